"""Train-step throughput: zoo's jitted train step vs open_clip's PyTorch train step.

Both sides do the same work per step: the same batch (host memory -> device), CLIP forward,
the same contrastive loss (open_clip.ClipLoss / zoo's reference loss), backward, global-norm
clipping at 1.0, AdamW (lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on weight
matrices only) and the logit-scale clamp. Rounds alternate zoo / open_clip / a matmul probe so
all three see the same background load; the headline ratio is the median of per-round ratios
(as bench/encode_throughput.py). Reports samples/s of both, GFLOP/step (XLA cost analysis) and
FLOP/s as a fraction of the matmul peak: on CPU a jitted 2048^2 float32 matmul timed in the
same rounds (and torch's own 2048^2 matmul, so each framework's step can be set against its
own GEMM: their ratio bounds what a GEMM-bound step can gain), on GPU/TPU the device's spec
peak (bf16 dense). `--profile` adds a breakdown of
zoo's step (host->device, forward, forward+backward, optimizer). Host memory is retained for
reuse as train.py does (zoo.train.host_memory; the same glibc settings serve both frameworks, which
share this process); `--host_memory default` measures glibc's defaults, under which XLA:CPU
page-faults its step buffer back in every step. Minor page faults per step are reported for
both. Writes JSON.

  python bench/train_throughput.py --model ViT-B-32 --batch 32
  python bench/train_throughput.py --model ViT-B-16 --batch 256 --dtype bfloat16   # accelerator
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.encode_throughput import pin_threads  # noqa: E402

# Peak dense bf16 FLOP/s per device (spec sheets), for MFU on accelerators.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}
MATMUL_N = 2048


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="ViT-B-32")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtype", default="float32", help="zoo compute dtype (params stay float32)")
  p.add_argument("--remat", default="none", help="zoo gradient checkpointing: none|block|full")
  p.add_argument("--loss_impl", default="reference")
  p.add_argument("--context_length", type=int, default=0, help="0 = the model's")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=0,
                 help="CPU cores for both frameworks (default: all this process may use)")
  p.add_argument("--profile", action="store_true", help="time the pieces of zoo's step")
  p.add_argument("--no_torch", action="store_true", help="skip the open_clip baseline")
  p.add_argument("--host_memory", choices=("retain", "default"), default="retain",
                 help="retain: zoo.train.host_memory.retain_freed_memory (as train.py); "
                      "default: glibc's malloc defaults")
  p.add_argument("--captions", choices=("uniform", "coco"), default="uniform",
                 help="EOT positions: uniform over [3, L) (default), or coco: 1 + 12 + 3.5 N(0,1) "
                      "rounded, clipped to [6, L-1] (COCO's ~12 BPE tokens per caption)")
  p.add_argument("--rows", default="",
                 help="extra rows in the same alternating rounds, comma-separated: trimmed (zoo "
                      "with data.text_lengths=auto), bf16 (zoo in bfloat16 vs open_clip under "
                      "torch.autocast bfloat16)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "train_throughput.json"))
  return p.parse_args(argv)


def device_peak(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peak
  return None


def make_batch(args, image_size: int, length: int):
  import numpy as np

  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 49000, size=(args.batch, length)).astype(np.int32)
  tokens[:, 0] = 49406
  if getattr(args, "captions", "uniform") == "coco":
    eot = np.clip(np.rint(13 + 3.5 * rng.standard_normal(args.batch)), 6, length - 1)
    tokens[np.arange(length)[None, :] > eot[:, None]] = 0  # padding after the EOT
    tokens[np.arange(args.batch), eot.astype(int)] = 49407
  else:
    tokens[np.arange(args.batch), rng.integers(3, length, size=args.batch)] = 49407  # EOT
  images = rng.standard_normal((args.batch, image_size, image_size, 3), dtype=np.float32)
  return {"image": images, "tokens": tokens}


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_faults(fn) -> tuple[float, int]:
  """(seconds, minor page faults) of one call."""
  faults = minor_faults()
  return timed(fn), minor_faults() - faults


def build_zoo(args):
  """(step() -> None, flops per step, zoo config, trainer, host batch, {"state": live state})."""
  import jax

  from configs import base
  from zoo.models import sharding
  from zoo.train import trainer as trainer_lib

  c = base.base_config()
  c.model, c.batch_size, c.dtype, c.remat = args.model, args.batch, args.dtype, args.remat
  c.context_length = args.context_length
  c.total_steps, c.warmup_steps = 100_000, 10
  c.loss.impl = args.loss_impl
  trainer = trainer_lib.build_trainer(c, sharding.make_mesh(data=1, fsdp=-1))
  mc = trainer.model().config
  batch = make_batch(args, mc.vision.image_size, args.context_length or mc.text.context_length)
  gbatch = sharding.host_to_global(batch, trainer.mesh)
  cost = trainer.step_fn.lower(trainer.state, gbatch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  holder = {"state": trainer.state}

  def step():
    holder["state"], metrics = trainer.step_fn(
        holder["state"], sharding.host_to_global(holder.get("batch", batch), trainer.mesh))
    jax.block_until_ready(metrics)
    holder.setdefault("losses", []).append(float(metrics["loss"]))

  return step, flops, c, trainer, batch, holder


def build_open_clip(args, c, batch, threads: int):
  import numpy as np
  import open_clip
  import torch

  from zoo.models import configs as registry

  torch.set_num_threads(threads)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  if args.model in open_clip.list_models() and not args.context_length:
    model = open_clip.create_model(args.model, pretrained=None, output_dict=True)
  else:  # a zoo-only architecture (e.g. demo-tiny) or another context length: same dims
    mc = registry.get_model_config(args.model)
    v, t = mc.vision, mc.text
    model = open_clip.CLIP(
        mc.embed_dim, quick_gelu=mc.quick_gelu, output_dict=True,
        vision_cfg=dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                        layers=v.layers, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio),
        text_cfg=dict(context_length=args.context_length or t.context_length,
                      vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
                      mlp_ratio=t.mlp_ratio))
  model = model.to(dev).train()
  no_decay = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale")
  decay = [p for n, p in model.named_parameters()
           if p.ndim >= 2 and not any(k in n for k in no_decay) and not n.endswith("bias")]
  decay_ids = {id(p) for p in decay}
  rest = [p for p in model.parameters() if id(p) not in decay_ids]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                           {"params": rest, "weight_decay": 0.0}],
                          lr=c.lr, betas=(c.b1, c.b2), eps=c.eps)
  loss_fn = open_clip.ClipLoss()
  images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
  tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
  autocast = (torch.autocast(dev, dtype=torch.bfloat16) if args.dtype == "bfloat16"
              else torch.autocast(dev, enabled=False))

  losses = []

  def step():
    x, t = images.to(dev), tokens.to(dev)
    with autocast:
      out = model(x, t)
      loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(c.max_logit_scale))
    losses.append(loss.item())
    if dev == "cuda":
      torch.cuda.synchronize()

  step.losses = losses
  return step, torch.get_num_threads(), dev


def extra_rows(args, trainer, live, batch, c, threads: int, with_torch: bool) -> dict:
  """{row name: step()} of `--rows`: zoo_trimmed (the fp32 trainer on the batch trimmed by
  data.text_lengths=auto), zoo_bf16 and open_clip_bf16 (compute dtype bfloat16 / autocast)."""
  import argparse as _argparse

  import jax

  from zoo.models import sharding
  from zoo.train import text_lengths

  rows = {r.strip() for r in args.rows.split(",") if r.strip()}
  unknown = rows - {"trimmed", "bf16"}
  if unknown:
    raise SystemExit(f"--rows: unknown {sorted(unknown)}; expected trimmed, bf16")
  out = {}
  if "trimmed" in rows:
    trim = text_lengths.Trim(text_lengths.parse("auto", batch["tokens"].shape[1]))
    small = trim(batch)
    losses = []

    def trimmed():
      live["state"], metrics = trainer.step_fn(
          live["state"], sharding.host_to_global(small, trainer.mesh))
      losses.append(float(jax.block_until_ready(metrics)["loss"]))

    trimmed.losses = losses
    out["zoo_trimmed"] = trimmed
  if "bf16" in rows:
    bargs = _argparse.Namespace(**{**vars(args), "dtype": "bfloat16"})
    step, _, _, _, _, holder = build_zoo(bargs)

    def zoo_bf16():
      step()

    zoo_bf16.losses = holder.setdefault("losses", [])
    out["zoo_bf16"] = zoo_bf16
    if with_torch:
      out["open_clip_bf16"] = build_open_clip(bargs, c, batch, threads)[0]
  return out


def build_torch_matmul_probe():
  """() -> FLOP/s of torch's MATMUL_N^2 float32 matmul on the CPU (best of 3)."""
  import torch

  a = torch.randn(MATMUL_N, MATMUL_N)
  a @ a

  def probe() -> float:
    return 2 * MATMUL_N ** 3 / min(timed(lambda: a @ a) for _ in range(3))

  return probe


