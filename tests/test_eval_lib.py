"""eval_lib: metrics against direct numpy computations, encoders against the model, files."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import zoo
from zoo.eval import evaluator, report, suite

EOT = 49407


def simple_tokenizer(texts, context_length=77):
  """Deterministic char-level ids ending in EOT (the largest id, as CLIP's argmax pooling wants)."""
  out = np.zeros((len(texts), context_length), np.int32)
  for i, t in enumerate(texts):
    ids = [1 + (ord(ch) * 31) % 40000 for ch in t][: context_length - 1] + [EOT]
    out[i, : len(ids)] = ids
  return out


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def model():
  return zoo.create("test-tiny")


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).normal(size=(13, 32, 32, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- zero-shot metrics


def numpy_zero_shot(img, labels, w):
  logits = 100.0 * img @ w
  order = np.argsort(-logits, axis=1, kind="stable")
  rank = np.argmax(order == labels[:, None], axis=1)
  c = w.shape[1]
  top1 = (rank == 0).mean()
  top5 = (rank < min(5, c)).mean()
  mpcr = np.mean([(rank[labels == k] == 0).mean() for k in np.unique(labels)])
  return top1, top5, mpcr


@pytest.mark.parametrize("num_classes", [3, 7, 20])
def test_zero_shot_metrics_match_numpy(num_classes):
  rng = np.random.default_rng(num_classes)
  img = normalize(rng.normal(size=(64, 16)))
  w = normalize(rng.normal(size=(num_classes, 16))).T
  labels = rng.integers(0, num_classes, size=64)
  m = evaluator.zero_shot_metrics(img, labels, w)
  top1, top5, mpcr = numpy_zero_shot(img, labels, w)
  assert m["top1"] == pytest.approx(top1)
  assert m["top5"] == pytest.approx(top5)
  assert m["mean_per_class_recall"] == pytest.approx(mpcr)
  if num_classes <= 5:
    assert m["top5"] == 1.0  # top-min(5, C) covers every class
  else:
    assert m["top5"] < 1.0


def test_zero_shot_metrics_hand_cases():
  w = np.eye(4, dtype=np.float32)  # E = C = 4: an image one-hot at class k is class k
  labels = np.array([0, 1, 2, 3, 3, 3])
  perfect = evaluator.zero_shot_metrics(np.eye(4)[labels], labels, w)
  assert perfect == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}
  # Images of class 3 predicted as class 2 twice out of three: top1 = 4/6, recall(3) = 1/3.
  preds = np.array([0, 1, 2, 3, 2, 2])
  m = evaluator.zero_shot_metrics(np.eye(4)[preds], labels, w)
  assert m["top1"] == pytest.approx(4 / 6)
  assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 1 + 1 / 3) / 4)
  # Ties (all logits equal): the lowest class index wins, as np.argmax.
  m = evaluator.zero_shot_metrics(np.ones((4, 4)), np.array([0, 1, 2, 3]), w)
  assert m["top1"] == 0.25 and m["top5"] == 1.0


def test_zero_shot_metrics_bad_labels():
  with pytest.raises(ValueError, match="labels must lie in"):
    evaluator.zero_shot_metrics(np.eye(3), np.array([0, 1, 3]), np.eye(3))
  with pytest.raises(ValueError, match="do not fit"):
    evaluator.zero_shot_metrics(np.eye(3), np.array([0, 1, 2]), np.eye(4))


# ----------------------------------------------------------------------------- retrieval metrics


def numpy_retrieval(img, txt, image_to_texts, k):
  scores = txt @ img.T
  t2i = [[i for i, ts in enumerate(image_to_texts) if j in ts] for j in range(len(txt))]
  img_hits = [bool(set(np.argsort(-scores[j], kind="stable")[:k]) & set(t2i[j])) for j in range(len(txt))]
  txt_hits = [bool(set(np.argsort(-scores[:, i], kind="stable")[:k]) & set(image_to_texts[i]))
              for i in range(len(img))]
  return np.mean(img_hits), np.mean(txt_hits)


def test_retrieval_perfect_and_permutation():
  img = np.eye(6, dtype=np.float32)
  perfect = evaluator.retrieval_metrics(img, img, [[i] for i in range(6)], ks=(1, 5))
  assert all(v == 1.0 for v in perfect.values())
  # Text j looks exactly like image perm[j] but describes image j: a hit at 1 iff perm[j] == j.
  perm = np.array([0, 1, 3, 2, 5, 4])
  txt = img[perm] + 0.5 * img  # own image scores 0.5, the permuted one 1.0 (or 1.5 if same)
  m = evaluator.retrieval_metrics(img, txt, [[i] for i in range(6)], ks=(1, 2))
  assert m["image_retrieval_recall@1"] == pytest.approx(2 / 6)
  assert m["text_retrieval_recall@1"] == pytest.approx(2 / 6)
  assert m["image_retrieval_recall@2"] == 1.0 and m["text_retrieval_recall@2"] == 1.0


