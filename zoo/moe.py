"""Old import path of CLIP-MoE (kept for one release): re-exports zoo.models.moe (model),
zoo.families.moe (settings, loss, DMU) and zoo.convert.clip_moe (PyTorch layout)."""

from __future__ import annotations

import ml_collections

from zoo.convert.clip_moe import export_safetensors, from_clip_moe, to_clip_moe
from zoo.families.moe.dmu import ClusterLabeler, assign_clusters, kmeans, stage_config
from zoo.families.moe.family import (
  FAMILY,
  DMUSettings,
  Settings,
  cluster_contrastive_loss,
  default_settings,
  parse_settings,
)
from zoo.models.moe import (
  MoECLIP,
  MoECLIPConfig,
  MoEConfig,
  MoEMLP,
  Routing,
  balance_loss,
  capacity_routing,
  capture_aux,
  create,
  dense_view,
  moe_config,
  resolve_layers,
  route,
  summarize_aux,
  upcycle,
  z_loss,
)
from zoo.models.moe_stats import flops_per_token, parameter_counts

settings = parse_settings


def build_model(config: ml_collections.ConfigDict) -> MoECLIP:
  """The model of a `moe` run (see zoo.families.moe.family.MoEFamily.build_model)."""
  return FAMILY.build_model(config, FAMILY.settings(config))


def trainable_for(config: ml_collections.ConfigDict):
  """The optimizer mask of `config.moe.trainable` (None = everything)."""
  return FAMILY.trainable(FAMILY.settings(config))


__all__ = [
    "ClusterLabeler", "DMUSettings", "MoECLIP", "MoECLIPConfig", "MoEConfig", "MoEMLP", "Routing",
    "Settings", "assign_clusters", "balance_loss", "build_model", "capacity_routing", "capture_aux",
    "cluster_contrastive_loss", "create", "default_settings", "dense_view", "export_safetensors",
    "flops_per_token", "from_clip_moe", "kmeans", "moe_config", "parameter_counts",
    "resolve_layers", "route", "settings", "stage_config", "summarize_aux", "to_clip_moe",
    "trainable_for", "upcycle", "z_loss",
]
