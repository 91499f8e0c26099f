"""Benchmarks by name (CLIP_benchmark's): `get(name)` -> `Benchmark` (task, class names, prompt
templates, languages), `locate(name, data_root)` -> where its images are, and the readers
`classification_examples(name, data_root, split="test")` -> (uint8 HWC image, int label) and
`retrieval_examples(...)` -> (image, [captions]). `names()` lists the registry.

Class names and templates are CLIP_benchmark's (zoo/assets/benchmark_*.json; ImageNet's are
OpenAI's 1000 names and 80 templates, equal to open_clip's zero_shot_metadata); a set whose
names CLIP_benchmark takes from the data (cars, food101, ...) reads them from the source.
`NAME:LANG` picks a language (imagenet1k:it, xtd10:de). Sources, first found wins: CLIP_benchmark's
WebDataset layout (`test/{0..n-1}.tar` + `test/nshards.txt`, `classnames.txt`,
`zeroshot_classification_templates.txt`, `.cls` labels, `.txt` captions, one per line) in
DATA_ROOT/wds_<name> or DATA_ROOT/<name>, or in the Hugging Face cache (clip-benchmark/wds_<name>,
djghosh/wds_<name>_test; never downloaded here); an image folder DATA_ROOT/<name>[/test]/<class>/;
TFDS (DATA_ROOT/tfds) when it has the set. DATA_ROOT: the argument, else $ZOO_DATA.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from importlib import resources

import huggingface_hub
import numpy as np
from PIL import Image

from zoo.data import webdataset as wds

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order
IMAGE_FILES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
HUB_REPOS = ("clip-benchmark/wds_{}", "djghosh/wds_{}_test")
_VTAB = ("caltech101", "cifar10", "cifar100", "clevr_count_all", "clevr_closest_object_distance",
         "diabetic_retinopathy", "dmlab", "dsprites_label_orientation", "dsprites_label_x_position",
         "dtd", "eurosat", "kitti_closest_vehicle_distance", "flowers", "pets", "pcam", "resisc45",
         "smallnorb_label_azimuth", "smallnorb_label_elevation", "svhn")
_CLASSIFICATION = (
    "imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "imagenet-o",
    "objectnet", "cifar10", "cifar100", "food101", "cars", "pets", "flowers", "fgvc_aircraft",
    "sun397", "dtd", "eurosat", "caltech101", "mnist", "stl10", "gtsrb", "country211",
    "renderedsst2", "fer2013", "voc2007", "pcam", "svhn", "resisc45") + tuple(f"vtab/{n}" for n in _VTAB)
_RETRIEVAL = ("mscoco_captions", "flickr30k", "flickr8k", "multilingual_mscoco_captions",
              "crossmodal3600", "xtd10", "xtd200", "flickr30k-200")
_IMAGENET_NAMES = {"imagenetv2": "imagenet1k", "imagenet_sketch": "imagenet1k",
                   "vtab/caltech101": "caltech101_vtab"}
# TFDS name, split: sets whose TFDS labels index the same classes in the same order.
_TFDS = {"imagenet1k": ("imagenet2012", "validation"), "imagenetv2": ("imagenet_v2", "test"),
         "imagenet_sketch": ("imagenet_sketch", "test"), "cifar10": ("cifar10", "test"),
         "cifar100": ("cifar100", "test"), "mnist": ("mnist", "test"),
         "food101": ("food101", "validation"), "dtd": ("dtd", "test"),
         "flowers": ("oxford_flowers102", "test"), "pets": ("oxford_iiit_pet", "test"),
         "svhn": ("svhn_cropped", "test"), "stl10": ("stl10", "test")}


class MissingDataset(FileNotFoundError):
  """A benchmark's images are nowhere zoo looks; the message says where and how to get them."""


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark: `classnames` None = the data source names the classes; `language`: the one
  evaluated, `languages`: those the set has; `tfds`: (name, split) when TFDS has it."""

  name: str
  task: str
  classnames: tuple[str, ...] | None
  templates: tuple[str, ...]
  languages: tuple[str, ...] = ("en",)
  language: str = "en"
  tfds: tuple[str, str] | None = None

  @property
  def wds_name(self) -> str:
    """CLIP_benchmark's WebDataset name: wds_<name with '/' -> '-'>."""
    return "wds_" + self.name.replace("/", "-")

  @property
  def key(self) -> str:
    """`name` or `name:language`: the name metrics are reported under."""
    return self.name if self.language == "en" else f"{self.name}:{self.language}"


@functools.cache
def _asset(name: str) -> dict:
  data = json.loads(resources.files("zoo").joinpath("assets", f"benchmark_{name}.json").read_text("utf-8"))
  data.pop("_source", None)
  return data


