"""Per-chip memory of the compiled contrastive loss (value and grads) from libtpu's compiler.

No TPU needed (Python >= 3.11 with `pip install 'zoo[tpu]'`): the loss is compiled for a one-chip
TPU topology and `memory_analysis()` read: arguments (the embeddings), outputs (the gradients),
temp (everything else the compiled program allocates). impl="pallas" must be O(B d): temp per
row constant as B grows.

  JAX_PLATFORMS=cpu python bench/loss_memory.py --out loss_memory.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zoo.kernels.contrastive import contrastive_loss

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no device to guard


def measure(topology: str, kind: str, impl: str, b: int, d: int, dtype) -> dict:
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  mesh = Mesh(np.asarray(topo.devices[:1]), ("x",))
  rep = NamedSharding(mesh, P())
  e = jax.ShapeDtypeStruct((b, d), dtype, sharding=rep)
  s = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  args = (e, e, s, s) if kind == "sigmoid" else (e, e, s)
  fn = jax.jit(jax.value_and_grad(functools.partial(contrastive_loss, kind=kind, impl=impl),
                                  argnums=(0, 1, 2)))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    mem = fn.lower(*args).compile().memory_analysis()
  return dict(topology=topology, kind=kind, impl=impl, batch=b, dim=d,
              dtype=jnp.dtype(dtype).name, argument_bytes=mem.argument_size_in_bytes,
              output_bytes=mem.output_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
              temp_bytes_per_row=mem.temp_size_in_bytes / b,
              compile_s=round(time.perf_counter() - t0, 1))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", default="v5e:1x1")
  ap.add_argument("--batches", default="32768,131072,262144")
  ap.add_argument("--dim", type=int, default=1024)
  ap.add_argument("--kinds", default="softmax,sigmoid")
  ap.add_argument("--impls", default="pallas")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  rows = []
  for impl in a.impls.split(","):
    for kind in a.kinds.split(","):
      for b in map(int, a.batches.split(",")):
        r = measure(a.topology, kind, impl, b, a.dim, jnp.bfloat16)
        rows.append(r)
        print(f"{r['topology']} {impl:7s} {kind:7s} B={b:7d} d={a.dim} bf16: "
              f"args {r['argument_bytes'] / 2**20:8.1f} MiB  temp {r['temp_bytes'] / 2**20:8.1f} "
              f"MiB  temp/row {r['temp_bytes_per_row']:7.1f} B  ({r['compile_s']} s)", flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
