"""Blockwise contrastive-loss statistics in pure JAX (the `impl="xla"` backend).

Every function takes a block of rows `x` [m, d] and columns `y` [n, d] (logits
z_ij = scale * <x_i, y_j> (+ bias)) and scans over column blocks of `y` with `lax.scan`, so only
an [m, block] tile of logits exists at a time: memory O(m * block) instead of O(m * n). All rows
are in every tile, so column statistics of a block are exact without a second pass.

Gradient tiles hold dL/dz with the targets already subtracted in fp32 (`softmax_g`); the caller
(`kernels/contrastive.py`) scales them and owns the custom_vjp and the collectives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_NT = (((1,), (1,)), ((), ()))  # x @ y.T
_TN = (((0,), (0,)), ((), ()))  # g.T @ x


def vma_of(a) -> frozenset:
  """Manual mesh axes (inside shard_map) that `a` varies over; empty outside shard_map."""
  aval = jax.typeof(a)
  mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older releases: aval.vma
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def varying_like(init, *like):
  """Marks the loop carry `init` as varying over every manual axis that any of `like` varies
  over, so that its type matches the carry the loop body returns (shard_map's check_vma)."""
  axes = frozenset().union(*(vma_of(a) for a in like))

  def cast(a):
    missing = axes - vma_of(a)
    return lax.pcast(a, tuple(sorted(missing, key=str)), to="varying") if missing else a

  return jax.tree.map(cast, init)


def out_struct(shape: tuple[int, ...], like) -> jax.ShapeDtypeStruct:
  """An fp32 result type with the varying-axes type of `like` (pallas_call outputs)."""
  mat = getattr(jax.typeof(like), "manual_axis_type", None)
  kw = {} if mat is None else {"manual_axis_type": mat}
  return jax.ShapeDtypeStruct(shape, jnp.float32, **kw)


def _col_blocks(y: Array, block: int) -> tuple[Array, Array, int]:
  """Pads `y` [n, d] to a multiple of `block` rows; returns ([nb, block, d], block starts, nb)."""
  n = y.shape[0]
  nb = -(-n // block)
  yp = jnp.pad(y, ((0, nb * block - n), (0, 0))).reshape(nb, block, y.shape[1])
  return yp, jnp.arange(nb, dtype=jnp.int32) * block, nb


def _pad_vec(v: Array, nb: int, block: int) -> Array:
  return jnp.pad(v, (0, nb * block - v.shape[0])).reshape(nb, block)


def precision(dtype) -> lax.Precision | None:
  """The GPU kernels' precision: fp32 operands multiply in IEEE fp32 (HIGHEST, not TF32) unless
  the caller set `jax.default_matmul_precision` (e.g. "tensorfloat32"); bf16: default."""
  if jnp.dtype(dtype) != jnp.float32 or jax.config.jax_default_matmul_precision is not None:
    return None
  return lax.Precision.HIGHEST


def dot(a: Array, b: Array, dims=(((1,), (0,)), ((), ())), precision=None) -> Array:
  """fp32-accumulated dot_general (default precision: as the reference's einsum)."""
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def softmax_g(z: Array, lse_r: Array, lse_c: Array, pos: Array, targets: Array) -> Array:
  """2B * dL/dz of a softmax tile in fp32, targets subtracted before any rounding:
  exp(z - lse_r) + exp(z - lse_c) - 2 t, t = 1 - eps on the pair, eps / (B - 1) off it
  (`targets` = [2 (1 - eps - w), 2 w], w = eps / (B - 1)). A confident pair's p + q ~ 2 cancels
  against 2 t here, in fp32; rounded to bf16 first, its pull would be lost."""
  g = jnp.exp(z - lse_r) + jnp.exp(z - lse_c) - targets[1]
  return g - jnp.where(pos, targets[0], 0.0)


def _logits(x: Array, yb: Array, scale: Array, bias: Array | float = 0.0) -> Array:
  return scale * dot(x, yb, _NT) + bias


def _valid(start: Array, block: int, n: int) -> Array:
  return (start + jnp.arange(block, dtype=jnp.int32)) < n


def softmax_stats(x: Array, y: Array, scale: Array, block: int) -> tuple[Array, Array]:
  """(logsumexp over y for each row of x [m], logsumexp over x for each row of y [n])."""
  m, n = x.shape[0], y.shape[0]
  yb, starts, nb = _col_blocks(y, block)

  def step(carry, inp):
    row_max, row_sum = carry
    yblk, start = inp
    z = _logits(x, yblk, scale)
    z_rows = jnp.where(_valid(start, block, n)[None, :], z, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(z_rows, axis=1))
    row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.sum(
        jnp.exp(z_rows - new_max[:, None]), axis=1)
    col_max = jnp.max(z, axis=0)
    col_lse = col_max + jnp.log(jnp.sum(jnp.exp(z - col_max[None, :]), axis=0))
    return (new_max, row_sum), col_lse

  init = (jnp.full((m,), -jnp.inf, jnp.float32), jnp.zeros((m,), jnp.float32))
  init = varying_like(init, x, y, scale)
  (row_max, row_sum), col_lse = lax.scan(step, init, (yb, starts))
  return row_max + jnp.log(row_sum), col_lse.reshape(-1)[:n]


def softmax_grads(x: Array, y: Array, scale: Array, lse_rows: Array, lse_cols: Array,
                  targets: Array, offset: Array, block: int) -> tuple[Array, Array]:
  """(G @ y [m, d], G.T @ x [n, d]) with G = `softmax_g` (pairs: column - row == offset)."""
  m, n = x.shape[0], y.shape[0]
  yb, starts, nb = _col_blocks(y, block)
  lse_c = _pad_vec(lse_cols, nb, block)

  def step(acc, inp):
    yblk, start, lse_cb = inp
    z = _logits(x, yblk, scale)
    g = softmax_g(z, lse_rows[:, None], lse_cb[None, :], _positive(m, start, block, offset),
                  targets)
    g = jnp.where(_valid(start, block, n)[None, :], g, 0.0)
    acc = acc + dot(g.astype(y.dtype), yblk)
    gy = dot(g.astype(x.dtype), x, _TN)
    return acc, gy

  acc0 = varying_like(jnp.zeros(x.shape, jnp.float32), x, y, scale, lse_rows, lse_cols,
                      targets, offset)
  gx, gy = lax.scan(step, acc0, (yb, starts, lse_c))
  return gx, gy.reshape(-1, x.shape[1])[:n]


def _softplus(z: Array) -> Array:
  return jnp.maximum(z, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _positive(m: int, start: Array, block: int, offset: Array) -> Array:
  """[m, block] mask of the positive pairs: column index - row index == offset."""
  cols = start + jnp.arange(block, dtype=jnp.int32)
  return (cols[None, :] - jnp.arange(m, dtype=jnp.int32)[:, None]) == offset


def sigmoid_stats(x: Array, y: Array, scale: Array, bias: Array, offset: Array,
                  block: int) -> Array:
  """Sum over all (i, j) of -log sigmoid(+-z_ij) (+ on pairs with j - i == offset), fp32."""
  m, n = x.shape[0], y.shape[0]
  yb, starts, _ = _col_blocks(y, block)

  def step(total, inp):
    yblk, start = inp
    z = _logits(x, yblk, scale, bias)
    z = jnp.where(_positive(m, start, block, offset), -z, z)
    sp = jnp.where(_valid(start, block, n)[None, :], _softplus(z), 0.0)
    return total + jnp.sum(sp), None

  init = varying_like(jnp.zeros((), jnp.float32), x, y, scale, bias, offset)
  total, _ = lax.scan(step, init, (yb, starts))
  return total


def sigmoid_grads(x: Array, y: Array, scale: Array, bias: Array, offset: Array,
                  block: int) -> tuple[Array, Array, Array, Array]:
  """(sigmoid_stats, G @ y [m, d], G.T @ x [n, d], sum G) from one pass over the tiles, with
  G = d(sigmoid_stats)/dz = sigmoid(z) - [positive] (-sigmoid(-z) on positives, computed
  directly: no 1 - sigmoid cancellation)."""
  m, n = x.shape[0], y.shape[0]
  yb, starts, _ = _col_blocks(y, block)

  def step(carry, inp):
    acc, loss, total = carry
    yblk, start = inp
    z = _logits(x, yblk, scale, bias)
    pos = _positive(m, start, block, offset)
    zs = jnp.where(pos, -z, z)
    valid = _valid(start, block, n)[None, :]
    sig = jax.nn.sigmoid(zs)
    g = jnp.where(valid, jnp.where(pos, -sig, sig), 0.0)
    loss = loss + jnp.sum(jnp.where(valid, _softplus(zs), 0.0))
    acc = acc + dot(g.astype(y.dtype), yblk)
    gy = dot(g.astype(x.dtype), x, _TN)
    return (acc, loss, total + jnp.sum(g)), gy

  init = (jnp.zeros(x.shape, jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  init = varying_like(init, x, y, scale, bias, offset)
  (gx, loss, total), gy = lax.scan(step, init, (yb, starts))
  return loss, gx, gy.reshape(-1, x.shape[1])[:n], total
