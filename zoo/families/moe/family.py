"""The `moe` family: CLIP-MoE training (router / experts / FFN phases), DMU as its driver.

Settings: `config.moe` (`Settings`, with `config.moe.dmu`: `DMUSettings`). Loss: the contrastive
loss (within k-means clusters when the batch has `cluster`, DMU stages) + balance_weight *
load-balancing loss + z_weight * router z-loss, the aux losses sowed by the MoE layers.
Paper notes: docs/families/moe.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from zoo import errors, losses
from zoo.families import base
from zoo.families.moe import dmu
from zoo.models import clip as clip_lib
from zoo.models.moe import MoECLIPConfig, capacity_routing, capture_aux, summarize_aux, upcycle
from zoo.weights import model_dir

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DMUSettings:
  """`config.moe.dmu`: Diversified Multiplet Upcycling (see dmu.py)."""

  stages: int = 0  # FFN copies fine-tuned by the driver (= experts); 0 = no DMU, plain MoE run
  steps_per_stage: int = 1000
  lr: float = 1e-5  # stage fine-tuning learning rate
  clusters: int = 4  # k-means clusters per stage (stage s >= 2 uses the joint labels so far)
  kmeans_samples: int = 4096  # samples whose features are clustered at each stage
  kmeans_iters: int = 50
  cluster_on: str = "both"  # image | text | both (concatenated normalized features)
  cross_cluster_weight: float = 0.0  # weight of cross-cluster negatives in stage losses
  init: str = "base"  # each stage starts from: base (the dense model) | previous (stage s-1)

  def __post_init__(self):
    if self.cluster_on not in ("image", "text", "both"):
      raise ValueError(f"config.moe.dmu.cluster_on={self.cluster_on!r}; expected "
                       "image | text | both")
    if self.init not in ("base", "previous"):
      raise ValueError(f"config.moe.dmu.init={self.init!r}; expected base | previous")


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.moe`."""

  num_experts: int = 4
  top_k: int = 2
  capacity_factor: float = 1.25  # used only with dropless=False, in training steps
  dropless: bool = True  # False: capacity routing in training (evaluation stays dropless)
  normalize_gates: bool = True
  layers: str = "every_other"  # see models.moe.resolve_layers; or "vision:SPEC;text:SPEC"
  router_init_std: float = 0.02
  balance_weight: float = 0.01  # load-balancing loss weight
  z_weight: float = 0.001  # router z-loss weight
  mode: str = "moe"  # moe | dense_ffn (a DMU stage: dense model, FFNs trained)
  trainable: str = "all"  # all | router | moe (router + experts) | ffn (every FFN)
  expert_checkpoints: str = ""  # comma-separated zoo.save dirs, one dense model per expert
  cross_cluster_weight: float = 0.0  # for batches with a `cluster` field (DMU stages)
  dmu: DMUSettings = DMUSettings()

  def __post_init__(self):
    if self.mode not in ("moe", "dense_ffn"):
      raise ValueError(f"config.moe.mode={self.mode!r}; expected 'moe' or 'dense_ffn'")
    if self.trainable not in ("all", "router", "moe", "ffn"):
      raise ValueError(f"config.moe.trainable={self.trainable!r}; expected all | router | moe | ffn")


def _plain(section: Any) -> dict[str, Any]:
  section = section or {}
  return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def parse_settings(config: ml_collections.ConfigDict) -> Settings:
  """`config.moe` over the defaults; unknown keys are errors listing the valid ones."""
  given = _plain(config.get("moe", None))
  dmu = _plain(given.pop("dmu", None))
  for where, keys, cls in (("config.moe", given, Settings), ("config.moe.dmu", dmu, DMUSettings)):
    errors.check_keys(keys, (f.name for f in dataclasses.fields(cls) if f.name != "dmu"), where)
  return Settings(**given, dmu=DMUSettings(**dmu))


def _layer_spec(spec: str) -> Any:
  """'every_other' or 'vision:all;text:last:2' -> a spec for moe_config."""
  if ";" not in spec and not spec.strip().startswith(("vision:", "text:")):
    return spec
  out = {}
  for part in spec.split(";"):
    tower, _, value = part.strip().partition(":")
    out[tower.strip()] = value.strip()
  return out


def _is_ffn(path: tuple[str, ...]) -> bool:
  return "resblocks" in path and "mlp" in path


def _split_dirs(value: str) -> list[str]:
  return [p.strip() for p in str(value or "").split(",") if p.strip()]


