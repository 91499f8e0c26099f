"""Light CLIP by distillation on the demo data: a teacher, a small student trained from scratch,
and the same student distilled from the teacher for the same steps on the same data.

python bench/distill_demo.py [--teacher DIR] [--teacher_steps 300 --steps 100 --seeds 0,1 ...]

1. Teacher: configs/demo.py (demo-tiny, 9.0M parameters) trained `--teacher_steps` steps with
   the one train loop, or any zoo.save CLIP given with --teacher.
2. Per seed: the configs/distill_demo.py student (1.9M parameters) trained `--steps` steps
   (a) from scratch (family clip: contrastive loss only) and (b) distilled (family distill:
   feature + logit distillation + contrastive), same seed, so the same init and data order.
3. Held-out demo zero-shot top-1 and retrieval R@1 of teacher and students; parameters and
   FLOPs per image (XLA cost analysis of encode_image) and image-encode throughput.

Prints a table and writes JSON (default bench/results/distill_demo.json). Report `uptime`
with the throughput numbers: the machine may be shared.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import zoo  # noqa: E402
from configs import demo as demo_config, distill_demo  # noqa: E402
from zoo.data import pipeline  # noqa: E402
from zoo.eval import suite
from zoo.train import loop as train_lib

METRICS = {"zeroshot_top1": "zeroshot/top1",
           "image_retrieval_R@1": "retrieval/image_retrieval_recall@1",
           "text_retrieval_R@1": "retrieval/text_retrieval_recall@1"}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--teacher", default="", help="zoo.save directory of a CLIP (skips step 1)")
  p.add_argument("--teacher_steps", type=int, default=300)
  p.add_argument("--steps", type=int, default=100,
                 help="student steps (both students; at 300 both reach the demo teacher)")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--eval_size", type=int, default=960, help="held-out images per eval set")
  p.add_argument("--throughput_batch", type=int, default=64)
  p.add_argument("--workdir", default="", help="keep the runs here (default: a temp dir)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "distill_demo.json"))
  return p.parse_args()


def train(config, workdir: str, name: str) -> str:
  t = time.perf_counter()
  summary = train_lib.train(config, workdir)
  losses = summary["losses"]
  print(f"  [{name}] {summary['step']} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f} "
        f"({time.perf_counter() - t:.0f}s)", flush=True)
  return os.path.join(workdir, "model")


def quick(config, args, steps: int, seed: int):
  config.seed, config.batch_size, config.total_steps = seed, args.batch_size, steps
  config.warmup_steps = min(config.warmup_steps, max(steps // 10, 1))
  config.eval_every, config.checkpoint_every = 0, 10 ** 9
  return config


def scores(model_dir: str, eval_size: int) -> dict[str, float]:
  model, tokenizer, _ = zoo.load(model_dir)
  c = model.config
  sets = pipeline.build_eval_sets({"name": "demo", "eval_size": eval_size,
                                   "eval_sets": "zeroshot,retrieval"},
                                  image_size=c.vision.image_size, mean=c.image_mean,
                                  std=c.image_std)
  metrics = suite.evaluate(model, sets, tokenizer)
  return {k: float(metrics[v]) for k, v in METRICS.items()}


def cost(model_dir: str, batch: int) -> dict[str, float]:
  """Parameters, FLOPs per image (XLA cost analysis) and images/s of the jitted image encoder."""
  model, _, _ = zoo.load(model_dir)
  size = model.config.vision.image_size
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x, normalize=True))
  x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
  analysis = fn.lower(state, x).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  fn(state, x).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    fn(state, x).block_until_ready()
    times.append(time.perf_counter() - t)
  params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  vparams = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model.visual, nnx.Param)))
  return {"params": params, "image_params": vparams,
          "flops_per_image": float(analysis.get("flops", float("nan"))) / batch,
          "images_per_s": batch / float(np.median(times))}


def main():
  args = parse_args()
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  root = args.workdir or tempfile.mkdtemp(prefix="distill_demo_")
  t0 = time.perf_counter()
  teacher = args.teacher
  if not teacher:
    print(f"1. teacher: configs/demo.py, {args.teacher_steps} steps", flush=True)
    c = quick(demo_config.get_config(), args, args.teacher_steps, 0)
    teacher = train(c, os.path.join(root, "teacher"), "teacher")
  results = {"teacher": scores(teacher, args.eval_size)}
  runs = {"teacher": teacher}
  for seed in seeds:
    print(f"2. seed {seed}: student from scratch and distilled, {args.steps} steps each",
          flush=True)
    c = quick(distill_demo.get_config(), args, args.steps, seed)
    c.family = "clip"
    scratch = train(c, os.path.join(root, f"scratch_{seed}"), f"scratch seed {seed}")
    c = quick(distill_demo.get_config(), args, args.steps, seed)
    c.distill.teacher = teacher
    distilled = train(c, os.path.join(root, f"distill_{seed}"), f"distill seed {seed}")
    results[f"scratch_seed{seed}"] = scores(scratch, args.eval_size)
    results[f"distilled_seed{seed}"] = scores(distilled, args.eval_size)
    runs[f"scratch_seed{seed}"], runs[f"distilled_seed{seed}"] = scratch, distilled

  costs = {"teacher": cost(teacher, args.throughput_batch),
           "student": cost(runs[f"distilled_seed{seeds[0]}"], args.throughput_batch)}
  cols = list(METRICS)
  print(f"\n{'model':<20}" + "".join(f"{k:>22}" for k in cols))
  for name, r in results.items():
    print(f"{name:<20}" + "".join(f"{r[k]:>22.3f}" for k in cols))
  gain = {k: [results[f"distilled_seed{s}"][k] - results[f"scratch_seed{s}"][k] for s in seeds]
          for k in cols}
  print("distilled - scratch per seed: " + ", ".join(f"{k} {v}" for k, v in gain.items()))
  print(f"\n{'':<10}{'params':>12}{'image params':>14}{'GFLOPs/image':>14}{'images/s':>12}")
  for name, r in costs.items():
    print(f"{name:<10}{r['params']:>12,}{r['image_params']:>14,}"
          f"{r['flops_per_image'] / 1e9:>14.4f}{r['images_per_s']:>12.1f}")
  speedup = costs["student"]["images_per_s"] / costs["teacher"]["images_per_s"]
  load = os.getloadavg()
  print(f"student image-encode speedup {speedup:.2f}x; load average {load}; runs under {root}")
  record = {"args": vars(args), "scores": results, "distilled_minus_scratch": gain,
            "cost": costs, "encode_speedup": speedup, "load_average": load,
            "wall_s": time.perf_counter() - t0, "workdir": root}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
