"""Benchmarks by name (zoo.data.benchmarks): the registry against its public sources, the sources
(CLIP_benchmark's WebDataset layout on disk and in a Hugging Face cache, image folders), eval.py
--datasets on synthetic stand-ins in the real layouts with numbers equal to CLIP_benchmark's
computation, its result format, and the errors (nothing configured, missing set, empty set)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import zoo
from tests.cli_run import run
from zoo.data import benchmarks, eval_sets
from zoo.eval import evaluator

try:  # CLIP_benchmark's computation below is torch code; only the equality test needs it
  import torch
  import torch.nn.functional as F
except ImportError:
  torch = F = None

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}.", "art of the {c}."]


# ----------------------------------------------------------------------------- CLIP_benchmark
# Transcribed from CLIP_benchmark 1.6.2 (PyPI clip-benchmark==1.6.2; the same files at
# github.com/LAION-AI/CLIP_benchmark commit 48de38c1689fa6d8b4dd53e3370c669c3bb18117): clip_benchmark/metrics/zeroshot_classification.py (zero_shot_classifier,
# accuracy, run_classification's logits, evaluate's metric dict; sklearn's
# balanced_accuracy_score = the mean over the classes present in y_true of each class's recall)
# and clip_benchmark/metrics/zeroshot_retrieval.py (evaluate, recall_at_k). Installing the
# package pulls scikit-learn, pycocoevalcap and webdataset; the computation is what matters.


def cb_zero_shot_classifier(encode_text, tokenizer, classnames, templates):
  zeroshot_weights = []
  for classname in classnames:
    texts = [template.format(c=classname) for template in templates]
    class_embeddings = encode_text(tokenizer(texts))
    class_embedding = F.normalize(class_embeddings, dim=-1).mean(dim=0)
    class_embedding /= class_embedding.norm()
    zeroshot_weights.append(class_embedding)
  return torch.stack(zeroshot_weights, dim=1)


def cb_accuracy(output, target, topk=(1,)):
  pred = output.topk(max(topk), 1, True, True)[1].t()
  correct = pred.eq(target.view(1, -1).expand_as(pred))
  n = len(target)
  # CLIP_benchmark: float(<1-element array>); numpy >= 2.5 refuses that, so [0] takes the element.
  return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / n
          for k in topk]


def cb_balanced_accuracy(y_true, y_pred):
  classes = np.unique(y_true)
  return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes]))


def cb_classification(image_features, classifier, target, num_classes):
  logits = 100. * F.normalize(image_features, dim=-1) @ classifier
  pred = logits.argmax(axis=1)
  if num_classes >= 5:
    acc1, acc5 = cb_accuracy(logits, target, topk=(1, 5))
  else:
    acc1, = cb_accuracy(logits, target, topk=(1,))
    acc5 = float("nan")
  return {"acc1": acc1, "acc5": acc5,
          "mean_per_class_recall": cb_balanced_accuracy(target.numpy(), pred.numpy())}


def cb_recall_at_k(scores, positive_pairs, k):
  nb_texts, nb_images = scores.shape
  topk_indices = torch.topk(scores, k, dim=1)[1]
  nb_positive = positive_pairs.sum(dim=1)
  topk_indices_onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
  positive_pairs_reshaped = positive_pairs.view(nb_texts, 1, nb_images)
  nb_true_positive = (topk_indices_onehot * positive_pairs_reshaped).sum(dim=(1, 2))
  return nb_true_positive / nb_positive


def cb_retrieval(images_emb, texts_emb, texts_image_index, recall_k_list=(1, 5, 10)):
  scores = texts_emb @ images_emb.t()
  positive_pairs = torch.zeros_like(scores, dtype=bool)
  positive_pairs[torch.arange(len(scores)), texts_image_index] = True
  metrics = {}
  for k in recall_k_list:
    metrics[f"image_retrieval_recall@{k}"] = (cb_recall_at_k(scores, positive_pairs, k) > 0).float().mean().item()
    metrics[f"text_retrieval_recall@{k}"] = (cb_recall_at_k(scores.T, positive_pairs.T, k) > 0).float().mean().item()
  return metrics


# ----------------------------------------------------------------------------- synthetic sets


def _encode(image: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
                              **({"lossless": True} if fmt == "webp" else {}))
  return buf.getvalue()


def write_cb_wds(root: str, samples: list[dict], *, per_shard: int, classnames=None, templates=None,
                 retrieval: bool = False) -> None:
  """CLIP_benchmark's WebDataset layout (datasets/builder.py build_wds_dataset): test/{i}.tar,
  test/nshards.txt, classnames.txt, zeroshot_classification_templates.txt, dataset_type.txt."""
  os.makedirs(os.path.join(root, "test"), exist_ok=True)
  shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)] or [[]]
  for s, chunk in enumerate(shards):
    with tarfile.open(os.path.join(root, "test", f"{s}.tar"), "w") as tar:
      for sample in chunk:
        for ext, data in sample.items():
          if ext == "__key__":
            continue
          info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  with open(os.path.join(root, "test", "nshards.txt"), "w") as f:
    f.write(f"{len(shards)}\n")
  if classnames:
    with open(os.path.join(root, "classnames.txt"), "w") as f:
      f.write("\n".join(classnames) + "\n")
  if templates:
    with open(os.path.join(root, "zeroshot_classification_templates.txt"), "w") as f:
      f.write("\n".join(templates) + "\n")
  if retrieval:
    with open(os.path.join(root, "dataset_type.txt"), "w") as f:
      f.write("retrieval\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A data root with wds_cifar10 (22 images, 10 classes, unbalanced, webp/png/jpg, 3 shards)
  and wds_mscoco_captions (12 images, 1-3 captions each), and a saved test-tiny model."""
  tmp = tmp_path_factory.mktemp("bench")
  rng = np.random.default_rng(0)
  labels = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 9, 2, 6]
  palette = rng.integers(0, 256, (10, 3))  # a colour per class + noise: no trivial scores
  images = [np.clip(palette[y] + rng.normal(0, 40, (24 + i % 3 * 8, 40, 3)), 0, 255).astype(np.uint8)
            for i, y in enumerate(labels)]
  fmts = ["webp", "png", "png"]
  cls = [{"__key__": f"s{i:04d}", fmts[i % 3]: _encode(im, fmts[i % 3]),
          "cls": str(y).encode()} for i, (im, y) in enumerate(zip(images, labels))]
  write_cb_wds(str(tmp / "data" / "wds_cifar10"), cls, per_shard=8, classnames=CIFAR10,
               templates=TEMPLATES)
  caps = [[f"caption {i} number {j}" for j in range(1 + i % 3)] for i in range(12)]
  cap_images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in caps]
  ret = [{"__key__": f"r{i:04d}", "png": _encode(im, "png"), "txt": "\n".join(c).encode()}
         for i, (im, c) in enumerate(zip(cap_images, caps))]
  write_cb_wds(str(tmp / "data" / "wds_mscoco_captions"), ret, per_shard=5, retrieval=True)
  from configs import demo

  config = demo.get_config()
  config.model, config.context_length = "test-tiny", 16
  zoo.save(zoo.create("test-tiny", seed=7), str(tmp / "model"), config.to_dict())
  return {"tmp": tmp, "root": str(tmp / "data"), "model": str(tmp / "model"), "labels": labels,
          "images": images, "captions": caps, "cap_images": cap_images}


