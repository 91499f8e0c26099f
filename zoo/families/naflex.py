"""SigLIP 2 NaFlex training: images at their own aspect ratio, as many patches as the budget.

Batch fields: `patches` float32 [b, N, p*p*3] (each random-resized crop resized to the largest
patch grid within the budget, aspect kept, normalized and patchified: transforms.NaFlexPreprocess,
transformers' Siglip2ImageProcessor), `patch_mask` bool [b, N] (False = padding),
`spatial_shapes` int32 [b, 2] (rows, cols of patches), `tokens`. The pipeline pads a batch to
N = transforms.bucket_length(its longest image, budget): the next power of two, capped at the
budget, so the jitted step sees about log2(budget) shapes. Forward: `CLIP.encode_patches`
(positions resized per image, padding masked in attention and in the MAP head); loss: the CLIP
family's (sigmoid for SigLIP). Settings (`config.naflex`): `max_patches`, the patch budget
(0 = the model's `vision.max_patches`, else its position grid's size).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import errors, transforms
from zoo.families import base


@dataclasses.dataclass(frozen=True)
class Settings:
  max_patches: int = 0  # the patch budget per image (0 = the model's)

  def __post_init__(self):
    if self.max_patches < 0:
      raise errors.UserError(f"config.naflex.max_patches={self.max_patches} must be >= 0")


def default_settings() -> ml_collections.ConfigDict:
  """`config.naflex` with the defaults (configs.base.naflex() returns it)."""
  return ml_collections.ConfigDict(dataclasses.asdict(Settings()))


class PatchHook:
  """The NaFlex fields of one sample: its crop (the pipeline's random-resized-crop and flip)
  through `NaFlexPreprocess`; `ragged` tells the pipeline to pad them to a bucketed length."""

  def __init__(self, preprocess: transforms.NaFlexPreprocess):
    self.preprocess = preprocess
    dim = 3 * preprocess.patch_size ** 2
    self.fields = {
        "patches": f"float32 [b, N, {dim}], the crop patchified at <= "
                   f"{preprocess.max_patches} patches, zero-padded",
        "patch_mask": "bool [b, N], True for a real patch",
        "spatial_shapes": "int32 [b, 2], (rows, cols) of each image's patches"}
    self.ragged = {"patches": preprocess.max_patches, "patch_mask": preprocess.max_patches}

  def __call__(self, sample: Mapping[str, Any], view: Any) -> dict[str, np.ndarray]:
    top, left, h, w = (int(v) for v in view.crop)
    crop = np.asarray(sample["image"])[top:top + h, left:left + w]
    if view.hflip:
      crop = crop[:, ::-1]
    patches, shape = self.preprocess(np.ascontiguousarray(crop))
    return {"patches": patches, "patch_mask": np.ones(len(patches), bool),
            "spatial_shapes": np.asarray(shape, np.int32)}


class NaFlexFamily(base.Family):
  name = "naflex"
  fields = ("patches", "patch_mask", "spatial_shapes", "tokens")

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return base.parse_section(config, "naflex", Settings)

  def build_model(self, config: ml_collections.ConfigDict, settings: Settings) -> nnx.Module:
    model = super().build_model(config, settings)
    if not getattr(model.config.vision, "naflex", False):
      raise errors.UserError(f"config.family='naflex' needs a NaFlex image tower; "
                             f"{config.model!r} has none (set model_overrides.vision.naflex)")
    return model

  def field_hook(self, config: ml_collections.ConfigDict, settings: Settings,
                 model: nnx.Module) -> PatchHook:
    del config
    return PatchHook(transforms.naflex_preprocess(model.config, settings.max_patches))

  def forward(self, model: nnx.Module, batch: dict, rng: jax.Array, settings: Settings
              ) -> dict:
    del rng, settings
    out = {"image_features": model.encode_patches(batch["patches"], batch["spatial_shapes"],
                                                  batch["patch_mask"], normalize=True),
           "text_features": model.encode_text(batch["tokens"], normalize=True),
           "logit_scale": jnp.exp(model.logit_scale[...])}
    if model.logit_bias is not None:
      out["logit_bias"] = model.logit_bias[...]
    return out


FAMILY = NaFlexFamily()
