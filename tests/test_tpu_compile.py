"""The pallas kernels compile for real TPUs with libtpu's compiler, on a machine without one.

`jax.experimental.topologies` gives TPU devices of a v5e / v6e topology; jit(...).lower(...)
.compile() runs the TPU compiler (Mosaic layout, VMEM allocation: a kernel over its VMEM fails
here, which is libtpu's verdict on the kernels' VMEM plans). The loss dispatches by the platform
compiled for (no forced target): the compiled HLO must hold the Mosaic custom calls. Per
topology two compiles, each of value_and_grad of softmax and sigmoid in fp32 and bf16 (and the
sigmoid loss alone, as in evaluation: the forward-only kernel): one chip
at B = 262144 / d = 1024, and a ring of 16 chips under shard_map (16384 rows each, d = 768).
Skipped without libtpu (`pip install 'zoo[tpu]'`, Python >= 3.11).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zoo.kernels.contrastive import contrastive_loss

pytest.importorskip("libtpu", reason="libtpu absent (pip install 'zoo[tpu]'); CI compiles these "
                    "in its Python 3.12 stage, which installs .[test,tpu]")
from jax.experimental import topologies  # noqa: E402

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no device to guard

MOSAIC = 'custom_call_target="tpu_custom_call"'
CASES = [(k, t) for k in ("softmax", "sigmoid") for t in (jnp.float32, jnp.bfloat16)]


def _losses(*args, axis_name=None):
  """value_and_grad of every (kind, dtype) case; args: (x, y) per dtype, then scale, bias."""
  out = []
  for k, (kind, dtype) in enumerate(CASES):
    x, y = args[2 * (dtype == jnp.bfloat16)], args[2 * (dtype == jnp.bfloat16) + 1]
    extra = (args[4],) if kind == "softmax" else (args[4], args[5])
    fn = functools.partial(contrastive_loss, kind=kind, impl="pallas", axis_name=axis_name)
    out.append(jax.value_and_grad(fn, argnums=(0, 1, 2))(x, y, *extra))
    if kind == "sigmoid":  # the loss alone (evaluation): the forward-only kernel
      out.append(fn(x, y, *extra))
  return out


def _compile(topology: str, chips: int, b: int, d: int):
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  mesh = Mesh(np.asarray(topo.devices[:chips]), ("x",))
  rows, rep = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())
  args = [jax.ShapeDtypeStruct((b, d), t, sharding=rows)
          for t in (jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16)]
  args += [jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)] * 2
  fn = _losses
  if chips > 1:
    fn = jax.shard_map(functools.partial(_losses, axis_name="x"), mesh=mesh,
                       in_specs=(P("x"),) * 4 + (P(), P()), out_specs=P(), check_vma=False)
  with jax.set_mesh(mesh):
    return jax.jit(fn).lower(*args).compile()


@pytest.mark.parametrize("topology,chips,b,d", [
    ("v5e:1x1", 1, 262144, 1024), ("v6e:1x1", 1, 262144, 1024),
    ("v5e:4x4", 16, 262144, 768), ("v6e:4x4", 16, 262144, 768)])
def test_kernels_compile_for_tpu(topology, chips, b, d):
  compiled = _compile(topology, chips, b, d)
  text = compiled.as_text()
  # softmax: 2 statistics passes + 1 gradient pass; sigmoid: 1 pass, its loss alone: 1; x 2
  assert text.count(MOSAIC) >= 10, text.count(MOSAIC)
  for name in ("softmax_grads", "sigmoid_grads", "sigmoid_loss"):
    assert f"contrastive_{name}" in text, name
  mem = compiled.memory_analysis()
  hbm = 16 << 30 if topology.startswith("v5e") else 32 << 30
  assert mem.argument_size_in_bytes + mem.temp_size_in_bytes < hbm, mem