# ----------------------------------------------------------------------------- registry


def test_imagenet_is_openais_protocol_exactly():
  meta = pytest.importorskip("open_clip.zero_shot_metadata")
  b = benchmarks.get("imagenet1k")
  assert b.task == benchmarks.CLASSIFICATION and b.classnames == tuple(meta.IMAGENET_CLASSNAMES)
  assert [t.format(c="X") for t in b.templates] == [t("X") for t in meta.OPENAI_IMAGENET_TEMPLATES]
  assert len(b.templates) == 80 and b.tfds == ("imagenet2012", "validation")
  for variant in ("imagenetv2", "imagenet_sketch"):
    assert benchmarks.get(variant).classnames == b.classnames
    assert benchmarks.get(variant).templates == b.templates
  a = benchmarks.get("imagenet-a")
  assert len(a.classnames) == 200 and set(a.classnames) < set(b.classnames)
  it = benchmarks.get("imagenet1k:it")
  assert it.language == "it" and len(it.classnames) == 1000 and it.key == "imagenet1k:it"
  assert it.classnames != b.classnames and "{c}" in it.templates[0]
  assert benchmarks.get("mscoco_captions").task == benchmarks.RETRIEVAL
  x = benchmarks.get("xtd10:de")
  assert x.language == "de" and {"en", "de", "jp"} <= set(x.languages)
  assert len(benchmarks.get("xtd200").languages) > 100
  assert len(benchmarks.get("cifar10").templates) == 18  # CLIP_benchmark's cifar10 prompts
  vtab, caltech = benchmarks.get("vtab/caltech101"), benchmarks.get("caltech101")
  assert vtab.classnames[0] == "accordion" and caltech.classnames[0] == "background"
  assert vtab.wds_name == "wds_vtab-caltech101" and benchmarks.get("cars").classnames is None
  with pytest.raises(ValueError, match="unknown benchmark 'imagenet2k'.*imagenet1k"):
    benchmarks.get("imagenet2k")
  with pytest.raises(ValueError, match="no language 'xx'"):
    benchmarks.get("imagenet1k:xx")


