"""One prepared check of the contrastive kernels on a lent GPU (or TPU): < 8 minutes, one table.

1. Parity at B=4096, d=768 against impl="reference", values and all gradients: fp32 with
   default_matmul_precision="highest" (tolerance 1e-4 of each quantity's magnitude), bf16 inputs
   (tolerance 3e-2: the kernels round probabilities to bf16 before the gradient matmuls).
2. Forward+backward time, TFLOP/s (of the 3 x 2 B^2 d matmul work a softmax fwd+bwd needs) and
   peak memory of reference / xla / pallas at B in {32768, 131072}, d=768, bf16, each in a fresh
   process (bench/contrastive_loss.py's measurement); and the pallas kernels timed apart
   (`kernel_times`: softmax statistics, softmax gradients, sigmoid gradients, sigmoid loss
   alone) with the TFLOP/s of the matmul work they execute.
3. The largest B each impl runs: doubling from 32768 to --max_batch, each try in a fresh process
   with a timeout; stops at the first failure or when the time budget is spent.
4. Per row against float64 numpy at logit scale 100 (softmax: half confident pairs, half hard;
   sigmoid: bias -10), fp32 and bf16, reference / xla / pallas at the default precision: the
   share of rows whose dx is > 10% off and dscale's relative error; and whether pallas'
   value and gradients are bitwise equal run to run.
Every measurement is wrapped: an error is recorded in its row, never fatal. Prints one table and
writes JSON (--json). `--smoke` runs the same logic at tiny sizes (for a CPU dry run).

  python bench/gpu_check.py                       # on the lent machine
  JAX_PLATFORMS=cpu python bench/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import contrastive_loss as bench  # noqa: E402

IMPLS = ("reference", "xla", "pallas")


def _errors(got, want) -> dict:
  """max |got - want| / max(|want|) for the loss and each gradient."""
  import numpy as np

  names = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
  (v, g), (v0, g0) = got, want
  out = {}
  for name, a, r in zip(names, [v, *g], [v0, *g0]):
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    out[name] = float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-30))
  return out


def parity(batch: int, dim: int, kinds, impls) -> list[dict]:
  import jax
  import jax.numpy as jnp

  rows = []
  for kind in kinds:
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 3e-2)):
      x, y = bench._inputs(batch, dim, dtype)
      args = (x, y, jnp.float32(10.0)) + ((jnp.float32(-10.0),) if kind == "sigmoid" else ())
      vg = lambda impl: jax.jit(jax.value_and_grad(
          bench.loss_fn(impl, kind), argnums=tuple(range(len(args)))))(*args)
      with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        want = vg("reference")
        for impl in impls:
          row = {"check": "parity", "kind": kind, "dtype": dtype, "impl": impl,
                 "batch": batch, "dim": dim, "tolerance": tol}
          try:
            errs = _errors(vg(impl), want)
            row.update(errors=errs, ok=max(errs.values()) <= tol)
          except Exception as e:  # recorded, not fatal
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
          rows.append(row)
  return rows


def _pairs(b: int, d: int, scale: float, seed: int = 0):
  """Unit rows y_i = c_i x_i + sqrt(1 - c_i^2) u_i, the positive logit a margin 3..7 (even rows,
  confident) or -2..2 (odd rows, hard) above the log-sum-exp of the row's negatives."""
  import numpy as np

  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  u = rng.normal(size=(b, d))
  u -= np.sum(u * x, 1, keepdims=True) * x
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  zn = scale * x @ u.T
  np.fill_diagonal(zn, -np.inf)
  lse = np.log(np.exp(zn - zn.max(1, keepdims=True)).sum(1)) + zn.max(1)
  margin = np.where(np.arange(b) % 2 == 0, rng.uniform(3, 7, b), rng.uniform(-2, 2, b))
  c = np.clip((lse + margin) / scale, 0, 0.95)[:, None]
  return x, c * x + np.sqrt(1 - c**2) * u


