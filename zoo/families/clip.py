"""The `clip` family: CLIP / SigLIP contrastive training (the `Family` defaults, plus soft labels).

Batch fields: image, tokens. Loss: softmax (CLIP) or sigmoid (SigLIP, a model with a logit
bias) contrastive loss over the global batch, through zoo.losses -> kernels. Softmax takes
`config.loss.label_smoothing` eps (target 1 - eps on the pair, eps / (B - 1) on each negative),
constant or decaying to `label_smoothing_end` over `total_steps` (LightCLIP's softened labels).
Notes: docs/families/clip.md.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from zoo import losses
from zoo.families import base

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Label smoothing, read from `config.loss` (its other keys belong to the loop)."""

  label_smoothing: float = 0.0  # eps at step 0
  label_smoothing_end: float = 0.0  # eps at total_steps (linear / cosine schedules)
  label_smoothing_schedule: str = "constant"  # constant | linear | cosine
  total_steps: int = 1

  def __post_init__(self):
    for name in ("label_smoothing", "label_smoothing_end"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"config.loss.{name}={getattr(self, name)}: expected 0 <= eps < 1")
    if self.label_smoothing_schedule not in SCHEDULES:
      raise ValueError(f"config.loss.label_smoothing_schedule="
                       f"{self.label_smoothing_schedule!r}: expected one of {SCHEDULES}")

  @property
  def smoothed(self) -> bool:
    return bool(self.label_smoothing or (self.label_smoothing_schedule != "constant"
                                         and self.label_smoothing_end))

  def eps(self, step: jax.Array | int | None) -> jax.Array | float:
    """eps at `step` (None: step 0): constant, or from label_smoothing to label_smoothing_end
    linearly / along a half cosine over total_steps, then held."""
    start, end = self.label_smoothing, self.label_smoothing_end
    if self.label_smoothing_schedule == "constant" or step is None:
      return start
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.total_steps, 1), 0.0, 1.0)
    if self.label_smoothing_schedule == "linear":
      frac = 1.0 - t
    else:
      frac = 0.5 * (1.0 + jnp.cos(math.pi * t))
    return end + (start - end) * frac


def smoothing_settings(config: ml_collections.ConfigDict) -> Settings:
  """The label-smoothing settings of `config.loss` (shared by families with a CLIP loss)."""
  loss = config.get("loss", None) or {}
  return Settings(
      label_smoothing=float(loss.get("label_smoothing", 0.0) or 0.0),
      label_smoothing_end=float(loss.get("label_smoothing_end", 0.0) or 0.0),
      label_smoothing_schedule=str(loss.get("label_smoothing_schedule", "constant") or
                                   "constant"),
      total_steps=int(config.get("total_steps", 1) or 1))


def clip_loss(outputs: dict, ctx: base.LossContext, smoothing: Settings | None
              ) -> tuple[jax.Array, dict]:
  """CLIP / SigLIP loss of `outputs` with `smoothing`'s eps at `ctx.step` (softmax only)."""
  if smoothing is None or not smoothing.smoothed:
    return losses.clip_loss(outputs, {}, impl=ctx.impl, mesh=ctx.mesh)
  if outputs.get("logit_bias") is not None:
    raise ValueError("config.loss.label_smoothing applies to softmax (CLIP) only; this model "
                     "has a logit bias (SigLIP)")
  eps = smoothing.eps(ctx.step)
  loss = losses.contrastive_loss(outputs["image_features"], outputs["text_features"],
                                 outputs["logit_scale"], kind="softmax", impl=ctx.impl,
                                 mesh=ctx.mesh, label_smoothing=eps)
  return loss, {"loss": loss, "logit_scale": outputs["logit_scale"],
                "label_smoothing": jnp.asarray(eps, jnp.float32)}


class ClipFamily(base.Family):
  """Plain CLIP / SigLIP: the `Family` defaults, with label smoothing for softmax."""

  name = "clip"

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return smoothing_settings(config)

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[jax.Array, dict]:
    # Subclasses with their own settings (no label smoothing) get the plain loss.
    del batch
    return clip_loss(outputs, ctx, ctx.settings if isinstance(ctx.settings, Settings) else None)


FAMILY = ClipFamily()