def test_retrieval_multiple_positives_and_ties_match_numpy():
  rng = np.random.default_rng(1)
  n = 20
  image_to_texts = [[2 * i, 2 * i + 1] for i in range(n)]  # two captions each, like COCO's five
  # Small integer features: scores are integers, so many are exactly tied.
  img = rng.integers(-1, 2, size=(n, 6)).astype(np.float32)
  txt = (np.repeat(img, 2, axis=0) + rng.integers(-1, 2, size=(2 * n, 6))).astype(np.float32)
  scores = txt @ img.T
  assert any(len(np.unique(row)) < len(row) for row in scores)  # ties really occur
  m = evaluator.retrieval_metrics(img, txt, image_to_texts, ks=(1, 5, 10))
  for k in (1, 5, 10):
    i_r, t_r = numpy_retrieval(img, txt, image_to_texts, k)
    assert m[f"image_retrieval_recall@{k}"] == pytest.approx(i_r)
    assert m[f"text_retrieval_recall@{k}"] == pytest.approx(t_r)
  assert 0 < m["text_retrieval_recall@1"] < 1


def test_retrieval_any_positive_counts():
  img = np.eye(3, dtype=np.float32)
  # Image 0 has texts 0 and 1; text 1 is the best match of image 0, text 0 is the worst.
  txt = np.array([[-1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
  m = evaluator.retrieval_metrics(img, txt, [[0, 1], [2], [3]], ks=(1,))
  assert m["text_retrieval_recall@1"] == 1.0
  assert m["image_retrieval_recall@1"] == pytest.approx(3 / 4)  # text 0 ranks image 0 last


def test_retrieval_bad_input():
  img = np.eye(3)
  with pytest.raises(ValueError, match="belong to no image"):
    evaluator.retrieval_metrics(img, img, [[0], [1], [1]])
  with pytest.raises(ValueError, match=r"image_to_texts\[1\] is empty"):
    evaluator.retrieval_metrics(img, img, [[0, 2], [], [1]])
  with pytest.raises(ValueError, match="outside"):
    evaluator.retrieval_metrics(img, img, [[0], [1], [5]])


# ----------------------------------------------------------------------------- encoders


def test_encode_images_matches_model_and_compiles_once(model, images):
  expected = normalize(np.asarray(model.encode_image(images), np.float64))
  before = evaluator._encode_batch._cache_size()
  out = evaluator.encode_images(model, images, batch_size=4)  # 13 = 4 + 4 + 4 + 1 (padded)
  assert evaluator._encode_batch._cache_size() - before == 1
  assert out.dtype == np.float32 and out.shape == (13, 32)
  np.testing.assert_allclose(out, expected, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)


def test_encode_images_sharded_equals_unsharded(model, images):
  unsharded = evaluator.encode_images(model, images, batch_size=4)
  devices = np.array(jax.devices()).reshape(2, 2, 2)
  mesh = Mesh(devices, ("data", "fsdp", "tensor"))
  sharded = evaluator.encode_images(model, images, batch_size=6, mesh=mesh)  # rounded up to 8
  np.testing.assert_allclose(sharded, unsharded, atol=2e-5)
  mesh8 = Mesh(np.array(jax.devices()), ("data",))
  np.testing.assert_allclose(evaluator.encode_images(model, images, mesh=mesh8), unsharded, atol=2e-5)
  with pytest.raises(ValueError, match="batch axes"):
    evaluator.encode_images(model, images, mesh=Mesh(np.array(jax.devices()), ("tensor",)))


def test_encode_with_sharded_parameters(model, images):
  """The training layout: parameters sharded by zoo.models.sharding's rules over a 4-axis mesh."""
  from flax import nnx

  from zoo.models import sharding

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, state = nnx.split(model)
  sharded_model = nnx.merge(graphdef, sharding.shard_state(state, sharding.state_shardings(state, mesh)))
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(nnx.state(sharded_model)))
  tokens = simple_tokenizer([f"text {i}" for i in range(11)])
  np.testing.assert_allclose(evaluator.encode_images(sharded_model, images, batch_size=8, mesh=mesh),
                             evaluator.encode_images(model, images), atol=2e-5)
  np.testing.assert_allclose(evaluator.encode_texts(sharded_model, tokens, batch_size=4, mesh=mesh),
                             evaluator.encode_texts(model, tokens), atol=2e-5)


def test_encode_texts_matches_model(model):
  tokens = simple_tokenizer(["a", "bb cc", "a photo of a dog", "x" * 100, "z"])
  expected = normalize(np.asarray(model.encode_text(tokens), np.float64))
  np.testing.assert_allclose(evaluator.encode_texts(model, tokens, batch_size=2), expected, atol=2e-5)
  with pytest.raises(ValueError, match=r"expected \[N, L\]"):
    evaluator.encode_texts(model, tokens[0])


def test_zero_shot_classifier_averages_normalized_templates(model):
  classes = ["cat", "dog", "red car"]
  templates = ["a photo of a {}.", "a drawing of a {c}", lambda c: f"{c}!"]
  w = evaluator.zero_shot_classifier(model, simple_tokenizer, classes, templates)
  assert w.shape == (32, 3) and w.dtype == np.float32
  texts = [[f"a photo of a {c}.", f"a drawing of a {c}", f"{c}!"] for c in classes]
  expected = []
  for per_class in texts:
    emb = np.asarray(model.encode_text(simple_tokenizer(per_class)), np.float64)
    expected.append(normalize(normalize(emb).mean(axis=0)))
  np.testing.assert_allclose(w, np.stack(expected, axis=1), atol=2e-5)
  with pytest.raises(ValueError, match="placeholder"):
    evaluator.zero_shot_classifier(model, simple_tokenizer, classes, ["no placeholder"])


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_dispatch(model, images):
  labels = np.array([i % 3 for i in range(13)])
  captions = [f"caption {j}" for j in range(26)]
  eval_sets = {
      "zeroshot": {"kind": "zeroshot", "images": images, "labels": labels,
                   "class_names": ["a", "b", "c"], "templates": ["{}", "a {}"]},
      "retrieval": {"kind": "retrieval", "images": images, "captions": captions,
                    "image_to_captions": [[2 * i, 2 * i + 1] for i in range(13)]},
  }
  out = suite.evaluate(model, eval_sets, simple_tokenizer, batch_size=8)
  img = evaluator.encode_images(model, images)
  w = evaluator.zero_shot_classifier(model, simple_tokenizer, ["a", "b", "c"], ["{}", "a {}"])
  zs = evaluator.zero_shot_metrics(img, labels, w)
  rt = evaluator.retrieval_metrics(img, evaluator.encode_texts(model, simple_tokenizer(captions)),
                                  eval_sets["retrieval"]["image_to_captions"])
  expected = {**{f"zeroshot/{k}": v for k, v in zs.items()}, **{f"retrieval/{k}": v for k, v in rt.items()}}
  assert set(out) == set(expected)
  assert "zeroshot/top1" in out and "retrieval/image_retrieval_recall@1" in out
  for k in expected:
    assert out[k] == pytest.approx(expected[k]), k

  calls = []

  def count_images(model, spec, tokenizer, *, mesh, batch_size):
    calls.append(batch_size)
    return {"n": float(len(spec["images"]))}

  assert suite.evaluate(model, {"c": {"kind": "count", "images": images, "batch_size": 3}},
                       simple_tokenizer, prefix_by_set=False,
                       kinds={"count": count_images}) == {"n": 13.0}
  assert calls == [3]
  with pytest.raises(ValueError, match="unknown kind 'nope'"):
    suite.evaluate(model, {"x": {"kind": "nope"}}, simple_tokenizer)
  with pytest.raises(ValueError, match=r"misses keys \['labels'\]"):
    suite.evaluate(model, {"x": {"kind": "zeroshot", "images": images, "class_names": ["a"],
                                    "templates": ["{}"]}}, simple_tokenizer)


# ----------------------------------------------------------------------------- files


def test_append_metrics_appends_and_replaces(tmp_path):
  workdir = tmp_path / "run"
  report.append_metrics(workdir, 20, {"zeroshot/top1": np.float32(0.5)})
  report.append_metrics(workdir, 10, {"zeroshot/top1": 0.25, "retrieval/x": 0.1})
  report.append_metrics(workdir, 20, {"zeroshot/top1": 0.75})  # re-evaluated: replaced
  with open(workdir / "metrics.json") as f:
    records = json.load(f)
  assert records == [{"step": 10, "zeroshot/top1": 0.25, "retrieval/x": 0.1},
                     {"step": 20, "zeroshot/top1": 0.75}]
  report.append_metrics(workdir, 10, {"long/r1": 0.5}, merge=True)
  assert report.read_metrics(workdir)[0] == {"step": 10, "zeroshot/top1": 0.25, "retrieval/x": 0.1,
                                               "long/r1": 0.5}
  assert os.listdir(workdir) == ["metrics.json"]  # no temp files left behind
  (workdir / "metrics.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    report.append_metrics(workdir, 30, {"a": 1.0})


def test_format_table():
  text = report.format_table({"zeroshot/top1": 0.123456, "retrieval/image_retrieval_recall@1": 1.0},
                               title="step 7")
  assert "zeroshot/top1" in text and "0.1235" in text
  assert "retrieval/image_retrieval_recall@1" in text and "1.0000" in text and "step 7" in text


def test_family_eval_kinds_known_without_a_side_effect_import():
  """A fresh process: evaluate knows the families' kinds with nothing but zoo.eval.suite
  imported (no `import zoo.families` first), and a family added at run time brings its kinds."""
  import subprocess
  import sys

  code = ("from zoo.eval import suite\n"
          "try:\n"
          "  suite.evaluate(None, {'r': {'kind': 'region_zeroshot'}}, lambda t: t)\n"
          "  raise SystemExit('no error')\n"
          "except ValueError as e:\n"
          "  assert 'misses key' in str(e), e\n"
          "assert {'zeroshot', 'retrieval', 'region_zeroshot', 'long_retrieval', "
          "'babel_zeroshot'} <= set(suite.eval_kinds())\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
