"""The `impl="pallas"` backend: Pallas kernels with the interface of `kernels/_blockwise.py`.

Which kernels run (decided when the loss is traced):
* TPU: the Mosaic kernels of `kernels/_mosaic.py` (2-D tiled grid, VMEM sized per kernel).
* NVIDIA GPU, compute capability >= 8.0 (A100, H100/H200 and newer): the Triton kernels of
  `kernels/_triton.py`, selected explicitly by Triton CompilerParams (Triton exists in JAX 0.10
  through 0.12; their shared memory, <= 96 KiB at 2 stages, fits sm_80 and sm_90; compiled for
  sm_90 they use no local memory / spills). Older GPUs and ROCm: `impl="auto"` picks "xla".
* CPU: interpret mode, of the GPU kernels (JAX's generic interpreter) by default; `use_target`
  selects another (the TPU interpreter, or lowering for TPU / GPU on a CPU-only machine).
The Mosaic GPU backend (JAX's default for a pallas_call without compiler params) is not used.
"""

from __future__ import annotations

import contextlib
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


def target() -> str:
  if _forced:
    return _forced[-1]
  backend = jax.default_backend()
  if backend == "tpu":
    return "tpu"
  if backend == "gpu":
    return "gpu"
  return "interpret-gpu"


def gpu_supported(device) -> bool:
  """Whether the Triton kernels serve this GPU (NVIDIA, compute capability >= 8.0)."""
  cc = getattr(device, "compute_capability", None)
  try:
    return cc is not None and float(cc) >= 8.0
  except ValueError:
    return False


def _module():
  t = target()
  mod = _mosaic if t.endswith("tpu") else _triton
  if t == "interpret-tpu":
    return mod, pltpu.InterpretParams()
  return mod, t == "interpret-gpu"


def _check_interpret(*xs: Array) -> None:
  if target().startswith("interpret") and any(_blockwise.vma_of(a) for a in xs):
    raise ValueError(
        "contrastive_loss(impl='pallas') on CPU runs Pallas in interpret mode, which inside "
        "jax.shard_map(check_vma=True) fails in JAX's interpreter; pass check_vma=False to "
        "shard_map (the loss handles both modes) or use impl='xla' on CPU")


def _params(scale: Array, bias: Array | float = 0.0) -> Array:
  return jnp.stack([jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)])


def softmax_stats(x: Array, y: Array, scale: Array, block: int | None) -> tuple[Array, Array]:
  """(logsumexp over y for each row of x [m], logsumexp over x for each row of y [n])."""
  _check_interpret(x, y)
  mod, interpret = _module()
  return mod.softmax_stats_call(x, y, scale, block, interpret=interpret)


def softmax_grads(x: Array, y: Array, scale: Array, lse_rows: Array, lse_cols: Array,
                  block: int | None) -> tuple[Array, Array]:
  """With G_ij = exp(z_ij - lse_rows_i) + exp(z_ij - lse_cols_j): (G @ y [m, d], G.T @ x [n, d])."""
  _check_interpret(x, y)
  mod, interpret = _module()
  return mod.grads_call(x, y, _params(scale), block, sigmoid=False, lse_rows=lse_rows,
                        lse_cols=lse_cols, interpret=interpret)


def sigmoid_grads(x: Array, y: Array, scale: Array, bias: Array, offset: Array,
                  block: int | None) -> tuple[Array, Array, Array, Array]:
  """(sum of -log sigmoid(+-z_ij), G @ y, G.T @ x, sum G) with G = sigmoid(z) - [positive]."""
  _check_interpret(x, y)
  mod, interpret = _module()
  gx, gy, loss, g_sum = mod.grads_call(x, y, _params(scale, bias), block, sigmoid=True,
                                       offset=offset, interpret=interpret)
  return loss, gx, gy, g_sum


def sigmoid_stats(x: Array, y: Array, scale: Array, bias: Array, offset: Array,
                  block: int | None) -> Array:
  """The loss sum alone (the gradient kernel's; its gradients are dropped)."""
  return sigmoid_grads(x, y, scale, bias, offset, block)[0]
