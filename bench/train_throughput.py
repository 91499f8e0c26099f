"""Train-step throughput of zoo (jitted, sharded) vs open_clip's PyTorch train step.

Prints samples/s of both, their ratio, zoo's model FLOPs per step (XLA cost analysis) and, on
a GPU/TPU, MFU against the device's peak; writes JSON.

  python bench/train_throughput.py --model test-tiny --batch 64 --steps 10
  python bench/train_throughput.py --model ViT-B-16 --batch 256 --dtype bfloat16   # accelerator
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Peak dense bf16 FLOP/s per device, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}


def device_peak(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def time_zoo(args) -> dict:
  import jax
  import numpy as np

  from configs import base
  from zoo import sharding, train_lib

  c = base.base_config()
  c.model, c.batch_size, c.dtype = args.model, args.batch, args.dtype
  c.total_steps, c.warmup_steps = 10_000, 10
  c.loss.impl = args.loss_impl
  mesh = sharding.make_mesh(data=1, fsdp=-1)
  trainer = train_lib.build_trainer(c, mesh)
  mc = trainer.model().config
  rng = np.random.default_rng(0)
  size, length = mc.vision.image_size, mc.text.context_length
  batch = {"image": rng.normal(size=(args.batch, size, size, 3)).astype(np.float32),
           "tokens": rng.integers(1, 49000, size=(args.batch, length)).astype(np.int32)}
  batch["tokens"][:, -1] = 49407
  gbatch = sharding.host_to_global(batch, mesh)
  compiled = trainer.step_fn.lower(trainer.state, gbatch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state = trainer.state
  for _ in range(args.warmup):
    state, m = trainer.step_fn(state, gbatch)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = trainer.step_fn(state, gbatch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  out = {"samples_per_sec": args.batch / step_s, "step_seconds": step_s,
         "flops_per_step": flops, "devices": jax.device_count(),
         "device_kind": jax.devices()[0].device_kind}
  peak = device_peak(jax.devices()[0])
  if peak and flops:
    out["mfu"] = flops / step_s / (peak * jax.device_count())
  return out


def time_open_clip(args) -> dict | None:
  try:
    import open_clip
    import torch
  except ImportError:
    return None
  import numpy as np

  from zoo import registry

  if args.model not in open_clip.list_models():
    return None
  cfg = registry.get_model_config(args.model)
  torch.manual_seed(0)
  model = open_clip.create_model(args.model, pretrained=None)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                          weight_decay=0.2)
  loss_fn = open_clip.ClipLoss()
  size, length = cfg.vision.image_size, cfg.text.context_length
  images = torch.randn(args.batch, 3, size, size)
  tokens = torch.randint(1, 49000, (args.batch, length))
  tokens[:, -1] = 49407

  def step():
    out = model(images, tokens)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    opt.zero_grad()
    loss.backward()
    opt.step()

  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  return {"samples_per_sec": args.batch / step_s, "step_seconds": step_s,
          "torch_threads": torch.get_num_threads()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="test-tiny")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--loss_impl", default="reference")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no_torch", action="store_true", help="skip the open_clip baseline")
  p.add_argument("--out", default="bench/results/train_throughput.json")
  args = p.parse_args()
  result = {"args": vars(args), "zoo": time_zoo(args)}
  if not args.no_torch:
    result["open_clip"] = time_open_clip(args)
  if result.get("open_clip"):
    result["ratio_zoo_over_open_clip"] = (result["zoo"]["samples_per_sec"]
                                          / result["open_clip"]["samples_per_sec"])
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  z = result["zoo"]
  print(f"zoo       {z['samples_per_sec']:10.1f} samples/s  ({z['step_seconds'] * 1e3:.1f} ms/step,"
        f" {z['flops_per_step'] / 1e9:.2f} GFLOP/step" +
        (f", MFU {z['mfu']:.1%}" if "mfu" in z else "") + ")")
  if result.get("open_clip"):
    o = result["open_clip"]
    print(f"open_clip {o['samples_per_sec']:10.1f} samples/s  ({o['step_seconds'] * 1e3:.1f} ms/step)")
    print(f"ratio zoo/open_clip: {result['ratio_zoo_over_open_clip']:.2f}x")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