def names() -> list[str]:
  """Every benchmark name (classification, then retrieval)."""
  return list(_CLASSIFICATION + _RETRIEVAL)


def get(name: str) -> Benchmark:
  """The benchmark `name` or `name:language` (a `UnknownBenchmark` ValueError names the known)."""
  base, _, lang = name.strip().partition(":")
  base = {"flickr30k_200": "flickr30k-200", "imagenet": "imagenet1k"}.get(base, base)
  if base not in _CLASSIFICATION + _RETRIEVAL:
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(names())} (NAME:LANG for a "
                     "language)")
  langs = tuple(_asset("languages").get(base, ("en",)))
  lang = lang or ("en" if "en" in langs else langs[0])
  if lang not in langs:
    raise ValueError(f"benchmark {base!r} has no language {lang!r}; it has {', '.join(langs)}")
  if base in _RETRIEVAL:
    return Benchmark(base, RETRIEVAL, None, (), langs, lang)
  short = base.split("/", 1)[-1]
  classnames, templates = _asset("classnames").get(lang, {}), _asset("templates").get(lang, {})
  key = _IMAGENET_NAMES.get(base, base)
  found = next((classnames[k] for k in (key, short) if k in classnames), None)
  prompts = next(templates[k] for k in (base, short, "imagenet1k") if k in templates)
  return Benchmark(base, CLASSIFICATION, tuple(found) if found else None, tuple(prompts), langs,
                   lang, _TFDS.get(base))


def data_root(given: str | None = None) -> str:
  """`given`, else $ZOO_DATA, else "" (no local root)."""
  return given or os.environ.get("ZOO_DATA", "")


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a benchmark's images are: kind "wds" | "folder" | "tfds", and the path (or TFDS
  data_dir); `classnames` / `templates` the source's own files (CLIP_benchmark: they win)."""

  kind: str
  path: str
  classnames: tuple[str, ...] | None = None
  templates: tuple[str, ...] | None = None


def _lines(path: str) -> tuple[str, ...] | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return tuple(line.strip() for line in f.read().splitlines())


def _is_wds(path: str, split: str) -> bool:
  return os.path.isfile(os.path.join(path, split, "nshards.txt")) or bool(
      glob.glob(os.path.join(path, split, "*.tar")))


def _hub_dirs(bench: Benchmark) -> list[tuple[str, str | None]]:
  """(repo id, snapshot dir or None) of the hub repos, from the local cache only."""
  out = []
  for pattern in HUB_REPOS:
    repo = pattern.format(bench.wds_name[4:])
    try:
      out.append((repo, huggingface_hub.snapshot_download(repo, repo_type="dataset",
                                                          local_files_only=True)))
    except Exception:  # not cached: not a source
      out.append((repo, None))
  return out


def _hub_path(spec: str) -> str:
  repo = spec[len("hf-hub:"):]
  try:
    return huggingface_hub.snapshot_download(repo, repo_type="dataset", local_files_only=True)
  except Exception:
    raise MissingDataset(f"{spec}: not in the Hugging Face cache (zoo does not download data); "
                         f"get it with: huggingface-cli download --repo-type dataset {repo}") from None


def locate(bench: Benchmark | str, root: str | None = None, *, split: str = "test",
           path: str | None = None) -> Location:
  """Where `bench`'s `split` is (see the module docstring), or `MissingDataset` naming every
  place looked in. `path`: a directory or hf-hub:ORG/REPO given for this set (NAME=PATH)."""
  bench = get(bench) if isinstance(bench, str) else bench
  root = data_root(root)
  looked: list[str] = []
  # Multilingual retrieval sets: one directory per language (their captions differ).
  lang_dirs = [bench.language] if bench.task == RETRIEVAL and len(bench.languages) > 1 else []
  candidates = [_hub_path(path) if path.startswith("hf-hub:") else path] if path else [
      os.path.join(root, d, *lang_dirs) for d in (bench.wds_name, bench.name) if root]
  for cand in candidates:
    looked.append(cand)
    if _is_wds(cand, split):
      return Location("wds", cand, _lines(os.path.join(cand, "classnames.txt")),
                      _lines(os.path.join(cand, "zeroshot_classification_templates.txt")))
    folder = os.path.join(cand, split) if os.path.isdir(os.path.join(cand, split)) else cand
    if bench.task == CLASSIFICATION and _class_dirs(folder):
      return Location("folder", folder)
  if path:
    raise MissingDataset(f"{bench.key}: {path} holds neither CLIP_benchmark's WebDataset layout "
                         f"({split}/nshards.txt + {split}/0.tar ...) nor class sub-folders")
  if not lang_dirs:
    for repo, snap in _hub_dirs(bench):
      looked.append(f"hf-hub:{repo} (cache)")
      if snap and _is_wds(snap, split):
        return Location("wds", snap, _lines(os.path.join(snap, "classnames.txt")),
                        _lines(os.path.join(snap, "zeroshot_classification_templates.txt")))
  if bench.tfds:
    tfds_dir = os.path.join(root, "tfds") if root else None
    looked.append(f"TFDS {bench.tfds[0]} ({tfds_dir or 'default data_dir'})")
    if _tfds_prepared(bench.tfds[0], tfds_dir):
      return Location("tfds", tfds_dir or "")
  where = "; ".join(looked) if root else "; ".join(looked) + " (no data root: set ZOO_DATA or " \
      "--config.eval.data_root)"
  sub = "/".join([bench.wds_name, *lang_dirs])
  raise MissingDataset(
      f"benchmark {bench.key}: no {split} data found (looked in: {where}); get it with: "
      f"huggingface-cli download --repo-type dataset clip-benchmark/{bench.wds_name} --local-dir "
      f"{os.path.join(root or '$ZOO_DATA', sub)}, or put one sub-folder of images per class in "
      f"{os.path.join(root or '$ZOO_DATA', bench.name, split)}")


