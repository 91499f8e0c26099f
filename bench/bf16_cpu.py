"""encode_image in bfloat16 vs float32 on this CPU: zoo (jit) and open_clip (torch.autocast).

python bench/bf16_cpu.py --model ViT-B-32 --batch 8 --rounds 3 [--out J.json]

Same random weights (zoo's converted to open_clip) and images; rounds alternate the four
variants; medians in images/s, the load average and the max |bf16 - fp32| feature difference
(relative to the features' max) in the JSON. The train-step rows are in
bench/train_throughput.py --rows bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="ViT-B-32")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np
  import open_clip
  import torch
  from flax import nnx

  import zoo
  from zoo.convert import open_clip as oc_convert

  load0 = os.getloadavg()
  z32 = zoo.create(args.model, seed=0)
  z16 = zoo.create(args.model, seed=0, dtype="bfloat16")
  size = z32.config.vision.image_size
  x = np.random.default_rng(0).standard_normal((args.batch, size, size, 3), dtype=np.float32)
  fns = {}
  for name, m in (("zoo_fp32", z32), ("zoo_bf16", z16)):
    g, st = nnx.split(m)
    f = jax.jit(lambda st, x, g=g: nnx.merge(g, st).encode_image(x))
    fns[name] = (lambda f=f, st=st: np.asarray(f(st, jnp.asarray(x))))
  model = open_clip.create_model(args.model, pretrained=None).eval()
  state = oc_convert.to_open_clip(z32)
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

  def oc(dtype):
    def run():
      with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        return model.encode_image(xt).float().numpy()
    return run

  fns["open_clip_fp32"], fns["open_clip_bf16"] = oc("fp32"), oc("bf16")
  outs = {k: f() for k, f in fns.items()}  # warm-up / compile
  times = {k: [] for k in fns}
  for r in range(args.rounds):
    for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      t = time.perf_counter()
      fns[k]()
      times[k].append(time.perf_counter() - t)
  ref = outs["zoo_fp32"]
  scale = float(np.abs(ref).max())
  result = {"model": args.model, "batch": args.batch, "jax": jax.__version__,
            "torch": torch.__version__, "load": {"before": load0, "after": os.getloadavg()},
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
  for k, ts in times.items():
    result[k] = {"images_per_sec": args.batch / statistics.median(ts), "seconds": ts,
                 "max_rel_diff_vs_zoo_fp32": float(np.abs(outs[k] - ref).max()) / scale}
    print(f"{k:15s} {result[k]['images_per_sec']:8.2f} img/s  max rel diff vs zoo fp32 "
          f"{result[k]['max_rel_diff_vs_zoo_fp32']:.2e}")
  print(f"load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
