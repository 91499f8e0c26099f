"""Will a training run fit a TPU pod? Compile its train step for the pod, on any machine.

  python -m zoo.plan --config configs/clip_vit_b16.py --topology v5e:8x8 [--config.KEY=VALUE]
      [--max_batch] [--json OUT]

The real sharded train step of the config (model, optimizer, loss impl, remat, dtype, mesh and
global batch) is compiled by libtpu's TPU compiler for the topology's chips (`pip install
'zoo[tpu]'`), on abstract state: nothing is allocated. Printed per chip (the compiler's buffer
assignment): parameters + optimizer state, activations / temporaries, the total against the
chip's HBM, whether it fits; FLOPs per step. `--max_batch` finds the largest global batch that
fits by compiling: per-chip memory is close to affine in the batch, so a few compiles predict
it, and a compile that fits plus one a step above that does not confirm it. On TPU dtype "auto" means bfloat16; loss impl "auto"
compiles the Pallas kernels.
XLA's FLOP count misses the Pallas loss kernels (~4 * 2 B^2 d for the softmax loss).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(x(\d+))?$")
_OOM = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")
_REQUIRED = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class Plan:
  topology: str
  chips: int
  global_batch: int
  fits: bool
  hbm_bytes: int
  per_chip_bytes: int  # arguments + outputs not aliased to them + temporaries + code
  # (when the compiler refuses a program over HBM: its required temporaries + state + batch)
  state_bytes: int  # parameters + optimizer state (+ step, rng) per chip
  temp_bytes: int  # activations and temporaries per chip
  batch_bytes: int  # the batch's shard per chip
  flops_per_step: float  # summed over chips (XLA's count)
  error: str = ""  # the compiler's out-of-memory message, when it refused


def check_topology(topology: str) -> str:
  """The chip generation of "v5e:8x8"-style names; a one-line error otherwise."""
  from zoo import errors

  match = _TOPOLOGY.match(topology)
  if not match:
    raise errors.UserError(f"unknown topology {topology!r}; expected GENERATION:AxB[xC] with "
                           f"GENERATION one of {sorted(HBM_GIB)}, e.g. v5e:8x8 or v5p:2x2x2")
  return match.group(1)


def tpu_devices(topology: str) -> list:
  """The TPU devices of `topology` (libtpu's compiler, no TPU needed)."""
  from zoo import errors

  check_topology(topology)
  if importlib.util.find_spec("libtpu") is None:
    raise errors.UserError("compiling for TPU needs libtpu: pip install 'zoo[tpu]' "
                           "(Python >= 3.11)")
  from jax.experimental import topologies

  # Compiling only: other processes compiling with libtpu at the same time are fine.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # noqa: BLE001 - libtpu's message, on one line
    what = f"unknown topology {topology!r}" if "topolog" in str(e).lower() else "libtpu"
    raise errors.UserError(f"{what}: {errors.one_line(e)}") from None


def for_tpu(config):
  """`config` with its "auto" dtype as on a TPU: bfloat16 (loss impl "auto" needs nothing: it
  picks the TPU kernels when compiled for TPU, from any host)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if config.get("dtype", "auto") == "auto":
      config.dtype = "bfloat16"
  return config


def _batch_avals(trainer, config, batch: int, mesh) -> dict:
  import jax
  import jax.numpy as jnp

  from zoo import errors
  from zoo.data import pipeline as data
  from zoo.models import sharding
  from zoo.train import loop

  model = trainer.model(trainer.state)
  fields = trainer.family.batch_fields(trainer.settings)
  size = model.config.vision.image_size
  shapes = {"image": ((size, size, 3), jnp.float32),
            "tokens": ((loop.context_length(config, model),), jnp.int32)}
  fields = data.with_crop_field(fields, config.data)
  if "image_crop" in fields:  # data.resize='device': each crop on a uint8 canvas
    side = data.canvas_side(config.data.get("resize_canvas", 0) or 0, size)
    shapes["image"] = ((side, side, 3), jnp.uint8)
    shapes["image_crop"] = ((3,), jnp.int32)
  unknown = [f for f in fields if f not in shapes]
  if unknown:
    raise errors.UserError(f"zoo.plan: family {trainer.family.name!r} reads batch fields "
                           f"{unknown} whose shapes the planner does not know (it plans "
                           f"{sorted(shapes)})")
  rows = sharding.batch_sharding(mesh)
  return {f: jax.ShapeDtypeStruct((batch, *shapes[f][0]), shapes[f][1], sharding=rows)
          for f in fields}


def _shard_bytes(tree) -> int:
  import jax
  import numpy as np

  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * leaf.dtype.itemsize
  return total


def compile_step(config, topology: str, batch: int | None = None,
                 hbm_bytes: int | None = None) -> Plan:
  """Compiles the config's train step for `topology` at global `batch` (default: the config's);
  it fits if its per-chip bytes are within `hbm_bytes` (default: the chip's HBM)."""
  from zoo import errors
  from zoo.models import sharding
  from zoo.train import trainer as trainer_lib

  gen = check_topology(topology)
  devices = tpu_devices(topology)
  config = for_tpu(config)
  batch = int(batch or config.batch_size)
  mc = config.mesh
  try:
    mesh = sharding.make_mesh(data=mc.get("data", 1), fsdp=mc.get("fsdp", -1),
                              tensor=mc.get("tensor", 1), expert=mc.get("expert", 1),
                              devices=devices)
  except ValueError as e:
    raise errors.UserError(f"config.mesh on {topology} ({len(devices)} chips): {e}") from None
  n_batch = int(mesh.size // (mesh.shape["tensor"] * mesh.shape.get("expert", 1)))
  if batch % n_batch:
    raise errors.UserError(f"global batch {batch} is not divisible by the {n_batch} chips the "
                           f"batch is split over on {topology}")
  tr = trainer_lib.build_trainer(config, mesh=mesh, abstract=True)
  avals = _batch_avals(tr, config, batch, mesh)
  hbm = hbm_bytes or HBM_GIB[gen] << 30
  state_bytes, batch_bytes = _shard_bytes(tr.state), _shard_bytes(avals)
  try:
    compiled = tr.step_fn.lower(tr.state, avals).compile()
  except Exception as e:  # noqa: BLE001 - the compiler refuses a program over HBM
    if not any(m in str(e) for m in _OOM):
      raise
    need = _REQUIRED.search(str(e))  # "... HLO temporaries (57.19G) exceeds available HBM"
    temp = int(float(need.group(1)) * _UNITS[need.group(2)]) if need else -1
    total = temp + state_bytes + batch_bytes if need else -1
    return Plan(topology, len(devices), batch, False, hbm, total, state_bytes, temp,
                batch_bytes, 0.0, errors.one_line(e)[:300])
  mem = compiled.memory_analysis()
  per_chip = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", 0.0)) * len(devices)
  return Plan(topology, len(devices), batch, per_chip <= hbm, hbm, int(per_chip), state_bytes,
              int(mem.temp_size_in_bytes), batch_bytes, flops)


def max_batch_search(measure, hbm: int, unit: int, first: tuple[int, int, bool],
                     floor_bytes: int = 0, max_compiles: int = 10) -> dict:
  """The largest global batch (a multiple of `unit`) whose step fits `hbm` bytes per chip.

  `measure(batch) -> (per_chip_bytes, fits)` is one compile (bytes -1 when unknown). Per-chip
  memory is close to affine in the batch, so each step fits a line through the two points
  nearest the limit (the fitting one just below and the refused one just above, once known;
  `floor_bytes` at batch 0, the state, stands in until there are two), compiles at the batch it
  predicts, and narrows the bracket; a step that lands on the same side as the one before bisects
  the bracket instead (or doubles, before any refusal), so a curved memory function still
  converges. The answer rests on two compiles: one at the batch returned that fits and one a
  unit above that does not. Returns
  {"max_global_batch", "confirmed", "compiles": [{"global_batch", "per_chip_bytes", "fits"}]}.
  """
  points = {first[0]: (first[1], first[2])}
  sides = []
  while True:
    fit = [b for b, (_, ok) in points.items() if ok]
    over = [b for b, (_, ok) in points.items() if not ok]
    lo, hi = max(fit, default=0), min(over, default=None)
    if hi is not None and hi - lo <= unit:
      break
    if len(points) >= max_compiles:
      break
    known = [(b, y) for b, (y, _) in points.items() if y >= 0]
    near = sorted(known, key=lambda p: (p[0] not in (lo, hi), abs(p[1] - hbm)))[:2]
    if len(near) < 2:
      near.append((0, floor_bytes))
    (x1, y1), (x2, y2) = sorted(near) if len(near) == 2 else ((0, 0), (0, 0))
    slope = (y2 - y1) / (x2 - x1) if x2 != x1 else 0.0
    if slope > 0:
      guess = int((x1 + (hbm - y1) / slope) // unit * unit)
    else:
      guess = 2 * lo if hi is None else (lo + hi) // 2 // unit * unit
    if len(sides) >= 2 and sides[-1] == sides[-2]:  # two steps on one side: bisect, or double
      if hi is not None:
        guess = (lo + hi) // 2 // unit * unit
      elif guess > lo:  # still room by the fit, yet creeping: go at least twice as far
        guess = max(guess, 2 * lo)
    if guess <= lo:
      guess = lo + unit  # the prediction is a batch known to fit: test the step above it
    if hi is not None and guess >= hi:  # the line is off (a refusal's bytes unknown, or a
      guess = max(lo + unit, (lo + hi) // 2 // unit * unit)  # curve): bisect, don't creep
    if guess in points:
      break
    points[guess] = measure(guess)
    sides.append(points[guess][1])
  fit = [b for b, (_, ok) in points.items() if ok]
  lo = max(fit, default=0)
  over = [b for b in points if not points[b][1] and b > lo]
  return {"max_global_batch": lo, "confirmed": lo + unit in points and not points[lo + unit][1]
          and (lo == 0 or points[lo][1]),
          "compiles": [{"global_batch": b, "per_chip_bytes": y, "fits": ok}
                       for b, (y, ok) in points.items()]}


def max_batch(config, topology: str, start: Plan, max_compiles: int = 10) -> dict:
  """`max_batch_search` over compiles of the config's step: batches are multiples of the chips
  the batch is split over; the config's batch (`start`, compiled) is the first point."""
  mc = for_tpu(config).mesh
  unit = start.chips // (mc.get("tensor", 1) * mc.get("expert", 1))
  plans, took = {start.global_batch: start}, {}

  def measure(batch: int) -> tuple[int, bool]:
    t0 = time.perf_counter()
    plans[batch] = p = compile_step(config, topology, batch, start.hbm_bytes)
    took[batch] = {"compile_s": round(time.perf_counter() - t0, 1),
                   "load": round(os.getloadavg()[0], 2)}
    if p.per_chip_bytes < 0:
      took[batch]["error"] = p.error  # a refusal that does not say what it needed
    size = f"{p.per_chip_bytes / 2**30:7.2f} GiB" if p.per_chip_bytes >= 0 else "   (unknown)"
    print(f"  global batch {batch:>8} ({batch // unit} per chip): {size} per chip, "
          f"{'fits' if p.fits else 'does NOT fit'}", flush=True)
    return p.per_chip_bytes, p.fits

  out = max_batch_search(measure, start.hbm_bytes, unit,
                         (start.global_batch, start.per_chip_bytes, start.fits),
                         start.state_bytes, max_compiles)
  for c in out["compiles"]:
    c.update(took.get(c["global_batch"], {}))
  out["plan"] = plans.get(out["max_global_batch"])
  return out


def report(p: Plan) -> str:
  gib = lambda b: f"{b / 2**30:7.2f} GiB"
  lines = [f"zoo.plan: {p.topology} ({p.chips} chips), global batch {p.global_batch} "
           f"({p.global_batch // max(1, p.chips)} per chip)",
           f"  per chip: parameters + optimizer state {gib(p.state_bytes)}",
           f"            batch                         {gib(p.batch_bytes)}"]
  if p.error:
    if p.temp_bytes >= 0:
      lines.append(f"            activations / temporaries     {gib(p.temp_bytes)}")
      lines.append(f"            total                         {gib(p.per_chip_bytes)} of "
                   f"{gib(p.hbm_bytes).strip()} HBM: does NOT fit")
    lines.append(f"  the TPU compiler refused it: {p.error}")
    return "\n".join(lines)
  lines += [f"            activations / temporaries     {gib(p.temp_bytes)}",
            f"            total                         {gib(p.per_chip_bytes)} of "
            f"{gib(p.hbm_bytes).strip()} HBM: {'fits' if p.fits else 'does NOT fit'}",
            f"  FLOPs per step (XLA's count, all chips): {p.flops_per_step:.3e}"]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  from zoo import errors

  ap = errors.ArgumentParser(prog="python -m zoo.plan", description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True, help="a configs/*.py file")
  ap.add_argument("--topology", required=True, help="e.g. v5e:8x8, v5p:2x2x2, v6e:4x4")
  ap.add_argument("--max_batch", action="store_true", help="find the largest global batch")
  ap.add_argument("--hbm_gib", type=float, default=None,
                  help="plan against this many GiB per chip (default: the chip's HBM)")
  ap.add_argument("--json", default=None, help="write the result as JSON here")
  args, rest = ap.parse_known_args(argv)
  from zoo.train import config_files

  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    raise errors.UserError(f"unrecognized arguments: {' '.join(bad)} (see python -m zoo.plan "
                           "--help)")
  check_topology(args.topology)
  if args.hbm_gib is not None and args.hbm_gib <= 0:
    raise errors.UserError(f"--hbm_gib must be > 0, got {args.hbm_gib}")
  config = config_files.load_config_file(args.config)
  config_files.check_overrides(config, rest)
  from absl import flags as absl_flags  # --config.KEY=VALUE parsed as train.py parses them
  from ml_collections import config_flags

  fv = absl_flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", args.config, flag_values=fv)
  try:
    fv(["zoo.plan", f"--config={args.config}", *rest])
  except absl_flags.Error as e:
    raise errors.UserError(str(e)) from None
  config = holder.value
  plan = compile_step(config, args.topology,
                      hbm_bytes=int(args.hbm_gib * 2**30) if args.hbm_gib else None)
  out: dict[str, Any] = {"fits": plan.fits, "per_chip_bytes": plan.per_chip_bytes,
                         "hbm_bytes": plan.hbm_bytes, "global_batch": plan.global_batch,
                         "flops_per_step": plan.flops_per_step, "topology": plan.topology}
  print(report(plan), flush=True)
  if args.max_batch:
    found = max_batch(config, args.topology, plan)
    best, best_plan = found["max_global_batch"], found["plan"]
    out["max_global_batch"] = best
    out["max_batch_compiles"] = found["compiles"]
    out["max_batch_confirmed"] = found["confirmed"]
    print(f"  largest global batch that fits: {best} ({best // plan.chips} per chip)"
          + (f", {best_plan.per_chip_bytes / 2**30:.2f} GiB per chip" if best_plan else "")
          + ("; the next step up does not fit" if found["confirmed"] else
             "; NOT confirmed: the search stopped before a compile one step above refused"))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU; never claim a local one
  from zoo import errors

  errors.quiet_logging()
  sys.exit(errors.run(main, prog="python -m zoo.plan"))
