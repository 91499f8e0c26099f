"""Forward+backward time and peak memory of kernels.contrastive_loss: reference / xla / pallas.

Each measurement runs in a fresh subprocess (clean compile cache and memory peak). Time: median
wall time of jit(value_and_grad) over --repeats runs after a warm-up (compile excluded).
Memory: on CPU the compiled executable's memory_analysis(), temp + argument + output bytes (XLA's
static buffer assignment = the peak of that executable); on GPU/TPU the device's
peak_bytes_in_use from memory_stats() in that process, minus the bytes in use before the run.
Ratios are against the reference measured in the same invocation. Defaults on CPU skip pallas
(interpret mode is not a speed path); the reference is skipped where its B x B buffers would not
fit in memory.

  python bench/contrastive_loss.py --batch 4096 16384 --dim 512            # CPU target check
  python bench/contrastive_loss.py --batch 4096 16384 65536 --dim 512 768  # accelerator
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Reference forward+backward holds about this many fp32 B x B buffers at its peak (logits, two
# softmaxes, their gradients); used only to skip configurations that cannot fit.
REF_BUFFERS = 6


def measure_one(impl: str, kind: str, batch: int, dim: int, dtype: str, block: int | None,
                repeats: int) -> dict:
  """Runs in the child process: compile, warm up, time, read memory."""
  import jax
  import jax.numpy as jnp

  from kernels import contrastive_loss

  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (batch, dim), jnp.float32)
  y = x + jax.random.normal(ky, (batch, dim), jnp.float32)
  x = (x / jnp.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)
  y = (y / jnp.linalg.norm(y, axis=1, keepdims=True)).astype(dtype)
  args = (x, y, jnp.float32(10.0)) + ((jnp.float32(-10.0),) if kind == "sigmoid" else ())
  loss = lambda *a: contrastive_loss(*a, kind=kind, impl=impl, block_size=block)
  step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
  compiled = step.lower(*args).compile()
  mem = compiled.memory_analysis()
  device = jax.devices()[0]
  stats0 = device.memory_stats() or {}
  out = compiled(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  stats = device.memory_stats() or {}
  res = {"impl": impl, "kind": kind, "batch": batch, "dim": dim, "dtype": dtype,
         "block": block, "backend": jax.default_backend(), "device": device.device_kind,
         "time_s": statistics.median(times), "times_s": times, "loss": float(out[0]),
         "compiled_bytes": int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                               + mem.output_size_in_bytes),
         "temp_bytes": int(mem.temp_size_in_bytes)}
  if "peak_bytes_in_use" in stats:
    res["device_peak_bytes"] = int(stats["peak_bytes_in_use"] - stats0.get("bytes_in_use", 0))
  res["memory_bytes"] = res.get("device_peak_bytes", res["compiled_bytes"])
  res["memory_measure"] = ("device memory_stats peak_bytes_in_use" if "device_peak_bytes" in res
                           else "compiled memory_analysis temp+argument+output")
  return res


def available_bytes() -> int:
  """Memory the reference may use: the device limit on accelerators, MemAvailable on CPU."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 1 << 62


def run_child(cfg: dict, timeout: float) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--_one", json.dumps(cfg)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {**cfg, "skipped": f"timed out after {timeout:.0f} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**cfg, "skipped": f"failed (exit {proc.returncode}): {tail[:300]}"}
  return json.loads(lines[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, nargs="+", default=[4096, 16384, 65536])
  p.add_argument("--dim", type=int, nargs="+", default=[512, 768])
  p.add_argument("--kind", nargs="+", default=["softmax"], choices=["softmax", "sigmoid"])
  p.add_argument("--impl", nargs="+", default=None, choices=["reference", "xla", "pallas"],
                 help="default: all three (no pallas on CPU)")
  p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 elsewhere")
  p.add_argument("--block", type=int, default=None, help="block size (default: per impl)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--timeout", type=float, default=3600.0, help="per measurement, seconds")
  p.add_argument("--json", default=os.path.join(ROOT, "bench/results/contrastive_loss.json"))
  p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)

  if a._one:
    cfg = json.loads(a._one)
    print(json.dumps(measure_one(**cfg)))
    return 0

  # The parent only inspects the device; it must not reserve accelerator memory the children need.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  backend = jax.default_backend()
  impls = a.impl or (["reference", "xla"] if backend == "cpu" else ["reference", "xla", "pallas"])
  dtype = a.dtype or ("float32" if backend == "cpu" else "bfloat16")
  avail = available_bytes()
  print(f"backend {backend} ({jax.devices()[0].device_kind}), dtype {dtype}, "
        f"memory available {avail / 2**30:.1f} GiB, repeats {a.repeats}")
  results = []
  for kind in a.kind:
    for batch in a.batch:
      for dim in a.dim:
        ref = None
        for impl in impls:
          cfg = {"impl": impl, "kind": kind, "batch": batch, "dim": dim, "dtype": dtype,
                 "block": a.block, "repeats": a.repeats}
          need = REF_BUFFERS * 4 * batch * batch
          if impl == "reference" and need > 0.8 * avail:
            r = {**cfg, "skipped": f"needs ~{need / 2**30:.0f} GiB (B x B buffers), "
                                   f"{avail / 2**30:.0f} GiB available"}
          else:
            r = run_child(cfg, a.timeout)
          if impl == "reference" and "skipped" not in r:
            ref = r
          if ref is not None and "skipped" not in r:
            r["time_vs_reference"] = r["time_s"] / ref["time_s"]
            r["memory_vs_reference"] = r["memory_bytes"] / ref["memory_bytes"]
          results.append(r)
          if "skipped" in r:
            print(f"{kind:8s} B={batch:<6d} d={dim:<4d} {impl:9s} skipped: {r['skipped']}")
            continue
          ratio = (f"  time x{r['time_vs_reference']:.2f}  memory x{r['memory_vs_reference']:.4f}"
                   if "time_vs_reference" in r else "")
          print(f"{kind:8s} B={batch:<6d} d={dim:<4d} {impl:9s} {r['time_s']:8.3f} s  "
                f"{r['memory_bytes'] / 2**20:10.1f} MiB  loss {r['loss']:.5f}{ratio}", flush=True)

  target = [r for r in results if r.get("impl") == "xla" and r.get("batch") == 16384
            and r.get("dim") == 512 and r.get("kind") == "softmax" and "time_vs_reference" in r]
  if backend == "cpu" and target:
    t = target[0]
    ok = t["memory_vs_reference"] <= 0.05 and t["time_vs_reference"] <= 1.5
    print(f"CPU target (xla, B=16384, d=512: memory <= 5%, time <= 1.5x of the reference): "
          f"memory {100 * t['memory_vs_reference']:.2f}%, time x{t['time_vs_reference']:.2f} "
          f"-> {'PASS' if ok else 'FAIL'}")
  os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
  with open(a.json, "w") as f:
    json.dump({"backend": backend, "device": jax.devices()[0].device_kind, "dtype": dtype,
               "memory_measure": ("compiled memory_analysis temp+argument+output" if backend
                                  == "cpu" else "device memory_stats peak_bytes_in_use"),
               "command": " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
               "results": results}, f, indent=1)
  print(f"wrote {a.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
