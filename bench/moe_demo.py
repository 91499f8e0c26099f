"""CLIP-MoE on the demo data: dense CLIP vs DMU-upcycled CLIP-MoE after equal extra steps.

python bench/moe_demo.py [--pretrain_steps 300 --stage_steps 40 --router_steps 80 ...]

1. Pre-train a dense tiny CLIP (test-tiny) on the demo data: the starting checkpoint.
2. From it, for the same number of extra steps E = 4 * stage_steps + router_steps:
   (a) dense: plain CLIP fine-tuning of all weights for E steps;
   (b) CLIP-MoE by DMU (configs/clip_moe_demo.py: the DMU driver, zoo.families.moe.dmu): 4 stages of
       stage_steps each fine-tune FFN copies (stage 1 plain contrastive, stages 2-4 within the
       joint k-means clusters of earlier stages' features), then a top-2 MoE with the 4 stage
       FFNs as experts in every other block of both towers trains for router_steps
       (`--moe_trainable router` as CLIP-MoE, or `all`).
   Every phase is the train loop (`train_lib.train`) on the same demo pipeline and seed.
3. Evaluate all on held-out demo splits (zero-shot top-1/top-5 over 24 classes, image<->text
   retrieval R@1/R@5) and report parameters (total, active per token) and forward FLOPs:
   analytic per token (attention projections + FFN; active = k experts + router) and XLA's
   count for encoding one image / one caption (the einsum dispatch computes every capacity slot).

Prints a table and writes JSON (default bench/results/moe_demo.json).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import logging
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import clip_moe_demo  # noqa: E402
from zoo.eval import suite
from zoo.models import moe  # noqa: E402
from zoo.train import loop as train_lib
from zoo.weights import model_dir


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="test-tiny")
  p.add_argument("--train_size", type=int, default=8000)
  p.add_argument("--eval_size", type=int, default=1000)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--pretrain_steps", type=int, default=300)
  p.add_argument("--pretrain_lr", type=float, default=1e-3)
  p.add_argument("--stage_steps", type=int, default=40)
  p.add_argument("--router_steps", type=int, default=80)
  p.add_argument("--finetune_lr", type=float, default=3e-4, help="dense and DMU stage lr")
  p.add_argument("--router_lr", type=float, default=1e-3)
  p.add_argument("--moe_trainable", default="router", choices=["router", "moe", "all"])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="", help="keep runs here (default: a temporary dir)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "moe_demo.json"))
  return p.parse_args()


def make_config(args, *, family, steps, lr, init_from=""):
  c = clip_moe_demo.get_config()
  c.family = family
  c.model = args.model
  c.init_from = init_from
  c.seed = args.seed
  c.batch_size = args.batch_size
  c.total_steps = steps
  c.warmup_steps = max(1, steps // 10)
  c.lr = lr
  c.eval_every = 0
  c.checkpoint_every = 10 ** 6
  c.log_every = 25
  c.data.size = args.train_size
  c.data.eval_size = args.eval_size
  c.moe.trainable = args.moe_trainable
  c.moe.dmu.steps_per_stage = args.stage_steps
  c.moe.dmu.lr = args.finetune_lr
  if family != "moe":
    c.moe.dmu.stages = 0
  return c


def run(config, workdir):
  t = time.perf_counter()
  result = train_lib.train(config, workdir)
  return result, time.perf_counter() - t


def xla_flops(model, images, tokens):
  """XLA's FLOP count of encoding one image and one caption (jitted, batch 1)."""
  from flax import nnx

  graphdef, state = nnx.split(model)

  def count(method, x):
    fn = jax.jit(lambda st, x: getattr(nnx.merge(graphdef, st), method)(x))
    cost = fn.lower(state, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))

  return {"image": count("encode_image", images), "text": count("encode_text", tokens)}


def describe(model, images, tokens):
  counts = moe.parameter_counts(model)
  tok = {t: moe.flops_per_token(model, t) for t in ("visual", "text")}
  return {
      "params_total": counts["total"],
      "params_active": counts["active"],
      "flops_per_token_visual": tok["visual"]["active"],
      "flops_per_token_text": tok["text"]["active"],
      **{f"xla_flops_per_{k}": v for k, v in xla_flops(model, images, tokens).items()},
  }


