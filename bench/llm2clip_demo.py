"""LLM2CLIP on the demo data: does an LLM text tower that reads the whole long caption beat the
77-token CLIP text tower on long-caption retrieval?

python bench/llm2clip_demo.py [--steps 250 --cc_steps 100 --seeds 0,1 --kinds KINDS --out FILE]

The demo's long captions (~200 CLIP BPE tokens) start with the primary shape ("a red circle.")
and a generic preamble; the background, the positions and the other shapes come after token ~150,
so a 77-token tower sees only the primary class. Per seed, with the same image tower (test-tiny),
steps, batches and optimizer, all trained on the long captions:
  (a) llm2clip_cc: the tiny LLM ("llm-tiny", bidirectional, mean pooled) first made a caption
      embedder by configs/llm2clip_cc_demo.py (text only, `--cc_steps`, this seed), then frozen
      at a 256-token context + LLM2CLIP's adapter (configs/llm2clip_demo.py, text_init);
  (b) clip77: the test-tiny CLIP text tower (trained) reading the same captions cut at 77;
  (c) llm2clip_cc77: as (a), but the CLIP stage's LLM reads the captions cut at 77 tokens
      (is it the LLM or the context?); (d) llm2clip: the frozen random-init LLM, no
      caption-contrastive stage. (c) and (d) with --kinds.
Evaluated on held-out long-caption retrieval (R@1 both directions). JSON out + a table.
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

from configs import llm2clip_cc_demo, llm2clip_demo  # noqa: E402
from zoo import families  # noqa: E402
from zoo.families import base, llm2clip  # noqa: E402
from zoo.train import loop  # noqa: E402


class LongCaptionCLIP(base.Family):
  """Plain CLIP trained on the long captions (cut at the model's 77 tokens): the baseline."""

  name = "bench_clip_long"
  fields = ("image", "llm_tokens")

  def field_hook(self, config, settings, model):
    return llm2clip.LLMFields(True)

  def forward(self, model, batch, rng, settings):
    return model(batch["image"], batch["llm_tokens"])


KINDS = ("llm2clip_cc", "clip77", "llm2clip_cc77", "llm2clip")


def configure(kind: str, seed: int, args, text_init: str = "") -> object:
  c = (llm2clip_cc_demo if kind == "cc" else llm2clip_demo).get_config()
  steps = args.cc_steps if kind == "cc" else args.steps
  c.seed, c.total_steps, c.batch_size = seed, steps, args.batch_size
  c.warmup_steps = max(1, steps // 10)
  c.eval_every = 0 if kind == "cc" else steps
  c.checkpoint_every, c.log_every = steps, 50
  c.data.size, c.data.eval_size = args.train_size, args.eval_size
  c.dtype = "float32"
  if kind == "clip77":
    c.family, c.context_length = LongCaptionCLIP.name, 77
  if kind in ("llm2clip_cc", "llm2clip_cc77"):
    c.llm2clip.text_init = text_init
  if kind == "llm2clip_cc77":
    c.context_length = 77
  return c


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=250)
  p.add_argument("--cc_steps", type=int, default=100)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--train_size", type=int, default=8000)
  p.add_argument("--eval_size", type=int, default=200)
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--kinds", default="llm2clip_cc,clip77",
                 help="of " + ", ".join(KINDS))
  p.add_argument("--out", default="bench/results/llm2clip_demo.json")
  args = p.parse_args()
  families.register(LongCaptionCLIP(), overwrite=True)
  kinds = tuple(args.kinds.split(","))
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown:
    p.error(f"--kinds: unknown {', '.join(unknown)}; known: {', '.join(KINDS)}")
  rows = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    with tempfile.TemporaryDirectory() as cc_work:
      cc_row = {"final_loss": None}
      if {"llm2clip_cc", "llm2clip_cc77"} & set(kinds):
        start = time.time()
        cc = loop.train(configure("cc", seed, args), cc_work)
        cc_row = {"seed": seed, "kind": "cc_stage", "seconds": round(time.time() - start, 1),
                  "final_loss": float(cc["losses"][-1]),
                  "accuracy": float(cc["metrics"].get("accuracy", float("nan")))}
        print(json.dumps(cc_row), flush=True)
      for kind in kinds:
        start = time.time()
        with tempfile.TemporaryDirectory() as work:
          summary = loop.train(configure(kind, seed, args, os.path.join(cc_work, "model")), work)
        m = summary["eval"]
        rows.append({"seed": seed, "kind": kind, "seconds": round(time.time() - start, 1),
                     "image_R@1": m.get("retrieval_long/image_retrieval_recall@1"),
                     "text_R@1": m.get("retrieval_long/text_retrieval_recall@1"),
                     "final_loss": float(summary["losses"][-1]),
                     "cc_final_loss": cc_row["final_loss"] if "_cc" in kind else None})
        print(json.dumps(rows[-1]), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"args": vars(args), "rows": rows}, f, indent=1)
  print("| seed | tower | image->text R@1 | text->image R@1 | final loss |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['seed']} | {r['kind']} | {r['text_R@1']:.3f} | {r['image_R@1']:.3f} | "
          f"{r['final_loss']:.3f} |")


if __name__ == "__main__":
  main()
