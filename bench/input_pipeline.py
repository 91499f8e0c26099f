"""Training input pipeline throughput: zoo's grain pipeline vs open_clip's WebDataset loader.

python bench/input_pipeline.py [--shards GLOB] [--workers 2] [--threads 1] [--out J.json]

Both read the same tar shards (without --shards: synthetic 500x375 JPEGs written to a temp dir)
and deliver what their train loop receives: shards -> JPEG decode -> RandomResizedCrop (scale
0.9-1.0, bicubic) -> normalize -> CLIP BPE tokens -> batched arrays. zoo:
`zoo.data.build_train_pipeline` with data.worker_processes=`--workers` (grain worker processes,
`--threads` threads each) and data.image_dtype=uint8 (the train step normalizes on the device);
extra rows (`--rows`): `zoo_float32` (normalized on the host), `zoo_threads` (`--workers`
threads in one process, no worker processes), `zoo_device_resize` (data.resize='device': the
host decodes and crops into a `--canvas` uint8 canvas and the train step does the bicubic
resize; its cost there, FLOPs per image and ms per image on this CPU, goes in the JSON).
open_clip: `open_clip_train.data.get_wds_dataset`
(webdataset + torch DataLoader, `--workers` processes, torchvision transforms, open_clip's
tokenizer). Rounds alternate the loaders (order reversed every other round) in one process;
each round builds a fresh loader, skips its first batch (start-up) and times the next
`--batches`: images/s (wall) and CPU-ms per image (user + system of this process and its live
worker processes, psutil; the figure to compare on a machine shared with other jobs). A one-
thread decode-only loop (PIL full decode + RGB) is the decode bound per core. Figures are
medians over rounds; the load average goes in the JSON. No figure is reported without the
open_clip baseline (it needs `pip install webdataset pandas`).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
import types

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
WORDS = "a photo of the small big red green blue dog cat man woman on in with near old".split()


def write_synthetic(out_dir: str, shards: int, per_shard: int, seed: int = 0) -> str:
  """`shards` tars of `per_shard` 500x375 JPEGs (quality 90, smooth colour fields + noise) with
  captions of 5-20 words; returns a glob."""
  from zoo.data import webdataset as wds

  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)

  def samples():
    for _ in range(shards * per_shard):
      a, b, c = rng.uniform(0.005, 0.03, 3)
      base = np.stack([np.sin(xx * a + c), np.cos(yy * b), np.sin((xx + yy) * a * b * 20)], -1)
      img = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format="JPEG", quality=90)
      words = rng.choice(WORDS, int(rng.integers(5, 21)))
      yield {"image": buf.getvalue(), "caption": " ".join(words)}

  wds.write_shards(samples(), out_dir, per_shard, prefix="synthetic")
  return os.path.join(out_dir, "synthetic-*.tar")


def cpu_seconds() -> float:
  """user + system CPU seconds of this process and its live child processes (loader workers)."""
  import psutil

  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:  # exited meanwhile
      pass
  return total


def zoo_round(shards: str, workers: int, batch: int, batches: int, size: int, seed: int,
              image_dtype: str = "float32", processes: bool = True,
              threads: int = 1, resize: str = "host", canvas: int = 0) -> tuple[float, float]:
  """(images/s, CPU seconds per image) of zoo's pipeline: `workers` worker processes of
  `threads` threads each (data.worker_processes), or with processes=False `workers` threads in
  this process."""
  from zoo import tokenizers
  from zoo.data import pipeline

  cfg = {"name": "webdataset", "shards": shards, "image_dtype": image_dtype,
         "num_threads": threads if processes else workers,
         "worker_processes": workers if processes else 0, "resize": resize,
         "resize_canvas": canvas}
  it = pipeline.build_train_pipeline(
      cfg, tokenizer=tokenizers.get_tokenizer("ViT-B-32"), image_size=size, mean=MEAN, std=STD,
      global_batch_size=batch, seed=seed, context_length=77)
  first = next(it)
  side = canvas if resize == "device" else size
  assert first["image"].shape == (batch, side, side, 3) and first["tokens"].shape == (batch, 77)
  c, t = cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    next(it)
  dt, cpu = time.perf_counter() - t, cpu_seconds() - c
  it.close()
  return batches * batch / dt, cpu / (batches * batch)


def open_clip_round(shards: str, workers: int, batch: int, batches: int, size: int, seed: int,
                    num_samples: int) -> tuple[float, float]:
  import open_clip
  from open_clip_train import data as oc_data

  if not getattr(oc_data, "_zoo_bench_patched", False):
    # webdataset 0.2.x's tar_file_expander ends each shard with an empty record that open_clip
    # 3.3's group_by_keys_nothrow indexes ("fname" KeyError): drop such records, nothing else.
    group = oc_data.group_by_keys_nothrow
    oc_data.group_by_keys_nothrow = lambda data, *a, **k: group(
        (f for f in data if "fname" in f), *a, **k)
    oc_data._zoo_bench_patched = True
  args = types.SimpleNamespace(
      train_data="::".join(sorted(glob.glob(shards))), train_num_samples=num_samples,
      dataset_resampled=False, train_data_upsampling_factors=None, seed=seed, batch_size=batch,
      workers=workers, world_size=1)
  preprocess = open_clip.image_transform(size, is_train=True, mean=MEAN, std=STD)
  info = oc_data.get_wds_dataset(args, preprocess, is_train=True,
                                 tokenizer=open_clip.get_tokenizer("ViT-B-32"))
  it = iter(info.dataloader)
  images, tokens = next(it)
  assert tuple(images.shape) == (batch, 3, size, size) and tuple(tokens.shape) == (batch, 77)
  c, t = cpu_seconds(), time.perf_counter()
  n = 0
  for _ in range(batches):
    try:
      images, _ = next(it)
    except StopIteration:  # an epoch of this loader ended: start the next one
      it = iter(info.dataloader)
      images, _ = next(it)
    n += len(images)
  dt, cpu = time.perf_counter() - t, cpu_seconds() - c
  del it, info
  return n / dt, cpu / n


def device_resize_cost(batch: int, size: int, canvas: int) -> dict:
  """What data.resize='device' moves into the train step: the jitted resize of one batch of
  canvases, timed here (CPU) and its FLOPs per image from XLA's cost analysis (an accelerator
  spends those instead of the host's PIL resize)."""
  import jax
  import jax.numpy as jnp

  from zoo.train.step import resize_on_device

  rng = np.random.default_rng(0)
  canvases = jnp.asarray(rng.integers(0, 256, (batch, canvas, canvas, 3), dtype=np.uint8))
  hw = rng.integers(int(0.7 * canvas), canvas + 1, (batch, 2))
  crops = jnp.asarray(np.concatenate([hw, np.zeros((batch, 1), int)], 1).astype(np.int32))
  fn = jax.jit(resize_on_device, static_argnums=2)
  compiled = fn.lower(canvases, crops, size).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  fn(canvases, crops, size).block_until_ready()
  times = []
  for _ in range(3):
    t = time.perf_counter()
    fn(canvases, crops, size).block_until_ready()
    times.append(time.perf_counter() - t)
  return {"cpu_ms_per_image": 1e3 * min(times) / batch,
          "gflops_per_image": float(cost.get("flops", 0.0)) / batch / 1e9,
          "canvas": canvas, "bytes_per_image": canvas * canvas * 3}


