"""Prompt learning on the demo data: zero-shot CLIP vs CoOp vs CoCoOp vs MaPLe, base-to-novel.

python bench/prompt_demo.py [--pretrain_steps 300 --steps 60 --seeds 1,2 --out JSON]

1. Pre-train a tiny CLIP (test-tiny, 32 px) on the demo captions through the train loop: the
   frozen CLIP every method starts from.
2. Per seed (the few-shot draw, the context init and the data order follow it): the base
   classes are the first 12 of the 24 demo classes (red, green, blue shapes), the novel ones the
   other 12 (yellow, purple, orange): colours the prompts never see.
   * zero-shot: the CLIP with the hand-written prompt "a photo of a {class}." (CoOp's init);
   * CoOp (configs/coop_demo.py), CoCoOp (the same with prompt.method=cocoop) and MaPLe
     (configs/maple_demo.py), each `--steps` steps on `--shots` shots per base class.
3. Each is tested on the held-out demo test split: base accuracy (among the base classes),
   novel accuracy (among the novel classes) and their harmonic mean (HM).

Prints a markdown table and writes JSON (default bench/results/prompt_demo.json).
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

import zoo  # noqa: E402
from configs import coop_demo, demo as demo_config, maple_demo  # noqa: E402
from zoo import tokenizers  # noqa: E402
from zoo.families import prompt as prompt_family  # noqa: E402
from zoo.train import loop  # noqa: E402


def parse_args():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pretrain_steps", type=int, default=300)
  p.add_argument("--steps", type=int, default=60, help="prompt-learning steps (batch 8)")
  p.add_argument("--shots", type=int, default=8)
  p.add_argument("--eval_size", type=int, default=960, help="demo test scenes (~40 per class)")
  p.add_argument("--seeds", default="1,2")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "prompt_demo.json"))
  return p.parse_args()


def pretrain(args, workdir: str) -> str:
  c = demo_config.get_config()
  c.model, c.batch_size, c.total_steps = "test-tiny", 64, args.pretrain_steps
  c.warmup_steps, c.lr = 50, 1e-3
  c.eval_every, c.checkpoint_every, c.log_every = 0, args.pretrain_steps, 50
  c.data.size = 8000
  loop.train(c, workdir)
  return os.path.join(workdir, "model")


def method_config(method: str, args, seed: int, init_from: str):
  c = (maple_demo if method == "maple" else coop_demo).get_config()
  c.prompt.method = "cocoop" if method == "cocoop" else c.prompt.method
  c.init_from, c.seed = init_from, seed
  c.total_steps = c.eval_every = c.checkpoint_every = args.steps
  c.data.shots, c.data.eval_size = args.shots, args.eval_size
  if method == "cocoop":
    c.prompt.eval_batch_size = 16  # images x classes text passes per batch
  return c


def scores(metrics: dict) -> dict:
  return {k: round(100 * float(metrics[f"demo/{k}"]), 2)
          for k in ("base_accuracy", "novel_accuracy", "hm")}


def main():
  args = parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  results = {"args": vars(args), "runs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    clip_dir = pretrain(args, os.path.join(tmp, "clip"))
    results["pretrain_s"] = round(time.perf_counter() - t, 1)
    for seed in seeds:
      for method in ("zeroshot", "coop", "cocoop", "maple"):
        t = time.perf_counter()
        config = method_config("coop" if method == "zeroshot" else method, args, seed, clip_dir)
        if method == "zeroshot":
          family = prompt_family.FAMILY
          model = family.build_model(config, family.settings(config))
          tok = tokenizers.get_tokenizer(config.model)
          metrics = prompt_family.evaluate_protocol(model, config, tok)
        else:
          metrics = loop.train(config, os.path.join(tmp, f"{method}_{seed}"))["eval"]
        row = scores(metrics)
        row["seconds"] = round(time.perf_counter() - t, 1)
        results["runs"].setdefault(method, {})[str(seed)] = row
        print(method, seed, row, flush=True)
  lines = ["| method | " + " | ".join(f"base / novel / HM (seed {s})" for s in seeds)
           + " | mean HM |", "|---" * (len(seeds) + 2) + "|"]
  for method, runs in results["runs"].items():
    cells = [f"{r['base_accuracy']:.1f} / {r['novel_accuracy']:.1f} / {r['hm']:.1f}"
             for r in (runs[str(s)] for s in seeds)]
    mean = sum(runs[str(s)]["hm"] for s in seeds) / len(seeds)
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean:.1f} |")
  results["table"] = "\n".join(lines)
  print(results["table"])
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print("wrote", args.out, "zoo", zoo.__file__)


if __name__ == "__main__":
  main()
