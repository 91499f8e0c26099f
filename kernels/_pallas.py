"""Pallas kernels for the contrastive-loss statistics (the `impl="pallas"` backend).

Same interface as `kernels/_blockwise.py`. Each kernel runs on a 1-D grid over row blocks of `x`
(rows are independent, so the grid is parallel); inside, a `fori_loop` walks the column blocks of
`y`, so only a [block_rows, block_cols] tile of logits ever exists, in registers / shared memory.
Column statistics are obtained by calling the same row kernel with the operands swapped
(z.T = scale * y @ x.T + bias has the same form), which keeps every kernel free of cross-program
reductions (no atomics on GPU).

Shapes are padded: rows and columns to a multiple of the block (padded columns are masked inside
the kernels, padded rows are sliced off), the feature dimension to a power of two >= 16 with
zeros (which leaves every dot product unchanged) as Triton requires. `interpret=True` is used
automatically on CPU.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._blockwise import varying_like

Array = jax.Array

_NT = (((1,), (1,)), ((), ()))  # x @ y.T


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _block_for(n: int, block: int) -> int:
  """The block used for a dimension of size n: `block`, shrunk (to a power of two >= 16) for small n."""
  return min(block, max(16, _next_pow2(n)))


def _interpret() -> bool:
  return jax.default_backend() == "cpu"


def _softplus(z: Array) -> Array:
  return jnp.maximum(z, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _tile(p_ref, x, y_ref, j, bc: int, n_cols: int, with_bias: bool):
  """Logits of the row tile `x` against column block j, and the mask of real columns."""
  y = y_ref[pl.ds(pl.multiple_of(j * bc, bc), bc), :]
  z = p_ref[0] * lax.dot_general(x, y, _NT, preferred_element_type=jnp.float32)
  if with_bias:
    z = z + p_ref[1]
  cols = j * bc + lax.broadcasted_iota(jnp.int32, z.shape, 1)
  return z, y, cols < n_cols


def _lse_kernel(p_ref, x_ref, y_ref, lse_ref, *, bc: int, n_cols: int):
  x = x_ref[...]
  br = x.shape[0]

  def body(j, carry):
    row_max, row_sum = carry
    z, _, valid = _tile(p_ref, x, y_ref, j, bc, n_cols, False)
    z = jnp.where(valid, z, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(z, axis=1))
    row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.sum(jnp.exp(z - new_max[:, None]), axis=1)
    return new_max, row_sum

  init = (jnp.full((br,), -jnp.inf, jnp.float32), jnp.zeros((br,), jnp.float32))
  row_max, row_sum = lax.fori_loop(0, y_ref.shape[0] // bc, body, init)
  lse_ref[...] = row_max + jnp.log(row_sum)


def _softmax_grad_kernel(p_ref, x_ref, y_ref, lse_r_ref, lse_c_ref, out_ref, *, bc: int,
                         n_cols: int):
  x = x_ref[...]
  lse_r = lse_r_ref[...]

  def body(j, acc):
    z, y, valid = _tile(p_ref, x, y_ref, j, bc, n_cols, False)
    lse_c = lse_c_ref[pl.ds(pl.multiple_of(j * bc, bc), bc)]
    g = jnp.exp(z - lse_r[:, None]) + jnp.exp(z - lse_c[None, :])
    g = jnp.where(valid, g, 0.0)
    return acc + jnp.dot(g.astype(y.dtype), y, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, y_ref.shape[0] // bc, body, jnp.zeros(x.shape, jnp.float32))
  out_ref[...] = acc


def _signed_tile(p_ref, o_ref, x, y_ref, j, row0, bc: int, n_cols: int):
  """Sigmoid-loss tile: (logits with the sign flipped on positive pairs, positives, y, valid)."""
  z, y, valid = _tile(p_ref, x, y_ref, j, bc, n_cols, True)
  diff = (j * bc + lax.broadcasted_iota(jnp.int32, z.shape, 1)
          - row0 - lax.broadcasted_iota(jnp.int32, z.shape, 0))
  pos = diff == o_ref[0]
  return jnp.where(pos, -z, z), pos, y, valid


def _softplus_kernel(p_ref, o_ref, x_ref, y_ref, out_ref, *, bc: int, n_cols: int):
  x = x_ref[...]
  row0 = pl.program_id(0) * x.shape[0]  # (program_id is not allowed inside the loop body)

  def body(j, acc):
    z, _, _, valid = _signed_tile(p_ref, o_ref, x, y_ref, j, row0, bc, n_cols)
    return acc + jnp.sum(jnp.where(valid, _softplus(z), 0.0), axis=1)

  out_ref[...] = lax.fori_loop(0, y_ref.shape[0] // bc, body,
                               jnp.zeros((x.shape[0],), jnp.float32))


def _sigmoid_grad_kernel(p_ref, o_ref, x_ref, y_ref, out_ref, sum_ref, *, bc: int,
                         n_cols: int):
  x = x_ref[...]
  row0 = pl.program_id(0) * x.shape[0]

  def body(j, carry):
    acc, total = carry
    z, pos, y, valid = _signed_tile(p_ref, o_ref, x, y_ref, j, row0, bc, n_cols)
    sig = 1.0 / (1.0 + jnp.exp(-z))
    g = jnp.where(valid, jnp.where(pos, -sig, sig), 0.0)
    acc = acc + jnp.dot(g.astype(y.dtype), y, preferred_element_type=jnp.float32)
    return acc, total + jnp.sum(g, axis=1)

  init = (jnp.zeros(x.shape, jnp.float32), jnp.zeros((x.shape[0],), jnp.float32))
  acc, total = lax.fori_loop(0, y_ref.shape[0] // bc, body, init)
  out_ref[...] = acc
  sum_ref[...] = total


def _rows_call(kernel: Callable, x: Array, y: Array, params: Array, block: int, *,
               offset: Array | None = None, row_vecs: Sequence[Array] = (),
               col_vecs: Sequence[Array] = (),
               outs: Sequence[str] = ("vec",)) -> list[Array]:
  """Runs a row kernel over row blocks of x against all of y, handling padding.

  Kernel args: params (2,) = (scale, bias), [offset (1,) int32 if given], x tile, y (all), row
  vectors (tile), column vectors (all), outputs.
  `outs`: "vec" -> per-row fp32 [m]; "mat" -> per-row fp32 [m, d].
  """
  (m, d), n = x.shape, y.shape[0]
  br, bc = _block_for(m, block), _block_for(n, block)
  mp, np_, dp = -(-m // br) * br, -(-n // bc) * bc, max(16, _next_pow2(d))
  xp = jnp.pad(x, ((0, mp - m), (0, dp - d)))
  yp = jnp.pad(y.astype(x.dtype), ((0, np_ - n), (0, dp - d)))
  rvs = [jnp.pad(v.astype(jnp.float32), (0, mp - m)) for v in row_vecs]
  cvs = [jnp.pad(v.astype(jnp.float32), (0, np_ - n)) for v in col_vecs]
  offs = [] if offset is None else [jnp.reshape(offset, (1,)).astype(jnp.int32)]
  in_specs = ([pl.BlockSpec((2,), lambda i: (0,))]
              + [pl.BlockSpec((1,), lambda i: (0,)) for _ in offs]
              + [pl.BlockSpec((br, dp), lambda i: (i, 0)),
               pl.BlockSpec((np_, dp), lambda i: (0, 0))]
              + [pl.BlockSpec((br,), lambda i: (i,)) for _ in rvs]
              + [pl.BlockSpec((np_,), lambda i: (0,)) for _ in cvs])
  # Inside shard_map every operand and result must carry the same varying-axes type.
  args = varying_like([params, *offs, xp, yp, *rvs, *cvs], params, *offs, xp, yp, *rvs, *cvs)
  mat = getattr(jax.typeof(args[0]), "manual_axis_type", None)
  if _interpret() and mat is not None and mat.varying:
    raise ValueError(
        "contrastive_loss(impl='pallas') on CPU runs Pallas in interpret mode, which inside "
        "jax.shard_map(check_vma=True) fails in JAX's interpreter; pass check_vma=False to "
        "shard_map (the loss handles both modes) or use impl='xla' on CPU")
  sds = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32,
                          **({} if mat is None else {"manual_axis_type": mat}))
  out_shape, out_specs = [], []
  for kind in outs:
    if kind == "vec":
      out_shape.append(sds((mp,)))
      out_specs.append(pl.BlockSpec((br,), lambda i: (i,)))
    else:
      out_shape.append(sds((mp, dp)))
      out_specs.append(pl.BlockSpec((br, dp), lambda i: (i, 0)))
  res = pl.pallas_call(
      functools.partial(kernel, bc=bc, n_cols=n),
      out_shape=out_shape, grid=(mp // br,), in_specs=in_specs, out_specs=out_specs,
      interpret=_interpret(), name=f"contrastive{kernel.__name__}",
  )(*args)
  return [r[:m] if kind == "vec" else r[:m, :d] for r, kind in zip(res, outs)]


def _params(scale: Array, bias: Array | float = 0.0) -> Array:
  return jnp.stack([jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)])


def softmax_stats(x: Array, y: Array, scale: Array, block: int) -> tuple[Array, Array]:
  """(logsumexp over y for each row of x [m], logsumexp over x for each row of y [n])."""
  p = _params(scale)
  (lse_rows,) = _rows_call(_lse_kernel, x, y, p, block)
  (lse_cols,) = _rows_call(_lse_kernel, y, x, p, block)
  return lse_rows, lse_cols


def softmax_grads(x: Array, y: Array, scale: Array, lse_rows: Array, lse_cols: Array,
                  block: int) -> tuple[Array, Array]:
  """With G_ij = exp(z_ij - lse_rows_i) + exp(z_ij - lse_cols_j): (G @ y [m, d], G.T @ x [n, d])."""
  p = _params(scale)
  (gx,) = _rows_call(_softmax_grad_kernel, x, y, p, block, row_vecs=[lse_rows],
                     col_vecs=[lse_cols], outs=("mat",))
  (gy,) = _rows_call(_softmax_grad_kernel, y, x, p, block, row_vecs=[lse_cols],
                     col_vecs=[lse_rows], outs=("mat",))
  return gx, gy


def sigmoid_stats(x: Array, y: Array, scale: Array, bias: Array, offset: Array,
                  block: int) -> Array:
  """Sum over all (i, j) of -log sigmoid(+-z_ij) (+ on pairs with j - i == offset), fp32."""
  (rows,) = _rows_call(_softplus_kernel, x, y, _params(scale, bias), block, offset=offset)
  return jnp.sum(rows)


def sigmoid_grads(x: Array, y: Array, scale: Array, bias: Array, offset: Array,
                  block: int) -> tuple[Array, Array, Array]:
  """With G = sigmoid(z) - [positive]: (G @ y [m, d], G.T @ x [n, d], sum of G)."""
  p = _params(scale, bias)
  gx, total = _rows_call(_sigmoid_grad_kernel, x, y, p, block, offset=offset,
                         outs=("mat", "vec"))
  gy, _ = _rows_call(_sigmoid_grad_kernel, y, x, p, block, offset=-offset, outs=("mat", "vec"))
  return gx, gy, jnp.sum(total)
