"""CLOC-style promptable region embeddings for any zoo CLIP (the region family's model side).

`roi_align`: differentiable RoIAlign over the ViT patch-token grid (normalized xyxy boxes,
torchvision aligned=True conventions, separable bilinear weights: one einsum, no gathers).
`Prompter`: a small transformer over [box token; RoI bin tokens] -> region embedding.
`RegionCLIP`: a CLIP (same towers and API) plus the prompter and an optional text -> box
`GroundingHead`; `encode_regions(images, boxes, box_mask)` -> ([B, R, E], mask [B, R]).
`RegionBaselines`: crop and mean-pooled-patch region features of a plain CLIP.
Paper notes: docs/families/region.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.models import clip as clip_lib, configs
from zoo.models.layers import LayerNorm, Linear, Transformer, get_activation, param

Array = jax.Array

# A CPU-sized architecture for the region demo: test-tiny's towers at 64 px, so the patch grid
# is 8 x 8 (test-tiny's 4 x 4 is too coarse for boxes; demo-tiny's 192-wide tower is slow).
configs.register("region-tiny", configs.CLIPConfig(
    32, configs.VisionConfig(image_size=64, patch_size=8, width=64, layers=2, heads=2),
    configs.TextConfig(width=64, heads=2, layers=2)))
# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class RegionConfig:
  """Region head architecture, stored with the model.

  roi_size: RoI bins per side. sampling_ratio: bilinear samples per bin per side (0: the
  smallest that gives at least one sample per patch, ceil(grid / roi_size)). width / heads /
  layers: the prompter transformer (width 0 = the vision width; heads 0 = width // 64, >= 1).
  box_frequencies: Fourier frequencies per box coordinate. residual_pool: see Prompter.
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
    return configs.checked_config(cls, d, "region")


@dataclasses.dataclass(frozen=True)
class RegionCLIPConfig(configs.CLIPConfig):
  """A CLIPConfig plus the region head (`region`)."""

  region: RegionConfig = RegionConfig()

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "RegionCLIPConfig":
    d = dict(d)
    region = RegionConfig.from_dict(d.pop("region", {}) or {})
    return dataclasses.replace(super().from_dict(d), region=region)


def region_config(base: configs.CLIPConfig | str, **region: Any) -> RegionCLIPConfig:
  """A RegionCLIPConfig over an architecture (a name or CLIPConfig); kwargs: RegionConfig."""
  if isinstance(base, str):
    base = configs.get_model_config(base)
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(configs.CLIPConfig)}
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
  normalized xyxy -> [B, R, S, S, C] (S = output_size), float32. Conventions: torchvision's
  roi_align(aligned=True) on the patch grid (patch centres at integers, samples clamped)."""
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
  """RoI bin tokens + box prompt -> region embedding [..., E]: a small pre-LN transformer over
  [box token; RoI bin tokens + per-bin positions]; the box token (an MLP of Fourier features of
  the box) gives the output. With `residual_pool` the output projection starts at zero and is
  added to the box's mean-pooled patch tokens through the image tower's projection."""

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
                      "one with zoo.models.region.region_config(...)")
    super().__init__(config, rngs=rngs)
    v = config.vision
    dtype = jnp.dtype(config.dtype)
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


def create(name: str | configs.CLIPConfig, *, seed: int = 0, **region: Any) -> RegionCLIP:
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