def _tfds_prepared(name: str, data_dir: str | None) -> bool:
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  if not os.path.isdir(os.path.join(where, name.split("/")[0].split(":")[0])):
    return False  # nothing prepared there (and tfds is not asked: it warns on a missing one)
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    return False
  try:
    return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
  except Exception:  # unknown to this tfds version, or unreadable
    return False


def _class_dirs(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    return []
  return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


# ----------------------------------------------------------------------------- readers


def wds_shards(path: str, split: str = "test") -> list[str]:
  """The shards of CLIP_benchmark's layout: {0..nshards-1}.tar (nshards.txt), else all *.tar."""
  nshards = os.path.join(path, split, "nshards.txt")
  if os.path.isfile(nshards):
    with open(nshards) as f:
      n = int(f.read().strip())
    shards = [os.path.join(path, split, f"{i}.tar") for i in range(n)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
      raise MissingDataset(f"{nshards} says {n} shards; {len(missing)} are missing (e.g. "
                           f"{missing[0]}): the download is incomplete")
    return shards
  return sorted(glob.glob(os.path.join(path, split, "*.tar")),
                key=lambda s: (len(os.path.basename(s)), os.path.basename(s)))


def _wds_samples(path: str, split: str) -> Iterator[dict]:
  source = wds.TarShardSource(wds_shards(path, split))
  try:
    for i in range(len(source)):
      yield source[i]
  finally:
    source.close()


def _image(raw: dict) -> np.ndarray | None:
  key = next((k for k in IMAGE_KEYS if k in raw), None)
  return None if key is None else wds.decode_image(raw[key])


def read_image(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3] of an image file."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def class_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(class folder names in label order (sorted), [(image path, label)]) of `root/<class>/`;
  the image-folder source of benchmarks and of few-shot data (zoo.data.fewshot)."""
  classes = _class_dirs(root)
  files = [(os.path.join(root, cls, f), label) for label, cls in enumerate(classes)
           for f in sorted(os.listdir(os.path.join(root, cls))) if f.lower().endswith(IMAGE_FILES)]
  return classes, files


def classification_examples(name: str | Benchmark, data_root: str | None = None,
                            split: str = "test", *, path: str | None = None
                            ) -> Iterator[tuple[np.ndarray, int]]:
  """(uint8 RGB [H, W, 3] image, int label) of a classification benchmark, from whichever
  source `locate` finds (labels index `class_names(name, ...)`)."""
  bench = get(name) if isinstance(name, str) else name
  if bench.task != CLASSIFICATION:
    raise ValueError(f"{bench.key} is a {bench.task} benchmark, not classification")
  loc = locate(bench, data_root, split=split, path=path)
  if loc.kind == "wds":
    for raw in _wds_samples(loc.path, split):
      image = _image(raw)
      if image is None or "cls" not in raw:
        raise ValueError(f"{raw.get('__shard__')}: sample {raw.get('__key__')} lacks an image "
                         f"({'/'.join(IMAGE_KEYS)}) or its .cls label; it has {sorted(raw)}")
      yield image, int(raw["cls"].decode("utf-8").strip())
  elif loc.kind == "folder":
    for path_, label in class_folder(loc.path)[1]:
      yield read_image(path_), label
  else:
    from zoo.data import tfds as tfds_lib

    source = tfds_lib.data_source(bench.tfds[0], bench.tfds[1], loc.path or None)
    for i in range(len(source)):
      ex = source[i]
      image = np.asarray(ex["image"])
      yield (np.repeat(image, 3, -1) if image.shape[-1] == 1 else image), int(ex["label"])


def classification_index(name: str | Benchmark, data_root: str | None = None,
                         split: str = "test", *, path: str | None = None
                         ) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
  """(labels int32 [N], load(i) -> uint8 RGB [H, W, 3]) of a classification benchmark: labels
  read without decoding any image, images decoded on access (few-shot draws from a train split
  the size of ImageNet's without holding it in memory)."""
  bench = get(name) if isinstance(name, str) else name
  if bench.task != CLASSIFICATION:
    raise ValueError(f"{bench.key} is a {bench.task} benchmark, not classification")
  loc = locate(bench, data_root, split=split, path=path)
  if loc.kind == "wds":
    source = wds.TarShardSource(wds_shards(loc.path, split))
    labels = []
    for i in range(len(source)):
      raw = source[i]
      if "cls" not in raw or not any(k in raw for k in IMAGE_KEYS):
        raise ValueError(f"{raw['__shard__']}: sample {raw['__key__']} lacks an image "
                         f"({'/'.join(IMAGE_KEYS)}) or its .cls label; it has {sorted(raw)}")
      labels.append(int(raw["cls"].decode("utf-8").strip()))
    return np.asarray(labels, np.int32), lambda i: _image(source[int(i)])
  if loc.kind == "folder":
    files = class_folder(loc.path)[1]
    return (np.asarray([y for _, y in files], np.int32), lambda i: read_image(files[int(i)][0]))
  from zoo.data import tfds as tfds_lib

  tfds_source = tfds_lib.data_source(bench.tfds[0], bench.tfds[1], loc.path or None)

  def load(i: int) -> np.ndarray:
    image = np.asarray(tfds_source[int(i)]["image"])
    return np.repeat(image, 3, -1) if image.shape[-1] == 1 else image

  return (np.asarray([int(tfds_source[i]["label"]) for i in range(len(tfds_source))], np.int32),
          load)


def class_names_and_templates(name: str | Benchmark, data_root: str | None = None,
                              split: str = "test", *, path: str | None = None
                              ) -> tuple[list[str], list[str]]:
  """The class names and templates evaluated, as CLIP_benchmark picks them: the WebDataset's own
  classnames.txt / templates file when it has them, else the registry's, else the source's
  class folders / TFDS label names."""
  bench = get(name) if isinstance(name, str) else name
  loc = locate(bench, data_root, split=split, path=path)
  names_ = loc.classnames or bench.classnames
  if names_ and loc.kind == "folder" and len(_class_dirs(loc.path)) != len(names_):
    raise ValueError(f"{bench.key}: {loc.path} has {len(_class_dirs(loc.path))} class folders; "
                     f"the benchmark has {len(names_)} classes (one folder per class, sorted "
                     "names = label order, e.g. WordNet ids for ImageNet)")
  if not names_ and loc.kind == "folder":
    names_ = tuple(d.replace("_", " ") for d in _class_dirs(loc.path))
  if not names_ and loc.kind == "tfds":
    from zoo.data import tfds as tfds_lib

    names_ = tuple(n.replace("_", " ") for n in tfds_lib.label_names(bench.tfds[0], loc.path or None))
  if not names_:
    raise MissingDataset(f"{bench.key}: {loc.path} has no classnames.txt and zoo ships no class "
                         "names for it; add classnames.txt (one per line, in label order)")
  return list(names_), list(loc.templates or bench.templates)


def retrieval_examples(name: str | Benchmark, data_root: str | None = None, split: str = "test",
                       *, path: str | None = None) -> Iterator[tuple[np.ndarray, list[str]]]:
  """(uint8 RGB image, its captions) of a retrieval benchmark (CLIP_benchmark's WebDataset
  layout: `.txt` holds the captions, one per line)."""
  bench = get(name) if isinstance(name, str) else name
  if bench.task != RETRIEVAL:
    raise ValueError(f"{bench.key} is a {bench.task} benchmark, not retrieval")
  loc = locate(bench, data_root, split=split, path=path)
  for raw in _wds_samples(loc.path, split):
    image = _image(raw)
    if image is None or "txt" not in raw:
      raise ValueError(f"{raw.get('__shard__')}: sample {raw.get('__key__')} lacks an image or "
                       f"its .txt captions; it has {sorted(raw)}")
    yield image, raw["txt"].decode("utf-8").splitlines()


def parse_names(given: str | Sequence[str]) -> list[tuple[str, str | None]]:
  """"a,b=DIR,c:de" -> [("a", None), ("b", "DIR"), ("c:de", None)]; names are checked."""
  items = [x.strip() for x in given.split(",")] if isinstance(given, str) else list(given)
  out = []
  for item in (x for x in items if x):
    name, sep, path = item.partition("=")
    get(name)
    out.append((name.strip(), path.strip() if sep else None))
  return out