def decode_only(shards: str, limit: int) -> float:
  """Images/s of one thread doing PIL's full JPEG decode + RGB (the decode bound per core)."""
  blobs = []
  for path in sorted(glob.glob(shards)):
    with tarfile.open(path) as tar:
      for m in tar:
        if m.name.endswith((".jpg", ".jpeg")):
          blobs.append(tar.extractfile(m).read())
        if len(blobs) >= limit:
          break
  t = time.perf_counter()
  for b in blobs:
    with Image.open(io.BytesIO(b)) as im:
      np.asarray(im.convert("RGB"))
  return len(blobs) / (time.perf_counter() - t)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shards", default="", help="glob of tar shards (default: synthetic)")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=6, help="timed batches per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=1,
                      help="threads per zoo worker process (data.num_threads)")
  parser.add_argument("--rows", default="zoo_float32,zoo_threads,zoo_device_resize",
                      help="extra zoo rows besides zoo (worker processes, uint8) and open_clip: "
                           "zoo_float32 (normalized on the host), zoo_threads (threads, no "
                           "worker processes), zoo_device_resize (data.resize='device': the "
                           "host crops into a --canvas canvas, the train step resizes)")
  parser.add_argument("--canvas", type=int, default=512,
                      help="data.resize_canvas of the zoo_device_resize row")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  try:
    import open_clip_train.data  # noqa: F401
    import webdataset  # noqa: F401
  except ImportError as e:
    print(f"input_pipeline: the open_clip baseline cannot run ({e}); install it with "
          "`pip install open_clip_torch webdataset pandas` (no figure is reported without it)",
          file=sys.stderr)
    return 2
  tmp = None
  shards = args.shards
  if not shards:
    tmp = tempfile.mkdtemp(prefix="zoo_input_bench_")
    n_shards = max(4, args.workers)
    per = -(-(args.batch * (args.batches + 2) * 2) // n_shards)
    shards = write_synthetic(tmp, n_shards, per, args.seed)
  paths = sorted(glob.glob(shards))
  if not paths:
    print(f"input_pipeline: --shards {shards!r} matches no file", file=sys.stderr)
    return 2
  num_samples = 0
  for p in paths:
    with tarfile.open(p) as tar:
      num_samples += sum(1 for m in tar if m.name.endswith((".jpg", ".jpeg", ".png", ".webp")))
  loads = [os.getloadavg()[0]]
  # name -> round function; rounds alternate the order (forward, then reversed).
  w, size = max(args.workers, 1), args.image_size
  common = (shards, args.workers, args.batch, args.batches, size)
  loaders = {
      "zoo": lambda r: zoo_round(*common, args.seed + r, "uint8", True, args.threads),
      "zoo_float32": lambda r: zoo_round(*common, args.seed + r, "float32", True, args.threads),
      "zoo_threads": lambda r: zoo_round(*common, args.seed + r, "uint8", False),
      "zoo_device_resize": lambda r: zoo_round(*common, args.seed + r, "uint8", True,
                                               args.threads, "device", args.canvas),
      "open_clip": lambda r: open_clip_round(*common, args.seed + r, num_samples),
  }
  if args.rows:
    loaders = {k: v for k, v in loaders.items() if k in ("zoo", "open_clip") or k in args.rows}
  rates = {k: [] for k in loaders}
  cpus = {k: [] for k in loaders}
  dec_rates = []
  for r in range(args.rounds):
    for who in (list(loaders) if r % 2 == 0 else list(loaders)[::-1]):
      ips, cpu = loaders[who](r)
      rates[who].append(ips)
      cpus[who].append(cpu)
    dec_rates.append(decode_only(shards, 2 * args.batch))
    loads.append(os.getloadavg()[0])
    print(f"round {r}: " + ", ".join(f"{k} {rates[k][-1]:.1f} img/s ({1e3 * cpus[k][-1]:.2f} "
                                      "CPU-ms/img)" for k in loaders)
          + f", decode-only {dec_rates[-1]:.1f} img/s/core, load {loads[-1]:.2f}", flush=True)
  med = {k: statistics.median(v) for k, v in rates.items()}
  dec = statistics.median(dec_rates)
  result = {k: {"images_per_sec": med[k], "per_core": med[k] / w, "rounds": rates[k],
                "cpu_ms_per_image": 1e3 * statistics.median(cpus[k]),
                "cpu_ms_per_image_rounds": [1e3 * c for c in cpus[k]]} for k in loaders}
  result.update({
      "decode_only": {"images_per_sec_per_core": dec, "cpu_ms_per_image": 1e3 / dec,
                      "rounds": dec_rates},
      "ratio": med["zoo"] / med["open_clip"],
      "cpu_ratio": statistics.median(cpus["open_clip"]) / statistics.median(cpus["zoo"]),
      **({"ratio_threads": med["zoo_threads"] / med["open_clip"],
          "cpu_ratio_threads": statistics.median(cpus["open_clip"])
          / statistics.median(cpus["zoo_threads"])} if "zoo_threads" in loaders else {}),
      **({"ratio_device_resize": med["zoo_device_resize"] / med["open_clip"],
          "cpu_ratio_device_resize": statistics.median(cpus["open_clip"])
          / statistics.median(cpus["zoo_device_resize"]),
          "device_resize": device_resize_cost(args.batch, size, args.canvas)}
         if "zoo_device_resize" in loaders else {}),
      "workers": args.workers, "zoo_threads_per_worker": args.threads, "batch": args.batch,
      "image_size": size, "shards": len(paths), "samples": num_samples,
      "cpu_count": os.cpu_count(), "load": {"start": loads[0], "per_round": loads[1:]},
  })
  print(", ".join(f"{k} {med[k]:.1f} img/s ({med[k] / w:.1f}/worker, "
                  f"{result[k]['cpu_ms_per_image']:.2f} CPU-ms/img)" for k in loaders)
        + f"; ratio {result['ratio']:.2f} (CPU per image: open_clip / zoo "
        f"{result['cpu_ratio']:.2f})"
        + (f"; with data.resize='device' {result['ratio_device_resize']:.2f} (the train step "
           f"then resizes: {result['device_resize']['gflops_per_image']:.2f} GFLOP per image, "
           f"{result['device_resize']['cpu_ms_per_image']:.2f} ms per image on this CPU)"
           if "zoo_device_resize" in loaders else "")
        + f"; decode-only bound {dec:.1f} img/s per core; load {loads}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  if tmp:
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