# ----------------------------------------------------------------------------- sources


def test_sources_hub_cache_and_image_folder(world, tmp_path, monkeypatch):
  hub = pytest.importorskip("huggingface_hub")
  # A Hugging Face cache holding clip-benchmark/wds_cifar10 (offline: read from the cache only).
  repo = tmp_path / "hub" / "datasets--clip-benchmark--wds_cifar10"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text("a" * 40)
  snap = repo / "snapshots" / ("a" * 40)
  snap.parent.mkdir()
  os.symlink(os.path.join(world["root"], "wds_cifar10"), snap)
  monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("ZOO_DATA", raising=False)
  loc = benchmarks.locate("cifar10", "")
  assert loc.kind == "wds" and loc.classnames == tuple(CIFAR10) and loc.templates == tuple(TEMPLATES)
  got = list(benchmarks.classification_examples("cifar10"))
  assert [y for _, y in got] == world["labels"]
  for (im, _), want in zip(got, world["images"]):
    assert im.dtype == np.uint8 and np.array_equal(im, want)  # webp lossless / png
  # Random access (few-shot draws): labels without decoding, each image decoded when read.
  labels, load = benchmarks.classification_index("cifar10")
  assert labels.tolist() == world["labels"]
  assert np.array_equal(load(len(labels) - 1), world["images"][-1]) and np.array_equal(
      load(0), world["images"][0])
  # An image folder, one sub-folder per class (sorted = label order), under DATA_ROOT/<name>/test.
  for i, name in enumerate(["apple", "bear"]):
    d = tmp_path / "root" / "cifar100" / "test" / name
    d.mkdir(parents=True)
    for j in range(2 + i):
      Image.fromarray(np.full((8, 8, 3), 40 * j, np.uint8)).save(d / f"{j}.png")
  monkeypatch.setenv("ZOO_DATA", str(tmp_path / "root"))
  with pytest.raises(ValueError, match="has 2 class folders; the benchmark has 10 classes"):
    benchmarks.class_names_and_templates("cifar10", path=str(tmp_path / "root" / "cifar100"))
  assert [y for _, y in benchmarks.classification_examples("cifar100")] == [0, 0, 1, 1, 1]
  labels, load = benchmarks.classification_index("cifar100")
  assert labels.tolist() == [0, 0, 1, 1, 1] and np.array_equal(load(2), np.zeros((8, 8, 3)))
  names, templates = benchmarks.class_names_and_templates("cifar100")
  assert names == ["apple", "bear"] and templates == list(benchmarks.get("cifar100").templates)
  # Missing: one line naming every place looked and how to get it; an empty set is an error.
  with pytest.raises(benchmarks.MissingDataset) as e:
    benchmarks.locate("imagenet1k")
  msg = str(e.value)
  assert "\n" not in msg and str(tmp_path / "root" / "wds_imagenet1k") in msg
  assert "hf-hub:clip-benchmark/wds_imagenet1k" in msg and "huggingface-cli download" in msg
  write_cb_wds(str(tmp_path / "empty"), [], per_shard=1, classnames=CIFAR10, templates=TEMPLATES)
  sets = eval_sets.benchmark_eval_sets(f"cifar10={tmp_path / 'empty'}", image_size=32,
                                       mean=(0.5,) * 3, std=(0.5,) * 3)
  with pytest.raises(ValueError, match="yielded no images"):
    evaluator.eval_benchmark(zoo.create("test-tiny"), sets["cifar10"], zoo.get_tokenizer("test-tiny"))


# ----------------------------------------------------------------------------- eval.py


