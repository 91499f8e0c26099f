"""The `impl="pallas"` backend: Pallas kernels with the interface of `kernels/_blockwise.py`.

Which kernels run (decided when the loss is traced):
* TPU: the Mosaic kernels of `kernels/_mosaic.py` (2-D tiled grid, VMEM sized per kernel).
* NVIDIA GPU, compute capability >= 8.0 (A100, H100/H200 and newer): the Triton kernels of
  `kernels/_triton.py`, selected explicitly by Triton CompilerParams (Triton exists in JAX 0.10
  through 0.12; their shared memory, <= 96 KiB at 2 stages, fits sm_80 and sm_90; compiled for
  sm_90 they use no local memory / spills). Older GPUs and ROCm: `impl="auto"` picks "xla".
* CPU: interpret mode, of the GPU kernels (JAX's generic interpreter); inside
  `shard_map(check_vma=True)`, where the interpreter fails, the xla backend.
The choice follows the platform being lowered for (`jax.lax.platform_dependent`), not the
default backend: `jit(loss).lower(...)` for TPU devices on a CPU host (an AOT compile with
libtpu) gets the Mosaic kernels. `use_target` forces one target (the TPU interpreter, or
lowering for TPU / GPU).
impl="auto" (`AUTO`) is the same dispatch with the xla backend on every other platform.
The Mosaic GPU backend (JAX's default for a pallas_call without compiler params) is not used.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from zoo.kernels import _blockwise, _mosaic, _triton

Array = jax.Array

TARGETS = ("tpu", "gpu", "interpret-tpu", "interpret-gpu")
_forced: list[str] = []


@contextlib.contextmanager
def use_target(target: str) -> Iterator[None]:
  """Traces the kernels for `target` (one of TARGETS) regardless of the default backend, e.g.
  to lower for "tpu" / "gpu" on a CPU-only machine, or to interpret the GPU kernels."""
  if target not in TARGETS:
    raise ValueError(f"use_target: {target!r}; expected one of {TARGETS}")
  _forced.append(target)
  try:
    yield
  finally:
    _forced.pop()


def target() -> str | None:
  """The forced target (`use_target`), or None: chosen per lowering platform (`_dispatch`)."""
  return _forced[-1] if _forced else None


def gpu_supported(device) -> bool:
  """Whether the Triton kernels serve this GPU (NVIDIA, compute capability >= 8.0)."""
  cc = getattr(device, "compute_capability", None)
  try:
    return cc is not None and float(cc) >= 8.0
  except ValueError:
    return False


def _module(t: str):
  mod = _mosaic if t.endswith("tpu") else _triton
  if t == "interpret-tpu":
    return mod, pltpu.InterpretParams()
  return mod, t == "interpret-gpu"


def _check_interpret(t: str, *xs: Array) -> None:
  if t.startswith("interpret") and any(_blockwise.vma_of(a) for a in xs):
    raise ValueError(
        "contrastive_loss(impl='pallas') on CPU runs Pallas in interpret mode, which inside "
        "jax.shard_map(check_vma=True) fails in JAX's interpreter; pass check_vma=False to "
        "shard_map (the loss handles both modes) or use impl='xla' on CPU")


def _cuda_supported() -> bool:
  """Whether the CUDA devices (if this process has any) are ones the Triton kernels serve; with
  none (an AOT compile for GPU from another host) they are assumed to (sm_80+)."""
  try:
    devices = jax.devices("cuda")
  except RuntimeError:
    return True
  return gpu_supported(devices[0])


def _dispatch(kernel, fallback, *args, auto: bool = False):
  """kernel(module, interpret, *args) for the platform being lowered for, not the default
  backend (`jax.lax.platform_dependent`): TPU -> Mosaic, CUDA -> Triton, elsewhere the GPU
  kernels interpreted, or, inside shard_map(check_vma=True) (where the interpreter fails),
  `fallback(*args)` (the xla backend). `auto` (impl="auto"): `fallback` on every platform but
  TPU and the CUDA GPUs the kernels serve. A `use_target` target is traced as forced."""
  t = target()
  if t is not None:
    _check_interpret(t, *args[:2])
    return kernel(*_module(t), *args)
  default = (fallback if auto or any(_blockwise.vma_of(a) for a in args[:2])
             else lambda *a: kernel(_triton, True, *a))
  cuda = (lambda *a: kernel(_triton, False, *a)) if not auto or _cuda_supported() else fallback
  return jax.lax.platform_dependent(
      *args, tpu=lambda *a: kernel(_mosaic, False, *a), cuda=cuda, default=default)


def _params(scale: Array, bias: Array | float = 0.0, targets: Array | None = None) -> Array:
  """[scale, bias, 2 t_pair, 2 t_other] (fp32 scalars the kernels read from SMEM / memory)."""
  t = jnp.zeros((2,), jnp.float32) if targets is None else targets.astype(jnp.float32)
  return jnp.concatenate([jnp.stack([jnp.asarray(scale, jnp.float32),
                                     jnp.asarray(bias, jnp.float32)]), t])


def _xla_block(block: int | None) -> int:
  return block or 512


def softmax_stats(x: Array, y: Array, scale: Array, block: int | None, *,
                  auto: bool = False) -> tuple[Array, Array]:
  """(logsumexp over y for each row of x [m], logsumexp over x for each row of y [n])."""
  return _dispatch(
      lambda mod, interp, *a: mod.softmax_stats_call(*a, block, interpret=interp),
      lambda *a: _blockwise.softmax_stats(*a, _xla_block(block)), x, y, scale, auto=auto)


def softmax_grads(x: Array, y: Array, scale: Array, lse_rows: Array, lse_cols: Array,
                  targets: Array, offset: Array, block: int | None, *,
                  auto: bool = False) -> tuple[Array, Array]:
  """(G @ y [m, d], G.T @ x [n, d]) with G = `_blockwise.softmax_g` (targets subtracted)."""
  def kernel(mod, interp, x, y, scale, lr, lc, targets, offset):
    return tuple(mod.grads_call(x, y, _params(scale, 0.0, targets), block, sigmoid=False,
                                lse_rows=lr, lse_cols=lc, offset=offset, interpret=interp))

  fallback = lambda *a: _blockwise.softmax_grads(*a, _xla_block(block))
  return _dispatch(kernel, fallback, x, y, scale, lse_rows, lse_cols, targets, offset,
                   auto=auto)


def sigmoid_grads(x: Array, y: Array, scale: Array, bias: Array, offset: Array,
                  block: int | None, *, auto: bool = False) -> tuple[Array, Array, Array, Array]:
  """(sum of -log sigmoid(+-z_ij), G @ y, G.T @ x, sum G) with G = sigmoid(z) - [positive]."""
  def kernel(mod, interp, x, y, scale, bias, offset):
    gx, gy, loss, g_sum = mod.grads_call(x, y, _params(scale, bias), block, sigmoid=True,
                                         offset=offset, interpret=interp)
    return loss, gx, gy, g_sum

  fallback = lambda *a: _blockwise.sigmoid_grads(*a, _xla_block(block))
  return _dispatch(kernel, fallback, x, y, scale, bias, offset, auto=auto)


def sigmoid_stats(x: Array, y: Array, scale: Array, bias: Array, offset: Array,
                  block: int | None, *, auto: bool = False) -> Array:
  """The loss sum alone (a forward-only kernel: no gradient is computed)."""
  def kernel(mod, interp, x, y, scale, bias, offset):
    return mod.sigmoid_loss_call(x, y, _params(scale, bias), offset, block, interpret=interp)

  fallback = lambda *a: _blockwise.sigmoid_stats(*a, _xla_block(block))
  return _dispatch(kernel, fallback, x, y, scale, bias, offset, auto=auto)


# impl="auto": the kernels on TPU and supported CUDA GPUs, the xla backend elsewhere, chosen
# per lowering platform like the kernels themselves.
AUTO = types.SimpleNamespace(**{f.__name__: functools.partial(f, auto=True) for f in (
    softmax_stats, softmax_grads, sigmoid_grads, sigmoid_stats)})
