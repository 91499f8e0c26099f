"""Old import path of the region heads (kept for one release): re-exports zoo.models.region and
zoo.families.region."""

from __future__ import annotations

import ml_collections

from zoo.families.region.evals import (
  REGION_METHODS,
  box_iou_numpy,
  eval_region_retrieval,
  eval_region_zeroshot,
  predict_boxes,
  region_features,
  webdataset_region_metrics,
  webdataset_region_set,
)
from zoo.families.region.family import (
  FAMILY,
  RegionFields,
  Settings,
  box_area,
  caption_ids,
  default_settings,
  generalized_iou,
  grounding_loss,
  region_positives,
  region_text_loss,
  tic_loss,
)
from zoo.models.region import (
  GroundingHead,
  Prompter,
  RegionBaselines,
  RegionCLIP,
  RegionCLIPConfig,
  RegionConfig,
  box_fourier_features,
  check_boxes,
  create,
  crop_and_resize,
  expand_boxes,
  from_clip,
  patch_grid,
  project_patch_tokens,
  region_config,
  roi_align,
  roi_mean,
  sampling_ratio_for,
  valid_boxes,
)


def settings(config: ml_collections.ConfigDict) -> Settings:
  return FAMILY.settings(config)


def build_model(config: ml_collections.ConfigDict) -> RegionCLIP:
  return FAMILY.build_model(config, FAMILY.settings(config))


def trainable_for(config: ml_collections.ConfigDict):
  return FAMILY.trainable(FAMILY.settings(config))


def region_forward(model, batch, rng=None, settings=None):
  return FAMILY.forward(model, batch, rng, settings)


def region_family_evaluate(model, config: ml_collections.ConfigDict, tokenizer, mesh):
  return webdataset_region_metrics(model, config.data, tokenizer, mesh)


__all__ = [
    "GroundingHead", "Prompter", "REGION_METHODS", "RegionBaselines", "RegionCLIP",
    "RegionCLIPConfig", "RegionConfig", "RegionFields", "Settings", "box_area",
    "box_fourier_features", "box_iou_numpy", "build_model", "caption_ids", "check_boxes",
    "create", "crop_and_resize", "default_settings", "eval_region_retrieval",
    "eval_region_zeroshot", "expand_boxes", "from_clip", "generalized_iou", "grounding_loss",
    "patch_grid", "predict_boxes", "project_patch_tokens", "region_config", "region_features",
    "region_family_evaluate", "region_forward", "region_positives", "region_text_loss",
    "roi_align", "roi_mean", "sampling_ratio_for", "settings", "tic_loss", "trainable_for",
    "valid_boxes", "webdataset_region_set",
]
