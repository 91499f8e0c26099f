"""Eval sets for zoo.eval.evaluator.evaluate: the demo's held-out splits, WebDataset retrieval shards,
a TFDS zero-shot set and Babel-ImageNet label files (host-local numpy, the same on every host), and
benchmarks by name (zoo.data.benchmarks; kind "benchmark", streamed in chunks)."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from zoo import transforms
from zoo.data import babel, benchmarks, demo as demo_lib, webdataset as wds

log = logging.getLogger("zoo.data")
Tokenizer = Callable[[list[str]], np.ndarray]


def config_value(data_cfg: Any, key: str, default: Any) -> Any:
  """data_cfg[key] for a ConfigDict / dict, `default` when absent or empty."""
  try:
    value = data_cfg.get(key, default)
  except AttributeError:
    value = getattr(data_cfg, key, default)
  return default if value is None or (isinstance(value, str) and not value) else value



# ----------------------------------------------------------------------------- eval sets

DEMO_EVAL_SETS = ("zeroshot", "retrieval")
ALL_DEMO_EVAL_SETS = ("zeroshot", "retrieval", "retrieval_long", "regions", "multilingual")


def _demo_items(split: str, size: int, render_size: int) -> list[dict]:
  src = demo_lib.DemoSource(size, split, render_size)
  return [src[i] for i in range(size)]


def _pad_regions(items: Sequence[Mapping[str, Any]], crop_fn, max_regions: int):
  n = len(items)
  boxes = np.zeros((n, max_regions, 4), np.float32)
  mask = np.zeros((n, max_regions), bool)
  labels = np.full((n, max_regions), -1, np.int32)
  captions: list[list[str]] = []
  for i, s in enumerate(items):
    h, w = np.asarray(s["image"]).shape[:2]
    moved, keep = transforms.transform_boxes(s["boxes"], crop_fn(h, w), (h, w))
    idx = np.flatnonzero(keep)[:max_regions]
    boxes[i, :len(idx)], mask[i, :len(idx)] = moved[idx], True
    labels[i, :len(idx)] = np.asarray(s["region_labels"])[idx]
    captions.append([s["region_captions"][j] for j in idx])
  return boxes, mask, labels, captions


def demo_eval_sets(data_cfg: Any, *, image_size: int, mean: Sequence[float],
                   std: Sequence[float]) -> dict[str, dict]:
  """Held-out demo eval sets (disjoint seeds from train), chosen by `data.eval_sets`.

  * zeroshot (kind "zeroshot"): images, labels, class_names, templates (English);
  * retrieval (kind "retrieval"): images, one caption each;
  * retrieval_long (kind "retrieval"): the same images with their long captions;
  * regions (kind "region_zeroshot"): images, boxes [N, R, 4], box_mask, region_labels,
    region_captions, class_names, templates — for region heads;
  * multilingual (kind "babel_zeroshot"): images, labels, and Babel-ImageNet-format
    `class_labels` / `prompts` for every demo language (upper-case codes), all 24 classes;
  * babel (kind "babel_zeroshot", when `data.babel_labels` names a Babel label file): the
    multilingual split's images scored with that file (and `data.babel_prompts`).
  """
  size = int(config_value(data_cfg, "eval_size", 1000))
  render = int(config_value(data_cfg, "render_size", 0)) or int(image_size)
  names = config_value(data_cfg, "eval_sets", DEMO_EVAL_SETS)
  names = [x.strip() for x in names.split(",")] if isinstance(names, str) else list(names)
  bad = [n for n in names if n not in ALL_DEMO_EVAL_SETS]
  if bad:
    raise ValueError(f"unknown data.eval_sets {bad}; demo eval sets: {', '.join(ALL_DEMO_EVAL_SETS)}")
  pre = transforms.make_preprocess(image_size, mean, std)
  cache: dict[str, list[dict]] = {}

  def items(split):
    if split not in cache:
      cache[split] = _demo_items(split, size, render)
    return cache[split]

  def images(split):
    return pre.batch([s["image"] for s in items(split)])

  sets: dict[str, dict] = {}
  if "zeroshot" in names:
    sets["zeroshot"] = {"kind": "zeroshot", "images": images("zeroshot"),
                        "labels": np.asarray([s["label"] for s in items("zeroshot")], np.int32),
                        "class_names": demo_lib.class_names(), "templates": demo_lib.templates()}
  if "retrieval" in names or "retrieval_long" in names:
    ims = images("retrieval")
    one_each = [[i] for i in range(size)]
    if "retrieval" in names:
      sets["retrieval"] = {"kind": "retrieval", "images": ims, "image_to_captions": one_each,
                           "captions": [s["caption"] for s in items("retrieval")]}
    if "retrieval_long" in names:
      sets["retrieval_long"] = {"kind": "retrieval", "images": ims, "image_to_captions": one_each,
                                "captions": [s["long_caption"] for s in items("retrieval")]}
  if "regions" in names:
    boxes, mask, labels, caps = _pad_regions(items("regions"), pre.crop_box,
                                             int(config_value(data_cfg, "max_regions", 4)))
    sets["regions"] = {"kind": "region_zeroshot", "images": images("regions"), "boxes": boxes,
                       "box_mask": mask, "region_labels": labels, "region_captions": caps,
                       "class_names": demo_lib.class_names(), "templates": demo_lib.templates()}
  if "multilingual" in names or config_value(data_cfg, "babel_labels", ""):
    ml_images = images("multilingual")
    ml_labels = np.asarray([s["label"] for s in items("multilingual")], np.int32)
  if "multilingual" in names:
    # Babel-ImageNet's format, in memory: every demo language (not only the training ones)
    # names all classes.
    langs = demo_lib.LANGUAGES
    every = list(range(demo_lib.num_classes()))
    sets["multilingual"] = {
        "kind": "babel_zeroshot", "images": ml_images, "labels": ml_labels,
        "class_labels": {lang.upper(): [every, demo_lib.class_names(lang)] for lang in langs},
        "prompts": {lang.upper(): demo_lib.templates(lang) for lang in langs},
        "templates": demo_lib.templates("en")}
  if config_value(data_cfg, "babel_labels", ""):
    sets["babel"] = babel_set(data_cfg, ml_images, ml_labels)
  return sets


def babel_set(data_cfg: Any, images: np.ndarray, labels: np.ndarray) -> dict:
  """A "babel_zeroshot" eval set over (images, labels) from Babel-ImageNet's own files:
  `data.babel_labels` (labels JSON), `data.babel_prompts` (optional prompts JSON),
  `data.babel_languages` ("DE,FR,...": only those; default all), `data.babel_en` (auto |
  openai | file: English as the paper, OpenAI's 1000 ImageNet class names and 80 templates;
  auto = openai when the classes index ImageNet-1k)."""
  labels_file = config_value(data_cfg, "babel_labels", "")
  prompts_file = config_value(data_cfg, "babel_prompts", "")
  spec = {"kind": "babel_zeroshot", "images": images, "labels": labels,
          "class_labels": babel.load_babel_labels(labels_file),
          "prompts": babel.load_babel_prompts(prompts_file) if prompts_file else None}
  top = max(max(idx) for idx, _ in spec["class_labels"].values())
  en = str(config_value(data_cfg, "babel_en", "auto")).lower()
  if en not in ("auto", "openai", "file"):
    raise ValueError(f"data.babel_en={en!r}; expected auto | openai | file")
  if en == "openai" or (en == "auto" and max(top, int(labels.max()) if labels.size else 0) == 999):
    names, templates = babel.openai_imagenet()
    spec["class_labels"]["EN"] = (list(range(len(names))), names)
    spec["prompts"] = dict(spec["prompts"] or {}, EN=templates)
  langs = config_value(data_cfg, "babel_languages", "")
  if isinstance(langs, str):
    langs = [x.strip() for x in langs.split(",") if x.strip()]
  if langs:
    langs = [str(x).upper() for x in langs]
    unknown = [x for x in langs if x not in spec["class_labels"]]
    if unknown:
      raise ValueError(f"data.babel_languages names {unknown}, not in {labels_file} (it has "
                       f"{len(spec['class_labels'])} languages, e.g. "
                       f"{', '.join(sorted(spec['class_labels'])[:8])})")
    spec["languages"] = langs
  if labels.size and top > int(labels.max()) and top >= 1000:
    log.warning("babel labels %s index classes up to %d; the eval images' labels reach %d",
                labels_file, top, int(labels.max()))
  return spec


def language_adapters(data_cfg: Any) -> dict[str, str]:
  """`data.language_adapters` ("AR=dir,SW=dir") -> {language: zoo.models.lora adapter directory}."""
  given = config_value(data_cfg, "language_adapters", "")
  if not given:
    return {}
  if isinstance(given, Mapping):
    return {str(k): str(v) for k, v in given.items()}
  out = {}
  for item in str(given).split(","):
    lang, sep, path = item.strip().partition("=")
    if not sep or not lang or not path:
      raise ValueError(f"data.language_adapters entry {item!r}: expected LANG=adapter_directory")
    out[lang.strip()] = path.strip()
  return out


def webdataset_retrieval_set(shards: str | Sequence[str], *, image_size: int, mean: Sequence[float],
                             std: Sequence[float], max_samples: int = 0) -> dict:
  """Retrieval eval set (all samples of `shards`, every host) with eval preprocessing.

  Unusable samples are skipped; their number is in the set's `skipped` entry and logged.
  """
  source = wds.TarShardSource(wds.expand_shards(shards))
  pre = transforms.make_preprocess(image_size, mean, std)
  images, captions, skipped = [], [], 0
  for i in range(len(source)):
    if max_samples and len(images) >= max_samples:
      break
    raw = source[i]
    try:
      s = wds.decode_sample(raw)
    except wds.SkipSample as e:
      skipped += 1
      log.warning("eval data: skipped sample %s (%s)", raw.get("__key__"), e)
      continue
    images.append(pre(s["image"]))
    captions.append(s["caption"])
  source.close()
  if not images:
    raise ValueError(f"webdataset eval shards {shards!r} hold no usable sample ({skipped} skipped)")
  if skipped:
    log.warning("eval data: %d samples skipped in %s", skipped, shards)
  n = len(images)
  return {"kind": "retrieval", "images": np.stack(images), "captions": captions,
          "image_to_captions": [[i] for i in range(n)], "skipped": skipped}


def build_eval_sets(data_cfg: Any, *, tokenizer: Tokenizer | None = None, image_size: int,
                    mean: Sequence[float], std: Sequence[float]) -> dict[str, dict]:
  """Eval sets for `zoo.eval.evaluator.evaluate` (full sets, host-local numpy, same on every host).

  demo: the held-out sets of `demo_eval_sets` (`data.eval_sets`, default zeroshot +
  retrieval); webdataset: a retrieval set from `data.eval_shards` when given. Either way,
  `data.tfds` (a dict: name, split, data_dir, size, image_key, label_key) adds a TFDS
  zero-shot set named "tfds_<name>". The tokenizer is not needed: eval_lib tokenizes.
  """
  del tokenizer  # eval_lib tokenizes class prompts and captions itself
  name = config_value(data_cfg, "name", "demo")
  sets: dict[str, dict] = {}
  if name == "demo":
    sets.update(demo_eval_sets(data_cfg, image_size=image_size, mean=mean, std=std))
  elif name == "webdataset":
    eval_shards = config_value(data_cfg, "eval_shards", "")
    if eval_shards:
      sets["retrieval"] = webdataset_retrieval_set(
          eval_shards, image_size=image_size, mean=mean, std=std,
          max_samples=int(config_value(data_cfg, "eval_size", 0)))
  elif name != "fewshot":  # few-shot data: the family evaluates its own protocol
    raise ValueError(f"unknown data.name {name!r}; expected 'demo', 'webdataset' or 'fewshot'")
  tfds_cfg = config_value(data_cfg, "tfds", None)
  if tfds_cfg and config_value(tfds_cfg, "name", ""):
    from zoo.data import tfds as tfds_lib

    tfds_name = config_value(tfds_cfg, "name", "")
    tfds_set = tfds_lib.zero_shot_set(
        tfds_name, split=config_value(tfds_cfg, "split", "test"), data_dir=config_value(tfds_cfg, "data_dir", None),
        image_size=image_size, mean=mean, std=std, size=int(config_value(tfds_cfg, "size", 0)),
        image_key=config_value(tfds_cfg, "image_key", "image"), label_key=config_value(tfds_cfg, "label_key", "label"))
    sets[f"tfds_{tfds_name.split('/')[0].split(':')[0]}"] = tfds_set
    if config_value(data_cfg, "babel_labels", ""):  # Babel-ImageNet over the TFDS set (e.g. imagenet2012)
      sets["babel"] = babel_set(data_cfg, tfds_set["images"], tfds_set["labels"])
  elif name != "demo" and config_value(data_cfg, "babel_labels", ""):
    raise ValueError("data.babel_labels needs class-indexed eval images: the demo data or a "
                     "data.tfds set (e.g. imagenet2012)")
  adapters = language_adapters(data_cfg)
  for spec in sets.values():
    if adapters and spec["kind"] == "babel_zeroshot":
      spec["adapters"] = adapters
  return sets


def _chunks(examples, pre, chunk: int, size: int):
  """(float32 [n, H, W, 3] preprocessed images, their targets) chunks; decoding and
  preprocessing on a thread pool (PIL releases the GIL)."""
  examples = itertools.islice(examples, size) if size else examples
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    while True:
      block = list(itertools.islice(examples, chunk))
      if not block:
        return
      yield np.stack(list(pool.map(pre, [image for image, _ in block]))), [y for _, y in block]


def benchmark_set_name(bench: benchmarks.Benchmark) -> str:
  """The eval-set name of a benchmark: its key with '/' -> '.' (metrics are 'set/metric')."""
  return bench.key.replace("/", ".")


def benchmark_eval_sets(datasets: str | Sequence[str], *, data_root: str = "", split: str = "test",
                        size: int = 0, image_size: int, mean: Sequence[float],
                        std: Sequence[float], chunk: int = 1024) -> dict[str, dict]:
  """Kind "benchmark" eval sets for "name[:lang][=DIR|hf-hub:ORG/REPO],...": each is located now
  (a missing one fails here, in one line) and read when evaluated, `chunk` images at a time
  (`size` > 0: only the first `size`). The spec: task, class_names + templates (classification),
  `chunks()` -> iterator of (images, labels | caption lists), `source` (where it was found),
  `benchmark` (dataset, task, language: CLIP_benchmark's result fields)."""
  pre = transforms.make_preprocess(image_size, mean, std)
  sets: dict[str, dict] = {}
  for name, path in benchmarks.parse_names(datasets):
    bench = benchmarks.get(name)
    loc = benchmarks.locate(bench, data_root, split=split, path=path)
    spec = {"kind": "benchmark", "task": bench.task, "source": f"{loc.kind} {loc.path}",
            "benchmark": {"dataset": bench.name, "task": bench.task, "language": bench.language}}
    if bench.task == benchmarks.CLASSIFICATION:
      spec["class_names"], spec["templates"] = benchmarks.class_names_and_templates(
          bench, data_root, split, path=path)
      read = benchmarks.classification_examples
    else:
      read = benchmarks.retrieval_examples
    spec["chunks"] = lambda read=read, bench=bench, path=path: _chunks(
        read(bench, data_root, split, path=path), pre, chunk, size)
    sets[benchmark_set_name(bench)] = spec
  return sets
