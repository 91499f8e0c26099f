"""Inference throughput: zoo's jitted encode_image / encode_text vs open_clip eager PyTorch.

Same weights (open_clip's random init converted with `zoo.convert.from_open_clip`), same inputs,
same machine, same process. Timings alternate zoo / torch round by round so both see the same
background load; the ratio (zoo throughput / torch throughput) is the median of the per-round
ratios, and each side's median time is reported too. Prints the ratios and writes JSON.

  python bench/encode_throughput.py                       # ViT-B-32, images 8, texts 64
  python bench/encode_throughput.py --threads 2 --rounds 15 --out bench/results/x.json

`encode_text` runs zoo's tower on all 77 positions like open_clip; `encode_text_trim_padding`
uses `encode_text(tokens, trim_padding=True)` (same inputs, same outputs: causal attention
makes positions after the last EOT of the batch irrelevant, so zoo runs a shorter bucket).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="ViT-B-32")
  p.add_argument("--image-batch", type=int, default=8)
  p.add_argument("--text-batch", type=int, default=64)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--threads", type=int, default=0,
                 help="CPU cores for both frameworks (default: all this process may use)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "encode_throughput.json"))
  return p.parse_args(argv)


def pin_threads(n: int) -> int:
  """Restricts this process (JAX's and torch's pools alike) to `n` cores; returns n."""
  cores = sorted(os.sched_getaffinity(0))
  n = n or len(cores)
  if n > len(cores):
    raise ValueError(f"--threads {n} but only {len(cores)} cores are available")
  os.sched_setaffinity(0, cores[:n])
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin
  os.environ["OMP_NUM_THREADS"] = str(n)
  return n


def main(argv=None) -> dict:
  args = parse_args(argv)
  threads = pin_threads(args.threads)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  import numpy as np
  import open_clip
  import torch
  from flax import nnx

  from zoo import convert

  torch.set_num_threads(threads)
  on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  tdev = "cuda" if on_gpu else "cpu"

  torch.manual_seed(0)
  torch_model = open_clip.create_model(args.model, pretrained=None).eval().to(tdev)
  model = convert.from_open_clip({k: v.cpu() for k, v in torch_model.state_dict().items()},
                                 args.model)
  graphdef, state = nnx.split(model)

  @jax.jit
  def zoo_image(state, images):
    return nnx.merge(graphdef, state).encode_image(images)

  @jax.jit
  def zoo_text(state, tokens):
    return nnx.merge(graphdef, state).encode_text(tokens)

  @jax.jit
  def zoo_text_trim(state, tokens):
    return nnx.merge(graphdef, state).encode_text(tokens, trim_padding=True)

  size = model.config.vision.image_size
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.image_batch, 3, size, size), dtype=np.float32)
  words = "a photo of the small red dog cat bird car on in with at sunset beach city".split()
  texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for _ in range(args.text_batch)]
  tokens = open_clip.get_tokenizer(args.model)(texts).numpy()

  images_t = torch.from_numpy(images).to(tdev)
  tokens_t = torch.from_numpy(tokens).to(tdev)
  images_j = jax.device_put(images.transpose(0, 2, 3, 1))
  tokens_j = jax.device_put(tokens.astype(np.int32))

  def run_zoo(fn, x):
    return lambda: jax.block_until_ready(fn(state, x))

  def run_torch(fn, x):
    def call():
      with torch.no_grad():
        out = fn(x)
      if on_gpu:
        torch.cuda.synchronize()
      return out
    return call

  cases = {
      "encode_image": (args.image_batch, run_zoo(zoo_image, images_j),
                       run_torch(torch_model.encode_image, images_t)),
      "encode_text": (args.text_batch, run_zoo(zoo_text, tokens_j),
                      run_torch(torch_model.encode_text, tokens_t)),
      # Same inputs (77 tokens, padded); zoo skips the padding after the last EOT in the batch.
      "encode_text_trim_padding": (args.text_batch, run_zoo(zoo_text_trim, tokens_j),
                                   run_torch(torch_model.encode_text, tokens_t)),
  }
  load_before = os.getloadavg()
  results = {}
  for name, (batch, zoo_fn, torch_fn) in cases.items():
    t0 = time.perf_counter()
    zoo_out = np.asarray(zoo_fn())  # includes compilation
    compile_s = time.perf_counter() - t0
    torch_out = torch_fn().float().cpu().numpy()
    for _ in range(args.warmup):
      zoo_fn()
      torch_fn()
    zoo_t, torch_t = [], []
    for _ in range(args.rounds):
      for fn, acc in ((zoo_fn, zoo_t), (torch_fn, torch_t)):
        t = time.perf_counter()
        fn()
        acc.append(time.perf_counter() - t)
    zoo_med, torch_med = statistics.median(zoo_t), statistics.median(torch_t)
    # Each round times zoo then torch back to back: the per-round ratio cancels slow drifts in
    # background load (shared machines), so its median is the headline figure.
    paired = statistics.median(t / z for z, t in zip(zoo_t, torch_t))
    results[name] = {
        "batch": batch,
        "zoo_median_s": zoo_med, "torch_median_s": torch_med,
        "zoo_items_per_s": batch / zoo_med, "torch_items_per_s": batch / torch_med,
        "ratio_zoo_over_torch": paired,
        "ratio_of_medians": torch_med / zoo_med,
        "zoo_times_s": zoo_t, "torch_times_s": torch_t,
        "zoo_compile_s": compile_s,
        "max_abs_diff": float(np.abs(zoo_out - torch_out).max()),
    }
  report = {
      "model": args.model, "rounds": args.rounds, "warmup": args.warmup, "threads": threads,
      "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
      "torch_device": tdev, "jax": jax.__version__, "torch": torch.__version__,
      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
      "results": results,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"{args.model} on {report['jax_backend']} ({threads} threads, load avg before "
        f"{load_before[0]:.2f}): zoo jit vs open_clip eager torch, median of {args.rounds}")
  for name, r in results.items():
    print(f"  {name:24s} batch {r['batch']:3d}: zoo {r['zoo_items_per_s']:8.1f}/s  "
          f"torch {r['torch_items_per_s']:8.1f}/s  ratio {r['ratio_zoo_over_torch']:.2f}x  "
          f"(ratio of medians {r['ratio_of_medians']:.2f}x, max |diff| {r['max_abs_diff']:.1e})")
  print(f"wrote {args.out}")
  return report


if __name__ == "__main__":
  main()