def cluster_contrastive_loss(image_features: Array, text_features: Array, logit_scale: Array,
                             clusters: Array, *, cross_cluster_weight: float = 0.0) -> Array:
  """CLIP's symmetric softmax loss with negatives mainly from the sample's own cluster (MCL).

  Pairs (i, j) from different clusters have their exp(logit) multiplied by
  `cross_cluster_weight` (0: only same-cluster negatives; 1: the plain CLIP loss). Features are
  L2-normalized [B, E]; clusters int [B]. Plain jnp: under jit over a mesh it is the
  global-batch loss.
  """
  if not 0.0 <= cross_cluster_weight <= 1.0:
    raise ValueError(f"cross_cluster_weight={cross_cluster_weight} must be in [0, 1]")
  if clusters.shape != image_features.shape[:1]:
    raise ValueError(f"clusters shape {clusters.shape} must be [batch]={image_features.shape[:1]}")
  logits = logit_scale * jnp.einsum("ie,je->ij", image_features.astype(jnp.float32),
                                    text_features.astype(jnp.float32))
  same = clusters[:, None] == clusters[None, :]
  if cross_cluster_weight == 0.0:
    logits = jnp.where(same, logits, -jnp.inf)
  elif cross_cluster_weight < 1.0:
    logits = jnp.where(same, logits, logits + math.log(cross_cluster_weight))
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - diag
  t2i = jax.nn.logsumexp(logits, axis=0) - diag
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


class MoEFamily(base.Family):
  """CLIP-MoE on the train loop."""

  name = "moe"

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return parse_settings(config)

  def build_model(self, config: ml_collections.ConfigDict, settings: Settings) -> clip_lib.CLIP:
    """mode dense_ffn: the dense `config.model` (weights from `init_from`), for DMU stages.
    mode moe: `init_from` an MoE checkpoint -> loaded as is; otherwise the dense model (with
    `init_from`'s weights) upcycled, experts from `expert_checkpoints` when given."""
    s = settings
    src = config.get("init_from", "")
    if s.mode == "moe" and src and isinstance(model_dir.load_config(src)[0], MoECLIPConfig):
      return model_dir.load(src)[0]
    dense = super().build_model(config, s)
    if s.mode == "dense_ffn":
      return dense
    sources = None
    dirs = _split_dirs(s.expert_checkpoints)
    if dirs:
      sources = [model_dir.load(d)[0] for d in dirs]
      if len(sources) != s.num_experts:
        raise ValueError(f"config.moe.expert_checkpoints names {len(sources)} models but "
                         f"num_experts={s.num_experts}")
    return upcycle(dense, s.num_experts, s.top_k, _layer_spec(s.layers),
                   capacity_factor=s.capacity_factor, dropless=s.dropless,
                   normalize_gates=s.normalize_gates, expert_sources=sources,
                   router_init_std=s.router_init_std, seed=config.seed)

  def forward(self, model: clip_lib.CLIP, batch: dict, rng: Array, settings: Settings) -> dict:
    """CLIP outputs plus `moe_aux` (summarized aux losses of every MoE layer called); a model
    with dropless=False routes with its capacity here (training) and nowhere else."""
    del rng, settings
    with capacity_routing():
      out, aux = capture_aux(lambda m: dict(m(batch["image"], batch["tokens"])), model)
    out["moe_aux"] = summarize_aux(aux)
    return out

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[Array, dict]:
    """Contrastive loss (within clusters when the batch has `cluster`) + weighted aux losses."""
    s = ctx.settings
    aux = outputs.get("moe_aux", {})
    if "cluster" in batch:
      if "logit_bias" in outputs:
        raise ValueError("within-cluster (DMU stage) training is implemented for the softmax "
                         "CLIP loss only; this model has a SigLIP logit_bias")
      contrastive = cluster_contrastive_loss(
          outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
          batch["cluster"], cross_cluster_weight=s.cross_cluster_weight)
      metrics = {"logit_scale": outputs["logit_scale"]}
    else:
      contrastive, metrics = losses.clip_loss(outputs, batch, impl=ctx.impl, mesh=ctx.mesh)
      metrics = dict(metrics)
    total = contrastive
    if aux:
      total = total + s.balance_weight * aux["moe_balance_loss"] + s.z_weight * aux["moe_z_loss"]
    metrics.update(aux)
    metrics["contrastive_loss"] = contrastive
    metrics["loss"] = total
    return total, metrics

  def trainable(self, settings: Settings) -> Callable[[tuple[str, ...]], bool] | None:
    """The optimizer mask of `config.moe.trainable` (None = everything)."""
    which = settings.trainable
    if which == "all":
      return None
    if which == "router":
      return lambda path: _is_ffn(path) and "router" in path
    if which == "moe":
      return lambda path: _is_ffn(path) and any(n.startswith(("fc1_", "fc2_")) or n == "router"
                                                for n in path)
    return _is_ffn

  def driver(self, settings: Settings) -> Callable[..., dict[str, Any]] | None:
    """DMU (dmu.run) when `dmu.stages` > 0 in mode moe; else one plain run."""
    if settings.dmu.stages <= 0 or settings.mode != "moe":
      return None
    return functools.partial(dmu.run, settings)


FAMILY = MoEFamily()


def default_settings() -> ml_collections.ConfigDict:
  """`config.moe` with the defaults and `config.moe.dmu` (configs.base.moe() returns it)."""
  return ml_collections.ConfigDict(dataclasses.asdict(Settings()))
