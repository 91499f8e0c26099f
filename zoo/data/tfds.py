"""TFDS evaluation data through `tfds.data_source` (ArrayRecord, random access, no TensorFlow).

tensorflow-datasets is an optional extra (`pip install 'zoo[tfds]'`); it is imported only when
a function here runs. `tfds.data_source(name, split=..., data_dir=...)` reads a prepared
ArrayRecord dataset and decodes images with PIL, so TensorFlow itself is not required.
The returned source is a grain RandomAccessDataSource (`len`, `source[i]` -> dict of numpy).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from zoo import transforms

GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a blurry photo of a {}.", "a photo of the large {}.",
    "a photo of the small {}.", "a close-up photo of a {}.", "a drawing of a {}.")
_WORDNET_ID = re.compile(r"^n\d{8}$")


def import_tfds():
  """The tensorflow_datasets module, or an ImportError that says how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "TFDS data needs the optional package tensorflow-datasets: pip install 'zoo[tfds]' "
        "(or pip install tensorflow-datasets; TensorFlow itself is not needed)") from e
  return tfds


def data_source(name: str, split: str, data_dir: str | None = None):
  """`tfds.data_source(name, split=split, data_dir=data_dir)`: a random-access ArrayRecord source.

  The dataset must already be prepared in ArrayRecord format under `data_dir`
  (`tfds build --file_format=array_record` or `builder.download_and_prepare()`).
  """
  tfds = import_tfds()
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for missing data / formats
    raise ValueError(f"TFDS dataset {name!r} split {split!r} (data_dir={data_dir!r}) cannot be "
                     f"opened as an ArrayRecord data source: {e}. Prepare it with "
                     "file_format='array_record'.") from e


def label_names(name: str, data_dir: str | None = None, label_key: str = "label") -> list[str]:
  """The ClassLabel names of feature `label_key` of a prepared dataset."""
  tfds = import_tfds()
  features = tfds.builder(name, data_dir=data_dir).info.features
  if label_key not in features:
    raise KeyError(f"TFDS dataset {name!r} has no feature {label_key!r}; features: {list(features)}")
  names = getattr(features[label_key], "names", None)
  if not names:
    raise ValueError(f"TFDS feature {name}/{label_key} is not a ClassLabel with names")
  return list(names)


def zero_shot_set(name: str, *, split: str = "test", data_dir: str | None = None,
                  image_size: int, mean: Sequence[float], std: Sequence[float], size: int = 0,
                  image_key: str = "image", label_key: str = "label",
                  class_names: Sequence[str] | None = None,
                  templates: Sequence[str] | None = None) -> dict[str, Any]:
  """A `zoo.eval.evaluator` "zeroshot" eval set from the first `size` (0 = all) examples of a split.

  Class names default to the ClassLabel names ("_" -> " "); WordNet ids (ImageNet's TFDS
  labels) are not prompts, so those need `class_names`.
  """
  source = data_source(name, split, data_dir)
  if class_names is None:
    names = label_names(name, data_dir, label_key)
    if all(_WORDNET_ID.match(n) for n in names):
      raise ValueError(f"TFDS dataset {name!r} labels are WordNet ids ({names[0]}, ...); pass "
                       "class_names (e.g. the OpenAI ImageNet class names) for zero-shot prompts")
    class_names = [n.replace("_", " ") for n in names]
  pre = transforms.make_preprocess(image_size, mean, std)
  n = len(source) if not size else min(int(size), len(source))
  images, labels = [], []
  for i in range(n):
    example = source[i]
    if image_key not in example or label_key not in example:
      raise KeyError(f"TFDS example {name}[{i}] lacks {image_key!r} or {label_key!r}; "
                     f"it has {sorted(example)}")
    image = np.asarray(example[image_key])
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    images.append(pre(image))
    labels.append(int(example[label_key]))
  return {"kind": "zeroshot", "images": np.stack(images), "labels": np.asarray(labels, np.int32),
          "class_names": list(class_names), "templates": list(templates or GENERIC_TEMPLATES)}
