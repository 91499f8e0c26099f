"""Fused contrastive losses (CLIP softmax, SigLIP sigmoid) that never store the B x B logits.

impl: "reference" (plain jnp, B x B; 6 B^2 d matmul units fwd+bwd softmax, 3 sigmoid), "xla"
(`lax.scan` over column blocks), "pallas" (kernels; `kernels/_pallas.py`: which, where): 5 units
(softmax: row and column statistics passes, one gradient pass recomputing each tile once), 3
(sigmoid: the forward emits the gradients; the loss alone, e.g. in evaluation: 1); "auto" =
pallas where it lowers (TPU, NVIDIA sm_80+), else xla, chosen per platform being compiled for
(an AOT compile for TPU from a CPU host gets the TPU kernels). G = dl/dz:
  softmax: loss = [sum_i lse_row_i + sum_j lse_col_j] / (2B) - sum_i z_ii / B,
           G_ij = [exp(z_ij - lse_row_i) + exp(z_ij - lse_col_j) - 2 delta_ij] / (2B)
  sigmoid: loss = sum_ij softplus(-+z_ij) / B, G_ij = [sigmoid(z_ij) - delta_ij] / B
and z = scale * x @ y.T (+ bias): dx = scale G @ y, dy = scale G.T @ x, dscale = <x, G @ y>.
Sharded (`axis_name` inside `shard_map`, B/n rows per device): both kinds are rings over the
text chunks (`_ring_walk`: ppermute overlapped with compute; softmax column statistics and
G.T @ x accumulators travel with their chunk), O(B/n * d) memory per device; the loss is
the global-batch mean, gradients equal the single-device ones (check_vma=True and False alike;
interpret-mode Pallas on CPU needs False). label_smoothing (softmax) adds an O(B d) term.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
from jax import lax

from zoo.kernels import _blockwise, _pallas

Array = jax.Array
AxisName = Hashable | tuple[Hashable, ...] | None

KINDS = ("softmax", "sigmoid")
IMPLS = ("auto", "pallas", "xla", "reference")
# pallas: tiles planned per kernel and hardware; auto: as pallas (the xla backend's default 512
# where it runs xla)
DEFAULT_BLOCK = {"xla": 512, "pallas": None, "auto": None}
_BACKENDS = {"xla": _blockwise, "pallas": _pallas, "auto": _pallas.AUTO}


@dataclasses.dataclass(frozen=True)
class _Cfg:
  impl: str
  block: int | None
  axis_name: Any
  smoothed: bool = False  # label smoothing on: eps travels as an array argument


def _smoothing_weights(eps: Array | None, b_global: int) -> tuple[Array | float, Array | float]:
  """(weight of z_ii, weight of every z_ij) in sum_j target_ij z_ij with label smoothing eps
  (None: off): target 1 - eps on the pair and w = eps / (B - 1) on each negative, so
  (1 - eps - w, w). eps may be traced (a schedule over steps)."""
  if eps is None:
    return 1.0, 0.0
  if b_global < 2:
    raise ValueError(f"contrastive_loss: label_smoothing needs a global batch >= 2, got "
                     f"{b_global}")
  w = eps / (b_global - 1)
  return 1.0 - eps - w, w


def _global_sum(a: Array, axis_name: AxisName) -> Array:
  """sum over the global batch of the rows of a, fp32 [d]."""
  return _psum(jnp.sum(a.astype(jnp.float32), axis=0), axis_name)


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


# ----------------------------------------------------------------------------- rings


def _ring(axis_name: AxisName, tree):
  """Sends every array of `tree` one step around the device ring (device k -> k + 1)."""
  n = lax.axis_size(axis_name)
  perm = [(k, (k + 1) % n) for k in range(n)]
  return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), tree)


def _ring_walk(axis_name: AxisName, chunk, compute: Callable, fold_local: Callable,
               fold_travel: Callable):
  """Runs `compute` on every device's text chunk in turn: (local state, travelling value home).

  Step t holds the chunk of device (k - t) mod n. `compute(own, chunk)` -> (local, visiting):
  `local` is folded into this device's state, `visiting` into the chunk's travelling value
  (column statistics or gradient accumulator), which follows its chunk one step behind. Both
  ppermutes of a step (the next chunk, the travelling value of the chunk in hand) are issued
  before the compute on the chunk in hand and do not depend on it, so transfers overlap compute.
  After the last step each travelling value goes one more step, home to its chunk's owner.
  """
  n = 1 if axis_name is None else lax.axis_size(axis_name)
  nxt = _ring(axis_name, chunk) if n > 1 else None  # issued before the first compute
  local, travel = compute(True, chunk)
  if n == 1:
    return local, travel

  def step(carry, last: bool):
    chunk, pending, state = carry
    nxt = chunk if last else _ring(axis_name, chunk)  # the chunk of step t + 1
    arrived = _ring(axis_name, pending)  # the value of the chunk in hand, from device k - 1
    loc, visiting = compute(False, chunk)
    return nxt, fold_travel(arrived, visiting), fold_local(state, loc)

  carry = (nxt, travel, local)
  carry = lax.fori_loop(1, n - 1, lambda _, c: step(c, False), carry)
  _, pending, state = step(carry, True)
  return state, _ring(axis_name, pending)


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


# ----------------------------------------------------------------------------- softmax


# Offset meaning "no positive pairs in this block" (column - row never reaches it).
_NO_POSITIVES = 2**30


def _offset(own: bool) -> Array:
  return jnp.int32(0 if own else _NO_POSITIVES)


def _softmax_fwd(x: Array, y: Array, scale: Array, eps: Array, cfg: _Cfg):
  """Forward: one stats pass per chunk (row statistics local, column statistics travelling)."""
  backend = _BACKENDS[cfg.impl]
  n_dev, b_local = _axis_size(cfg.axis_name), x.shape[0]
  compute = lambda own, c: backend.softmax_stats(x, c, scale, cfg.block)
  lse_r, lse_c = _ring_walk(cfg.axis_name, y, compute, jnp.logaddexp, jnp.logaddexp)
  b_global = b_local * n_dev
  a, w = _smoothing_weights(eps if cfg.smoothed else None, b_global)
  # Cross-entropies row by row (as the reference does), then summed. Label smoothing adds
  # -w sum_ij z_ij = -w scale <sum_i x_i, sum_j y_j> (rows and columns alike): O(B d), no B x B.
  z_diag = scale * jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32), axis=1)
  ce = jnp.sum(lse_r - a * z_diag) + jnp.sum(lse_c - a * z_diag)
  loss = _psum(ce, cfg.axis_name) / (2 * b_global)
  sums = None
  if cfg.smoothed:
    sums = (_global_sum(x, cfg.axis_name), _global_sum(y, cfg.axis_name))
    loss = loss - w * scale * jnp.dot(sums[0], sums[1]) / b_global
  return loss, (x, y, scale, eps, lse_r, lse_c)


def _softmax_bwd(cfg: _Cfg, res, g: Array):
  """Backward: one grads pass per chunk; the chunk's lse_c travels with it, its G.T @ x
  accumulator one step behind. The tiles subtract the targets themselves, in fp32 (label
  smoothing's eps / (B - 1) included), so G @ y is the whole gradient up to a factor."""
  x, y, scale, eps, lse_r, lse_c = res
  backend = _BACKENDS[cfg.impl]
  b_global = x.shape[0] * _axis_size(cfg.axis_name)
  a, w = _smoothing_weights(eps if cfg.smoothed else None, b_global)
  targets = jnp.stack([jnp.asarray(2 * a, jnp.float32), jnp.asarray(2 * w, jnp.float32)])
  g, reduce_rep = _bwd_collectives(x, g, cfg.axis_name)

  def compute(own, chunk):
    c, c_lse = chunk
    return backend.softmax_grads(x, c, scale, lse_r, c_lse, targets, _offset(own), cfg.block)

  gx, gy = _ring_walk(cfg.axis_name, (y, lse_c), compute, jnp.add, jnp.add)
  c = g / (2 * b_global)
  dx, dy = scale * c * gx, scale * c * gy
  dscale = reduce_rep(c * _dot_rows(x, gx))
  # eps is a hyperparameter (a schedule value), not learned: no gradient.
  return (dx.astype(x.dtype), dy.astype(y.dtype), dscale.astype(scale.dtype),
          jnp.zeros_like(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_loss(x: Array, y: Array, scale: Array, eps: Array, cfg: _Cfg) -> Array:
  return _softmax_fwd(x, y, scale, eps, cfg)[0]


_softmax_loss.defvjp(lambda x, y, s, e, cfg: _softmax_fwd(x, y, s, e, cfg), _softmax_bwd)


# ----------------------------------------------------------------------------- sigmoid


def _sigmoid_primal(x: Array, y: Array, scale: Array, bias: Array, cfg: _Cfg) -> Array:
  """The loss alone (no gradients): the text chunks ring, nothing travels with them."""
  backend = _BACKENDS[cfg.impl]
  nothing = _blockwise.varying_like(jnp.zeros((), jnp.float32), x)
  compute = lambda own, c: (backend.sigmoid_stats(x, c, scale, bias, _offset(own), cfg.block),
                            nothing)
  total, _ = _ring_walk(cfg.axis_name, y, compute, jnp.add, jnp.add)
  return _psum(total, cfg.axis_name) / (x.shape[0] * _axis_size(cfg.axis_name))


def _sigmoid_fwd(x: Array, y: Array, scale: Array, bias: Array, cfg: _Cfg):
  """One pass per chunk computes the loss and the gradients (no global statistic is needed),
  saved as residuals; the chunk's G.T @ x accumulator travels one step behind it."""
  backend = _BACKENDS[cfg.impl]

  def compute(own, c):
    loss, gx, gy, g_sum = backend.sigmoid_grads(x, c, scale, bias, _offset(own), cfg.block)
    return (loss, gx, g_sum), gy

  (total, gx, g_sum), gy = _ring_walk(cfg.axis_name, y, compute, _add, jnp.add)
  loss = _psum(total, cfg.axis_name) / (x.shape[0] * _axis_size(cfg.axis_name))
  return loss, (x, gx, gy, _dot_rows(x, gx), g_sum, scale, bias)


def _sigmoid_bwd(cfg: _Cfg, res, g: Array):
  x, gx, gy, x_gx, g_sum, scale, bias = res
  g, reduce_rep = _bwd_collectives(x, g, cfg.axis_name)
  c = g / (x.shape[0] * _axis_size(cfg.axis_name))
  dx = c * scale * gx
  dy = c * scale * gy
  dscale = c * reduce_rep(x_gx)
  dbias = c * reduce_rep(g_sum)
  return (dx.astype(x.dtype), dy.astype(x.dtype),
          dscale.astype(scale.dtype), dbias.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sigmoid_loss(x: Array, y: Array, scale: Array, bias: Array, cfg: _Cfg) -> Array:
  return _sigmoid_primal(x, y, scale, bias, cfg)


_sigmoid_loss.defvjp(lambda x, y, s, b, cfg: _sigmoid_fwd(x, y, s, b, cfg), _sigmoid_bwd)


# ----------------------------------------------------------------------------- reference


def reference_loss(image_emb: Array, text_emb: Array, logit_scale: Array,
                   logit_bias: Array | None = None, *, kind: str = "softmax",
                   axis_name: AxisName = None, label_smoothing: float | Array = 0.0) -> Array:
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
    eps = label_smoothing
    pair = labels[:, None] == jnp.arange(b_global)[None, :]
    target = jnp.where(pair, 1.0 - eps, eps / max(b_global - 1, 1))
    ce_rows = -jnp.sum(target * jax.nn.log_softmax(logits, axis=1))
    ce_cols = -jnp.sum(target * jax.nn.log_softmax(logits_t, axis=1))
    return _psum(ce_rows + ce_cols, axis_name) / (2 * b_global)
  bias = 0.0 if logit_bias is None else logit_bias
  z = jnp.where(labels[:, None] == jnp.arange(b_global)[None, :], 1.0, -1.0)
  return -_psum(jnp.sum(jax.nn.log_sigmoid(z * (logits + bias))), axis_name) / b_global


# ----------------------------------------------------------------------------- public


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """What `impl` runs on `platform` ("tpu", "cuda" / "gpu", "cpu", ...; None: the default
  backend, whose first device's compute capability is then checked): "auto" -> "pallas" on TPU
  and on NVIDIA GPUs the Triton kernels serve (compute capability >= 8.0), "xla" elsewhere (CPU,
  older GPUs, ROCm); other names are returned unchanged. `contrastive_loss` itself does not
  call it: impl="auto" is chosen when lowering, per platform (`jax.lax.platform_dependent`)."""
  if impl != "auto":
    return impl
  backend = jax.default_backend() if platform is None else platform
  if backend == "tpu":
    return "pallas"
  if backend in ("gpu", "cuda"):
    if platform is not None and jax.default_backend() != "gpu":
      return "pallas"  # no device to check (AOT): assumed sm_80+, as the lowering does
    return "pallas" if _pallas.gpu_supported(jax.devices()[0]) else "xla"
  return "xla"


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
                     impl: str = "auto", axis_name: AxisName = None,
                     block_size: int | None = None,
                     label_smoothing: float | Array = 0.0) -> Array:
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
    impl: "auto" (default: pallas on TPU / NVIDIA sm_80+, else xla, per platform compiled
      for; `resolve_impl`), "reference" (materializes B x B), "xla" (blockwise
      lax.scan) or "pallas" (kernels).
    axis_name: mesh axis name (or tuple of names) when called inside `shard_map` with the batch
      split over it; then each device passes its B/n rows, and every device gets the loss over
      the global batch (gradients equal those of the unsharded loss).
    label_smoothing: eps for kind="softmax": each cross-entropy's target is 1 - eps on the
      pair and eps / (B - 1) on each of the B - 1 negatives (global B; needs B >= 2). A float
      or a scalar array (traced: a schedule over steps; it gets no gradient).
    block_size: tile size (power of two >= 16); default 512 columns for "xla"; for "pallas" an
      upper bound on the planned tiles (TPU tiles are at least 128, GPU tiles at most 64).
      Ignored by "reference".

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
  smoothed = isinstance(label_smoothing, jax.Array) or bool(label_smoothing)
  if smoothed and kind != "softmax":
    raise ValueError(f"contrastive_loss: label_smoothing={label_smoothing} is only for "
                     f"kind='softmax'")
  if smoothed:
    try:
      value = float(label_smoothing)
    except jax.errors.ConcretizationTypeError:  # traced (a schedule): checked where it is built
      value = 0.0
    if not 0.0 <= value < 1.0:
      raise ValueError(f"contrastive_loss: label_smoothing={value} must be in [0, 1)")
  eps = jnp.reshape(jnp.asarray(label_smoothing, jnp.float32), ())
  if impl == "reference":
    return reference_loss(x, y, scale, bias, kind=kind, axis_name=axis_name,
                          label_smoothing=eps if smoothed else 0.0)
  cfg = _Cfg(impl=impl, block=block_size or DEFAULT_BLOCK[impl], axis_name=axis_name,
             smoothed=smoothed)
  if kind == "softmax":
    return _softmax_loss(x, y, scale, eps, cfg)
  if bias is None:
    bias = jnp.zeros((), jnp.float32)
  return _sigmoid_loss(x, y, scale, bias, cfg)
