"""Region-aligned heads (CLOC-style promptable region embeddings) for any zoo CLIP.

CLOC (Chen et al., arXiv 2410.02746) adds a light *prompter* on top of CLIP's image tower: the
patch tokens plus a box prompt give a region embedding in the text space, trained with a
region-text contrastive loss next to the image-text one (and optionally a grounding term that
regresses the box from the region caption). FG-CLIP 2 (arXiv 2510.10921) adds a textual
intra-modal contrastive (TIC) term that separates similar captions. Here:

* `roi_align` — differentiable RoIAlign over the ViT patch-token grid: boxes in normalized
  xyxy over the image, `roi_size` x `roi_size` bins, each the mean of `sampling_ratio`^2
  bilinear samples. Conventions are torchvision's `roi_align(aligned=True)`: a normalized
  coordinate u maps to grid coordinate u * g - 0.5 (patch centres at integers), samples are
  clamped to the grid (edge patches extend to the image border). The bilinear weights are
  separable, so the op is two small weight matrices per box and one einsum (no gathers).
  When roi_size * sampling_ratio is a multiple of the grid size, the mean of the bins of the
  whole-image box is exactly the mean of the patch tokens.
* `Prompter` — a small pre-LN transformer over [box token; RoI bin tokens]: RoI tokens are
  projected to the prompter width and get a learned per-bin position; the box token is an MLP
  of Fourier features of (x0, y0, x1, y1). The box token's output, LayerNorm'd and projected,
  is the region embedding. With `residual_pool` (default) the region embedding is
  `mean(RoI tokens) @ visual.proj + prompter(...)` with the prompter's output projection
  zero-initialised: a fresh head starts exactly at the "mean-pooled patch tokens projected to
  the joint space" baseline and learns a correction.
* `RegionCLIP` — a CLIP (same towers, same `encode_image` / `encode_text`, so zoo.save /
  zoo.load / conversion of the towers keep working) plus the prompter (and an optional
  `GroundingHead`); `encode_regions(images, boxes, box_mask)` -> ([B, R, E], mask [B, R]).
* Losses (`region_text_loss`, `grounding_loss`, `tic_loss`) over all valid regions of the
  GLOBAL batch: plain jnp over [M, M] logits (M = B * R), so under jit with a batch-sharded
  input GSPMD computes exactly the single-device loss. Padded boxes (box_mask False) are
  excluded as rows and as columns, so they contribute neither loss nor gradient. Region
  captions that are identical (same token ids) are positives of each other
  (`same_caption_positive`), not false negatives. The region-text loss is the softmax
  (InfoNCE) form for every model, SigLIP ones included.
* Our readings where the papers leave details open: the grounding head (`GroundingHead`: the
  caption embedding queries the patch tokens with one cross-attention, an MLP predicts
  (cx, cy, w, h); loss L1 + (1 - GIoU)) and TIC (`tic_loss`: each region caption against all
  region captions of the batch, identical captions positive) are our formulations of the two
  terms, not ports of the authors' code.
* The `region` family for the one train loop, and the `region_zeroshot` eval kind (region
  classification top-1 / top-5 over the valid boxes + region <-> caption retrieval), with the
  two baselines the bench compares against (`region_features(method=...)`,
  `RegionBaselines`): the global embedding of the box crop ('crop') and the box's mean-pooled
  patch tokens through the image tower's projection ('pooled_patches').
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import clip as clip_lib
from zoo import config_utils, eval_lib, losses, registry, train_lib, transforms
from zoo.layers import LayerNorm, Linear, Transformer, get_activation, param

Array = jax.Array

REGION_FIELDS = ("image", "tokens", "boxes", "box_mask", "region_tokens")

# A CPU-sized architecture for the region demo: test-tiny's towers at 64 px, so the patch grid
# is 8 x 8 (test-tiny's 4 x 4 is too coarse for boxes; demo-tiny's 192-wide tower is slow).
registry.register("region-tiny", registry.CLIPConfig(
    32, registry.VisionConfig(image_size=64, patch_size=8, width=64, layers=2, heads=2),
    registry.TextConfig(width=64, heads=2, layers=2)))
_NEG = -1e9  # logit of a masked column (finite: no NaN in softmax / gradients)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class RegionConfig:
  """Region head architecture, stored with the model.

  roi_size: RoI bins per side. sampling_ratio: bilinear samples per bin per side (0: the
  smallest that gives at least one sample per patch, ceil(grid / roi_size)). width / heads /
  layers: the prompter transformer (width 0 = the vision width; heads 0 = width // 64, >= 1).
  box_frequencies: Fourier frequencies per box coordinate. residual_pool: see module doc.
  grounding: also build the text -> box `GroundingHead`.
  """

  roi_size: int = 4
  sampling_ratio: int = 0
  width: int = 0
  heads: int = 0
  layers: int = 1
  mlp_ratio: float = 4.0
  box_frequencies: int = 8
  residual_pool: bool = True
  grounding: bool = False

  def __post_init__(self):
    for name in ("roi_size", "layers", "box_frequencies"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"region {name}={getattr(self, name)} must be >= 1")
    for name in ("sampling_ratio", "width", "heads"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"region {name}={getattr(self, name)} must be >= 0 (0 = automatic)")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RegionConfig":
    valid = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - valid)
    if bad:
      raise ValueError(f"unknown region config key {bad[0]!r}; valid keys: {', '.join(sorted(valid))}")
    return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class RegionCLIPConfig(registry.CLIPConfig):
  """A CLIPConfig plus the region head (`region`)."""

  region: RegionConfig = RegionConfig()

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "RegionCLIPConfig":
    d = dict(d)
    region = RegionConfig.from_dict(d.pop("region", {}) or {})
    return dataclasses.replace(super().from_dict(d), region=region)


def region_config(base: registry.CLIPConfig | str, **region: Any) -> RegionCLIPConfig:
  """A RegionCLIPConfig over an architecture (a name or CLIPConfig); kwargs: RegionConfig."""
  if isinstance(base, str):
    base = registry.get_model_config(base)
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(registry.CLIPConfig)}
  return RegionCLIPConfig(region=RegionConfig.from_dict(region), **fields)


def sampling_ratio_for(grid: int, roi_size: int, sampling_ratio: int = 0) -> int:
  """The static samples per bin per side (0 = ceil(grid / roi_size))."""
  return int(sampling_ratio) if sampling_ratio > 0 else max(1, math.ceil(grid / roi_size))


# ----------------------------------------------------------------------------- RoIAlign


def check_boxes(boxes: Array, where: str = "boxes") -> None:
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f"{where} must be [B, R, 4] normalized (x0, y0, x1, y1), got shape "
                     f"{tuple(boxes.shape)}")


def patch_grid(tokens: Array, grid: tuple[int, int] | None = None) -> Array:
  """Patch tokens [B, N, C] -> [B, gh, gw, C] (square grid unless `grid` is given)."""
  if tokens.ndim == 4:
    return tokens
  b, n, c = tokens.shape
  if grid is None:
    g = int(round(math.sqrt(n)))
    if g * g != n:
      raise ValueError(f"patch tokens: {n} tokens are not a square grid; pass grid=(gh, gw)")
    grid = (g, g)
  if grid[0] * grid[1] != n:
    raise ValueError(f"patch tokens: {n} tokens do not fill a {grid[0]}x{grid[1]} grid")
  return tokens.reshape(b, grid[0], grid[1], c)


def _axis_weights(lo: Array, hi: Array, size: int, bins: int, sampling_ratio: int) -> Array:
  """Bin-averaged bilinear weights along one axis: [..., bins, size].

  lo / hi [...]: box edges in normalized coordinates. Sample k (of bins * sampling_ratio) sits
  at grid coordinate lo*size - 0.5 + (k + 0.5) * (hi - lo) * size / (bins * sampling_ratio),
  clamped to [0, size - 1]; its weight on cell i is max(0, 1 - |coordinate - i|).
  """
  n = bins * sampling_ratio
  start = lo[..., None] * size - 0.5
  step = (hi - lo)[..., None] * size / n
  coords = start + (jnp.arange(n, dtype=jnp.float32) + 0.5) * step  # [..., n]
  coords = jnp.clip(coords, 0.0, size - 1.0)
  w = jnp.maximum(0.0, 1.0 - jnp.abs(coords[..., None] - jnp.arange(size, dtype=jnp.float32)))
  return w.reshape(*w.shape[:-2], bins, sampling_ratio, size).mean(axis=-2)


def roi_align(features: Array, boxes: Array, output_size: int, sampling_ratio: int = 0) -> Array:
  """RoIAlign on a feature grid: features [B, gh, gw, C] (or [B, N, C] square), boxes [B, R, 4]
  normalized xyxy -> [B, R, S, S, C] (S = output_size), float32. See the module docstring."""
  features = patch_grid(features)
  check_boxes(boxes)
  if boxes.shape[0] != features.shape[0]:
    raise ValueError(f"roi_align: {boxes.shape[0]} box rows for {features.shape[0]} images")
  _, gh, gw, _ = features.shape
  sr = sampling_ratio_for(max(gh, gw), output_size, sampling_ratio)
  boxes = boxes.astype(jnp.float32)
  wy = _axis_weights(boxes[..., 1], boxes[..., 3], gh, output_size, sr)  # [B, R, S, gh]
  wx = _axis_weights(boxes[..., 0], boxes[..., 2], gw, output_size, sr)  # [B, R, S, gw]
  return jnp.einsum("brpi,brqj,bijc->brpqc", wy, wx, features.astype(jnp.float32))


def roi_mean(features: Array, boxes: Array, output_size: int, sampling_ratio: int = 0) -> Array:
  """Mean of the RoIAlign bins: [B, R, C] (the box's mean-pooled patch tokens)."""
  return roi_align(features, boxes, output_size, sampling_ratio).mean(axis=(2, 3))


def valid_boxes(boxes: Array) -> Array:
  """True where a box has positive width and height: [B, R]."""
  return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def box_fourier_features(boxes: Array, frequencies: int) -> Array:
  """[..., 4] in [0, 1] -> [..., 8 * frequencies]: sin / cos(2^k pi u), k < frequencies."""
  scales = (2.0 ** jnp.arange(frequencies, dtype=jnp.float32)) * jnp.pi
  x = boxes.astype(jnp.float32)[..., None] * scales  # [..., 4, F]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1).reshape(*boxes.shape[:-1], -1)


# ----------------------------------------------------------------------------- modules


def _heads(width: int, heads: int) -> int:
  h = heads or max(1, width // 64)
  if width % h:
    raise ValueError(f"region prompter width {width} is not divisible by heads {h}")
  return h


class Prompter(nnx.Module):
  """RoI bin tokens + box prompt -> region embedding [..., E] (module docstring)."""

  def __init__(self, cfg: RegionConfig, vision_width: int, embed_dim: int, *,
               quick_gelu: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype, self.quick_gelu = cfg, dtype, quick_gelu
    w = cfg.width or vision_width
    self.in_proj = Linear(vision_width, w, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.bin_embedding = param(rngs, nnx.initializers.normal(w ** -0.5),
                               (cfg.roi_size ** 2, w), (None, "mlp"))
    self.box_fc1 = Linear(8 * cfg.box_frequencies, w, axes=(None, "mlp"), dtype=dtype, rngs=rngs)
    self.box_fc2 = Linear(w, w, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.transformer = Transformer(w, cfg.layers, _heads(w, cfg.heads), cfg.mlp_ratio,
                                   quick_gelu=quick_gelu, dtype=dtype, rngs=rngs)
    self.ln = LayerNorm(w, rngs=rngs)
    std = 0.0 if cfg.residual_pool else w ** -0.5
    self.out_proj = param(rngs, nnx.initializers.normal(std) if std else nnx.initializers.zeros,
                          (w, embed_dim), ("embed", None))

  def __call__(self, rois: Array, boxes: Array) -> Array:
    """rois [B, R, S, S, C], boxes [B, R, 4] -> [B, R, E] (float32, unnormalized)."""
    b, r, s, _, c = rois.shape
    x = self.in_proj(rois.reshape(b * r, s * s, c))
    x = x + self.bin_embedding[...].astype(x.dtype)
    act = get_activation(self.quick_gelu)
    box = self.box_fc2(act(self.box_fc1(box_fourier_features(boxes, self.cfg.box_frequencies))))
    x = jnp.concatenate([box.reshape(b * r, 1, -1).astype(x.dtype), x], axis=1)
    x = self.ln(self.transformer(x)[:, 0])
    out = x @ self.out_proj[...].astype(x.dtype)
    return out.reshape(b, r, -1).astype(jnp.float32)


class GroundingHead(nnx.Module):
  """Text embedding -> box (CLOC's grounding): a query from the text attends over the patch
  tokens (+ learned positions), then an MLP -> sigmoid (cx, cy, w, h) -> normalized xyxy."""

  def __init__(self, cfg: RegionConfig, vision_width: int, embed_dim: int, num_patches: int, *,
               quick_gelu: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    w = cfg.width or vision_width
    self.heads, self.dtype, self.quick_gelu = _heads(w, cfg.heads), dtype, quick_gelu
    self.q = Linear(embed_dim, w, axes=(None, "mlp"), dtype=dtype, rngs=rngs)
    self.kv = Linear(vision_width, 2 * w, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.pos = param(rngs, nnx.initializers.normal(w ** -0.5), (num_patches, w), (None, "mlp"))
    self.ln = LayerNorm(w, rngs=rngs)
    self.fc1 = Linear(w, w, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.fc2 = Linear(w, 4, axes=("embed", None), dtype=dtype, rngs=rngs)

  def __call__(self, patches: Array, text: Array) -> Array:
    """patches [B, N, C], text [B, R, E] -> boxes [B, R, 4] normalized xyxy (float32)."""
    b, n, _ = patches.shape
    r = text.shape[1]
    h = self.heads
    kv = self.kv(patches)
    w = kv.shape[-1] // 2
    k = kv[..., :w] + self.pos[...].astype(kv.dtype)
    v = kv[..., w:]
    q = self.q(text)
    out = jax.nn.dot_product_attention(q.reshape(b, r, h, w // h), k.reshape(b, n, h, w // h),
                                       v.reshape(b, n, h, w // h)).reshape(b, r, w)
    x = self.ln(out + q)
    raw = self.fc2(get_activation(self.quick_gelu)(self.fc1(x))).astype(jnp.float32)
    cxcy, wh = jax.nn.sigmoid(raw[..., :2]), jax.nn.sigmoid(raw[..., 2:])
    return jnp.clip(jnp.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=-1), 0.0, 1.0)


class RegionCLIP(clip_lib.CLIP):
  """A CLIP with a CLOC-style prompter: `encode_regions(images, boxes)` -> [B, R, E].

  Everything CLIP has (towers, `encode_image`, `encode_text`, `__call__`) is unchanged.
  """

  def __init__(self, config: RegionCLIPConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, RegionCLIPConfig):
      raise TypeError(f"RegionCLIP needs a RegionCLIPConfig, got {type(config).__name__}; build "
                      "one with zoo.region.region_config(...)")
    super().__init__(config, rngs=rngs)
    v = config.vision
    dtype = clip_lib._dtype(config.dtype)
    self.prompter = Prompter(config.region, v.width, config.embed_dim,
                             quick_gelu=config.quick_gelu, dtype=dtype, rngs=rngs)
    self.grounding = (GroundingHead(config.region, v.width, config.embed_dim, v.grid_size ** 2,
                                    quick_gelu=config.quick_gelu, dtype=dtype, rngs=rngs)
                      if config.region.grounding else None)

  def image_and_patches(self, images: Array) -> tuple[Array, Array]:
    """(pooled projected image embedding [B, E] float32, patch tokens [B, N, width])."""
    pooled, patches = self.visual(images, return_tokens=True)
    return pooled.astype(jnp.float32), patches

  def regions_from_patches(self, patches: Array, boxes: Array) -> Array:
    """Patch tokens [B, N, C] + boxes [B, R, 4] -> region embeddings [B, R, E] (unnormalized)."""
    rc = self.config.region
    rois = roi_align(patches, boxes, rc.roi_size, rc.sampling_ratio)
    out = self.prompter(rois, boxes)
    if rc.residual_pool:
      out = out + project_patch_tokens(self, rois.mean(axis=(2, 3)))
    return out

  def encode_regions(self, images: Array, boxes: Array, box_mask: Array | None = None,
                     normalize: bool = False) -> tuple[Array, Array]:
    """images [B, H, W, 3] preprocessed, boxes [B, R, 4] normalized xyxy (of the preprocessed
    image) -> (region embeddings [B, R, E] float32, mask [B, R]); padded regions are zeros.

    `box_mask` (True = real box) defaults to boxes of positive width and height.
    """
    check_boxes(boxes)
    mask = valid_boxes(boxes) if box_mask is None else box_mask.astype(bool)
    if mask.shape != boxes.shape[:2]:
      raise ValueError(f"box_mask has shape {tuple(mask.shape)}; expected {tuple(boxes.shape[:2])}")
    _, patches = self.image_and_patches(images)
    out = self.regions_from_patches(patches, boxes)
    if normalize:
      out = clip_lib.l2_normalize(out)
    return jnp.where(mask[..., None], out, 0.0), mask

  def encode_region_batch(self, batch: Mapping[str, Array], normalize: bool = False) -> Array:
    """`encode_regions` on {"images", "boxes"} -> [B, R, E] (for eval_lib.encode_batched)."""
    return self.encode_regions(batch["images"], batch["boxes"], normalize=normalize)[0]

  def ground(self, patches: Array, text_features: Array) -> Array:
    """Predicted boxes [B, R, 4] for text embeddings [B, R, E] (needs region.grounding)."""
    if self.grounding is None:
      raise ValueError("this RegionCLIP has no grounding head; build it with region.grounding=True")
    return self.grounding(patches, text_features)


def project_patch_tokens(model: clip_lib.CLIP, tokens: Array) -> Array:
  """Vision tokens [..., width] -> joint space [..., E] with the image tower's own projection
  (the mean-pooled-patch baseline; identity when the tower has no projection)."""
  proj = model.visual.proj
  tokens = tokens.astype(jnp.float32)
  return tokens if proj is None else tokens @ proj[...].astype(jnp.float32)


def create(name: str | registry.CLIPConfig, *, seed: int = 0, **region: Any) -> RegionCLIP:
  """A freshly initialised RegionCLIP over architecture `name` (kwargs: RegionConfig fields)."""
  return RegionCLIP(region_config(name, **region), rngs=nnx.Rngs(seed))


def from_clip(model: clip_lib.CLIP, *, seed: int = 0, **region: Any) -> RegionCLIP:
  """A RegionCLIP whose towers are `model`'s weights (the region head freshly initialised)."""
  if not isinstance(model, clip_lib.CLIP):
    raise TypeError(f"from_clip needs a zoo CLIP model, got {type(model).__name__}")
  out = RegionCLIP(region_config(model.config, **region), rngs=nnx.Rngs(seed))
  src = dict(nnx.to_flat_state(nnx.state(model)))
  dst = dict(nnx.to_flat_state(nnx.state(out)))
  for path, var in dst.items():
    if path in src and src[path].get_value().shape == var.get_value().shape:
      var.set_value(src[path].get_value())
  nnx.update(out, nnx.from_flat_state(dst))
  return out


# ----------------------------------------------------------------------------- baselines


def expand_boxes(boxes: Array, factor: float) -> Array:
  """Boxes [..., 4] scaled by `factor` about their centres, clipped to [0, 1]."""
  centre = (boxes[..., :2] + boxes[..., 2:]) / 2
  half = (boxes[..., 2:] - boxes[..., :2]) * (factor / 2)
  return jnp.clip(jnp.concatenate([centre - half, centre + half], axis=-1), 0.0, 1.0)


def crop_and_resize(images: Array, boxes: Array, size: int) -> Array:
  """Box crops of images [B, H, W, C] resized (bilinear, antialiased) -> [B, R, size, size, C].

  Boxes of zero width or height are replaced by the whole image (mask them afterwards).
  """
  check_boxes(boxes)
  _, h, w, _ = images.shape
  boxes = jnp.where(valid_boxes(boxes)[..., None], boxes.astype(jnp.float32),
                    jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32))

  def one(image: Array, box: Array) -> Array:
    # output pixel o (centre o + 0.5) reads input coordinate x0 * W + (o + 0.5) / scale
    scale = jnp.stack([size / ((box[3] - box[1]) * h), size / ((box[2] - box[0]) * w)])
    translation = -jnp.stack([box[1] * h, box[0] * w]) * scale
    return jax.image.scale_and_translate(image.astype(jnp.float32), (size, size, image.shape[-1]),
                                         (0, 1), scale, translation, method="linear",
                                         antialias=True)

  return jax.vmap(lambda im, bx: jax.vmap(lambda b: one(im, b))(bx))(images, boxes)


class RegionBaselines(nnx.Module):
  """Region features of a plain CLIP, for comparison with the region head:

  * `crop_regions`: the global image embedding of each box crop (resized to the input size;
    `crop_context` > 1 enlarges the box about its centre first, keeping some surroundings);
  * `pooled_regions`: the box's mean-pooled patch tokens (RoIAlign) through the image tower's
    projection.
  Both take {"images", "boxes"} and return [B, R, E] with padded boxes zeroed.
  """

  def __init__(self, model: clip_lib.CLIP, roi_size: int = 4, sampling_ratio: int = 0,
               crop_context: float = 1.0):
    self.model, self.roi_size, self.sampling_ratio = model, roi_size, sampling_ratio
    self.crop_context = float(crop_context)

  def crop_regions(self, batch: Mapping[str, Array], normalize: bool = False) -> Array:
    images, boxes = batch["images"], batch["boxes"]
    b, r = boxes.shape[:2]
    crop = boxes if self.crop_context == 1.0 else expand_boxes(boxes, self.crop_context)
    crops = crop_and_resize(images, crop, images.shape[1])
    x = self.model.encode_image(crops.reshape(b * r, *crops.shape[2:]), normalize=normalize)
    return jnp.where(valid_boxes(boxes)[..., None], x.reshape(b, r, -1), 0.0)

  def pooled_regions(self, batch: Mapping[str, Array], normalize: bool = False) -> Array:
    images, boxes = batch["images"], batch["boxes"]
    _, patches = self.model.visual(images, return_tokens=True)
    x = project_patch_tokens(self.model, roi_mean(patches, boxes, self.roi_size,
                                                  self.sampling_ratio))
    if normalize:
      x = clip_lib.l2_normalize(x)
    return jnp.where(valid_boxes(boxes)[..., None], x, 0.0)


REGION_METHODS = ("head", "crop", "pooled_patches")


def region_features(model: clip_lib.CLIP, images: Any, boxes: Any, *, method: str = "head",
                    batch_size: int = 256, mesh: jax.sharding.Mesh | None = None,
                    roi_size: int | None = None, crop_context: float = 1.0) -> np.ndarray:
  """L2-normalized region features [N, R, E] (numpy) of `method` (REGION_METHODS); padded
  boxes (zero width or height) give zero rows. `roi_size` (pooled_patches): default the
  model's region roi_size, else 4. `crop_context` (crop): box enlargement factor."""
  if method not in REGION_METHODS:
    raise ValueError(f"region method {method!r}; expected one of {REGION_METHODS}")
  boxes = np.asarray(boxes, np.float32)
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != np.shape(images)[0]:
    raise ValueError(f"boxes must be [N, R, 4] for {np.shape(images)[0]} images, got {boxes.shape}")
  inputs = {"images": np.asarray(images, np.float32), "boxes": boxes}
  if method == "head":
    if not isinstance(model, RegionCLIP):
      raise ValueError(f"method 'head' needs a RegionCLIP, got {type(model).__name__}; use "
                       "'crop' or 'pooled_patches' for a plain CLIP")
    return eval_lib.encode_batched(model, inputs, "encode_region_batch", batch_size=batch_size,
                                   mesh=mesh)
  rc = getattr(model.config, "region", None)
  size = roi_size or (rc.roi_size if rc is not None else 4)
  sr = rc.sampling_ratio if (rc is not None and roi_size is None) else 0
  wrapper = RegionBaselines(model, size, sr, crop_context)
  name = "crop_regions" if method == "crop" else "pooled_regions"
  # crops multiply the batch by R: keep the image-tower batch near `batch_size`
  bs = max(1, batch_size // boxes.shape[1]) if method == "crop" else batch_size
  return eval_lib.encode_batched(wrapper, inputs, name, batch_size=bs, mesh=mesh)


# ----------------------------------------------------------------------------- losses


def caption_ids(tokens: Array) -> Array:
  """A 32-bit hash per token row [..., L] -> int32 [...]: equal rows, equal ids (different
  rows collide with probability ~2^-32 per pair). Used to find identical region captions."""
  length = tokens.shape[-1]
  mult = np.random.default_rng(12345).integers(1, 2 ** 31, size=length, dtype=np.int64) * 2 + 1
  mult = jnp.asarray(mult.astype(np.uint32))
  h = jnp.sum(tokens.astype(jnp.uint32) * mult, axis=-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(h, jnp.int32)


def _masked_multi_positive_ce(logits: Array, positives: Array, valid: Array) -> Array:
  """Mean over valid rows of -log(sum of softmax mass on the row's positives), with invalid
  columns excluded from the softmax. logits [M, M], positives [M, M] bool, valid [M] bool."""
  logits = jnp.where(valid[None, :], logits, _NEG)
  pos = positives & valid[None, :]
  lse_all = jax.nn.logsumexp(logits, axis=-1)
  lse_pos = jax.nn.logsumexp(jnp.where(pos, logits, _NEG), axis=-1)
  rows = valid & pos.any(axis=-1)
  per_row = jnp.where(rows, lse_all - lse_pos, 0.0)
  return per_row.sum() / jnp.maximum(rows.sum(), 1)


def _flatten_regions(x: Array) -> Array:
  return x.reshape(-1, x.shape[-1]) if x.ndim == 3 else x


def region_positives(mask: Array, ids: Array | None) -> Array:
  """[M, M] positive pairs: the diagonal, or equal caption ids, among valid regions."""
  m = mask.shape[0]
  pos = jnp.eye(m, dtype=bool) if ids is None else ids[:, None] == ids[None, :]
  return pos & mask[:, None] & mask[None, :]


def region_text_loss(region_features: Array, text_features: Array, box_mask: Array,
                     logit_scale: Array, *, ids: Array | None = None) -> Array:
  """Symmetric region <-> caption contrastive loss over all valid regions of the batch.

  region_features / text_features: L2-normalized [B, R, E] (or [M, E]); box_mask [B, R] (or
  [M]); region m's caption is text m, every other valid region's caption is a negative unless
  `ids` (caption_ids of the region tokens) says it is the same caption. Padded regions are
  neither queries nor candidates. Returns the mean of both directions (0 with no valid region).
  """
  r = _flatten_regions(region_features).astype(jnp.float32)
  t = _flatten_regions(text_features).astype(jnp.float32)
  if r.shape != t.shape:
    raise ValueError(f"region_text_loss: region features {r.shape} and text features {t.shape} "
                     "must match")
  mask = box_mask.reshape(-1).astype(bool)
  if mask.shape[0] != r.shape[0]:
    raise ValueError(f"region_text_loss: box_mask has {mask.shape[0]} entries for {r.shape[0]} regions")
  ids = None if ids is None else ids.reshape(-1)
  pos = region_positives(mask, ids)
  logits = logit_scale * (r @ t.T)
  return 0.5 * (_masked_multi_positive_ce(logits, pos, mask)
                + _masked_multi_positive_ce(logits.T, pos.T, mask))


def box_area(b: Array) -> Array:
  return jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)


def generalized_iou(a: Array, b: Array, eps: float = 1e-7) -> Array:
  """GIoU of paired xyxy boxes [..., 4] -> [...] (Rezatofighi et al. 2019)."""
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.maximum(rb - lt, 0.0), axis=-1)
  union = box_area(a) + box_area(b) - inter
  hull = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), axis=-1)
  iou = inter / (union + eps)
  return iou - (hull - union) / (hull + eps)


def grounding_loss(pred: Array, target: Array, box_mask: Array, *, l1_weight: float = 1.0,
                   giou_weight: float = 1.0) -> Array:
  """Text -> box regression: mean over valid regions of l1 * |pred - target|_1 + giou *
  (1 - GIoU). pred / target [B, R, 4] normalized xyxy."""
  mask = box_mask.astype(bool)
  per = (l1_weight * jnp.abs(pred - target).sum(-1)
         + giou_weight * (1.0 - generalized_iou(pred, target)))
  return jnp.where(mask, per, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def tic_loss(text_features: Array, box_mask: Array, logit_scale: Array, ids: Array) -> Array:
  """Textual intra-modal contrastive term (after FG-CLIP 2): each valid region caption's
  embedding against all valid region captions of the batch, the identical ones (same `ids`,
  itself included) positive: pushes apart the embeddings of distinct captions."""
  t = _flatten_regions(text_features).astype(jnp.float32)
  mask = box_mask.reshape(-1).astype(bool)
  pos = region_positives(mask, ids.reshape(-1))
  return _masked_multi_positive_ce(logit_scale * (t @ t.T), pos, mask)


# ----------------------------------------------------------------------------- family

DEFAULTS: dict[str, Any] = {
    # loss weights and switches
    "image_text_weight": 1.0,  # CLIP / SigLIP image-text loss
    "region_weight": 1.0,  # region <-> region-caption contrastive loss
    "same_caption_positive": True,  # identical region captions are positives, not negatives
    "grounding_weight": 0.0,  # > 0: build the grounding head, add text -> box regression
    "grounding_l1": 1.0,
    "grounding_giou": 1.0,
    "tic_weight": 0.0,  # > 0: FG-CLIP 2's textual intra-modal contrastive term
    "trainable": "all",  # all | region (prompter / grounding head only)
    # region head architecture (RegionConfig) when not fine-tuning a RegionCLIP checkpoint
    "roi_size": 4,
    "sampling_ratio": 0,
    "width": 0,
    "heads": 0,
    "layers": 1,
    "mlp_ratio": 4.0,
    "box_frequencies": 8,
    "residual_pool": True,
}
_ARCH_KEYS = ("roi_size", "sampling_ratio", "width", "heads", "layers", "mlp_ratio",
              "box_frequencies", "residual_pool")


def default_settings() -> ml_collections.ConfigDict:
  """`config.region` with the defaults."""
  return ml_collections.ConfigDict(dict(DEFAULTS))


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.region` over the defaults; unknown keys are errors listing the valid ones."""
  out = config_utils.section(config, "region", DEFAULTS)
  if out["trainable"] not in ("all", "region"):
    raise ValueError(f"config.region.trainable={out['trainable']!r}; expected 'all' or 'region'")
  return out


def build_model(config: ml_collections.ConfigDict) -> RegionCLIP:
  """A RegionCLIP over `config.model` (+ model_overrides) with the head of `config.region`.

  The loop then copies `config.init_from`'s weights where names and shapes match: a CLIP
  checkpoint fills the towers (fresh head), a RegionCLIP checkpoint also the head.
  """
  rs = settings(config)
  base = registry.get_model_config(config.model, dtype=config.dtype,
                                   **train_lib.model_overrides(config))
  arch = {k: rs[k] for k in _ARCH_KEYS}
  arch["grounding"] = rs["grounding_weight"] > 0
  return RegionCLIP(region_config(base, **arch), rngs=nnx.Rngs(config.seed))


def region_forward(model: RegionCLIP, batch: Mapping[str, Array], rng: Array) -> dict:
  """Image / text features (as CLIP), normalized region features and region-caption features
  [B, R, E], and predicted boxes when the model has a grounding head."""
  del rng
  if not isinstance(model, RegionCLIP):
    raise TypeError(f"the region family needs a RegionCLIP, got {type(model).__name__}")
  missing = [k for k in REGION_FIELDS if k not in batch]
  if missing:
    raise ValueError(f"region batch lacks {missing}; it has {sorted(batch)}")
  boxes, region_tokens = batch["boxes"], batch["region_tokens"]
  check_boxes(boxes, "batch['boxes']")
  b, r = boxes.shape[:2]
  if region_tokens.shape[:2] != (b, r):
    raise ValueError(f"region_tokens {tuple(region_tokens.shape)} must be [B, R, L] with "
                     f"[B, R] = {(b, r)} as boxes")
  pooled, patches = model.image_and_patches(batch["image"])
  out = {
      "image_features": clip_lib.l2_normalize(pooled),
      "text_features": model.encode_text(batch["tokens"], normalize=True, trim_padding=True),
      "logit_scale": jnp.exp(model.logit_scale[...]),
      "region_features": clip_lib.l2_normalize(model.regions_from_patches(patches, boxes)),
      # trim_padding: causal argmax towers run on the shortest bucket holding every EOT
      # (same features; region captions are short); other towers ignore it.
      "region_text_features": model.encode_text(
          region_tokens.reshape(b * r, -1), normalize=True, trim_padding=True).reshape(b, r, -1),
  }
  if model.logit_bias is not None:
    out["logit_bias"] = model.logit_bias[...]
  if model.grounding is not None:
    out["pred_boxes"] = model.ground(patches, out["region_text_features"])
  return out


def region_loss(outputs: dict, batch: dict, ctx: train_lib.LossContext) -> tuple[Array, dict]:
  """image_text_weight * CLIP loss + region_weight * region-text loss (+ grounding, + TIC)."""
  rs = settings(ctx.config)
  scale = outputs["logit_scale"]
  mask = batch["box_mask"].astype(bool)
  ids = caption_ids(batch["region_tokens"])
  it_loss, metrics = losses.clip_loss(outputs, batch, impl=ctx.impl, mesh=ctx.mesh)
  metrics = dict(metrics)
  rt_loss = region_text_loss(outputs["region_features"], outputs["region_text_features"], mask,
                             scale, ids=ids if rs["same_caption_positive"] else None)
  total = rs["image_text_weight"] * it_loss + rs["region_weight"] * rt_loss
  metrics.update(image_text_loss=it_loss, region_text_loss=rt_loss,
                 regions_per_image=mask.sum(-1).mean().astype(jnp.float32))
  if rs["grounding_weight"] > 0:
    if "pred_boxes" not in outputs:
      raise ValueError("config.region.grounding_weight > 0 but the model has no grounding head "
                       "(build it with region.grounding=True)")
    g = grounding_loss(outputs["pred_boxes"], batch["boxes"].astype(jnp.float32), mask,
                       l1_weight=rs["grounding_l1"], giou_weight=rs["grounding_giou"])
    total = total + rs["grounding_weight"] * g
    metrics["grounding_loss"] = g
  if rs["tic_weight"] > 0:
    t = tic_loss(outputs["region_text_features"], mask, scale, ids)
    total = total + rs["tic_weight"] * t
    metrics["tic_loss"] = t
  metrics["loss"] = total
  return total, metrics


def trainable_for(config: ml_collections.ConfigDict) -> Callable[[tuple[str, ...]], bool] | None:
  """The optimizer mask of `config.region.trainable` (None = everything)."""
  if settings(config)["trainable"] == "all":
    return None
  return lambda path: bool(path) and path[0] in ("prompter", "grounding")


# ----------------------------------------------------------------------------- eval


def _valid_region_lists(spec: Mapping[str, Any]) -> tuple[np.ndarray, list[str]]:
  """(mask [N, R] of boxes with a caption, captions in the order of mask's True entries)."""
  mask = np.asarray(spec["box_mask"], bool)
  caps = spec.get("region_captions")
  flat: list[str] = []
  if caps is None:
    return mask, flat
  if len(caps) != mask.shape[0]:
    raise ValueError(f"region_captions has {len(caps)} entries for {mask.shape[0]} images")
  for i, row in enumerate(caps):
    k = int(mask[i].sum())
    if len(row) != k or not mask[i, :k].all():
      raise ValueError(f"region_captions[{i}] has {len(row)} captions but box_mask[{i}] = "
                       f"{mask[i].tolist()}; expected one caption per real box, boxes first")
    flat.extend(row)
  return mask, flat


@functools.partial(jax.jit, static_argnums=0)
def _ground_batch(graphdef: nnx.GraphDef, state: nnx.State, images: Array, text: Array) -> Array:
  model = nnx.merge(graphdef, state)
  _, patches = model.image_and_patches(images)
  return model.ground(patches, text)


def predict_boxes(model: RegionCLIP, images: Any, text_features: Any, *, batch_size: int = 64
                  ) -> np.ndarray:
  """The grounding head's boxes [N, R, 4] for caption embeddings [N, R, E] (normalized, as in
  training) over preprocessed images [N, H, W, 3]; fixed-size jitted batches, one device."""
  images, text = np.asarray(images, np.float32), np.asarray(text_features, np.float32)
  n = images.shape[0]
  graphdef, state = nnx.split(model)
  bs = min(batch_size, n)
  out = []
  for start in range(0, n, bs):
    # the last batch is padded (repeating its last row) to the same shape: one compilation
    chunk = [np.concatenate([a[start:start + bs]] + [a[-1:]] * (start + bs - n)) if start + bs > n
             else a[start:start + bs] for a in (images, text)]
    out.append(np.asarray(_ground_batch(graphdef, state, *chunk))[:min(bs, n - start)])
  return np.concatenate(out, axis=0)


def _region_text_metrics(model: clip_lib.CLIP, spec: Mapping[str, Any], feats: np.ndarray,
                         mask: np.ndarray, captions: list[str], tokenizer, *,
                         mesh: jax.sharding.Mesh | None, batch_size: int) -> dict[str, float]:
  """Region <-> caption recall@{1,5} (identical captions merged into one text; a text query
  is a hit when any region it describes ranks in its top k) and, for a model with a grounding
  head, the IoU of the boxes it predicts from the captions (mean, and the share >= 0.5)."""
  unique = sorted(set(captions))
  index = {c: j for j, c in enumerate(unique)}
  txt = eval_lib.encode_texts(model, tokenizer(unique), batch_size=max(batch_size, 1024), mesh=mesh)
  which = np.array([index[c] for c in captions], np.int64)
  ret = eval_lib.retrieval_metrics(feats[mask], txt, [[j] for j in which], ks=(1, 5))
  out = {}
  for k in (1, 5):
    out[f"text_to_region_recall@{k}"] = ret[f"image_retrieval_recall@{k}"]
    out[f"region_to_text_recall@{k}"] = ret[f"text_retrieval_recall@{k}"]
  if isinstance(model, RegionCLIP) and model.grounding is not None:
    text = np.zeros((*mask.shape, txt.shape[1]), np.float32)
    text[mask] = txt[which]
    pred = predict_boxes(model, spec["images"], text)
    iou = box_iou_numpy(pred[mask], np.asarray(spec["boxes"], np.float32)[mask])
    out["grounding_miou"] = float(iou.mean())
    out["grounding_acc@0.5"] = float((iou >= 0.5).mean())
  return out


def box_iou_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of paired xyxy boxes [M, 4] -> [M] (numpy)."""
  lt = np.maximum(a[:, :2], b[:, :2])
  rb = np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)
  return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def _spec_features(model: clip_lib.CLIP, spec: Mapping[str, Any], *, batch_size: int,
                   mesh: jax.sharding.Mesh | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
  method = spec.get("method") or ("head" if isinstance(model, RegionCLIP) else "crop")
  mask, captions = _valid_region_lists(spec)
  boxes = np.where(mask[..., None], np.asarray(spec["boxes"], np.float32), 0.0)
  feats = region_features(model, spec["images"], boxes, method=method, batch_size=batch_size,
                          mesh=mesh, roi_size=spec.get("roi_size"),
                          crop_context=float(spec.get("crop_context", 1.0)))
  return feats, mask, captions


def eval_region_zeroshot(model: clip_lib.CLIP, spec: Mapping[str, Any], tokenizer, *,
                         mesh: jax.sharding.Mesh | None = None, batch_size: int = 256
                         ) -> dict[str, float]:
  """Region classification (zero-shot top-1 / top-5 / mean per-class recall over the valid
  boxes with a label) and, with region_captions, the `_region_text_metrics`.

  Spec: images [N, H, W, 3] preprocessed, boxes [N, R, 4], box_mask [N, R], region_labels
  [N, R] (-1 = none), class_names, templates; optional region_captions (per image, the real
  boxes' captions), `method` (REGION_METHODS; default 'head' for a RegionCLIP, else 'crop'),
  `roi_size` (pooled_patches: RoIAlign bins per side), `crop_context` (crop: box scale).
  """
  for key in ("images", "boxes", "box_mask", "region_labels", "class_names", "templates"):
    if key not in spec:
      raise ValueError(f"eval set kind 'region_zeroshot' misses key {key!r}; it has {sorted(spec)}")
  feats, mask, captions = _spec_features(model, spec, batch_size=batch_size, mesh=mesh)
  labels = np.asarray(spec["region_labels"])
  labelled = mask & (labels >= 0)
  classifier = eval_lib.zero_shot_classifier(model, tokenizer, spec["class_names"],
                                             spec["templates"], batch_size=max(batch_size, 1024),
                                             mesh=mesh)
  out = eval_lib.zero_shot_metrics(feats[labelled], labels[labelled].astype(np.int64), classifier)
  out["num_regions"] = float(labelled.sum())
  if captions:
    out.update(_region_text_metrics(model, spec, feats, mask, captions, tokenizer, mesh=mesh,
                                    batch_size=batch_size))
  return out


def eval_region_retrieval(model: clip_lib.CLIP, spec: Mapping[str, Any], tokenizer, *,
                          mesh: jax.sharding.Mesh | None = None, batch_size: int = 256
                          ) -> dict[str, float]:
  """Region <-> caption retrieval (+ grounding IoU) of a set without class names: images,
  boxes, box_mask, region_captions (e.g. `webdataset_region_set`)."""
  for key in ("images", "boxes", "box_mask", "region_captions"):
    if key not in spec:
      raise ValueError(f"eval set kind 'region_retrieval' misses key {key!r}; it has {sorted(spec)}")
  feats, mask, captions = _spec_features(model, spec, batch_size=batch_size, mesh=mesh)
  if not captions:
    raise ValueError("eval set kind 'region_retrieval' holds no region")
  out = _region_text_metrics(model, spec, feats, mask, captions, tokenizer, mesh=mesh,
                             batch_size=batch_size)
  out["num_regions"] = float(mask.sum())
  return out


for _kind, _fn in (("region_zeroshot", eval_region_zeroshot),
                   ("region_retrieval", eval_region_retrieval)):
  if _kind not in eval_lib.evaluator_kinds():
    eval_lib.register_evaluator(_kind, _fn)


def webdataset_region_set(shards: Any, *, image_size: int, mean: Any, std: Any,
                          max_regions: int = 8, max_samples: int = 0) -> dict[str, Any]:
  """A `region_retrieval` eval set from WebDataset shards whose KEY.json has `regions`
  ({bbox, caption} with normalized boxes): eval preprocessing (resize + centre crop), boxes
  moved into the crop, regions that leave it dropped, samples without a region skipped."""
  from zoo.data import webdataset as wds

  source = wds.TarShardSource(wds.expand_shards(shards))
  pre = transforms.make_preprocess(image_size, mean, std)
  images, all_boxes, masks, captions = [], [], [], []
  try:
    for i in range(len(source)):
      if max_samples and len(images) >= max_samples:
        break
      try:
        s = wds.decode_sample(source[i])
      except wds.SkipSample:
        continue
      h, w = s["image"].shape[:2]
      if not len(s["boxes"]):
        continue
      moved, keep = transforms.transform_boxes(s["boxes"], pre.crop_box(h, w), (h, w))
      idx = np.flatnonzero(keep)[:max_regions]
      if not len(idx):
        continue
      boxes = np.zeros((max_regions, 4), np.float32)
      boxes[:len(idx)] = moved[idx]
      images.append(pre(s["image"]))
      all_boxes.append(boxes)
      masks.append(np.arange(max_regions) < len(idx))
      captions.append([s["region_captions"][j] for j in idx])
  finally:
    source.close()
  if not images:
    raise ValueError(f"webdataset shards {shards!r} hold no sample with a region inside the "
                     "eval crop (KEY.json 'regions': [{'bbox': [x0, y0, x1, y1], 'caption': ...}])")
  return {"kind": "region_retrieval", "images": np.stack(images), "boxes": np.stack(all_boxes),
          "box_mask": np.stack(masks), "region_captions": captions}


_WDS_SETS: dict[tuple, dict[str, Any]] = {}


def region_family_evaluate(model: clip_lib.CLIP, config: ml_collections.ConfigDict, tokenizer,
                           mesh: jax.sharding.Mesh | None) -> dict[str, float]:
  """The region family's extra eval: with WebDataset data and `data.eval_shards`, region <->
  caption retrieval (+ grounding) over the eval shards' regions as `regions/...` (demo data
  gets its `regions` set from data.eval_sets instead)."""
  data = config.data
  if data.get("name", "demo") != "webdataset" or not data.get("eval_shards", ""):
    return {}
  mc = model.config
  key = (str(data.eval_shards), mc.vision.image_size, int(data.get("max_regions", 4)),
         int(data.get("eval_size", 0)))
  if key not in _WDS_SETS:
    _WDS_SETS[key] = webdataset_region_set(
        data.eval_shards, image_size=mc.vision.image_size, mean=mc.image_mean, std=mc.image_std,
        max_regions=key[2], max_samples=key[3])
  metrics = eval_region_retrieval(model, _WDS_SETS[key], tokenizer, mesh=mesh)
  return {f"regions/{k}": v for k, v in metrics.items()}


# ----------------------------------------------------------------------------- register


train_lib.register_family(train_lib.Family(
    "region", forward=region_forward, loss=region_loss, fields=REGION_FIELDS,
    build_model=build_model, make_trainable=trainable_for, evaluate=region_family_evaluate))
