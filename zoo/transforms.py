"""Image preprocessing: the eval `preprocess` (open_clip-identical, NHWC) and train augmentation.

Eval (`make_preprocess`) reproduces open_clip's `image_transform(..., is_train=False)`:
resize (PIL, bicubic) so that the shortest side equals the target, center crop, convert to RGB,
scale to [0, 1], normalize with the model's mean/std. The resize and crop follow torchvision's
size and offset rounding exactly, so the output equals open_clip's tensor (CHW -> HWC).
zoo models take NHWC float32, so one image comes back as [H, W, 3] and a batch as [N, H, W, 3].

Train (`random_resized_crop_params`, `apply_crop_resize`, `transform_boxes`): torchvision's
RandomResizedCrop split into a pure sampling step (numpy Generator -> crop) and a
deterministic apply step, so the data pipeline can seed it per example and the region-head
work can move boxes with exactly the same crop/flip.

NaFlex (`NaFlexPreprocess`, SigLIP 2): transformers' Siglip2ImageProcessor — an aspect-keeping
resize to the largest patch grid within a patch budget, patchified and padded with a mask.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

from zoo.models import configs

RESIZE_MODES = ("shortest", "longest", "squash")
_INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}

ImageLike = Image.Image | np.ndarray
Crop = tuple[float, float, float, float]  # (top, left, height, width) in source pixels


# ----------------------------------------------------------------------------- helpers


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
  """`size` as (height, width); an int means a square."""
  if isinstance(size, (int, np.integer)):
    hw = (int(size), int(size))
  else:
    hw = tuple(int(s) for s in size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"image size must be a positive int or (height, width), got {size!r}")
  return hw  # type: ignore[return-value]


def to_pil(image: ImageLike) -> Image.Image:
  """A PIL image from a PIL image or a uint8 array [H, W], [H, W, 3] or [H, W, 4]."""
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise TypeError(
          f"image array has dtype {image.dtype}; expected uint8 pixels in [0, 255] "
          "(convert with (x * 255).round().astype(np.uint8))")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4)):
      return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    raise ValueError(f"image array has shape {image.shape}; expected [H, W], [H, W, 3] or [H, W, 4]")
  raise TypeError(f"image is {type(image).__name__}; expected a PIL.Image or a uint8 numpy array")


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) after resizing the shortest side to `size` (torchvision: long side truncated)."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def keep_ratio_size(height: int, width: int, target: tuple[int, int], longest: bool) -> tuple[int, int]:
  """(h, w) fitting the shortest (or longest) side to `target`, rounded (timm ResizeKeepRatio)."""
  ratio_h, ratio_w = height / target[0], width / target[1]
  ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
  return round(height / ratio), round(width / ratio)


def center_crop_offsets(height: int, width: int, out_hw: tuple[int, int]) -> tuple[int, int]:
  """(top, left) of a centered `out_hw` window in an image that is first padded to fit it.

  Negative offsets mean padding (torchvision/open_clip pad (d // 2, (d + 1) // 2), then crop at
  round((padded - out) / 2)).
  """
  offsets = []
  for size, out in zip((height, width), out_hw):
    pad_before = (out - size) // 2 if out > size else 0
    padded = max(size, out)
    offsets.append(int(round((padded - out) / 2.0)) - pad_before)
  return offsets[0], offsets[1]


def crop_or_pad(image: Image.Image, top: int, left: int, out_hw: tuple[int, int],
                fill: int | tuple[int, ...] = 0) -> Image.Image:
  """The `out_hw` window at (top, left); pixels outside the image are `fill`."""
  h, w = out_hw
  if top >= 0 and left >= 0 and top + h <= image.height and left + w <= image.width:
    return image.crop((left, top, left + w, top + h))
  canvas = Image.new(image.mode, (w, h), fill)
  canvas.paste(image, (-left, -top))
  return canvas


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std, computed in float32 like torchvision."""
  x = image.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ----------------------------------------------------------------------------- eval preprocess


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Eval preprocessing, callable on one image -> float32 [H, W, 3]; `.batch` -> [N, H, W, 3].

  resize_mode: 'shortest' (resize shortest side, center crop; CLIP default), 'longest'
  (resize longest side, center pad with `fill_color`) or 'squash' (resize to the target).
  """

  image_size: tuple[int, int]
  mean: tuple[float, float, float] = configs.OPENAI_MEAN
  std: tuple[float, float, float] = configs.OPENAI_STD
  resize_mode: str = "shortest"
  interpolation: str = "bicubic"
  fill_color: int = 0

  def __post_init__(self):
    if self.resize_mode not in RESIZE_MODES:
      raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
    if self.interpolation not in _INTERPOLATIONS:
      raise ValueError(f"interpolation {self.interpolation!r} is not one of {tuple(_INTERPOLATIONS)}")
    for key in ("mean", "std"):
      value = getattr(self, key)
      if len(value) != 3:
        raise ValueError(f"{key} must have 3 values (R, G, B), got {value!r}")
    if min(self.std) <= 0:
      raise ValueError(f"std must be positive, got {self.std!r}")

  def geometry(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized_h, resized_w), (top, left)) of the resize and the crop window after it."""
    out = self.image_size
    if self.resize_mode == "squash":
      return out, (0, 0)
    if self.resize_mode == "shortest" and out[0] == out[1]:
      resized = shortest_side_size(height, width, out[0])
    else:
      resized = keep_ratio_size(height, width, out, longest=self.resize_mode == "longest")
    return resized, center_crop_offsets(*resized, out)

  def crop_box(self, height: int, width: int) -> Crop:
    """The output window in source pixels (top, left, h, w) — feed it to `transform_boxes`."""
    (rh, rw), (top, left) = self.geometry(height, width)
    sy, sx = height / rh, width / rw
    return top * sy, left * sx, self.image_size[0] * sy, self.image_size[1] * sx

  def resize_crop(self, image: ImageLike) -> Image.Image:
    """The resized, cropped RGB PIL image (before scaling and normalization)."""
    image = to_pil(image)
    (rh, rw), (top, left) = self.geometry(image.height, image.width)
    if (rh, rw) != (image.height, image.width):
      image = image.resize((rw, rh), _INTERPOLATIONS[self.interpolation])
    image = crop_or_pad(image, top, left, self.image_size, self.fill_color)
    return image.convert("RGB")

  def __call__(self, image: ImageLike) -> np.ndarray:
    return normalize(np.asarray(self.resize_crop(image)), self.mean, self.std)

  def batch(self, images: Sequence[ImageLike]) -> np.ndarray:
    """float32 [N, H, W, 3] of a list of images."""
    if len(images) == 0:
      return np.zeros((0, *self.image_size, 3), np.float32)
    return np.stack([self(im) for im in images])


def make_preprocess(image_size: int | Sequence[int], mean: Sequence[float] = configs.OPENAI_MEAN,
                    std: Sequence[float] = configs.OPENAI_STD, resize_mode: str = "shortest", *,
                    interpolation: str = "bicubic", fill_color: int = 0) -> Preprocess:
  """The eval preprocess of a model with input `image_size` and normalization `mean`/`std`."""
  return Preprocess(_hw(image_size), tuple(float(m) for m in mean), tuple(float(s) for s in std),
                    resize_mode, interpolation, int(fill_color))


def get_preprocess(model: str | object) -> Preprocess:
  """The eval preprocess of a registered model name or a model config.

  A config needs `.vision.image_size`, `.image_mean` and `.image_std` (zoo.models.configs.CLIPConfig).
  """
  if isinstance(model, str):
    model = configs.get_model_config(model)
  try:
    size, mean, std = model.vision.image_size, model.image_mean, model.image_std
  except AttributeError as e:
    raise TypeError(f"get_preprocess needs a model name or a CLIPConfig, got {type(model).__name__}") from e
  return make_preprocess(size, mean, std)


# ----------------------------------------------------------------------------- NaFlex preprocess


def naflex_size(height: int, width: int, patch_size: int, max_patches: int,
                eps: float = 1e-5) -> tuple[int, int]:
  """(h, w), multiples of `patch_size`, of the largest aspect-keeping resize with at most
  `max_patches` patches: transformers' `get_image_size_for_max_num_patches` (the same binary
  search over the scale, each side rounded up to a whole patch, at least one patch)."""
  if height < 1 or width < 1 or patch_size < 1 or max_patches < 1:
    raise ValueError(f"naflex_size needs positive sizes, got image {height}x{width}, patch "
                     f"{patch_size}, max_patches {max_patches}")

  def side(scale: float, size: int) -> int:
    return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

  lo, hi = eps / 10, 100.0
  while hi - lo >= eps:
    scale = (lo + hi) / 2
    if (side(scale, height) / patch_size) * (side(scale, width) / patch_size) <= max_patches:
      lo = scale
    else:
      hi = scale
  return side(lo, height), side(lo, width)


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
  """[H, W, C] -> [(H/p)*(W/p), p*p*C]: patches row-major, each flattened (row, col, channel)."""
  h, w, c = image.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image {h}x{w} is not a whole number of {p}px patches")
  x = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
  return x.reshape((h // p) * (w // p), p * p * c)


def bucket_length(num_patches: int, max_patches: int) -> int:
  """The padded sequence length of a NaFlex batch: the smallest power of two >= num_patches,
  capped at max_patches, so that jit sees about log2(max_patches) shapes."""
  if not 0 < num_patches <= max_patches:
    raise ValueError(f"{num_patches} patches is not within the budget 1..{max_patches}")
  return min(max_patches, 1 << (num_patches - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class NaFlexPreprocess:
  """SigLIP 2 NaFlex preprocessing, equal to transformers' Siglip2ImageProcessor (PIL backend).

  One image -> (patches float32 [n, p*p*3], (rows, cols)) with n = rows * cols <= max_patches;
  `.batch(images, length)` -> (patches [N, length, p*p*3], spatial_shapes int32 [N, 2],
  mask bool [N, length]) — the inputs of `CLIP.encode_patches`; `length` defaults to
  max_patches (transformers pads to it), `bucket_length` gives a shorter one.
  """

  patch_size: int = 16
  max_patches: int = 256
  mean: tuple[float, float, float] = configs.INCEPTION_MEAN
  std: tuple[float, float, float] = configs.INCEPTION_STD
  interpolation: str = "bilinear"

  def __post_init__(self):
    if self.patch_size < 1 or self.max_patches < 1:
      raise ValueError(f"patch_size and max_patches must be positive, got {self.patch_size}, "
                       f"{self.max_patches}")
    if self.interpolation not in _INTERPOLATIONS:
      raise ValueError(f"interpolation {self.interpolation!r} is not one of {tuple(_INTERPOLATIONS)}")

  def resize(self, image: ImageLike) -> Image.Image:
    """The RGB image resized to its patch grid within the budget (`naflex_size`)."""
    image = to_pil(image).convert("RGB")
    h, w = naflex_size(image.height, image.width, self.patch_size, self.max_patches)
    if (h, w) != (image.height, image.width):
      image = image.resize((w, h), _INTERPOLATIONS[self.interpolation])
    return image

  def __call__(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
    pixels = np.asarray(self.resize(image))
    # transformers' order of float operations: rescale in float64, then normalize in float32
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    p = self.patch_size
    return patchify(x, p), (x.shape[0] // p, x.shape[1] // p)

  def batch(self, images: Sequence[ImageLike], length: int | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patches [N, length, p*p*3], spatial_shapes int32 [N, 2], mask bool [N, length])."""
    return pad_patches([self(im) for im in images], length or self.max_patches,
                       3 * self.patch_size ** 2)


def pad_patches(items: Sequence[tuple[np.ndarray, tuple[int, int]]], length: int, dim: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(patches, spatial_shapes, mask) of per-image (patches [n, dim], (rows, cols)), zero-padded
  to `length` patches (one-line error for an image with more)."""
  patches = np.zeros((len(items), length, dim), np.float32)
  shapes = np.zeros((len(items), 2), np.int32)
  mask = np.zeros((len(items), length), bool)
  for i, (x, shape) in enumerate(items):
    if len(x) > length:
      raise ValueError(f"image {i} has {len(x)} patches ({shape[0]}x{shape[1]}), over the padded "
                       f"length {length}")
    patches[i, :len(x)], shapes[i], mask[i, :len(x)] = x, shape, True
  return patches, shapes, mask


def naflex_preprocess(config: Any, max_patches: int | None = None) -> NaFlexPreprocess:
  """The NaFlex preprocess of a NaFlex model config (its patch size, mean/std, and budget:
  `max_patches`, else the config's, else its position grid's size)."""
  v = config.vision
  if not getattr(v, "naflex", False):
    raise ValueError("naflex_preprocess needs a NaFlex (SigLIP 2) model config")
  budget = max_patches or v.max_patches or v.grid_size ** 2
  return NaFlexPreprocess(v.patch_size, budget, tuple(config.image_mean), tuple(config.image_std))


# ----------------------------------------------------------------------------- train augmentation


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale: tuple[float, float] = (0.9, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random crop, torchvision's RandomResizedCrop algorithm.

  Up to 10 tries draw an area fraction uniformly in `scale` and a log-uniform aspect ratio
  (w / h) in `ratio`; the first crop that fits is placed uniformly. If none fits, the
  whole image is center-cropped to the nearest aspect ratio inside `ratio`.
  """
  if height < 1 or width < 1:
    raise ValueError(f"image size must be positive, got height={height}, width={width}")
  if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
    raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def apply_crop_resize(image: ImageLike, crop: tuple[int, int, int, int],
                      size: int | Sequence[int], hflip: bool = False,
                      interpolation: str = "bicubic") -> np.ndarray:
  """uint8 RGB [H, W, 3]: `crop` = (top, left, h, w) of `image`, resized to `size`, maybe flipped.

  Equals torchvision `resized_crop` (PIL, bicubic) then `hflip`; normalize with `normalize`.
  """
  if interpolation not in _INTERPOLATIONS:
    raise ValueError(f"interpolation {interpolation!r} is not one of {tuple(_INTERPOLATIONS)}")
  top, left, h, w = (int(v) for v in crop)
  if h < 1 or w < 1:
    raise ValueError(f"crop (top, left, h, w) = {crop} has an empty size")
  out_h, out_w = _hw(size)
  image = to_pil(image).crop((left, top, left + w, top + h))
  if (h, w) != (out_h, out_w):
    image = image.resize((out_w, out_h), _INTERPOLATIONS[interpolation])
  array = np.asarray(image.convert("RGB"))
  return np.ascontiguousarray(array[:, ::-1]) if hflip else array


def transform_boxes(boxes: np.ndarray, crop: Crop, orig_hw: tuple[int, int], hflip: bool = False,
                    *, min_size: float = 0.0, min_visible: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Moves boxes through a crop (+ resize, + horizontal flip) -> (boxes [N, 4], keep [N]).

  Args:
    boxes: [N, 4] (x0, y0, x1, y1), normalized to the source image ([0, 1]).
    crop: (top, left, h, w) in source pixels (as from `random_resized_crop_params`, or
      `Preprocess.crop_box` for the eval transform). A resize of the crop does not move
      normalized coordinates, so any output size gives the same boxes.
    orig_hw: (height, width) of the source image.
    hflip: the crop was flipped left-right.
    min_size: a kept box is wider and taller than this (normalized to the crop).
    min_visible: a kept box keeps more than this fraction of its area inside the crop.
  Returns:
    float32 boxes normalized to the crop, clipped to [0, 1] (rows of dropped boxes are 0), and
    keep: False for boxes that fall outside the crop or collapse.
  """
  boxes = np.asarray(boxes, np.float64)
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must have shape [N, 4] (x0, y0, x1, y1), got {boxes.shape}")
  top, left, h, w = (float(v) for v in crop)
  H, W = orig_hw
  if h <= 0 or w <= 0 or H <= 0 or W <= 0:
    raise ValueError(f"crop {crop} and orig_hw {orig_hw} must have positive sizes")
  x = (boxes[:, [0, 2]] * W - left) / w
  y = (boxes[:, [1, 3]] * H - top) / h
  area = (x[:, 1] - x[:, 0]) * (y[:, 1] - y[:, 0])
  x, y = np.clip(x, 0.0, 1.0), np.clip(y, 0.0, 1.0)
  bw, bh = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]
  keep = (bw > min_size) & (bh > min_size)
  with np.errstate(divide="ignore", invalid="ignore"):
    visible = np.where(area > 0, bw * bh / np.where(area > 0, area, 1.0), 0.0)
  keep &= visible > min_visible
  if hflip:
    x = 1.0 - x[:, ::-1]
  out = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=-1)
  out[~keep] = 0.0
  return out.astype(np.float32), keep

