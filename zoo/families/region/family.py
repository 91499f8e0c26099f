"""The `region` family: CLOC-style region-text training on the one loop.

Settings: `config.region` (`Settings`: loss weights, trainable set, head architecture).
Batch fields (the `RegionFields` hook): boxes, box_mask, region_tokens (region_labels).
Loss: image_text_weight * CLIP loss + region_weight * region <-> caption loss over all valid
regions of the global batch (+ grounding L1 / GIoU, + FG-CLIP 2's TIC term). Eval kinds:
region_zeroshot, region_retrieval (evals.py). Paper notes: docs/families/region.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import losses, transforms
from zoo.data import pipeline, webdataset as wds
from zoo.families import base
from zoo.families.region import evals
from zoo.models import clip as clip_lib, configs as registry
from zoo.models.region import RegionCLIP, RegionConfig, check_boxes, region_config

Array = jax.Array
FIELDS = ("image", "tokens", "boxes", "box_mask", "region_tokens")
_NEG = -1e9  # logit of a masked column (finite: no NaN in softmax / gradients)
_ARCH_KEYS = ("roi_size", "sampling_ratio", "width", "heads", "layers", "mlp_ratio",
              "box_frequencies", "residual_pool")


_HEAD = RegionConfig()  # the head architecture's defaults: defined once, in zoo.models.region


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.region`: loss weights and switches, then the head architecture (RegionConfig
  fields, with RegionConfig's defaults) used when not fine-tuning a RegionCLIP checkpoint."""

  image_text_weight: float = 1.0  # CLIP / SigLIP image-text loss
  region_weight: float = 1.0  # region <-> region-caption contrastive loss
  same_caption_positive: bool = True  # identical region captions are positives
  grounding_weight: float = 0.0  # > 0: build the grounding head, add text -> box regression
  grounding_l1: float = 1.0
  grounding_giou: float = 1.0
  tic_weight: float = 0.0  # > 0: FG-CLIP 2's textual intra-modal contrastive term
  trainable: str = "all"  # all | region (prompter / grounding head only)
  roi_size: int = _HEAD.roi_size
  sampling_ratio: int = _HEAD.sampling_ratio
  width: int = _HEAD.width
  heads: int = _HEAD.heads
  layers: int = _HEAD.layers
  mlp_ratio: float = _HEAD.mlp_ratio
  box_frequencies: int = _HEAD.box_frequencies
  residual_pool: bool = _HEAD.residual_pool

  def __post_init__(self):
    if self.trainable not in ("all", "region"):
      raise ValueError(f"config.region.trainable={self.trainable!r}; expected 'all' or 'region'")


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



