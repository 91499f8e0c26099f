"""Few-shot classification data and the base-to-novel protocol of prompt learning (CoOp, MaPLe).

A `Labelled` set is class names + labels + a loader of uint8 [H, W, 3] images (read on access).
Sources (`data.dataset`): "demo" (the embedded scenes, labelled by their primary object), "folder"
(`data.folder` / `data.eval_folder`: one sub-folder per class, classes in sorted order), or a
benchmark name (zoo.data.benchmarks). `base_novel` splits the label list as the
papers' code does (labels sorted, the first ceil(n/2) are base); `few_shot` draws k images per
class (seeded per class); `FewShotSource` is the grain source the train pipeline reads
(`data.name="fewshot"`), labels renumbered within the trained classes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from zoo.data import benchmarks, demo as demo_lib

SUBSETS = ("base", "novel", "all")
POLICIES = ("error", "all")
# config.data keys of the few-shot data (configs.base.fewshot_data() returns them).
DEFAULTS = dict(
    dataset="demo",  # demo | folder | a benchmark name (zoo.data.benchmarks)
    shots=16,  # images per class (k)
    shots_policy="error",  # a class with fewer images: error | all (use what it has)
    subsample="base",  # classes trained on: base (first half) | all
    folder="",  # dataset=folder: train images, one sub-folder per class
    eval_folder="",  # dataset=folder: test images, the same sub-folders
    data_root="",  # benchmarks: their root ("" = $ZOO_DATA)
    pool_size=2000,  # dataset=demo: training scenes the shots are drawn from
)


@dataclasses.dataclass(frozen=True)
class Labelled:
  """A labelled image set: `labels` [N] index `classnames`; `load(i)` -> uint8 [H, W, 3]."""

  name: str
  classnames: tuple[str, ...]
  labels: np.ndarray
  load: Callable[[int], np.ndarray]

  def __len__(self) -> int:
    return len(self.labels)


def demo_set(split: str, size: int, image_size: int) -> Labelled:
  """`size` demo scenes of `split` (labels from the layout alone; images rendered on access)."""
  seed = demo_lib.SPLIT_SEEDS[split]
  labels = np.asarray([demo_lib.sample_scene(seed, i).objects[0].label for i in range(size)],
                      np.int32)
  return Labelled(f"demo:{split}", tuple(demo_lib.class_names()), labels,
                  lambda i: demo_lib.render(demo_lib.sample_scene(seed, int(i)), image_size))


def folder_set(root: str) -> Labelled:
  """Images under `root/<class>/` (classes = sorted sub-folders, '_' read as a space)."""
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist (data.folder / "
                            "data.eval_folder: one sub-folder of images per class)")
  classes, files = benchmarks.class_folder(root)
  if not files:
    raise ValueError(f"image folder {root!r} holds no images ({', '.join(benchmarks.IMAGE_FILES)})"
                     " in class sub-folders")
  return Labelled(root, tuple(c.replace("_", " ") for c in classes),
                  np.asarray([y for _, y in files], np.int32),
                  lambda i: benchmarks.read_image(files[int(i)][0]))


def benchmark_set(name: str, data_root: str, split: str) -> Labelled:
  """A classification benchmark by name (zoo.data.benchmarks): class names + its labels, each
  image decoded when it is read (a train split as large as ImageNet's is never held in memory)."""
  classnames = benchmark_classnames(name, data_root, split)
  labels, load = benchmarks.classification_index(name, data_root or None, split)
  return Labelled(f"{name}:{split}", tuple(classnames), labels, load)


def class_names(data_cfg: Any) -> list[str]:
  """The class names of `data.dataset` (label order), without reading its images."""
  dataset = str(data_cfg.get("dataset", DEFAULTS["dataset"]))
  if dataset == "demo":
    return demo_lib.class_names()
  if dataset == "folder":
    root = str(data_cfg.get("folder", ""))
    if not root or not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist (data.folder: one "
                              "sub-folder of images per class)")
    return [d.replace("_", " ") for d in benchmarks.class_folder(root)[0]]
  return list(benchmark_classnames(dataset, str(data_cfg.get("data_root", ""))))


def benchmark_classnames(name: str, data_root: str, split: str = "test") -> tuple[str, ...]:
  names = benchmarks.get(name).classnames
  if not names:  # the source names the classes (e.g. cars, food101)
    names, _ = benchmarks.class_names_and_templates(name, data_root or None, split)
  return tuple(names)


def open_set(data_cfg: Any, split: str, image_size: int) -> Labelled:
  """The train ("train") or test ("test") images of `data.dataset`."""
  get = lambda k: data_cfg.get(k, DEFAULTS[k]) if hasattr(data_cfg, "get") else DEFAULTS[k]
  dataset = str(get("dataset"))
  if dataset == "demo":
    size = int(get("pool_size")) if split == "train" else int(data_cfg.get("eval_size", 1000))
    # shots from a split no demo CLIP trains on ("fewshot"), tests from the "test" split
    return demo_set("fewshot" if split == "train" else "test", size, image_size)
  if dataset == "folder":
    return folder_set(str(get("folder") if split == "train" else get("eval_folder")))
  return benchmark_set(dataset, str(get("data_root")), split)


def base_novel(num_classes: int) -> tuple[list[int], list[int]]:
  """(base, novel) labels: sorted, the first ceil(n/2) base (CoOp / CoCoOp / MaPLe's split)."""
  m = math.ceil(num_classes / 2)
  base, novel = list(range(m)), list(range(m, num_classes))
  if not base or not novel:
    raise ValueError(f"the base/novel split of {num_classes} class(es) leaves an empty "
                     f"{'base' if not base else 'novel'} half; base-to-novel needs >= 2 classes "
                     "(or data.subsample=all)")
  return base, novel


def classes_of(subset: str, num_classes: int) -> list[int]:
  if subset not in SUBSETS:
    raise ValueError(f"data.subsample={subset!r}: expected one of {', '.join(SUBSETS)}")
  if subset == "all":
    return list(range(num_classes))
  base, novel = base_novel(num_classes)
  return base if subset == "base" else novel


def few_shot(labels: np.ndarray, classes: Sequence[int], shots: int, seed: int,
             classnames: Sequence[str], policy: str = "error") -> np.ndarray:
  """Indices of `shots` images of each class in `classes` (drawn without replacement by a
  generator seeded with (seed, class)); shots <= 0 keeps every image. A class with fewer
  images is an error naming it (policy "error") or keeps all it has (policy "all")."""
  if policy not in POLICIES:
    raise ValueError(f"data.shots_policy={policy!r}: expected one of {', '.join(POLICIES)}")
  labels = np.asarray(labels)
  out = []
  for c in classes:
    idx = np.flatnonzero(labels == c)
    if shots > 0 and len(idx) < shots:
      if policy == "error":
        raise ValueError(f"class {classnames[c]!r} has {len(idx)} image(s), fewer than "
                         f"data.shots={shots}; lower data.shots or set data.shots_policy=all")
    elif shots > 0:
      idx = np.sort(np.random.default_rng([int(seed), int(c)]).choice(idx, shots, replace=False))
    out.append(idx)
  return np.concatenate(out) if out else np.zeros((0,), np.int64)


class FewShotSource:
  """A grain random-access source of the chosen images: {image, label (index into `classes`),
  caption (class name), key}."""

  def __init__(self, data: Labelled, indices: np.ndarray, classes: Sequence[int]):
    if len(indices) == 0:
      raise ValueError(f"{data.name}: no training images for classes {list(classes)[:5]}...")
    self.data, self.indices = data, np.asarray(indices)
    self.classes = list(classes)
    self.relabel = {c: i for i, c in enumerate(self.classes)}
    self.classnames = [data.classnames[c] for c in self.classes]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    j = int(self.indices[int(i)])
    label = int(self.data.labels[j])
    return {"image": self.data.load(j), "label": self.relabel[label],
            "caption": self.data.classnames[label], "key": f"{self.data.name}_{j}"}


def train_source(data_cfg: Any, image_size: int, seed: int) -> FewShotSource:
  """The k-shot training source of `data_cfg` (its `subsample` classes, shots seeded by `seed`)."""
  data = open_set(data_cfg, "train", image_size)
  get = lambda k: data_cfg.get(k, DEFAULTS[k])
  classes = classes_of(str(get("subsample")), len(data.classnames))
  idx = few_shot(data.labels, classes, int(get("shots")), seed, data.classnames,
                 str(get("shots_policy")))
  return FewShotSource(data, idx, classes)


def test_images(data: Labelled, classes: Sequence[int]) -> tuple[list[int], np.ndarray]:
  """(indices of the test images of `classes`, their labels renumbered within `classes`)."""
  where = {c: i for i, c in enumerate(classes)}
  idx = [i for i, label in enumerate(data.labels) if int(label) in where]
  return idx, np.asarray([where[int(data.labels[i])] for i in idx], np.int32)
