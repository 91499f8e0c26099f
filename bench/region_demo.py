"""Region heads on the demo data: does a CLOC-style prompter beat crop / pooled-patch baselines?

python bench/region_demo.py [--ablation] [--pretrain_steps 600 --finetune_steps 300 ...]

1. Pre-train a tiny CLIP (region-tiny: 64 px, 8 x 8 patch grid) on the demo captions.
2. From that checkpoint, train the `region` family (image-text + region-text contrastive
   loss over the demo's object boxes and region captions "a red circle", ...).
3. Region classification on the held-out `regions` split (every object box of every scene;
   24 colour-shape classes, the 6 zero-shot templates), zero-shot top-1 of:
   (a) region head: `RegionCLIP.encode_regions` of the trained model;
   (b) crop: the base CLIP's global image embedding of the box crop resized to 64 px (tight,
       and enlarged 1.5x about its centre: `crop_x1.5`);
   (c) pooled patches: the base CLIP's patch tokens mean-pooled in the box (RoIAlign) and
       projected with the image tower's projection.
   (b) and (c) are also reported for the fine-tuned towers (same model as (a)) for reference,
   as are region <-> caption retrieval R@1 and image-level zero-shot top-1.
   --ablation adds two more region runs (same base, batches, steps): + CLOC's grounding term
   (reports the grounding head's mean IoU) and + FG-CLIP 2's TIC term.

Prints a table and writes JSON (default bench/results/region_demo.json). The claim checked:
(a) beats (b) (both crops) and (c) of the base model on region top-1.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zoo  # noqa: E402
from configs import base  # noqa: E402
from zoo import transforms
from zoo.data import demo, pipeline  # noqa: E402
from zoo.eval import suite
from zoo.families.region import family as region_family
from zoo.models import configs, sharding
from zoo.train import trainer as trainer_lib


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="region-tiny", help="64 px, patch 8, 2+2 layers: fits a CPU")
  p.add_argument("--train_size", type=int, default=8000)
  p.add_argument("--eval_size", type=int, default=500, help="scenes of the regions split")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--pretrain_steps", type=int, default=600)
  p.add_argument("--pretrain_lr", type=float, default=1e-3)
  p.add_argument("--finetune_steps", type=int, default=300)
  p.add_argument("--finetune_lr", type=float, default=3e-4)
  p.add_argument("--roi_size", type=int, default=4)
  p.add_argument("--crop_context", type=float, default=1.5,
                 help="also crop boxes enlarged by this factor (some surroundings)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--save_base", default="",
                 help="also keep the pre-trained CLIP here (a zoo.save dir: init_from for "
                 "configs/cloc_demo.py)")
  p.add_argument("--ablation", action="store_true",
                 help="also train with the grounding term, and with the TIC term")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "region_demo.json"))
  return p.parse_args()


def trim(tokens: np.ndarray) -> np.ndarray:
  """Drops all-padding columns past the longest row (exact for causal argmax towers)."""
  width = int((tokens > 0).sum(-1).max())
  return np.ascontiguousarray(tokens[..., :max(width, 1)])


def load_data(args, image_size, mean, std):
  t = time.perf_counter()
  train = demo.samples(args.train_size, "train", image_size)
  tok = zoo.get_tokenizer(args.model)
  r = demo.MAX_OBJECTS
  n = len(train)
  boxes = np.zeros((n, r, 4), np.float32)
  mask = np.zeros((n, r), bool)
  captions = [""] * (n * r)
  for i, s in enumerate(train):
    k = len(s["boxes"])
    boxes[i, :k], mask[i, :k] = s["boxes"], True
    for j in range(k):
      captions[i * r + j] = s["region_captions"][j]
  region_tokens = tok(captions).reshape(n, r, -1)
  region_tokens[~mask] = 0
  data = {
      "images": transforms.normalize(np.stack([s["image"] for s in train]), mean, std),
      "caption": trim(tok([s["caption"] for s in train])),
      "boxes": boxes, "box_mask": mask, "region_tokens": trim(region_tokens),
  }
  cfg = {"eval_size": args.eval_size, "eval_sets": "zeroshot,regions", "max_regions": r}
  eval_sets = pipeline.demo_eval_sets(cfg, image_size=image_size, mean=mean, std=std)
  print(f"data: {n} train scenes ({int(mask.sum())} regions), {args.eval_size} eval scenes "
        f"({int(eval_sets['regions']['box_mask'].sum())} regions) in "
        f"{time.perf_counter() - t:.0f}s", flush=True)
  return data, eval_sets, tok


def make_config(args, *, family, steps, lr, init_from="", **region_settings):
  c = base.base_config()
  c.family = family
  c.model = args.model
  c.init_from = init_from
  c.seed = args.seed
  c.batch_size = args.batch_size
  c.total_steps = steps
  c.warmup_steps = max(1, steps // 10)
  c.lr = lr
  c.weight_decay = 0.1
  c.eval_every = 0
  c.checkpoint_every = 10 ** 9
  if family == "region":
    c.region = region_family.default_settings()
    c.region.roi_size = args.roi_size
    c.region.width = 64
    for k, v in region_settings.items():
      c.region[k] = v
  return c


def train(config, data, fields, mesh, seed, log_name):
  """Runs `config.total_steps` steps of the one train step on batches of `fields` (name -> key)."""
  trainer = trainer_lib.build_trainer(config, mesh)
  rng = np.random.default_rng(seed)
  n = data["images"].shape[0]
  order = np.concatenate([rng.permutation(n) for _ in range(config.total_steps * config.batch_size // n + 1)])
  t = time.perf_counter()
  for step in range(config.total_steps):
    idx = np.sort(order[step * config.batch_size:(step + 1) * config.batch_size])
    batch = {field: data[key][idx] for field, key in fields.items()}
    trainer.state, metrics = trainer.step_fn(trainer.state, sharding.host_to_global(batch, mesh))
    if (step + 1) % 100 == 0 or step + 1 == config.total_steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      extra = "".join(f" {k}={m[k]:.3f}" for k in ("image_text_loss", "region_text_loss",
                                                    "grounding_loss", "tic_loss") if k in m)
      print(f"  [{log_name}] step {step + 1}/{config.total_steps} loss={m['loss']:.3f}{extra} "
            f"({time.perf_counter() - t:.0f}s)", flush=True)
  return trainer.model(), time.perf_counter() - t


def region_eval(model, eval_sets, tok, method, roi_size, crop_context=1.0):
  # pooled_patches: the same RoIAlign grid as the head (a plain CLIP has no region config)
  m = suite.evaluate(model, {"regions": dict(eval_sets["regions"], method=method,
                                                roi_size=roi_size, crop_context=crop_context)},
                        tok)
  return {"region_top1": m["regions/top1"], "region_top5": m["regions/top5"],
          "text_to_region_R@1": m["regions/text_to_region_recall@1"],
          "region_to_text_R@1": m["regions/region_to_text_recall@1"],
          "grounding_mIoU": m.get("regions/grounding_miou", float("nan"))}


def main():
  args = parse_args()
  cfg = configs.get_model_config(args.model)
  mesh = sharding.make_mesh(devices=jax.devices()[:1], data=1, fsdp=1)
  data, eval_sets, tok = load_data(args, cfg.vision.image_size, cfg.image_mean, cfg.image_std)
  zs = {"zeroshot": eval_sets["zeroshot"]}
  results, timings = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    print(f"pre-training {args.model} (CLIP) for {args.pretrain_steps} steps", flush=True)
    pre_cfg = make_config(args, family="clip", steps=args.pretrain_steps, lr=args.pretrain_lr)
    base_model, timings["pretrain_s"] = train(pre_cfg, data, {"image": "images", "tokens": "caption"},
                                              mesh, args.seed, "pretrain")
    ckpt = zoo.save(base_model, args.save_base or os.path.join(tmp, "pretrained"), pre_cfg,
                    overwrite=bool(args.save_base))
    print(f"training the region family for {args.finetune_steps} steps from the base", flush=True)
    ft_cfg = make_config(args, family="region", steps=args.finetune_steps, lr=args.finetune_lr,
                         init_from=ckpt)
    fields = {"image": "images", "tokens": "caption", "boxes": "boxes", "box_mask": "box_mask",
              "region_tokens": "region_tokens"}
    head_model, timings["region_train_s"] = train(ft_cfg, data, fields, mesh, args.seed + 1, "region")
    ablations = {}
    if args.ablation:  # the optional loss terms, each on its own, same batches and steps
      for name, kw in (("region_head+grounding", dict(grounding_weight=1.0)),
                       ("region_head+tic", dict(tic_weight=0.5))):
        print(f"training {name} for {args.finetune_steps} steps from the base", flush=True)
        cfg_a = make_config(args, family="region", steps=args.finetune_steps,
                            lr=args.finetune_lr, init_from=ckpt, **kw)
        ablations[name], timings[f"{name}_s"] = train(cfg_a, data, fields, mesh, args.seed + 1, name)
  t = time.perf_counter()
  base_zs = suite.evaluate(base_model, zs, tok)["zeroshot/top1"]
  head_zs = suite.evaluate(head_model, zs, tok)["zeroshot/top1"]
  results["region_head"] = {**region_eval(head_model, eval_sets, tok, "head", args.roi_size),
                            "image_zeroshot_top1": head_zs}
  for name, model in ablations.items():
    results[name] = {**region_eval(model, eval_sets, tok, "head", args.roi_size),
                     "image_zeroshot_top1": suite.evaluate(model, zs, tok)["zeroshot/top1"]}
  for name, model, zs_top1 in (("base", base_model, base_zs), ("finetuned", head_model, head_zs)):
    for method, context in (("crop", 1.0), ("crop", args.crop_context), ("pooled_patches", 1.0)):
      label = method if context == 1.0 else f"crop_x{context:g}"
      results[f"{label}[{name}]"] = {
          **region_eval(model, eval_sets, tok, method, args.roi_size, context),
          "image_zeroshot_top1": zs_top1}
  timings["eval_s"] = time.perf_counter() - t

  head = results["region_head"]["region_top1"]
  checks = {
      "region_top1: region_head > crop[base]": head > results["crop[base]"]["region_top1"],
      f"region_top1: region_head > crop_x{args.crop_context:g}[base]":
          head > results[f"crop_x{args.crop_context:g}[base]"]["region_top1"],
      "region_top1: region_head > pooled_patches[base]":
          head > results["pooled_patches[base]"]["region_top1"],
  }
  keys = list(results["region_head"])
  width = max(len(n) for n in results) + 2
  print("\n" + f"{'method':<{width}}" + "".join(f"{k:>22}" for k in keys))
  for name, row in results.items():
    print(f"{name:<{width}}" + "".join(f"{row[k]:>22.4f}" for k in keys))
  for text, ok in checks.items():
    print(f"{'PASS' if ok else 'FAIL'}  {text}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    clean = {name: {k: (None if v != v else v) for k, v in row.items()}  # NaN -> null
             for name, row in results.items()}
    json.dump({"args": vars(args), "results": clean, "checks": checks, "timings_s": timings,
               "num_eval_regions": int(eval_sets["regions"]["box_mask"].sum()),
               "device": str(jax.devices()[0]), "jax": jax.__version__}, f, indent=1)
  print(f"wrote {args.out}")
  return 0 if all(checks.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