def test_eval_without_an_eval_set_is_an_error(world):
  proc = run("eval.py", "--checkpoint", world["model"], "--config", "configs/clip_vit_b16.py",
             "--output", str(world["tmp"] / "out0"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  err = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith("eval.py: error: nothing to evaluate"), err
  for way in ("--datasets", "--config.eval.datasets", "--config.data.eval_shards",
              "--config.data.eval_sets", "--config.data.tfds.name"):
    assert way in err[0]
  assert not os.path.exists(world["tmp"] / "out0" / "metrics.json")


def test_eval_datasets_equal_clip_benchmark(world):
  pytest.importorskip("torch")
  out = world["tmp"] / "out"
  proc = run("eval.py", "--checkpoint", world["model"], "--datasets", "cifar10,mscoco_captions",
             "--data_root", world["root"], "--output", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "zeroshot_classification" in proc.stdout and "zeroshot_retrieval" in proc.stdout
  assert "acc1" in proc.stdout and "image R@5" in proc.stdout and "text R@10" in proc.stdout
  with open(out / "benchmarks.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [(r["dataset"], r["task"], r["language"]) for r in records] == [
      ("cifar10", "zeroshot_classification", "en"), ("mscoco_captions", "zeroshot_retrieval", "en")]
  assert all(set(r) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
             for r in records)
  assert records[0]["num_images"] == 22 and records[1]["num_images"] == 12
  metrics = json.loads((out / "metrics.json").read_text())[-1]
  assert metrics["cifar10/top1"] == records[0]["metrics"]["acc1"]

  # CLIP_benchmark's computation on the same model, images (decoded from the bytes the test
  # wrote) and labels, its class names and templates read from the set's own files.
  model, tokenizer, _ = zoo.load(world["model"])
  from zoo import transforms

  mc = model.config
  pre = transforms.make_preprocess(mc.vision.image_size, mc.image_mean, mc.image_std)

  def enc_img(images):
    return torch.from_numpy(np.array(model.encode_image(np.stack([pre(i) for i in images]))))

  def enc_txt(tokens):
    return torch.from_numpy(np.array(model.encode_text(np.asarray(tokens))))

  tok = lambda texts: np.asarray(tokenizer(texts))  # noqa: E731
  clf = cb_zero_shot_classifier(enc_txt, tok, CIFAR10, TEMPLATES)
  ref = cb_classification(enc_img(world["images"]), clf, torch.tensor(world["labels"]), 10)
  # Not degenerate: some hits and misses; unbalanced classes, so acc1 != mean per-class recall.
  assert 0 < ref["acc1"] < ref["acc5"] < 1 and ref["acc1"] != ref["mean_per_class_recall"]
  for k, v in ref.items():
    assert records[0]["metrics"][k] == pytest.approx(v, abs=1e-9), k
  texts = [c for caps in world["captions"] for c in caps]
  index = [i for i, caps in enumerate(world["captions"]) for _ in caps]
  ref = cb_retrieval(F.normalize(enc_img(world["cap_images"]), dim=-1),
                     F.normalize(enc_txt(tok(texts)), dim=-1), index)
  assert set(ref) == set(records[1]["metrics"])
  for k, v in ref.items():  # CLIP_benchmark averages in float32; one query is 1/24 or 1/12
    assert records[1]["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_train_time_config_and_report_tables(world):
  from configs import demo
  from zoo.eval import report
  from zoo.train import loop

  config = demo.get_config()
  config.data.eval_size = 8
  config.eval.datasets, config.eval.data_root = "cifar10,vtab/cifar10=" + os.path.join(
      world["root"], "wds_cifar10"), world["root"]
  model = zoo.create("test-tiny")
  sets = loop.build_eval_sets(config, model, None)
  assert {"zeroshot", "retrieval", "cifar10", "vtab.cifar10"} <= set(sets)
  assert sets["vtab.cifar10"]["benchmark"]["dataset"] == "vtab/cifar10"
  assert sets["cifar10"]["class_names"] == CIFAR10 and sets["cifar10"]["templates"] == TEMPLATES
  metrics = {"cifar10/top1": 0.25, "cifar10/top5": 0.5, "cifar10/mean_per_class_recall": 0.2,
             "cifar10/num_images": 22.0, "vtab.cifar10/top1": 0.75, "vtab.cifar10/top5": 1.0,
             "vtab.cifar10/mean_per_class_recall": 0.6, "vtab.cifar10/num_images": 22.0,
             "zeroshot/top1": 0.5}
  records = report.benchmark_records(metrics, sets, model="m", pretrained="p")
  assert [r["dataset"] for r in records] == ["cifar10", "vtab/cifar10"]
  assert records[1]["metrics"] == {"acc1": 0.75, "acc5": 1.0, "mean_per_class_recall": 0.6}
  table = report.format_benchmark_tables(records)
  assert table.count("zeroshot_classification") == 1
  average = next(line for line in table.splitlines() if "average" in line)
  assert "0.5000" in average and "0.7500" in average and "0.4000" in average and "44" in average


def test_a_broken_model_is_refused_not_scored(world):
  """A benchmark set on a model with NaN weights raises instead of reporting a score (argmax
  over NaN logits would give class 0 for every image)."""
  from configs import demo
  from zoo.eval import suite
  from zoo.train import loop

  config = demo.get_config()
  config.eval.datasets, config.eval.data_root = "cifar10", world["root"]
  model, _, _ = zoo.load(world["model"])
  sets = loop.build_eval_sets(config, model, None)
  tokenizer = loop.make_tokenizer(config, model)
  good = suite.evaluate(model, {"cifar10": sets["cifar10"]}, tokenizer)
  assert 0 < good["cifar10/top1"] < 1
  nnx.update(model, jax.tree.map(lambda x: x * np.nan, nnx.state(model, nnx.Param)))
  with pytest.raises(evaluator.NonFiniteError, match="non-finite features"):
    suite.evaluate(model, {"cifar10": sets["cifar10"]}, tokenizer)