def build_matmul_probe():
  """() -> FLOP/s of a jitted MATMUL_N^2 float32 matmul (best of 3 back-to-back runs)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(a))

  def probe() -> float:
    return 2 * MATMUL_N ** 3 / min(timed(lambda: jax.block_until_ready(mm(a))) for _ in range(3))

  return probe


def profile_pieces(trainer, state, batch, reps: int = 3) -> dict[str, float]:
  """Median seconds of the pieces of zoo's step: host->device, forward (loss), forward +
  backward (value_and_grad), optimizer update (+ clamp)."""
  import jax
  import optax
  from flax import nnx

  from zoo import families
  from zoo.models import sharding
  from zoo.train import step as train_step

  family, config, mesh = trainer.family, trainer.config, trainer.mesh
  settings = family.settings(config)
  ctx = families.LossContext(settings=settings, mesh=mesh, impl=config.loss.impl)
  rng = jax.random.key(0)

  def loss_fn(params, batch):
    model = nnx.merge(trainer.graphdef, params, trainer.rest)
    return family.loss(family.forward(model, batch, rng, settings), batch, ctx)[0]

  fwd = jax.jit(loss_fn)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))

  def update(grads, opt_state, params):
    updates, opt_state = trainer.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return train_step.clamp_logit_scale(params, config.max_logit_scale), opt_state

  opt = jax.jit(update)
  params, opt_state = state["params"], state["opt_state"]
  gbatch = sharding.host_to_global(batch, mesh)
  grads = fwd_bwd(params, gbatch)[1]
  pieces = {
      "host_to_device": lambda: jax.block_until_ready(sharding.host_to_global(batch, mesh)),
      "forward_loss": lambda: jax.block_until_ready(fwd(params, gbatch)),
      "forward_backward": lambda: jax.block_until_ready(fwd_bwd(params, gbatch)),
      "optimizer_update": lambda: jax.block_until_ready(opt(grads, opt_state, params)),
  }
  out = {}
  for name, fn in pieces.items():
    fn()
    out[name] = statistics.median(timed(fn) for _ in range(reps))
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  threads = pin_threads(args.threads)
  from zoo.train import host_memory

  retained = args.host_memory == "retain" and host_memory.retain_freed_memory()
  import jax

  load_before = os.getloadavg()
  zoo_step, flops, c, trainer, batch, live = build_zoo(args)
  backend = jax.default_backend()
  probe = build_matmul_probe() if backend == "cpu" else None
  torch_step, torch_threads, torch_dev = (None, None, None)
  if not args.no_torch:
    try:
      torch_step, torch_threads, torch_dev = build_open_clip(args, c, batch, threads)
    except ImportError:  # open_clip_torch is an optional extra
      torch_step = None
  torch_probe = build_torch_matmul_probe() if probe and torch_step and torch_dev == "cpu" else None
  extra = extra_rows(args, trainer, live, batch, c, threads, torch_step is not None)
  for _ in range(args.warmup):
    zoo_step()
    if torch_step:
      torch_step()
    for fn in extra.values():
      fn()

  zoo_t, torch_t, peak, torch_peak, zoo_faults, torch_faults = [], [], [], [], [], []
  extra_t = {name: [] for name in extra}
  for r in range(args.rounds):
    for name in (list(extra) if r % 2 else list(extra)[::-1]):  # alternate their order too
      extra_t[name].append(timed(extra[name]))
    seconds, faults = timed_faults(zoo_step)
    zoo_t.append(seconds)
    zoo_faults.append(faults)
    if torch_step:
      seconds, faults = timed_faults(torch_step)
      torch_t.append(seconds)
      torch_faults.append(faults)
    if probe:
      peak.append(probe())
    if torch_probe:
      torch_peak.append(torch_probe())
  zoo_med = statistics.median(zoo_t)
  zoo_fps = [flops / t for t in zoo_t]
  result = {
      "model": args.model, "batch": args.batch, "dtype": args.dtype, "remat": args.remat,
      "rounds": args.rounds, "threads": threads, "backend": backend,
      "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
      "loadavg_before": load_before, "host_memory": args.host_memory,
      "host_memory_retained": retained,
      "zoo": {"samples_per_sec": args.batch / zoo_med, "step_seconds": zoo_med,
              "step_times_s": zoo_t, "flops_per_step": flops,
              "flops_per_sec": flops / zoo_med, "minor_faults_per_step": zoo_faults},
  }
  if probe:
    # Per round: zoo's FLOP/s over the matmul probe's FLOP/s in the same round.
    result["matmul_peak_flops_per_sec"] = statistics.median(peak)
    result["matmul_peak_per_round"] = peak
    result["zoo"]["fraction_of_matmul_peak"] = statistics.median(
        f / p for f, p in zip(zoo_fps, peak))
  else:
    spec = device_peak(jax.devices()[0])
    if spec:
      result["spec_peak_flops_per_sec"] = spec * jax.device_count()
      result["zoo"]["mfu"] = flops / zoo_med / result["spec_peak_flops_per_sec"]
  if torch_step:
    torch_med = statistics.median(torch_t)
    result["open_clip"] = {"samples_per_sec": args.batch / torch_med, "step_seconds": torch_med,
                           "step_times_s": torch_t, "torch_threads": torch_threads,
                           "minor_faults_per_step": torch_faults,
                           "device": torch_dev,
                           "flops_per_sec_at_zoo_flops": flops / torch_med}
    result["ratio_zoo_over_open_clip"] = statistics.median(
        t / z for z, t in zip(zoo_t, torch_t))
    result["ratio_of_medians"] = torch_med / zoo_med
    if probe:
      result["open_clip"]["fraction_of_matmul_peak"] = statistics.median(
          flops / t / p for t, p in zip(torch_t, peak))
    if torch_probe:
      result["torch_matmul_peak_flops_per_sec"] = statistics.median(torch_peak)
      result["torch_matmul_peak_per_round"] = torch_peak
      result["open_clip"]["fraction_of_torch_matmul_peak"] = statistics.median(
          flops / t / p for t, p in zip(torch_t, torch_peak))
      result["matmul_peak_ratio_jax_over_torch"] = statistics.median(
          j / t for j, t in zip(peak, torch_peak))
  if extra:
    result["captions"] = args.captions
    result["rows"] = {name: {"samples_per_sec": args.batch / statistics.median(ts),
                             "step_seconds": statistics.median(ts), "step_times_s": ts,
                             "first_losses": list(getattr(extra[name], "losses", [])[:3])}
                      for name, ts in extra_t.items()}
    result["zoo"]["first_losses"] = live.get("losses", [])[:3]
    if torch_step:
      result["open_clip"]["first_losses"] = torch_step.losses[:3]
  if args.profile:
    result["zoo"]["profile_seconds"] = profile_pieces(trainer, live["state"], batch)
  result["loadavg_after"] = os.getloadavg()

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  z = result["zoo"]
  print(f"{args.model} batch {args.batch} {args.dtype} remat={args.remat} on {backend}, "
        f"{threads} threads (JAX and torch), {args.rounds} alternating rounds, load avg "
        f"{load_before[0]:.2f} -> {result['loadavg_after'][0]:.2f}, host memory "
        f"{'retained' if retained else 'glibc defaults'}")
  line = (f"  zoo       {z['samples_per_sec']:8.2f} samples/s  {zoo_med * 1e3:8.1f} ms/step  "
          f"{flops / 1e9:8.1f} GFLOP/step  {z['flops_per_sec'] / 1e9:7.1f} GFLOP/s  "
          f"{statistics.median(zoo_faults):.0f} faults/step")
  if "fraction_of_matmul_peak" in z:
    line += (f"  = {z['fraction_of_matmul_peak']:.0%} of the matmul peak "
             f"({result['matmul_peak_flops_per_sec'] / 1e9:.0f} GFLOP/s, {MATMUL_N}^2 fp32)")
  elif "mfu" in z:
    line += f"  MFU {z['mfu']:.1%}"
  print(line)
  if torch_step:
    o = result["open_clip"]
    line = (f"  open_clip {o['samples_per_sec']:8.2f} samples/s  "
            f"{o['step_seconds'] * 1e3:8.1f} ms/step  ({o['torch_threads']} torch threads, "
            f"{statistics.median(torch_faults):.0f} faults/step)")
    if "fraction_of_matmul_peak" in o:
      line += f"  {o['fraction_of_matmul_peak']:.0%} of the matmul peak at zoo's FLOPs"
    if "fraction_of_torch_matmul_peak" in o:
      line += (f", {o['fraction_of_torch_matmul_peak']:.0%} of torch's own "
               f"({result['torch_matmul_peak_flops_per_sec'] / 1e9:.0f} GFLOP/s)")
    print(line)
    if "matmul_peak_ratio_jax_over_torch" in result:
      print(f"  matmul peaks JAX/torch {result['matmul_peak_ratio_jax_over_torch']:.2f}x "
            "(the ratio a step at the same fraction of each framework's GEMM peak would show)")
    print(f"  ratio zoo/open_clip {result['ratio_zoo_over_open_clip']:.2f}x (median of per-round "
          f"ratios; ratio of medians {result['ratio_of_medians']:.2f}x)")
  for name, row in result.get("rows", {}).items():
    print(f"  {name:16s} {row['samples_per_sec']:8.2f} samples/s  "
          f"{row['step_seconds'] * 1e3:8.1f} ms/step  first losses {row['first_losses']}")
  if args.profile:
    print("  zoo step pieces (s): " + ", ".join(
        f"{k} {v:.3f}" for k, v in z["profile_seconds"].items()))
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
