"""GPU (Triton, chosen explicitly by its CompilerParams) Pallas kernels; interface of `_mosaic`.

* `_stats_kernel` (softmax forward, 1 matmul unit per call): one program per row block; it walks
  the column blocks with the running row max / sum in registers and stores the rows'
  log-sum-exp. Called twice (rows of x @ y.T, then of y @ x.T): O(B) statistics.
* `_rows_kernel` (softmax backward: 2 units per pass; sigmoid forward with gradients): one
  program per row block owns those rows of G @ y and walks the column blocks in order,
  recomputing each tile; G.T @ x is the same kernel on the swapped problem (rows of y against x:
  G.T is the G of that problem), so the backward is two passes of 2 units (5 -> 6 for the
  softmax) and no output is shared between programs: no atomics, bitwise repeatable. The
  [rows, d] fp32 accumulator (d up to 1024: too big for registers) is read, added to and
  written back per column block by its owning program (L2-resident, unmeasured), a barrier between
  column blocks. Softmax tiles subtract the targets in fp32 (`softmax_g`); fp32 operands
  multiply at precision HIGHEST (IEEE fp32, not TF32) unless the caller set
  `jax.default_matmul_precision`. `sigmoid_loss_call`: the loss alone (1 unit, no gradients).
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


def _rows_kernel(*refs, sigmoid: bool, grads: bool, stats: bool, interpret: bool, m: int,
                 n: int, bm: int, bn: int, bk: int, nj: int, nk: int):
  """Program i owns rows i of the outputs and walks the column blocks j in order: the tile z
  (recomputed), G, then out[i] += G @ y_j d chunk by d chunk, read-modify-write by this program
  alone (a CTA barrier orders one column block's stores before the next one's loads); sigmoid
  `stats`: the row sums of softplus and G, carried in registers. No atomics: bitwise repeatable."""
  refs = list(refs)
  p_ref, o_ref, x_ref, y_ref = refs[:4]
  lr_ref, lc_ref = (None, None) if sigmoid else refs[4:6]
  outs = refs[4 if sigmoid else 6:]
  gx_ref = outs.pop(0) if grads else None
  i = pl.program_id(0)
  rows = i * bm + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
  rows_ds = pl.ds(i * bm, bm)

  def body(j, carry):
    z = _tile(p_ref, x_ref, y_ref, i, j, bm, bn, bk, nk)
    cols = j * bn + lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
    valid = (rows < m) & (cols < n)
    pos = (cols - rows) == o_ref[0]
    if sigmoid:
      zs = jnp.where(pos, -(z + p_ref[1]), z + p_ref[1])
      sig = 1.0 / (1.0 + jnp.exp(-zs))
      g = jnp.where(valid, jnp.where(pos, -sig, sig), 0.0)
      if stats:
        carry = (carry[0] + jnp.sum(jnp.where(valid, _softplus(zs), 0.0), axis=1),
                 carry[1] + jnp.sum(g, axis=1))
    else:
      lr, lc = lr_ref[rows_ds], lc_ref[pl.ds(j * bn, bn)]
      g = jnp.where(valid, softmax_g(z, lr[:, None], lc[None, :], pos, (p_ref[2], p_ref[3])),
                    0.0)
    if not grads:
      return carry
    gt = g.astype(x_ref.dtype)

    def chunk(k, c):
      dk = pl.ds(pl.multiple_of(k * bk, bk), bk)
      part = dot(gt, y_ref[pl.ds(j * bn, bn), dk], precision=precision(gt.dtype))
      # The first column block stores (the output's initial contents are never read).
      gx_ref[rows_ds, dk] = jnp.where(j > 0, gx_ref[rows_ds, dk], 0.0) + part
      return c

    lax.fori_loop(0, nk, chunk, 0)
    if not interpret:
      pltr.debug_barrier()
    return carry

  zero = jnp.zeros((bm,), jnp.float32)
  carry = lax.fori_loop(0, nj, body, (zero, zero))
  if stats:
    outs[0][rows_ds], outs[1][rows_ds] = carry


def _rows_call(x: Array, y: Array, params: Array, offset: Array, block: int | None, *,
               sigmoid: bool, grads: bool, stats: bool, lse_rows: Array | None = None,
               lse_cols: Array | None = None, interpret=False, name: str):
  """One row pass: ([G @ y [m, d]] fp32, [row sums of softplus, of G] for sigmoid `stats`)."""
  (m, d), n = x.shape, y.shape[0]
  p = plan(m, n, d, x.dtype.itemsize, block)
  mp, np_ = _round_up(m, p.bm), _round_up(n, p.bn)
  nbr, nj, nk = mp // p.bm, np_ // p.bn, p.dp // p.bk
  args = [params, jnp.reshape(offset, (1,)).astype(jnp.int32)]
  args += [_pad2(x, mp, p.dp), _pad2(y.astype(x.dtype), np_, p.dp)]
  if not sigmoid:
    args += [jnp.pad(lse_rows.astype(jnp.float32), (0, mp - m)),
             jnp.pad(lse_cols.astype(jnp.float32), (0, np_ - n))]
  args = varying_like(args, *args)
  out_shape = [out_struct((mp, p.dp), args[2])] if grads else []
  out_shape += [out_struct((mp,), args[2])] * (2 if stats else 0)
  kernel = functools.partial(_rows_kernel, sigmoid=sigmoid, grads=grads, stats=stats,
                             interpret=bool(interpret), m=m, n=n, bm=p.bm, bn=p.bn, bk=p.bk,
                             nj=nj, nk=nk)
  warps = (WARPS_GRADS if grads else WARPS_STATS).get(x.dtype.itemsize, 8)
  return pl.pallas_call(
      kernel, grid=(nbr,), out_shape=out_shape, compiler_params=_compiler_params(warps),
      interpret=interpret, name=name,
  )(*args)


def grads_call(x: Array, y: Array, params: Array, block: int | None, *, sigmoid: bool,
               lse_rows: Array | None = None, lse_cols: Array | None = None,
               offset: Array | None = None, interpret=False):
  """(G @ y [m, d], G.T @ x [n, d]) fp32 [, sum of softplus, sum of G for sigmoid]: a row pass
  (rows of x against y) and a column pass (the same kernel on rows of y against x: G.T is the
  G of the swapped problem, pairs at row - column == offset)."""
  (m, d), n = x.shape, y.shape[0]
  kind = "sigmoid" if sigmoid else "softmax"
  rows = _rows_call(x, y, params, offset, block, sigmoid=sigmoid, grads=True, stats=sigmoid,
                    lse_rows=lse_rows, lse_cols=lse_cols, interpret=interpret,
                    name=f"contrastive_{kind}_grads")
  cols = _rows_call(y.astype(x.dtype), x, params, -offset, block, sigmoid=sigmoid, grads=True,
                    stats=False, lse_rows=lse_cols, lse_cols=lse_rows, interpret=interpret,
                    name=f"contrastive_{kind}_grads_t")
  gx, gy = rows[0][:m, :d], cols[0][:n, :d]
  if not sigmoid:
    return gx, gy
  return gx, gy, jnp.sum(rows[1][:m]), jnp.sum(rows[2][:m])


def sigmoid_loss_call(x: Array, y: Array, params: Array, offset: Array, block: int | None, *,
                      interpret=False) -> Array:
  """The sigmoid loss sum alone (no gradients: one matmul unit), e.g. for evaluation."""
  loss, _ = _rows_call(x, y, params, offset, block, sigmoid=True, grads=False, stats=True,
                       interpret=interpret, name="contrastive_sigmoid_loss")
  return jnp.sum(loss[:x.shape[0]])
