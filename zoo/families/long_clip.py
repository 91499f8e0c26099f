"""The `long_clip` family: Long-CLIP fine-tuning (stretched positions + primary-component matching).

Settings: `config.long_clip` (`Settings`). Batch fields: `long_tokens`, `short_tokens` (the
long caption and its first sentence / short caption). Loss: CL(fine image, long caption) +
short_weight * CL(PCA-coarse image, short caption). Eval kind: `long_retrieval`.
Paper notes and deviations: docs/families/long_clip.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import losses, tokenizers
from zoo.data import webdataset as wds
from zoo.eval import evaluator
from zoo.families import base
from zoo.models import clip as clip_lib
from zoo.models.long_clip import (
  LONG_CLIP_COMPONENTS,
  LONG_CLIP_CONTEXT_LENGTH,
  LONG_CLIP_KEEP,
  pca_reconstruct,
  stretch_positions,
)
from zoo.weights import model_dir

Array = jax.Array
FIELDS = ("image", "long_tokens", "short_tokens")


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.long_clip`."""

  context_length: int = LONG_CLIP_CONTEXT_LENGTH  # text positions after stretching
  keep: int = LONG_CLIP_KEEP  # leading positions kept bit-identical (and frozen)
  components: int = LONG_CLIP_COMPONENTS  # principal components of the coarse image feature
  short_weight: float = 1.0  # weight of the coarse-image <-> short-caption term
  renormalize_coarse: bool = False  # Long-CLIP uses the PCA reconstruction as is
  freeze_kept_positions: bool = True  # no gradient into positions [0, keep)