class RegionFields:
  """Field hook: `boxes` [R, 4] (normalized xyxy after the crop / flip, zero-padded), `box_mask`
  [R], and on request `region_labels` [R] and `region_tokens` [R, L]. Boxes that keep less than
  `min_box_visible` of their area inside the crop are dropped; at most `max_regions` remain."""

  fields = {
      "boxes": "float32 [b, R, 4], normalized xyxy after the crop, zero-padded",
      "box_mask": "bool [b, R], True for real boxes",
      "region_tokens": "int32 [b, R, L], region captions, zero rows for padding",
      "region_labels": "int32 [b, R], class per region (-1 for padding / unknown)",
  }

  def __init__(self, max_regions: int = 4, min_box_visible: float = 0.5):
    self.max_regions, self.min_box_visible = int(max_regions), float(min_box_visible)

  def __call__(self, sample: Mapping[str, Any], view: Any) -> dict[str, np.ndarray]:
    if not any(f in view.fields for f in self.fields):
      return {}
    r = self.max_regions
    boxes = np.asarray(sample.get("boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    captions = list(sample.get("region_captions", []))
    labels = np.asarray(sample.get("region_labels", np.full(len(boxes), -1)), np.int32)
    if len(captions) != len(boxes) or len(labels) != len(boxes):
      raise wds.SkipSample("bad_regions", f"{len(boxes)} boxes, {len(captions)} captions")
    moved, keep = transforms.transform_boxes(boxes, view.crop, view.image_hw, view.hflip,
                                             min_visible=self.min_box_visible)
    idx = np.flatnonzero(keep)[:r]  # regions that leave the crop are dropped
    out = {"boxes": np.zeros((r, 4), np.float32), "box_mask": np.zeros((r,), bool)}
    out["boxes"][:len(idx)] = moved[idx]
    out["box_mask"][:len(idx)] = True
    if "region_labels" in view.fields:
      out["region_labels"] = np.full((r,), -1, np.int32)
      out["region_labels"][:len(idx)] = labels[idx]
    if "region_tokens" in view.fields:
      length = view.context_length or int(view.tokenize([""], "region_tokens").shape[1])
      toks = np.zeros((r, length), np.int32)
      if len(idx):
        toks[:len(idx)] = view.tokenize([captions[i] for i in idx], "region_tokens")
      out["region_tokens"] = toks
    return out


def field_hook(data_cfg: Any) -> RegionFields:
  """The region fields hook for a data config (`max_regions`, `min_box_visible`)."""
  return RegionFields(int(pipeline.config_value(data_cfg, "max_regions", 4)),
                      float(pipeline.config_value(data_cfg, "min_box_visible", 0.5)))


# ----------------------------------------------------------------------------- family


class RegionFamily(base.Family):
  """Region heads (RegionCLIP) on the train loop."""

  name = "region"
  fields = FIELDS
  eval_kinds = {"region_zeroshot": evals.eval_region_zeroshot,
                "region_retrieval": evals.eval_region_retrieval}

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return base.parse_section(config, "region", Settings)

  def build_model(self, config: ml_collections.ConfigDict, settings: Settings) -> RegionCLIP:
    """A RegionCLIP over `config.model` (+ model_overrides) with the head of the settings; then
    `config.init_from`'s weights where names and shapes match (a CLIP checkpoint fills the
    towers, a RegionCLIP checkpoint also the head)."""
    arch = {k: getattr(settings, k) for k in _ARCH_KEYS}
    arch["grounding"] = settings.grounding_weight > 0
    model = RegionCLIP(region_config(registry.get_model_config(
        config.model, dtype=base.resolve_dtype(config.dtype), **base.model_overrides(config)),
        **arch), rngs=nnx.Rngs(config.seed))
    base.init_params_from(config, model)
    return model

  def field_hook(self, config: ml_collections.ConfigDict, settings: Settings, model: nnx.Module
                 ) -> RegionFields:
    return field_hook(config.data)

  def forward(self, model: RegionCLIP, batch: dict, rng: Array, settings: Settings) -> dict:
    """Image / text features (as CLIP), normalized region features and region-caption
    features [B, R, E], and predicted boxes when the model has a grounding head."""
    del rng, settings
    if not isinstance(model, RegionCLIP):
      raise TypeError(f"the region family needs a RegionCLIP, got {type(model).__name__}")
    missing = [k for k in FIELDS if k not in batch]
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

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[Array, dict]:
    """image_text_weight * CLIP loss + region_weight * region-text loss (+ grounding, + TIC)."""
    rs = ctx.settings
    scale = outputs["logit_scale"]
    mask = batch["box_mask"].astype(bool)
    ids = caption_ids(batch["region_tokens"])
    it_loss, metrics = losses.clip_loss(outputs, batch, impl=ctx.impl, mesh=ctx.mesh)
    metrics = dict(metrics)
    rt_loss = region_text_loss(outputs["region_features"], outputs["region_text_features"], mask,
                               scale, ids=ids if rs.same_caption_positive else None)
    total = rs.image_text_weight * it_loss + rs.region_weight * rt_loss
    metrics.update(image_text_loss=it_loss, region_text_loss=rt_loss,
                   regions_per_image=mask.sum(-1).mean().astype(jnp.float32))
    if rs.grounding_weight > 0:
      if "pred_boxes" not in outputs:
        raise ValueError("config.region.grounding_weight > 0 but the model has no grounding head "
                         "(build it with region.grounding=True)")
      g = grounding_loss(outputs["pred_boxes"], batch["boxes"].astype(jnp.float32), mask,
                         l1_weight=rs.grounding_l1, giou_weight=rs.grounding_giou)
      total = total + rs.grounding_weight * g
      metrics["grounding_loss"] = g
    if rs.tic_weight > 0:
      t = tic_loss(outputs["region_text_features"], mask, scale, ids)
      total = total + rs.tic_weight * t
      metrics["tic_loss"] = t
    metrics["loss"] = total
    return total, metrics

  def trainable(self, settings: Settings) -> Callable[[tuple[str, ...]], bool] | None:
    """`trainable` region: the prompter and grounding head only (None = everything)."""
    if settings.trainable == "all":
      return None
    return lambda path: bool(path) and path[0] in ("prompter", "grounding")

  def evaluate(self, model: nnx.Module, config: ml_collections.ConfigDict, settings: Settings,
               tokenizer: Any, mesh: jax.sharding.Mesh | None) -> dict[str, float]:
    return evals.webdataset_region_metrics(model, config.data, tokenizer, mesh)


FAMILY = RegionFamily()


def default_settings() -> ml_collections.ConfigDict:
  """`config.region` with the defaults (configs.base.region() returns it)."""
  return ml_collections.ConfigDict(dataclasses.asdict(Settings()))
