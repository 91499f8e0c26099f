"""Diversified Multiplet Upcycling (CLIP-MoE): a driver that runs phase configs through the loop.

Stage 1 fine-tunes the FFNs of the dense `init_from` model with the plain contrastive loss;
stage s = 2..N clusters samples by stage s-1's features (k-means) and fine-tunes a fresh FFN
copy with negatives within the joint clusters of stages 1..s-1 (MCL). The N stage FFNs become
the experts of the MoE trained last. Every phase is one run of the train loop in its own
workdir (checkpoints, resume, eval); finished stages are skipped on restart.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zoo.eval import evaluator
from zoo.models import clip as clip_lib
from zoo.weights import model_dir as checkpoint

Array = jax.Array
log = logging.getLogger("zoo.moe")


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding (D^2 sampling)."""
  centroids = [x[rng.integers(len(x))]]
  d2 = np.sum((x - centroids[0]) ** 2, axis=1)
  for _ in range(1, k):
    total = d2.sum()
    i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
    centroids.append(x[i])
    d2 = np.minimum(d2, np.sum((x - x[i]) ** 2, axis=1))
  return np.stack(centroids)


def assign_clusters(x: Array, centroids: Array) -> Array:
  """Index of the nearest centroid (squared Euclidean) for each row of x [N, D]."""
  x = jnp.asarray(x, jnp.float32)
  c = jnp.asarray(centroids, jnp.float32)
  d = jnp.sum(x * x, 1, keepdims=True) - 2 * x @ c.T + jnp.sum(c * c, 1)[None]
  return jnp.argmin(d, axis=1).astype(jnp.int32)


@jax.jit
def _lloyd_step(x: Array, centroids: Array) -> tuple[Array, Array]:
  labels = assign_clusters(x, centroids)
  onehot = jax.nn.one_hot(labels, centroids.shape[0], dtype=jnp.float32)
  counts = onehot.sum(0)
  sums = onehot.T @ x
  new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids)
  return new, labels


