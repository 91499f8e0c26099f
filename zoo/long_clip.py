"""Old import path of Long-CLIP (kept for one release): re-exports zoo.models.long_clip,
zoo.families.long_clip and zoo.convert.long_clip; `main` is `python -m zoo.convert`."""

from __future__ import annotations

import ml_collections

from zoo.convert import cli
from zoo.convert.long_clip import from_long_clip, to_long_clip
from zoo.families.long_clip import (
  FAMILY,
  CaptionFields,
  Settings,
  default_settings,
  eval_long_retrieval,
  pcm_loss,
)
from zoo.models.long_clip import (
  LONG_CLIP_COMPONENTS,
  LONG_CLIP_CONTEXT_LENGTH,
  LONG_CLIP_KEEP,
  pca_reconstruct,
  stretch_coordinates,
  stretch_positions,
  stretch_table,
)


def settings(config: ml_collections.ConfigDict) -> Settings:
  return FAMILY.settings(config)


def build_model(config: ml_collections.ConfigDict):
  return FAMILY.build_model(config, FAMILY.settings(config))


def main(argv: list[str] | None = None) -> int:
  """`python -m zoo.convert {from-long-clip,to-long-clip} ...`."""
  return cli.main(argv)


__all__ = [
    "CaptionFields", "LONG_CLIP_COMPONENTS", "LONG_CLIP_CONTEXT_LENGTH", "LONG_CLIP_KEEP",
    "Settings", "build_model", "default_settings", "eval_long_retrieval", "from_long_clip", "main",
    "pca_reconstruct", "pcm_loss", "settings", "stretch_coordinates", "stretch_positions",
    "stretch_table", "to_long_clip",
]