def pcm_loss(image_features: Array, long_text_features: Array, short_text_features: Array,
             logit_scale: Array, *, components: int = LONG_CLIP_COMPONENTS,
             short_weight: float = 1.0, renormalize_coarse: bool = False,
             impl: str = "reference", mesh: jax.sharding.Mesh | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """Long-CLIP's loss: CL(fine image, long text) + short_weight * CL(coarse image, short text).

  Features are L2-normalized [B, E] (row i of each is one sample); the coarse image feature is
  `pca_reconstruct(image_features, components)` over the (global) batch; CL is CLIP's softmax
  contrastive loss (`zoo.losses.contrastive_loss`). Returns (total, metrics).
  """
  shapes = {image_features.shape, long_text_features.shape, short_text_features.shape}
  if len(shapes) != 1:
    raise ValueError(f"pcm_loss: image, long-text and short-text features must share one [B, E] "
                     f"shape, got {image_features.shape}, {long_text_features.shape}, "
                     f"{short_text_features.shape}")
  coarse = pca_reconstruct(image_features, components)
  if renormalize_coarse:
    coarse = clip_lib.l2_normalize(coarse)
  loss_long = losses.contrastive_loss(image_features, long_text_features, logit_scale,
                                      kind="softmax", impl=impl, mesh=mesh)
  loss_short = losses.contrastive_loss(coarse, short_text_features, logit_scale,
                                       kind="softmax", impl=impl, mesh=mesh)
  total = loss_long + short_weight * loss_short
  return total, {"loss": total, "loss_long": loss_long, "loss_short": loss_short,
                 "logit_scale": logit_scale}


class CaptionFields:
  """Field hook: `long_tokens` (the long caption, else the caption) and `short_tokens` (the
  short caption, else the caption's first sentence)."""

  fields = {"long_tokens": "int32 [b, L], the long caption",
            "short_tokens": "int32 [b, L], the short caption"}

  def __call__(self, sample: Mapping[str, Any], view: Any) -> dict[str, np.ndarray]:
    out = {}
    if "long_tokens" in view.fields:
      text = sample.get("long_caption") or sample["caption"]
      out["long_tokens"] = view.tokenize([text], "long_tokens")[0]
    if "short_tokens" in view.fields:
      text = sample.get("short_caption") or wds.first_sentence(sample["caption"])
      out["short_tokens"] = view.tokenize([text], "short_tokens")[0]
    return out


def eval_long_retrieval(model: nnx.Module, spec: Mapping[str, Any], tokenizer, *,
                        mesh: jax.sharding.Mesh | None = None, batch_size: int = 256
                        ) -> dict[str, float]:
  """Image <-> long-caption recall@K; captions are tokenized at the model's context length.

  Spec: `images`, `captions` (long), `image_to_captions` as a "retrieval" set. With the CLIP
  BPE tokenizer it also reports `truncated_fraction`, the share of captions longer than the
  model reads. (The demo data's "retrieval_long" set, kind "retrieval", gives the same recalls
  when the tokenizer has the model's context length, as the train loop's does.)
  """
  missing = [k for k in ("images", "captions", "image_to_captions") if k not in spec]
  if missing:
    raise ValueError(f"eval set 'long_retrieval' misses keys {missing}; it has {sorted(spec)}")
  length = int(model.config.text.context_length)
  captions = list(spec["captions"])
  tokens = tokenizer(captions, context_length=length)
  img = evaluator.encode_images(model, spec["images"], batch_size=batch_size, mesh=mesh)
  txt = evaluator.encode_texts(model, tokens, batch_size=max(batch_size, 1024), mesh=mesh)
  metrics = evaluator.retrieval_metrics(img, txt, spec["image_to_captions"],
                                       ks=spec.get("ks", (1, 5, 10)))
  if isinstance(tokenizer, tokenizers.ClipTokenizer):
    lengths = np.array([len(tokenizer.encode(c)) + 2 for c in captions])  # + SOT, EOT
    metrics["truncated_fraction"] = float(np.mean(lengths > length))
  return metrics


class LongClipFamily(base.Family):
  """Long-CLIP on the train loop."""

  name = "long_clip"
  fields = FIELDS
  eval_kinds = {"long_retrieval": eval_long_retrieval}

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return base.parse_section(config, "long_clip", Settings)

  def build_model(self, config: ml_collections.ConfigDict, settings: Settings) -> clip_lib.CLIP:
    """`config.model` with `init_from`'s weights, reading `settings.context_length` tokens.

    `init_from` holding a CLIP of another context length (77) is loaded and stretched; one that
    already reads `context_length` tokens (a Long-CLIP checkpoint) is loaded as is; without
    `init_from` the fresh model is stretched.
    """
    target = settings.context_length
    frozen = settings.keep if settings.freeze_kept_positions else 0
    source_length = None
    if config.get("init_from", ""):
      source_length = model_dir.load_config(config.init_from)[0].text.context_length
    overrides = base.model_overrides(config)
    text = {**overrides.pop("text", {}), "frozen_positions": frozen}
    if source_length == target:
      text["context_length"] = target
    model = clip_lib.create(config.model, seed=config.seed,
                            dtype=base.resolve_dtype(config.dtype), text=text, **overrides)
    base.init_params_from(config, model)
    length = model.config.text.context_length
    if length != target:
      if length > target:
        raise ValueError(f"long_clip.context_length={target} is shorter than the model's text "
                         f"context {length}; Long-CLIP only stretches")
      model = stretch_positions(model, target, settings.keep,
                                freeze=settings.freeze_kept_positions)
    return model

  def field_hook(self, config: ml_collections.ConfigDict, settings: Settings, model: nnx.Module
                 ) -> CaptionFields:
    return CaptionFields()

  def forward(self, model: clip_lib.CLIP, batch: dict, rng: Array, settings: Settings) -> dict:
    """Normalized image features, long- and short-caption text features, logit scale. Each
    caption runs at the width the data delivers (causal towers: same features for any padding)."""
    del rng, settings
    missing = [k for k in FIELDS if k not in batch]
    if missing:
      raise ValueError(f"long_clip batch lacks {missing}; it has {sorted(batch)}")
    encode = lambda tokens: clip_lib.l2_normalize(model.text(tokens).astype(jnp.float32))
    return {
        "image_features": model.encode_image(batch["image"], normalize=True),
        "long_text_features": encode(batch["long_tokens"]),
        "short_text_features": encode(batch["short_tokens"]),
        "logit_scale": jnp.exp(model.logit_scale[...]),
    }

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[Array, dict]:
    s = ctx.settings
    return pcm_loss(outputs["image_features"], outputs["long_text_features"],
                    outputs["short_text_features"], outputs["logit_scale"],
                    components=s.components, short_weight=s.short_weight,
                    renormalize_coarse=s.renormalize_coarse, impl=ctx.impl, mesh=ctx.mesh)


FAMILY = LongClipFamily()


def default_settings() -> ml_collections.ConfigDict:
  """`config.long_clip` with Long-CLIP's defaults (configs.base.long_clip() returns it)."""
  return ml_collections.ConfigDict(dataclasses.asdict(Settings()))