def kmeans(x: Any, k: int, *, iters: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means with k-means++ seeding: (centroids [k, D], labels [N]).

  Empty clusters keep their centroid. Stops early when the assignment no longer changes.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or not 1 <= k <= x.shape[0]:
    raise ValueError(f"kmeans: need features [N, D] with N >= k={k}, got shape {x.shape}")
  centroids = jnp.asarray(_kmeans_pp(x, k, np.random.default_rng(seed)))
  xj = jnp.asarray(x)
  labels = None
  for _ in range(iters):
    centroids, new_labels = _lloyd_step(xj, centroids)
    new_labels = np.asarray(new_labels)
    if labels is not None and np.array_equal(labels, new_labels):
      break
    labels = new_labels
  return np.asarray(centroids), np.asarray(assign_clusters(xj, centroids))


def stage_config(config: ml_collections.ConfigDict, stage: int, init_from: str, dmu: Any
                 ) -> ml_collections.ConfigDict:
  """The phase config of DMU stage `stage` (`dmu`: the parsed config.moe.dmu): a dense model,
  FFNs trained, no DMU."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.init_from = init_from
    c.total_steps = int(dmu.steps_per_stage)
    c.warmup_steps = min(config.warmup_steps, max(1, c.total_steps // 10))
    c.lr = float(dmu.lr)
    c.seed = config.seed + 1000 * stage
    c.moe.mode = "dense_ffn"
    c.moe.trainable = "ffn"
    c.moe.cross_cluster_weight = dmu.cross_cluster_weight
    c.moe.dmu.stages = 0
  return c


def final_config(config: ml_collections.ConfigDict, stage_dirs: Sequence[str]
                 ) -> ml_collections.ConfigDict:
  """The last phase: the MoE with the stage models as experts."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.moe.expert_checkpoints = ",".join(stage_dirs)
    c.moe.dmu.stages = 0
  return c


def _features_for_clustering(model: clip_lib.CLIP, batch: Mapping[str, np.ndarray], on: str
                             ) -> np.ndarray:
  parts = []
  if on in ("image", "both"):
    parts.append(np.asarray(evaluator.encode_images(model, batch["image"])))
  if on in ("text", "both"):
    parts.append(np.asarray(evaluator.encode_texts(model, batch["tokens"])))
  return np.concatenate(parts, axis=1) / math.sqrt(len(parts))


class ClusterLabeler:
  """Adds `cluster` to host batches: joint k-means labels of earlier stages' features.

  `stages` is a list of (model, centroids); the label is the mixed-radix number of the
  per-stage nearest centroids, so stage s contrasts within the intersection of all earlier
  clusterings (MCL's accumulated clusters). Deterministic in the batch (exact resume).
  """

  def __init__(self, stages: Sequence[tuple[clip_lib.CLIP, np.ndarray]], on: str):
    self.stages, self.on = list(stages), on

  def labels(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    label = np.zeros((len(batch["image"]),), np.int64)
    for model, centroids in self.stages:
      feats = _features_for_clustering(model, batch, self.on)
      label = label * len(centroids) + np.asarray(assign_clusters(feats, centroids))
    return label.astype(np.int32)

  def __call__(self, batch: dict) -> dict:
    return dict(batch, cluster=self.labels(batch))


def run(settings: Any, config: ml_collections.ConfigDict, workdir: str,
        run_phase: Callable[..., dict], sample_batches: Callable[..., list[dict]]
        ) -> dict[str, Any]:
  """DMU over `config.moe.dmu.stages` = N stages in workdir/dmu/stage_s, then the MoE run in
  `workdir` (`settings`: the parsed config.moe). `run_phase(config, workdir, batch_fn=None)` is
  one run of the train loop; `sample_batches(config, model, n)` gives about n training samples
  (image, tokens) of the config's data."""
  ms = settings
  dmu = ms.dmu
  if dmu.stages != ms.num_experts:
    raise ValueError(f"config.moe.dmu.stages={dmu.stages} must equal num_experts="
                     f"{ms.num_experts} (one fine-tuned FFN copy per expert)")
  base = config.get("init_from", "")
  if not base:
    log.warning("DMU without config.init_from: the stages fine-tune a randomly initialised CLIP")
  stage_dirs, labelers, summaries = [], [], {}
  for s in range(1, dmu.stages + 1):
    stage_workdir = os.path.join(workdir, "dmu", f"stage_{s}")
    model_dir = os.path.join(stage_workdir, "model")
    start = base if (dmu.init == "base" or s == 1) else stage_dirs[-1]
    phase = stage_config(config, s, start, dmu)
    batch_fn = None
    if s > 1:
      prev, _, _ = checkpoint.load(stage_dirs[-1])
      c = copy.deepcopy(phase)
      with c.unlocked():
        c.seed = phase.seed + 77  # clustering samples: their own stream
      feats = np.concatenate([_features_for_clustering(prev, b, dmu.cluster_on)
                              for b in sample_batches(c, prev, int(dmu.kmeans_samples))])
      centroids, labels = kmeans(feats, int(dmu.clusters), iters=int(dmu.kmeans_iters),
                                 seed=config.seed + s)
      log.info("DMU stage %d: k-means on %d samples, cluster sizes %s", s, len(feats),
               np.bincount(labels, minlength=int(dmu.clusters)).tolist())
      labelers.append((prev, centroids))
      batch_fn = ClusterLabeler(labelers, dmu.cluster_on)
    if not os.path.isdir(model_dir):
      result = run_phase(phase, stage_workdir, batch_fn=batch_fn)
      summaries[f"stage_{s}"] = {"losses": result["losses"][-1:], "eval": result["eval"]}
    stage_dirs.append(model_dir)
  result = run_phase(final_config(config, stage_dirs), workdir)
  result["dmu"] = {"stage_dirs": stage_dirs, "stages": summaries}
  return result
