"""How far the batch scales on TPUs, from libtpu compiles (no TPU needed: `pip install 'zoo[tpu]'`).

* `--part train`: with `zoo.plan`, the largest global batch of ViT-B/16 CLIP training (remat=block,
  bf16, the recipe's AdamW) that fits a topology's chips, for loss impl pallas / xla / reference
  (the naive form: all-gathered embeddings, B/n x B logits per chip, as open_clip).
* `--part loss`: the loss alone (value and grads, sharded over the topology's chips, d=512):
  per-chip temporaries at B = 32k / 256k / 1M for the same impls.
Results are per chip and per GiB of HBM; JSON with --out. Slow: every point is a compile.

  JAX_PLATFORMS=cpu python bench/loss_scale.py --part loss --topology v5e:8x8 --out scale.json
  JAX_PLATFORMS=cpu python bench/loss_scale.py --part train --topology v5e:8x8 --impls pallas
Figures: docs/scale.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zoo import plan as zplan
from zoo.kernels.contrastive import contrastive_loss

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no device to guard
IMPLS = ("pallas", "xla", "reference")


def loss_point(topology: str, impl: str, batch: int, dim: int) -> dict:
  devices = zplan.tpu_devices(topology)
  mesh = Mesh(np.asarray(devices), ("x",))
  e = jax.ShapeDtypeStruct((batch, dim), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
  s = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  loss = functools.partial(contrastive_loss, impl=impl, axis_name="x")
  body = jax.value_and_grad(loss, argnums=(0, 1, 2))
  fn = jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P("x"), P()),
                     out_specs=(P(), (P("x"), P("x"), P())), check_vma=impl != "pallas")
  row = dict(part="loss", topology=topology, impl=impl, batch=batch, dim=dim,
             chips=len(devices))
  t0 = time.perf_counter()
  try:
    mem = jax.jit(fn).lower(e, e, s).compile().memory_analysis()
    row.update(temp_bytes=mem.temp_size_in_bytes, argument_bytes=mem.argument_size_in_bytes,
               fits=mem.temp_size_in_bytes + 3 * mem.argument_size_in_bytes
               <= zplan.HBM_GIB[topology.split(":")[0]] << 30)
  except Exception as e:  # noqa: BLE001 - the compiler's refusal is the result
    need = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    row.update(fits=False, error=str(e).splitlines()[0][:200],
               temp_bytes=int(float(need.group(1)) * 2 ** (10 * "KMGT".index(need.group(2)) + 10))
               if need else None)
  row["compile_s"] = round(time.perf_counter() - t0, 1)
  return row


def train_point(config_path: str, topology: str, impl: str, batch: int = 0) -> dict:
  from zoo.train import config_files

  config = config_files.load_config_file(config_path)
  with config.unlocked():
    config.remat, config.dtype, config.loss.impl = "block", "bfloat16", impl
    if batch:
      config.batch_size = batch
  t0 = time.perf_counter()
  first = zplan.compile_step(config, topology)
  first_s = round(time.perf_counter() - t0, 1)
  found = zplan.max_batch(config, topology, first)
  found["compiles"][0].update(compile_s=first_s, load=round(os.getloadavg()[0], 2))
  best, p = found["max_global_batch"], found["plan"]
  hbm = zplan.HBM_GIB[topology.split(":")[0]]
  return dict(part="train", topology=topology, impl=impl, chips=first.chips,
              max_global_batch=best, per_chip=best // first.chips,
              per_gib=best / first.chips / hbm, confirmed=found["confirmed"],
              per_chip_bytes=p.per_chip_bytes if p else None, compiles=found["compiles"])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--part", choices=("loss", "train"), default="loss")
  ap.add_argument("--topology", default="v5e:8x8")
  ap.add_argument("--impls", default=",".join(IMPLS))
  ap.add_argument("--batches", default="32768,262144,1048576")
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--config", default="configs/clip_vit_b16.py")
  ap.add_argument("--first_batch", type=int, default=0,
                  help="--part train: the first global batch compiled (default: the config's)")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  rows = []
  for impl in a.impls.split(","):
    if a.part == "train":
      rows.append(train_point(a.config, a.topology, impl, a.first_batch))
    else:
      rows += [loss_point(a.topology, impl, b, a.dim) for b in map(int, a.batches.split(","))]
    for r in rows[-(1 if a.part == "train" else len(a.batches.split(","))):]:
      print(json.dumps(r), flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
