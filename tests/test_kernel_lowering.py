"""The pallas kernels lower for real hardware (no device needed, nothing allocated).

For softmax and sigmoid, forward+backward (jit(value_and_grad)), fp32 and bf16, B in {1000,
32768, 262144}, d in {512, 768, 1024}, traced on abstract shapes and lowered with interpret mode
off for "tpu" (under an abstract TPU v5e mesh) and "cuda". Resource checks, computed here from
the traced pallas_calls (independently of the kernels' own plans):
* TPU: interpret mode off, vmem_limit_bytes <= 16 MiB; whether the VMEM fits is libtpu's
  verdict, in tests/test_tpu_compile.py (a real TPU compile).
* GPU (Triton): num_stages >= 2 and (every rank-2 tile loaded) x stages + one fp32 [bm, bn] tile
  <= 227 KiB; and, with the `triton` package, the emitted Triton IR compiled for sm_90 uses
  <= 227 KiB of shared memory and no local memory (register spills).
"""

from __future__ import annotations

import functools
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from zoo.kernels import _pallas
from zoo.kernels.contrastive import contrastive_loss

MIB = 1 << 20
SMEM_H100 = 227 * 1024
BATCHES, DIMS = (1000, 32768, 262144), (512, 768, 1024)


def _abstract_tpu():
  dev = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=dev))


def _abstract_gpu():
  """An abstract H100 mesh: newer JAX lowers GPU Pallas calls only with a GPU device kind."""
  dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                    platform="cuda")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=dev))


def _avals(kind: str, b: int, d: int, dtype):
  e = jax.ShapeDtypeStruct((b, d), dtype)
  s = jax.ShapeDtypeStruct((), jnp.float32)
  return (e, e, s, s) if kind == "sigmoid" else (e, e, s)


def _pallas_calls(jaxpr) -> list:
  """Every pallas_call equation in a (closed) jaxpr, recursively."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append(eqn)
      continue
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else [p]):
        if isinstance(sub, jex_core.ClosedJaxpr):
          found += _pallas_calls(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          found += _pallas_calls(sub)
  return found


@functools.cache
def _lowered(platform: str, kind: str, dtype: str, b: int, d: int):
  """(pallas_call equations, lowered text) of jit(value_and_grad(loss)) for `platform`."""
  args = _avals(kind, b, d, jnp.dtype(dtype))
  loss = functools.partial(contrastive_loss, kind=kind, impl="pallas")
  fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
  target = "tpu" if platform == "tpu" else "gpu"
  mesh = _abstract_tpu() if platform == "tpu" else _abstract_gpu()
  with _pallas.use_target(target), mesh:
    traced = fn.trace(*args)
    lowered = traced.lower(lowering_platforms=(platform,))
  return _pallas_calls(traced.jaxpr.jaxpr), lowered.as_text()


KINDS_DTYPES = [(k, t) for k in ("softmax", "sigmoid") for t in ("float32", "bfloat16")]


@pytest.mark.parametrize("kind,dtype", KINDS_DTYPES)
def test_lowers_for_tpu(kind, dtype):
  for b in BATCHES:
    for d in DIMS:
      eqns, text = _lowered("tpu", kind, dtype, b, d)
      assert "tpu_custom_call" in text, (b, d)
      assert len(eqns) == (3 if kind == "softmax" else 1), [e.params["name"] for e in eqns]
      for eqn in eqns:
        assert not eqn.params["interpret"]
        assert eqn.params["compiler_params"].vmem_limit_bytes <= 16 * MIB


def _triton_smem_estimate(eqn) -> int:
  """Shared memory of the pipelined operand tiles: every rank-2 load x stages, plus G."""
  stages = eqn.params["compiler_params"].num_stages
  loads = []

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name in ("get", "load") and len(e.outvars[0].aval.shape) == 2:
        aval = e.outvars[0].aval
        loads.append(int(np.prod(aval.shape)) * aval.dtype.itemsize)
      for p in e.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else [p]):
          if isinstance(sub, jex_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            walk(sub)

  walk(eqn.params["jaxpr"])
  assert loads, eqn.params["name"]
  return stages * sum(loads) + max(loads) // 2 * 4


@pytest.mark.parametrize("kind,dtype", KINDS_DTYPES)
def test_lowers_for_cuda_within_shared_memory(kind, dtype):
  for b in BATCHES:
    for d in DIMS:
      eqns, text = _lowered("cuda", kind, dtype, b, d)
      assert "__gpu$xla.gpu.triton" in text, (b, d)
      assert len(eqns) == (3 if kind == "softmax" else 1)
      for eqn in eqns:
        params = eqn.params["compiler_params"]
        assert type(params).__module__.endswith("triton.core"), type(params)
        assert params.num_stages >= 2
        smem = _triton_smem_estimate(eqn)
        assert smem <= SMEM_H100, (eqn.params["name"], b, d, smem)


def test_triton_ir_compiles_for_sm90_without_spills(tmp_path):
  """The Triton IR JAX emits, compiled for sm_90 by the `triton` package (no GPU needed)."""
  triton = pytest.importorskip("triton")
  from jax._src.pallas.triton import lowering as tl  # to capture the emitted IR
  from triton.backends.compiler import GPUTarget

  if not hasattr(tl, "lower_jaxpr_to_triton_module"):
    pytest.skip(f"jax {jax.__version__} no longer has the Triton lowering entry this test hooks "
                "to capture the IR; the smem budget is still asserted by "
                "test_lowers_for_cuda_within_shared_memory")

  modules = []
  orig = tl.lower_jaxpr_to_triton_module

  def capture(*a, **k):
    res = orig(*a, **k)
    modules.append(res.module.operation.get_asm(enable_debug_info=False))
    return res

  tl.lower_jaxpr_to_triton_module = capture
  eqns = []
  try:
    for kind, dtype in KINDS_DTYPES:
      eqns += _lowered.__wrapped__("cuda", kind, dtype, 32768, 768)[0]
  finally:
    tl.lower_jaxpr_to_triton_module = orig
  assert len(modules) == len(eqns) == 8
  cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
  for k, (eqn, asm) in enumerate(zip(eqns, modules)):
    assert asm.startswith(f"module @{eqn.params['name']}"), asm[:80]
    params = eqn.params["compiler_params"]
    path = tmp_path / f"k{k}.ttir"
    path.write_text(asm)
    ck = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=params.num_warps, num_stages=params.num_stages))
    assert ck.metadata.shared <= SMEM_H100, (eqn.params["name"], ck.metadata.shared)
    if os.path.exists(cuobjdump):
      (tmp_path / "k.cubin").write_bytes(ck.asm["cubin"])
      usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(tmp_path / "k.cubin")],
                             capture_output=True, text=True, check=True).stdout
      assert "LOCAL:0" in usage and "STACK:0" in usage, (eqn.params["name"], usage)