def summarize(metrics):
  return {
      "zeroshot_top1": metrics["zeroshot/top1"],
      "zeroshot_top5": metrics["zeroshot/top5"],
      "i2t_R@1": metrics["retrieval/text_retrieval_recall@1"],
      "t2i_R@1": metrics["retrieval/image_retrieval_recall@1"],
      "i2t_R@5": metrics["retrieval/text_retrieval_recall@5"],
      "t2i_R@5": metrics["retrieval/image_retrieval_recall@5"],
  }


def main():
  args = parse_args()
  logging.getLogger("absl").setLevel(logging.WARNING)
  extra = 4 * args.stage_steps + args.router_steps
  results, timings, info = {}, {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    print(f"pre-training dense {args.model} for {args.pretrain_steps} steps", flush=True)
    pre_cfg = make_config(args, family="clip", steps=args.pretrain_steps, lr=args.pretrain_lr)
    _, timings["pretrain_s"] = run(pre_cfg, os.path.join(root, "pretrain"))
    base_dir = os.path.join(root, "pretrain", "model")

    print(f"dense: {extra} more steps of plain fine-tuning", flush=True)
    dense_cfg = make_config(args, family="clip", steps=extra, lr=args.finetune_lr, init_from=base_dir)
    _, timings["dense_s"] = run(dense_cfg, os.path.join(root, "dense"))

    print(f"CLIP-MoE: DMU 4 x {args.stage_steps} stage steps + {args.router_steps} MoE steps "
          f"(trainable: {args.moe_trainable})", flush=True)
    moe_cfg = make_config(args, family="moe", steps=args.router_steps, lr=args.router_lr,
                          init_from=base_dir)
    moe_result, timings["dmu_total_s"] = run(moe_cfg, os.path.join(root, "moe"))
    info["moe_last_train_metrics"] = moe_result["metrics"]

    base, tokenizer, _ = model_dir.load(base_dir)
    eval_sets = train_lib.build_eval_sets(dense_cfg, base, tokenizer)
    images = eval_sets["zeroshot"]["images"][:1]
    tokens = tokenizer(["a red circle"])
    dirs = {"pretrained": base_dir, "dense": os.path.join(root, "dense", "model"),
            "clip_moe_dmu": os.path.join(root, "moe", "model")}
    for s in range(1, 5):
      dirs[f"dmu_stage_{s}"] = os.path.join(root, "moe", "dmu", f"stage_{s}", "model")
    for name, d in dirs.items():
      model, _, _ = model_dir.load(d)
      results[name] = summarize(suite.evaluate(model, eval_sets, tokenizer))
      if not name.startswith("dmu_stage"):
        results[name].update(describe(model, images, tokens))
    moe_model, _, _ = model_dir.load(dirs["clip_moe_dmu"])
    info["moe_config"] = moe_model.config.moe.__dict__
    # Router balance after training on a held-out batch.
    _, aux = moe.capture_aux(
        lambda m: m(jnp.asarray(eval_sets["retrieval"]["images"][:64]),
                    jnp.asarray(tokenizer(eval_sets["retrieval"]["captions"][:64]))), moe_model)
    info["eval_aux"] = {k: float(v) for k, v in moe.summarize_aux(aux).items()}

  cols = ["pretrained", "dense", "clip_moe_dmu"] + [f"dmu_stage_{s}" for s in range(1, 5)]
  keys = list(results["dense"])
  print("\n" + f"{'metric':<24}" + "".join(f"{n:>15}" for n in cols))
  for k in keys:
    row = [results[n].get(k) for n in cols]
    fmt = lambda v: f"{'-':>15}" if v is None else (f"{v:>15.4f}" if abs(v) < 100 else f"{v:>15.3g}")
    print(f"{k:<24}" + "".join(fmt(v) for v in row))
  print(f"extra steps after pre-training: {extra} for both; MoE eval aux: {info['eval_aux']}")
  print("timings (s): " + ", ".join(f"{k}={v:.0f}" for k, v in timings.items()))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"args": vars(args), "extra_steps": extra, "results": results, "info": info,
               "timings_s": timings, "device": str(jax.devices()[0]), "jax": jax.__version__},
              f, indent=1, default=str)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
