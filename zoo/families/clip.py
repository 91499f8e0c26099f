"""The `clip` family: CLIP / SigLIP contrastive training (the `Family` defaults, plus soft labels).

Batch fields: image, tokens. Loss: softmax (CLIP) or sigmoid (SigLIP, a model with a logit
bias) contrastive loss over the global batch, through zoo.losses -> kernels. Softmax takes
`config.loss.label_smoothing` eps (target 1 - eps on the pair, eps / (B - 1) on each negative).
Notes: docs/families/clip.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from zoo import losses
from zoo.families import base


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the clip family reads of `config.loss` (its other keys belong to the loop)."""

  label_smoothing: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"config.loss.label_smoothing={self.label_smoothing}: expected 0 <= eps < 1")


class ClipFamily(base.Family):
  """Plain CLIP / SigLIP: the `Family` defaults, with label smoothing for softmax."""

  name = "clip"

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    loss = config.get("loss", None) or {}
    return Settings(label_smoothing=float(loss.get("label_smoothing", 0.0) or 0.0))

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[jax.Array, dict]:
    # Subclasses with their own settings (no label_smoothing) get the plain loss.
    eps = float(getattr(ctx.settings, "label_smoothing", 0.0) or 0.0)
    if not eps:
      return super().loss(outputs, batch, ctx)
    if outputs.get("logit_bias") is not None:
      raise ValueError("config.loss.label_smoothing applies to softmax (CLIP) only; this model "
                       "has a logit bias (SigLIP)")
    loss = losses.contrastive_loss(outputs["image_features"], outputs["text_features"],
                                   outputs["logit_scale"], kind="softmax", impl=ctx.impl,
                                   mesh=ctx.mesh, label_smoothing=eps)
    return loss, {"loss": loss, "logit_scale": outputs["logit_scale"],
                  "label_smoothing": jnp.asarray(eps, jnp.float32)}


FAMILY = ClipFamily()
