"""GPU (Triton, chosen explicitly by its CompilerParams) Pallas kernels; interface of `_mosaic`.

* `_stats_kernel` (softmax forward, 1 matmul unit per call): one program per row block; it walks
  the column blocks with the running row max / sum in registers and stores the rows'
  log-sum-exp. Called twice (rows of x @ y.T, then of y @ x.T): O(B) statistics.
* `_grads_kernel` (softmax backward, sigmoid forward, 3 units): one program per tile; the tile
  is computed once and G @ y_j, G.T @ x_i are added into fp32 [m, d] / [n, d] outputs with
  atomics, d chunk by d chunk. Softmax tiles subtract the targets in fp32 (`softmax_g`); fp32
  operands multiply at precision HIGHEST (IEEE fp32, not TF32) unless the caller set
  `jax.default_matmul_precision`.
Every loaded tile is [bm or bn, bk] with bk = 64 dividing the padded d (d is padded to a
multiple of 64, not to a power of two); `smem_bytes` bounds the operand tiles' shared memory
over NUM_STAGES pipeline stages, sized for the 227 KiB of an H100 (sm_90).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from zoo.kernels._blockwise import dot, out_struct, precision, softmax_g, varying_like

Array = jax.Array

_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
NUM_STAGES, BK = 2, 64
# No register spills at these, sm_80 and sm_90 (cuobjdump); fp32 at precision HIGHEST (3 tf32
# passes) needs 8 warps for the statistics and 32 x 32 tiles for the gradients.
WARPS_STATS, WARPS_GRADS = {2: 4, 4: 8}, {2: 8, 4: 8}
SMEM_LIMIT = 227 * 1024  # H100 / H200 shared memory per block


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class Plan:
  bm: int
  bn: int
  bk: int
  dp: int
  smem: int  # operand tiles x stages (+ the G tile staged for the second matmul)


def plan(m: int, n: int, d: int, itemsize: int, block: int | None = None) -> Plan:
  # fp32 at precision HIGHEST (3 tf32 passes per dot) spills registers at 64 x 64 tiles; the
  # statistics and gradient passes share the tiles, so both compute z_ij bit for bit alike
  # (a saturated pair's exp(z - lse) is then exactly 1).
  t = 64 if precision(jnp.float32 if itemsize == 4 else jnp.bfloat16) is None else 32
  t = t if block is None else max(16, min(t, block))
  t = min(t, max(16, 1 << (max(m, n) - 1).bit_length()))
  smem = NUM_STAGES * 2 * t * BK * itemsize + t * t * 4
  return Plan(t, t, BK, _round_up(d, BK), smem)


def _params(scale: Array, bias: Array | float = 0.0) -> Array:
  return jnp.stack([jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)])


def _pad2(a: Array, rows: int, cols: int) -> Array:
  return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _tile(p_ref, x_ref, y_ref, i, j, bm: int, bn: int, bk: int, nk: int) -> Array:
  """scale * x[i block] @ y[j block].T, accumulated over d chunks."""
  def body(k, acc):
    xk = x_ref[pl.ds(i * bm, bm), pl.ds(pl.multiple_of(k * bk, bk), bk)]
    yk = y_ref[pl.ds(j * bn, bn), pl.ds(pl.multiple_of(k * bk, bk), bk)]
    return acc + dot(xk, yk, _NT, precision(xk.dtype))

  return p_ref[0] * lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))


def _stats_kernel(p_ref, x_ref, y_ref, lse_ref, *, n: int, bm: int, bn: int, bk: int, nj: int,
                  nk: int):
  i = pl.program_id(0)

  def body(j, carry):
    m_r, s_r = carry
    z = _tile(p_ref, x_ref, y_ref, i, j, bm, bn, bk, nk)
    cols = j * bn + lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
    zr = jnp.where(cols < n, z, -jnp.inf)
    m_new = jnp.maximum(m_r, jnp.max(zr, axis=1))
    s_r = s_r * jnp.exp(m_r - m_new) + jnp.sum(jnp.exp(zr - m_new[:, None]), axis=1)
    return m_new, s_r

  init = (jnp.full((bm,), -jnp.inf, jnp.float32), jnp.zeros((bm,), jnp.float32))
  m_r, s_r = lax.fori_loop(0, nj, body, init)
  lse_ref[pl.ds(i * bm, bm)] = m_r + jnp.log(s_r)


def _compiler_params(num_warps: int):
  return pltr.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES)


def row_lse_call(x: Array, y: Array, scale: Array, block: int | None, *,
                 interpret=False) -> Array:
  """Log-sum-exp over y of each row of z = scale * x @ y.T [m]."""
  (m, d), n = x.shape, y.shape[0]
  p = plan(m, n, d, x.dtype.itemsize, block)
  mp, np_ = _round_up(m, p.bm), _round_up(n, p.bn)
  nbr, nj, nk = mp // p.bm, np_ // p.bn, p.dp // p.bk
  kernel = functools.partial(_stats_kernel, n=n, bm=p.bm, bn=p.bn, bk=p.bk, nj=nj, nk=nk)
  args = varying_like([_params(scale), _pad2(x, mp, p.dp), _pad2(y.astype(x.dtype), np_, p.dp)],
                      x, y, scale)
  lse = pl.pallas_call(
      kernel, grid=(nbr,), out_shape=out_struct((mp,), args[1]),
      compiler_params=_compiler_params(WARPS_STATS.get(x.dtype.itemsize, 8)),
      interpret=interpret,
      name="contrastive_softmax_stats",
  )(*args)
  return lse[:m]


def softmax_stats_call(x: Array, y: Array, scale: Array, block: int | None, *,
                       interpret=False) -> tuple[Array, Array]:
  """(row, column) log-sum-exp: two row passes (the columns' as rows of y @ x.T), O(B)."""
  return (row_lse_call(x, y, scale, block, interpret=interpret),
          row_lse_call(y.astype(x.dtype), x, scale, block, interpret=interpret))


def _softplus(z: Array) -> Array:
  return jnp.maximum(z, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _grads_kernel(*refs, sigmoid: bool, m: int, n: int, bm: int, bn: int, bk: int, nk: int):
  if sigmoid:
    p_ref, o_ref, x_ref, y_ref, _, _, dx_ref, dy_ref, loss_ref, gs_ref = refs
  else:
    p_ref, o_ref, x_ref, y_ref, lr_ref, lc_ref, _, _, dx_ref, dy_ref = refs
  i, j = pl.program_id(0), pl.program_id(1)
  z = _tile(p_ref, x_ref, y_ref, i, j, bm, bn, bk, nk)
  rows = i * bm + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
  cols = j * bn + lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
  valid = (rows < m) & (cols < n)
  pos = (cols - rows) == o_ref[0]
  if sigmoid:
    zs = jnp.where(pos, -(z + p_ref[1]), z + p_ref[1])
    sig = 1.0 / (1.0 + jnp.exp(-zs))
    g = jnp.where(valid, jnp.where(pos, -sig, sig), 0.0)
    loss_ref[i, j] = jnp.sum(jnp.where(valid, _softplus(zs), 0.0))
    gs_ref[i, j] = jnp.sum(g)
  else:
    lr = lr_ref[pl.ds(i * bm, bm)]
    lc = lc_ref[pl.ds(j * bn, bn)]
    g = jnp.where(valid, softmax_g(z, lr[:, None], lc[None, :], pos, (p_ref[2], p_ref[3])), 0.0)
  g = g.astype(x_ref.dtype)

  def body(k, carry):
    dk = pl.ds(pl.multiple_of(k * bk, bk), bk)
    yk = y_ref[pl.ds(j * bn, bn), dk]
    xk = x_ref[pl.ds(i * bm, bm), dk]
    pltr.atomic_add(dx_ref, (pl.ds(i * bm, bm), dk),
                    dot(g, yk, precision=precision(g.dtype)))
    pltr.atomic_add(dy_ref, (pl.ds(j * bn, bn), dk), dot(g, xk, _TN, precision(g.dtype)))
    return carry

  lax.fori_loop(0, nk, body, 0)


def grads_call(x: Array, y: Array, params: Array, block: int | None, *, sigmoid: bool,
               lse_rows: Array | None = None, lse_cols: Array | None = None,
               offset: Array | None = None, interpret=False):
  (m, d), n = x.shape, y.shape[0]
  p = plan(m, n, d, x.dtype.itemsize, block)
  mp, np_ = _round_up(m, p.bm), _round_up(n, p.bn)
  nbr, nbc, nk = mp // p.bm, np_ // p.bn, p.dp // p.bk
  args = [params, jnp.reshape(offset, (1,)).astype(jnp.int32)]
  args += [_pad2(x, mp, p.dp), _pad2(y.astype(x.dtype), np_, p.dp)]
  if not sigmoid:
    args += [jnp.pad(lse_rows.astype(jnp.float32), (0, mp - m)),
             jnp.pad(lse_cols.astype(jnp.float32), (0, np_ - n))]
  # The atomics accumulate into zero-initialized buffers passed in and aliased to the outputs.
  args += [jnp.zeros((mp, p.dp), jnp.float32), jnp.zeros((np_, p.dp), jnp.float32)]
  args = varying_like(args, *args)
  out_shape = [out_struct((mp, p.dp), args[-1]), out_struct((np_, p.dp), args[-1])]
  if sigmoid:
    out_shape += [out_struct((nbr, nbc), args[-1])] * 2
  kernel = functools.partial(_grads_kernel, sigmoid=sigmoid, m=m, n=n, bm=p.bm, bn=p.bn,
                             bk=p.bk, nk=nk)
  outs = pl.pallas_call(
      kernel, grid=(nbr, nbc), out_shape=out_shape,
      input_output_aliases={len(args) - 2: 0, len(args) - 1: 1},
      compiler_params=_compiler_params(WARPS_GRADS.get(x.dtype.itemsize, 16)),
      interpret=interpret,
      name="contrastive_sigmoid_grads" if sigmoid else "contrastive_softmax_grads",
  )(*args)
  gx, gy = outs[0][:m, :d], outs[1][:n, :d]
  if not sigmoid:
    return gx, gy
  return gx, gy, jnp.sum(outs[2]), jnp.sum(outs[3])
