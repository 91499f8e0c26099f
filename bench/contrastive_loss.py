"""Forward+backward time, peak memory and matmul work of contrastive losses, per impl.

Impls: "naive" (one B x B logits matrix, both log-softmaxes from it: what a user writes),
"reference" (open_clip-style: logits and logits.T computed separately), and zoo's "xla" and
"pallas". Each measurement runs in a fresh subprocess. Inputs are made on the host and placed
before the baseline reading. Time: median of jit(value_and_grad) over --repeats after a warm-up.
Memory: on accelerators peak_bytes_in_use minus bytes_in_use after the inputs were placed; on
CPU the compiled executable's temp + output bytes. Matmul units: the dot FLOPs of the traced
forward+backward (loop trip counts and Pallas grids included) / (2 B^2 d). Pallas is skipped on
CPU by default (interpret mode); the B x B impls are skipped where they cannot fit.

  python bench/contrastive_loss.py --batch 4096 16384 --dim 512            # CPU
  python bench/contrastive_loss.py --batch 32768 131072 --dim 768          # accelerator
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMPLS = ("naive", "reference", "xla", "pallas")
# fp32 B x B buffers alive at the peak of forward+backward (used only to skip what cannot fit).
SQUARE_BUFFERS = {"reference": 6, "naive": 4}


def naive_loss(x, y, scale, bias=None, *, kind: str = "softmax"):
  """The loss as a user writes it: one logits matrix, both directions from it."""
  import jax
  import jax.numpy as jnp

  logits = scale * jnp.dot(x, y.T, preferred_element_type=jnp.float32)
  if kind == "softmax":
    diag = jnp.diagonal(logits)
    rows = jax.nn.logsumexp(logits, axis=1) - diag
    cols = jax.nn.logsumexp(logits, axis=0) - diag
    return (jnp.sum(rows) + jnp.sum(cols)) / (2 * x.shape[0])
  sign = 2 * jnp.eye(x.shape[0], dtype=jnp.float32) - 1
  return -jnp.sum(jax.nn.log_sigmoid(sign * (logits + bias))) / x.shape[0]


def loss_fn(impl: str, kind: str, block: int | None = None):
  from zoo.kernels.contrastive import contrastive_loss

  if impl == "naive":
    return functools.partial(naive_loss, kind=kind)
  return functools.partial(contrastive_loss, kind=kind, impl=impl, block_size=block)


def _dot_flops(jaxpr, mult: int = 1) -> int:
  """Sum of 2 * M * N * K over dot_general equations, times loop trip counts / Pallas grids."""
  import numpy as np
  from jax.extend import core as jcore

  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      k = int(np.prod([lhs[i] for i in lc]))
      total += mult * 2 * k * int(np.prod(eqn.outvars[0].aval.shape))
      continue
    inner = mult
    if name == "scan":
      inner *= eqn.params["length"]
    elif name == "pallas_call":
      inner *= int(np.prod(eqn.params["grid_mapping"].grid))
    elif name == "while":
      raise ValueError("matmul units: a while loop with an unknown trip count")
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else [p]):
        if isinstance(sub, jcore.ClosedJaxpr):
          total += _dot_flops(sub.jaxpr, inner)
        elif isinstance(sub, jcore.Jaxpr):
          total += _dot_flops(sub, inner)
  return total


def matmul_units(impl: str, kind: str, batch: int, dim: int, target: str | None = None) -> float:
  """Dot FLOPs of jit(value_and_grad(loss)) traced on abstract shapes / (2 B^2 d)."""
  import contextlib

  import jax
  import jax.numpy as jnp

  from zoo.kernels import _pallas

  e = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
  s = jax.ShapeDtypeStruct((), jnp.float32)
  args = (e, e, s) + ((s,) if kind == "sigmoid" else ())
  fn = jax.value_and_grad(loss_fn(impl, kind), argnums=tuple(range(len(args))))
  with _pallas.use_target(target) if target else contextlib.nullcontext():
    jaxpr = jax.make_jaxpr(fn)(*args)
  return _dot_flops(jaxpr.jaxpr) / (2 * batch * batch * dim)


def _inputs(batch: int, dim: int, dtype: str):
  """Correlated unit-norm pairs made on the host (no device temporaries), then placed."""
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, dim), dtype=np.float32)
  y = x + rng.standard_normal((batch, dim), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  return jnp.asarray(x).astype(dtype), jnp.asarray(y).astype(dtype)


def measure_one(impl: str, kind: str, batch: int, dim: int, dtype: str, block: int | None,
                repeats: int) -> dict:
  """Runs in the child process: inputs, baseline memory, compile, warm up, time, read peak."""
  import jax
  import jax.numpy as jnp

  device = jax.devices()[0]
  x, y = _inputs(batch, dim, dtype)
  args = (x, y, jnp.float32(10.0)) + ((jnp.float32(-10.0),) if kind == "sigmoid" else ())
  jax.block_until_ready(args)
  stats0 = device.memory_stats() or {}
  step = jax.jit(jax.value_and_grad(loss_fn(impl, kind, block),
                                    argnums=tuple(range(len(args)))))
  compiled = step.lower(*args).compile()
  mem = compiled.memory_analysis()
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
         "time_s": statistics.median(times), "times_s": times, "loss": float(out[0])}
  if mem is not None:
    res["compiled_bytes"] = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
  if "peak_bytes_in_use" in stats:
    res["device_peak_bytes"] = int(stats["peak_bytes_in_use"] - stats0.get("bytes_in_use", 0))
  res["memory_bytes"] = res.get("device_peak_bytes", res.get("compiled_bytes", 0))
  res["memory_measure"] = ("peak_bytes_in_use - bytes_in_use after inputs"
                           if "device_peak_bytes" in res else "compiled temp + output bytes")
  return res


def available_bytes() -> int:
  """Memory the B x B impls may use: the device limit on accelerators, MemAvailable on CPU."""
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
  """measure_one(**cfg) in a fresh process; failures come back as {"skipped": reason}."""
  cmd = [sys.executable, os.path.abspath(__file__), "--_one", json.dumps(cfg)]
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)
  except subprocess.TimeoutExpired:
    return {**cfg, "skipped": f"timed out after {timeout:.0f} s"}
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or ["no output"]
    return {**cfg, "skipped": f"failed (exit {proc.returncode}): {err[-1][:300]}"}
  return json.loads(lines[-1])


def too_big(impl: str, batch: int, avail: int) -> str | None:
  need = SQUARE_BUFFERS.get(impl, 0) * 4 * batch * batch
  if need > 0.8 * avail:
    return f"needs ~{need / 2**30:.0f} GiB (B x B buffers), {avail / 2**30:.0f} GiB available"
  return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, nargs="+", default=[4096, 16384])
  p.add_argument("--dim", type=int, nargs="+", default=[512])
  p.add_argument("--kind", nargs="+", default=["softmax"], choices=["softmax", "sigmoid"])
  p.add_argument("--impl", nargs="+", default=None, choices=IMPLS,
                 help="default: all (no pallas on CPU)")
  p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 elsewhere")
  p.add_argument("--block", type=int, default=None, help="block size (default: per impl)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--timeout", type=float, default=3600.0, help="per measurement, seconds")
  p.add_argument("--json", default=os.path.join(ROOT, "bench/results/contrastive_loss.json"))
  p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)

  if a._one:
    print(json.dumps(measure_one(**json.loads(a._one))))
    return 0

  # The parent only inspects the device; it must not reserve accelerator memory the children need.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  backend = jax.default_backend()
  impls = a.impl or [i for i in IMPLS if backend != "cpu" or i != "pallas"]
  dtype = a.dtype or ("float32" if backend == "cpu" else "bfloat16")
  avail = available_bytes()
  print(f"backend {backend} ({jax.devices()[0].device_kind}), dtype {dtype}, "
        f"memory available {avail / 2**30:.1f} GiB, repeats {a.repeats}")
  results = []
  for kind in a.kind:
    units = {i: matmul_units(i, kind, 4096, 512) for i in impls}
    for batch in a.batch:
      for dim in a.dim:
        rows = []
        for impl in impls:
          cfg = {"impl": impl, "kind": kind, "batch": batch, "dim": dim, "dtype": dtype,
                 "block": a.block, "repeats": a.repeats}
          reason = too_big(impl, batch, avail)
          r = {**cfg, "skipped": reason} if reason else run_child(cfg, a.timeout)
          rows.append({**r, "matmul_units": units[impl]})
        ref = next((r for r in rows if r["impl"] == "reference" and "skipped" not in r), None)
        for r in rows:
          if ref is not None and "skipped" not in r:
            r["time_vs_reference"] = r["time_s"] / ref["time_s"]
            r["memory_vs_reference"] = r["memory_bytes"] / ref["memory_bytes"]
          head = (f"{kind:8s} B={batch:<7d} d={dim:<5d} {r['impl']:9s} "
                  f"units {r['matmul_units']:4.2f}")
          if "skipped" in r:
            print(f"{head}  skipped: {r['skipped']}", flush=True)
            continue
          ratio = (f"  time x{r['time_vs_reference']:.2f}  memory x{r['memory_vs_reference']:.4f}"
                   if "time_vs_reference" in r else "")
          print(f"{head} {r['time_s']:8.3f} s {r['memory_bytes'] / 2**20:10.1f} MiB  "
                f"loss {r['loss']:.5f}{ratio}", flush=True)
        results += rows

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
               "load_average": os.getloadavg(),
               "command": " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
               "results": results}, f, indent=1)
  print(f"wrote {a.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
