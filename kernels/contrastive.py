"""Fused contrastive losses (CLIP softmax, SigLIP sigmoid) that never store the B x B logits.

`contrastive_loss` is the public entry. Three implementations of the same number:

* "reference": the plain jnp definition; materializes the B x B logits (ground truth).
* "xla": `lax.scan` over column blocks (online log-sum-exp for rows, exact per-block column
  statistics), `jax.custom_vjp` whose backward recomputes each block; memory O(B * block).
* "pallas": `pl.pallas_call` kernels (kernels/_pallas.py) for the forward statistics and the
  backward, under the same custom_vjp; interpret mode on CPU, Triton / Mosaic otherwise.

The softmax splits into an O(B^2 d) part computed blockwise and an O(B d) diagonal part:

  softmax: loss = [sum_i lse_row_i + sum_j lse_col_j] / (2B) - sum_i z_ii / B
           dloss/dz_ij = [exp(z_ij - lse_row_i) + exp(z_ij - lse_col_j)] / (2B) - delta_ij / B
  sigmoid: loss = sum_ij softplus(-+z_ij) / B (- on the diagonal), all inside the blocks, with
           dloss/dz_ij = [sigmoid(z_ij) - delta_ij] / B (-sigmoid(-z_ii) on the diagonal, so
           saturated positives lose no precision)

With z = scale * x @ y.T (+ bias), the gradients are dx = scale * dZ @ y, dy = scale * dZ.T @ x,
dscale = sum_i <x_i, (dZ @ y)_i>, dbias = sum dZ: the backends return G @ y and G.T @ x.

Sharded (`axis_name`, inside `shard_map`, each device holds its B/n rows of both embeddings):
* softmax: the text embeddings are all-gathered; each device computes row statistics for its
  rows and column statistics over its rows, combined across devices with pmax / psum of [B]
  vectors; in the backward each device forms G for its rows, and the column gradients
  (G.T @ x_local, [B, d]) return to their owners by psum_scatter.
* sigmoid: text chunks travel around the ring with ppermute (big_vision's scheme); the backward
  runs the ring again, sending each chunk's gradient accumulator along with the chunk, so no
  device holds more than two chunks (plus their gradients).
Both return the global-batch mean loss on every device, and gradients equal those of the
single-device loss over the global batch, under `shard_map(check_vma=True)` and
`check_vma=False` alike (the backward detects which from the inputs' varying-axes type). Pallas
in interpret mode (CPU) needs check_vma=False: JAX 0.10.2's interpreter drops varying-axes types.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Hashable

import jax
import jax.numpy as jnp
from jax import lax

from kernels import _blockwise, _pallas

Array = jax.Array
AxisName = Hashable | tuple[Hashable, ...] | None

KINDS = ("softmax", "sigmoid")
IMPLS = ("pallas", "xla", "reference")
DEFAULT_BLOCK = {"xla": 512, "pallas": 128}
_BACKENDS = {"xla": _blockwise, "pallas": _pallas}


@dataclasses.dataclass(frozen=True)
class _Cfg:
  impl: str
  block: int
  axis_name: Any


# ----------------------------------------------------------------------------- helpers


def _axis_size(axis_name: AxisName) -> int:
  return 1 if axis_name is None else lax.axis_size(axis_name)


def _psum(x: Array, axis_name: AxisName) -> Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def _bwd_collectives(x: Array, g: Array, axis_name: AxisName):
  """(global cotangent of the loss, reduction for cotangents of replicated inputs).

  Under `shard_map(check_vma=True)` (x typed as varying) the loss cotangent arrives invariant and
  a replicated input's cotangent must be returned complete (psum). Under `check_vma=False`
  shard_map's transpose hands each device a share of the cotangent and itself sums the
  cotangents of replicated inputs, so the shares are summed here and local parts returned.
  """
  if axis_name is None:
    return g, lambda v: v
  if _blockwise.vma_of(x):
    return g, lambda v: lax.psum(v, axis_name)
  return lax.psum(g, axis_name), lambda v: v


def _dot_rows(a: Array, b: Array) -> Array:
  """sum_i <a_i, b_i> in fp32."""
  return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32))


# ----------------------------------------------------------------------------- softmax


def _softmax_fwd(x: Array, y: Array, scale: Array, cfg: _Cfg):
  backend = _BACKENDS[cfg.impl]
  n_dev, b_local = _axis_size(cfg.axis_name), x.shape[0]
  y_all = y if cfg.axis_name is None else lax.all_gather(y, cfg.axis_name, tiled=True)
  lse_r, lse_c_part = backend.softmax_stats(x, y_all, scale, cfg.block)
  if cfg.axis_name is None:
    lse_c, lse_c_own = lse_c_part, lse_c_part
  else:  # log-sum-exp across devices of the per-device column statistics
    c_max = lax.pmax(lse_c_part, cfg.axis_name)
    lse_c = c_max + jnp.log(lax.psum(jnp.exp(lse_c_part - c_max), cfg.axis_name))
    start = lax.axis_index(cfg.axis_name) * b_local
    lse_c_own = lax.dynamic_slice_in_dim(lse_c, start, b_local)
  # Cross-entropies row by row (as the reference does), then summed.
  z_diag = scale * jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32), axis=1)
  ce = jnp.sum(lse_r - z_diag) + jnp.sum(lse_c_own - z_diag)
  loss = _psum(ce, cfg.axis_name) / (2 * b_local * n_dev)
  return loss, (x, y, y_all, scale, lse_r, lse_c)


def _softmax_bwd(cfg: _Cfg, res, g: Array):
  x, y, y_all, scale, lse_r, lse_c = res
  backend = _BACKENDS[cfg.impl]
  b_global = x.shape[0] * _axis_size(cfg.axis_name)
  g, reduce_rep = _bwd_collectives(x, g, cfg.axis_name)
  gx, gy_all = backend.softmax_grads(x, y_all, scale, lse_r, lse_c, cfg.block)
  if cfg.axis_name is not None:
    gy_all = lax.psum_scatter(gy_all, cfg.axis_name, tiled=True)
  c, c_diag = g / (2 * b_global), g / b_global
  xf, yf = x.astype(jnp.float32), y.astype(jnp.float32)
  dx = scale * (c * gx - c_diag * yf)
  dy = scale * (c * gy_all - c_diag * xf)
  dscale = reduce_rep(c * _dot_rows(x, gx) - c_diag * _dot_rows(x, y))
  return dx.astype(x.dtype), dy.astype(y.dtype), dscale.astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_loss(x: Array, y: Array, scale: Array, cfg: _Cfg) -> Array:
  return _softmax_fwd(x, y, scale, cfg)[0]


_softmax_loss.defvjp(lambda x, y, s, cfg: _softmax_fwd(x, y, s, cfg), _softmax_bwd)


# ----------------------------------------------------------------------------- sigmoid


def _ring(axis_name: AxisName, *xs: Array) -> tuple[Array, ...]:
  """Sends each array one step around the device ring (device k -> k + 1)."""
  n = lax.axis_size(axis_name)
  perm = [(k, (k + 1) % n) for k in range(n)]
  return tuple(lax.ppermute(a, axis_name, perm) for a in xs)


# Offset meaning "no positive pairs in this block" (column - row never reaches it).
_NO_POSITIVES = 2**30


def _sigmoid_fwd(x: Array, y: Array, scale: Array, bias: Array, cfg: _Cfg):
  backend = _BACKENDS[cfg.impl]
  n_dev = _axis_size(cfg.axis_name)
  total = backend.sigmoid_stats(x, y, scale, bias, jnp.int32(0), cfg.block)
  if cfg.axis_name is not None:
    # Step t holds the text chunk of device (k - t) mod n: positives only in its own (t = 0).
    def step(_, carry):
      chunk, acc = carry
      (chunk,) = _ring(cfg.axis_name, chunk)
      no_pos = jnp.int32(_NO_POSITIVES)
      return chunk, acc + backend.sigmoid_stats(x, chunk, scale, bias, no_pos, cfg.block)

    _, total = lax.fori_loop(1, n_dev, step, (y, total))
  loss = _psum(total, cfg.axis_name) / (x.shape[0] * n_dev)
  return loss, (x, y, scale, bias)


def _sigmoid_bwd(cfg: _Cfg, res, g: Array):
  x, y, scale, bias = res
  backend = _BACKENDS[cfg.impl]
  n_dev = _axis_size(cfg.axis_name)
  g, reduce_rep = _bwd_collectives(x, g, cfg.axis_name)
  gx, gy, g_sum = backend.sigmoid_grads(x, y, scale, bias, jnp.int32(0), cfg.block)
  if cfg.axis_name is not None:
    # Each chunk travels with its gradient accumulator; after n steps both are home again.
    def step(_, carry):
      chunk, g_chunk, gx, g_sum = carry
      chunk, g_chunk = _ring(cfg.axis_name, chunk, g_chunk)
      no_pos = jnp.int32(_NO_POSITIVES)
      a_x, a_y, s = backend.sigmoid_grads(x, chunk, scale, bias, no_pos, cfg.block)
      return chunk, g_chunk + a_y, gx + a_x, g_sum + s

    _, gy, gx, g_sum = lax.fori_loop(1, n_dev, step, (y, gy, gx, g_sum))
    (gy,) = _ring(cfg.axis_name, gy)
  c = g / (x.shape[0] * n_dev)
  dx = c * scale * gx
  dy = c * scale * gy
  dscale = c * reduce_rep(_dot_rows(x, gx))
  dbias = c * reduce_rep(g_sum)
  return (dx.astype(x.dtype), dy.astype(y.dtype), dscale.astype(scale.dtype),
          dbias.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sigmoid_loss(x: Array, y: Array, scale: Array, bias: Array, cfg: _Cfg) -> Array:
  return _sigmoid_fwd(x, y, scale, bias, cfg)[0]


_sigmoid_loss.defvjp(lambda x, y, s, b, cfg: _sigmoid_fwd(x, y, s, b, cfg), _sigmoid_bwd)


# ----------------------------------------------------------------------------- reference


def reference_loss(image_emb: Array, text_emb: Array, logit_scale: Array,
                   logit_bias: Array | None = None, *, kind: str = "softmax",
                   axis_name: AxisName = None) -> Array:
  """The plain definition (materializes the logits; [B/n, B] per device when sharded)."""
  x, y = image_emb, text_emb
  offset = 0
  if axis_name is not None:
    offset = lax.axis_index(axis_name) * x.shape[0]
    x_all = lax.all_gather(x, axis_name, tiled=True)
    y_all = lax.all_gather(y, axis_name, tiled=True)
  else:
    x_all, y_all = x, y
  b_local, b_global = x.shape[0], x_all.shape[0]
  labels = offset + jnp.arange(b_local)
  logits = logit_scale * jnp.einsum("id,jd->ij", x, y_all, preferred_element_type=jnp.float32)
  if kind == "softmax":
    # rows: this device's images against all texts; columns: this device's texts against all
    # images. Each global row / column is owned by exactly one device.
    logits_t = logit_scale * jnp.einsum("id,jd->ij", y, x_all,
                                        preferred_element_type=jnp.float32)
    ce_rows = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1)
    ce_cols = -jnp.take_along_axis(jax.nn.log_softmax(logits_t, axis=1), labels[:, None], 1)
    return _psum(jnp.sum(ce_rows) + jnp.sum(ce_cols), axis_name) / (2 * b_global)
  bias = 0.0 if logit_bias is None else logit_bias
  z = jnp.where(labels[:, None] == jnp.arange(b_global)[None, :], 1.0, -1.0)
  return -_psum(jnp.sum(jax.nn.log_sigmoid(z * (logits + bias))), axis_name) / b_global


# ----------------------------------------------------------------------------- public


def _check(image_emb: Array, text_emb: Array, logit_scale: Array, logit_bias: Array | None,
           kind: str, impl: str, block_size: int | None) -> None:
  if kind not in KINDS:
    raise ValueError(f"contrastive_loss: kind={kind!r}; expected one of {KINDS}")
  if impl not in IMPLS:
    raise ValueError(f"contrastive_loss: impl={impl!r}; expected one of {IMPLS}")
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
    raise ValueError(f"contrastive_loss: image_emb {image_emb.shape} and text_emb "
                     f"{text_emb.shape} must both be [batch, dim] with equal shapes")
  if jnp.size(logit_scale) != 1:
    raise ValueError(f"contrastive_loss: logit_scale must be a scalar, got shape "
                     f"{jnp.shape(logit_scale)}")
  if logit_bias is not None and jnp.size(logit_bias) != 1:
    raise ValueError(f"contrastive_loss: logit_bias must be a scalar, got shape "
                     f"{jnp.shape(logit_bias)}")
  if kind == "softmax" and logit_bias is not None:
    raise ValueError("contrastive_loss: logit_bias is only used by kind='sigmoid' (a bias "
                     "cancels in the softmax); pass logit_bias=None for kind='softmax'")
  if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
    raise ValueError(f"contrastive_loss: block_size={block_size} must be a power of two >= 16")


def contrastive_loss(image_emb: Array, text_emb: Array, logit_scale: Array,
                     logit_bias: Array | None = None, *, kind: str = "softmax",
                     impl: str = "pallas", axis_name: AxisName = None,
                     block_size: int | None = None) -> Array:
  """Mean contrastive loss over the batch, differentiable in all four inputs.

  Args:
    image_emb, text_emb: [B, d] embeddings, used as given (callers L2-normalize); fp32 or bf16
      (statistics and accumulation are fp32 either way). Row i of each is a positive pair.
    logit_scale: the multiplier itself, i.e. the already-exponentiated (and clamped)
      temperature `exp(log_scale)`, not the learned log-scale.
    logit_bias: SigLIP's bias (kind="sigmoid" only; None there means 0).
    kind: "softmax" = mean of the image->text and text->image cross-entropies (CLIP);
      "sigmoid" = SigLIP: sum over all B^2 pairs of -log sigmoid(z_ij * logit_ij), z = +1 on the
      diagonal and -1 off it, divided by B.
    impl: "reference" (materializes B x B), "xla" (blockwise lax.scan) or "pallas" (kernels).
    axis_name: mesh axis name (or tuple of names) when called inside `shard_map` with the batch
      split over it; then each device passes its B/n rows, and every device gets the loss over
      the global batch (gradients equal those of the unsharded loss).
    block_size: tile size (power of two >= 16); default 512 columns for "xla", 128 x 128 for
      "pallas". Ignored by "reference".

  Returns:
    A float32 scalar.
  """
  image_emb, text_emb = jnp.asarray(image_emb), jnp.asarray(text_emb)
  _check(image_emb, text_emb, logit_scale, logit_bias, kind, impl, block_size)
  dtype = jnp.result_type(image_emb.dtype, text_emb.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"contrastive_loss: embeddings must be floating point, got {dtype}")
  x, y = image_emb.astype(dtype), text_emb.astype(dtype)
  scale = jnp.reshape(logit_scale, ()).astype(jnp.float32)
  bias = None if logit_bias is None else jnp.reshape(logit_bias, ()).astype(jnp.float32)
  if isinstance(axis_name, list):
    axis_name = tuple(axis_name)
  if impl == "reference":
    return reference_loss(x, y, scale, bias, kind=kind, axis_name=axis_name)
  cfg = _Cfg(impl=impl, block=block_size or DEFAULT_BLOCK[impl], axis_name=axis_name)
  if kind == "softmax":
    return _softmax_loss(x, y, scale, cfg)
  if bias is None:
    bias = jnp.zeros((), jnp.float32)
  return _sigmoid_loss(x, y, scale, bias, cfg)
