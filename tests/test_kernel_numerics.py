"""Gradients against float64 numpy, row by row, at logit scale 100 (a trained CLIP's).

Half the pairs are confident (1 - p_ii from 1e-5 to 5e-2: p_ii + q_ii is ~2 and must cancel
against the target 2 before anything is rounded to bf16), half hard (margin -2..2). A global
tolerance hides a lost pull on the confident rows (their gradients are small); so: the share of
rows whose dx is more than 10% off (relative to that row's norm) and dscale's relative error.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.kernels import _pallas
from zoo.kernels.contrastive import contrastive_loss

B, D, S = 512, 128, 100.0


def _pairs(b: int, d: int, seed: int = 0):
  """y_i = c_i x_i + sqrt(1 - c_i^2) u_i (u_i orthogonal to x_i); c_i puts the positive logit a
  margin above the log-sum-exp of row i's negatives: 3..7 (confident) or -2..2 (hard)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  u = rng.normal(size=(b, d))
  u -= np.sum(u * x, 1, keepdims=True) * x
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  zn = S * x @ u.T
  np.fill_diagonal(zn, -np.inf)
  lse = np.log(np.exp(zn - zn.max(1, keepdims=True)).sum(1)) + zn.max(1)
  margin = np.where(np.arange(b) % 2 == 0, rng.uniform(3, 7, b), rng.uniform(-2, 2, b))
  c = np.clip((lse + margin) / S, 0, 0.95)[:, None]
  return x, c * x + np.sqrt(1 - c**2) * u


def _float64_grads(x: np.ndarray, y: np.ndarray):
  z = S * x @ y.T
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  q = np.exp(z - z.max(0, keepdims=True))
  q /= q.sum(0, keepdims=True)
  g = (p + q - 2 * np.eye(len(x))) / (2 * len(x))
  return S * g @ y, np.sum(g * (x @ y.T))


@pytest.fixture(scope="module")
def pairs():
  return _pairs(B, D)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas-gpu", "pallas-tpu"])
def test_softmax_grads_per_row_vs_float64(pairs, impl, dtype):
  x, y = (jnp.asarray(a, dtype) for a in pairs)
  xf, yf = np.asarray(x, np.float64), np.asarray(y, np.float64)  # the inputs as rounded
  dx0, ds0 = _float64_grads(xf, yf)
  name, _, target = impl.partition("-")
  fn = jax.jit(jax.grad(functools.partial(contrastive_loss, impl=name), argnums=(0, 2)))
  with _pallas.use_target(f"interpret-{target}") if target else contextlib.nullcontext():
    dx, ds = fn(x, y, jnp.float32(S))
  dx = np.asarray(dx, np.float64)
  row_err = np.linalg.norm(dx - dx0, axis=1) / np.linalg.norm(dx0, axis=1)
  assert np.mean(row_err > 0.1) <= 0.01, (
      f"{np.mean(row_err > 0.1):.1%} of rows' dx > 10% off float64 (worst {row_err.max():.2f})")
  assert abs(float(ds) - ds0) <= 1e-3 * abs(ds0), (float(ds), ds0)
