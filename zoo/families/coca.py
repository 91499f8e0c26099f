"""The `coca` family: CoCa training, open_clip's CoCaLoss (contrastive + captioning).

Settings: `config.coca` (`Settings`: open_clip's --coca-caption-loss-weight 2.0 and
--coca-contrastive-loss-weight 1.0). Batch fields: image, tokens (the caption; teacher forcing
predicts tokens[:, 1:] from tokens[:, :-1]). Loss: clip_loss_weight * CLIP's softmax contrastive
loss + caption_loss_weight * the token cross-entropy, pad labels ignored (mean over the global
batch's non-pad labels, as torch's CrossEntropyLoss(ignore_index=pad_id)). The model is
zoo.models.coca (a `config.model` whose config is a CoCaConfig, e.g. coca_ViT-B-32).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from zoo import losses
from zoo.families import base
from zoo.models import coca, configs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.coca`."""

  caption_loss_weight: float = 2.0
  clip_loss_weight: float = 1.0


def caption_loss(logits: Array, labels: Array, pad_id: int = 0) -> Array:
  """Mean next-token cross-entropy of `logits` [B, L, V] against `labels` [B, L], pad ignored."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - picked
  keep = (labels != pad_id).astype(jnp.float32)
  return jnp.sum(ce * keep) / jnp.maximum(jnp.sum(keep), 1.0)


class CoCaFamily(base.Family):
  """CoCa: the CoCa model of `config.model`, contrastive + captioning loss."""

  name = "coca"

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return base.parse_section(config, "coca", Settings)

  def build_model(self, config: ml_collections.ConfigDict, settings: Settings) -> coca.CoCa:
    del settings
    model_config = configs.get_model_config(config.model, dtype=base.resolve_dtype(config.dtype),
                                            **base.model_overrides(config))
    if not isinstance(model_config, coca.CoCaConfig):
      raise ValueError(f"config.family='coca' needs a CoCa model (e.g. coca_ViT-B-32, "
                       f"coca-demo-tiny); config.model={config.model!r} is not one")
    model = coca.CoCa(model_config, rngs=nnx.Rngs(config.seed))
    base.init_params_from(config, model)
    return model

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[Array, dict]:
    del batch
    s = ctx.settings
    contrastive, _ = losses.clip_loss(outputs, {}, impl=ctx.impl, mesh=ctx.mesh)
    caption = caption_loss(outputs["logits"], outputs["labels"])
    total = s.clip_loss_weight * contrastive + s.caption_loss_weight * caption
    return total, {"loss": total, "contrastive_loss": contrastive, "caption_loss": caption,
                   "logit_scale": outputs["logit_scale"]}


FAMILY = CoCaFamily()


def default_settings() -> ml_collections.ConfigDict:
  """`config.coca` with open_clip's defaults (configs.base.coca() returns it)."""
  return ml_collections.ConfigDict(dataclasses.asdict(Settings()))
