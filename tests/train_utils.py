"""Shared helpers for the train-loop tests: a tiny config and fixed synthetic batches."""

from __future__ import annotations

import numpy as np

from configs import base


def tiny_config(**overrides):
  c = base.base_config()
  c.model = "test-tiny"
  c.batch_size = 16
  c.total_steps = 5
  c.warmup_steps = 1
  c.lr = 1e-3
  c.checkpoint_every = 1000
  c.eval_every = 0
  c.log_every = 1
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def synthetic_batches(n: int, batch: int, image_size: int = 32, length: int = 16, seed: int = 0):
  """Random images and CLIP-like token rows (SOT, ids, EOT, padding)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    tokens = np.zeros((batch, length), np.int32)
    for i in range(batch):
      k = int(rng.integers(2, length - 1))
      tokens[i, 0] = 49406
      tokens[i, 1:k] = rng.integers(1, 49000, size=k - 1)
      tokens[i, k] = 49407
    out.append({"image": images, "tokens": tokens})
  return out