def float64_rows(batch: int, dim: int, impls) -> list[dict]:
  """dx per row and dscale against float64 at scale 100 (bias -10 for sigmoid); repeatability."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  s, bias = 100.0, -10.0
  x64, y64 = _pairs(batch, dim, s)
  rows = []
  for kind in ("softmax", "sigmoid"):
    for dtype in ("float32", "bfloat16"):
      x, y = jnp.asarray(x64, dtype), jnp.asarray(y64, dtype)
      xf, yf = np.asarray(x, np.float64), np.asarray(y, np.float64)
      z = s * xf @ yf.T
      if kind == "softmax":
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        q = np.exp(z - z.max(0, keepdims=True))
        q /= q.sum(0, keepdims=True)
        g = (p + q - 2 * np.eye(batch)) / (2 * batch)
        args = (x, y, jnp.float32(s))
      else:
        sign = 2 * np.eye(batch) - 1
        g = -sign / (1 + np.exp(sign * (z + bias))) / batch
        args = (x, y, jnp.float32(s), jnp.float32(bias))
      dx0, ds0 = s * g @ yf, np.sum(g * (xf @ yf.T))
      for impl in impls:
        row = {"check": "float64", "kind": kind, "dtype": dtype, "impl": impl, "batch": batch,
               "dim": dim}
        try:
          fn = jax.jit(jax.value_and_grad(bench.loss_fn(impl, kind), argnums=(0, 2)))
          out = jax.block_until_ready(fn(*args))
          dx = np.asarray(out[1][0], np.float64)
          err = np.linalg.norm(dx - dx0, axis=1) / np.maximum(np.linalg.norm(dx0, axis=1), 1e-30)
          again = jax.block_until_ready(fn(*args))
          same = all(np.array_equal(np.asarray(a), np.asarray(b))
                     for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(again)))
          row.update(rows_over_10pct=float(np.mean(err > 0.1)), worst_row=float(err.max()),
                     dscale_rel=float(abs(float(out[1][1]) - ds0) / abs(ds0)), bitwise=same)
          row["ok"] = row["rows_over_10pct"] <= 0.01 and row["dscale_rel"] <= 1e-3
        except Exception as e:  # recorded, not fatal
          row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
  return rows


# Matmul units (2 B^2 d FLOPs each) each pallas kernel call executes: Triton (GPU) / Mosaic (TPU).
KERNEL_UNITS = {"softmax_stats": (2, 2), "softmax_grads": (4, 3), "sigmoid_grads": (4, 3),
                "sigmoid_loss": (1, 1)}


def kernel_times(batch: int, dim: int, dtype: str, repeats: int) -> list[dict]:
  """The pallas kernels alone, each jitted by itself: median of `repeats` after a warm-up, and
  TFLOP/s of the matmul work each executes (KERNEL_UNITS: the softmax statistics are two row
  passes; the GPU gradients a row and a column pass, each recomputing the logits tile)."""
  import statistics

  import jax
  import jax.numpy as jnp

  from zoo.kernels import _pallas

  x, y = bench._inputs(batch, dim, dtype)
  s, b, off = jnp.float32(10.0), jnp.float32(-10.0), jnp.int32(0)
  targets = jnp.asarray([2.0, 0.0], jnp.float32)
  lse = jax.jit(lambda x, y, s: _pallas.softmax_stats(x, y, s, None))(x, y, s)
  fns = {
      "softmax_stats": lambda x, y, s, b, lr, lc: _pallas.softmax_stats(x, y, s, None),
      "softmax_grads": lambda x, y, s, b, lr, lc: _pallas.softmax_grads(
          x, y, s, lr, lc, targets, off, None),
      "sigmoid_grads": lambda x, y, s, b, lr, lc: _pallas.sigmoid_grads(x, y, s, b, off, None),
      "sigmoid_loss": lambda x, y, s, b, lr, lc: _pallas.sigmoid_stats(x, y, s, b, off, None),
  }
  tpu = jax.default_backend() == "tpu"
  rows = []
  for name, fn in fns.items():
    row = {"check": "kernel", "impl": "pallas", "kind": name, "dtype": dtype, "batch": batch,
           "dim": dim, "units": KERNEL_UNITS[name][tpu]}
    try:
      step = jax.jit(fn)
      args = (x, y, s, b, *lse)
      jax.block_until_ready(step(*args))
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t0)
      t = statistics.median(times)
      row.update(time_s=t, tflops=row["units"] * 2 * batch * batch * dim / t / 1e12)
    except Exception as e:  # recorded, not fatal
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU dry run)")
  p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check")
  p.add_argument("--max_batch", type=int, default=1 << 20)
  p.add_argument("--json", default=os.path.join(ROOT, "bench/results/gpu_check.json"))
  a = p.parse_args(argv)
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  t_start = time.time()
  left = lambda: a.budget - (time.time() - t_start)
  if a.smoke:
    par_b, dim, batches, start_b, max_b, dtype = 64, 32, [128, 256], 128, 512, "float32"
  else:
    par_b, dim, batches, start_b, max_b, dtype = 4096, 768, [32768, 131072], 32768, \
        a.max_batch, "bfloat16"
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  from zoo.kernels.contrastive import resolve_impl

  head = (f"gpu_check: backend {backend} ({device}), impl='auto' -> {resolve_impl('auto')}, "
          f"budget {a.budget:.0f} s{' (smoke)' if a.smoke else ''}")
  print(head, flush=True)
  rows: list[dict] = []
  try:
    rows += parity(par_b, dim, ("softmax", "sigmoid"), ("xla", "pallas"))
  except Exception:
    rows.append({"check": "parity", "ok": False, "error": traceback.format_exc()[-600:]})
  try:
    rows += float64_rows(256 if a.smoke else 4096, dim, IMPLS)
  except Exception:
    rows.append({"check": "float64", "ok": False, "error": traceback.format_exc()[-600:]})
  avail = bench.available_bytes()
  per_timeout = lambda: max(10.0, min(120.0, left()))
  for batch in batches:
    for impl in IMPLS:
      cfg = {"impl": impl, "kind": "softmax", "batch": batch, "dim": dim, "dtype": dtype,
             "block": None, "repeats": 3}
      reason = bench.too_big(impl, batch, avail)
      if reason is None and left() < 20:
        reason = "time budget spent"
      r = {**cfg, "skipped": reason} if reason else bench.run_child(cfg, per_timeout())
      if "time_s" in r:
        r["tflops"] = 3 * 2 * batch * batch * dim / r["time_s"] / 1e12
      rows.append({"check": "timing", **r})
    if left() < 20:
      rows.append({"check": "kernel", "impl": "pallas", "batch": batch,
                   "skipped": "time budget spent"})
      continue
    try:
      rows += kernel_times(batch, dim, dtype, 3)
    except Exception:
      rows.append({"check": "kernel", "batch": batch, "error": traceback.format_exc()[-600:]})
  for impl in IMPLS:
    best, b, why = None, start_b, "reached --max_batch"
    while b <= max_b:
      if left() < 20:
        why = "time budget spent"
        break
      reason = bench.too_big(impl, b, avail)
      if reason:
        why = reason
        break
      cfg = {"impl": impl, "kind": "softmax", "batch": b, "dim": dim, "dtype": dtype,
             "block": None, "repeats": 1}
      r = bench.run_child(cfg, per_timeout())
      if "skipped" in r:
        why = f"B={b}: {r['skipped']}"
        break
      best, b = r, b * 2
    rows.append({"check": "max_batch", "impl": impl, "max_batch": best and best["batch"],
                 "memory_bytes": best and best["memory_bytes"], "stopped": why})

  print(f"{'check':10s} {'impl':9s} {'kind':8s} {'dtype':9s} {'B':>8s}  result")
  for r in rows:
    c = r["check"]
    if c == "parity":
      res = (r.get("error") or ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items()))
      res = f"{'OK ' if r['ok'] else 'BAD'} (tol {r.get('tolerance', 0):.0e}) {res}"
    elif c == "float64":
      res = r.get("error") or (f"{'OK ' if r['ok'] else 'BAD'} rows >10% off "
                               f"{r['rows_over_10pct']:.2%} (worst {r['worst_row']:.2g}), "
                               f"dscale {r['dscale_rel']:.1e}, bitwise repeatable "
                               f"{r['bitwise']}")
    elif c == "timing":
      res = r.get("skipped") or (f"{r['time_s'] * 1e3:9.1f} ms  {r['tflops']:7.1f} TFLOP/s  "
                                 f"{r['memory_bytes'] / 2**20:10.1f} MiB  ({r['memory_measure']})")
    elif c == "kernel":
      res = r.get("skipped") or r.get("error") or (
          f"{r['time_s'] * 1e3:9.1f} ms  {r['tflops']:7.1f} TFLOP/s  ({r['units']} x 2 B^2 d)")
    else:
      mb = r["memory_bytes"]
      res = (f"max B {r['max_batch']}" + (f" ({mb / 2**20:.0f} MiB)" if mb else "")
             + f"; stopped: {r['stopped']}")
    print(f"{c:10s} {r.get('impl', '-'):9s} {r.get('kind', 'softmax'):8s} "
          f"{r.get('dtype', dtype):9s} {r.get('batch', r.get('max_batch')) or '-':>8}  {res}")
  elapsed = time.time() - t_start
  print(f"elapsed {elapsed:.0f} s")
  os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
  with open(a.json, "w") as f:
    json.dump({"backend": backend, "device": device, "smoke": a.smoke, "elapsed_s": elapsed,
               "load_average": os.getloadavg(), "rows": rows}, f, indent=1, default=str)
  print(f"wrote {a.json}")
  bad = [r for r in rows if r["check"] in ("parity", "float64") and not r.get("ok")]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
