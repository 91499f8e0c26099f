"""A CLIP's embeddings precomputed into WebDataset shards (e.g. a distillation teacher's).

python -m zoo.data.embed_cache --model DIR|pretrained:NAME/TAG --shards 'in/*.tar' --out DIR
python -m zoo.data.embed_cache --text_model DIR --shards 'in/*.tar' --out DIR  (LLM text tower)

Each output shard is the input shard with, per sample, `KEY.{prefix}_image.npy` (float32 [E],
the L2-normalized image embedding), `KEY.{prefix}_text.npy` (float32 [n, E], one row per
caption: KEY.txt, KEY.txt_1, ... in `decode_sample`'s order) and `KEY.{prefix}_scale.npy` (the
model's exp(logit_scale), a 0-d float32). With --text_model (a zoo.save model with an LLM text
tower, family llm2clip) only `KEY.{prefix}_text.npy` is written (prefix `llm`): float32 [n, W],
the pooled LLM embedding of each caption, before the adapter. Images go through the model's eval preprocess
(resize + center crop), not the train augmentation. The other members are copied byte for
byte; samples `decode_sample` rejects are left out and counted. Shards are written to a
temporary name and renamed, so an interrupted run leaves no half-written shard.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo import errors
from zoo.data import webdataset as wds
from zoo.weights import model_dir as checkpoint, pretrained

_INTERNAL = ("__key__", "__shard__")


class Encoder:
  """Jitted, fixed-batch normalized image and text encoders of a CLIP; each batch is split over
  the local devices (a 1-D `data` mesh, the weights replicated), `batch_size` rounded up to a
  multiple of their count."""

  def __init__(self, model: nnx.Module, tokenizer: Any, preprocess: Any, batch_size: int):
    self.tokenizer, self.preprocess = tokenizer, preprocess
    self._place(batch_size)
    self.scale = np.float32(np.exp(np.asarray(model.logit_scale[...])))
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, self._replicated)
    self._image = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x, normalize=True))
    self._text = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode_text(t, normalize=True))

  def _place(self, batch_size: int) -> None:
    """batch_size rounded up to the local device count; row and replicated shardings."""
    devices = jax.local_devices()
    self.batch_size = -(-max(int(batch_size), 1) // len(devices)) * len(devices)
    mesh = Mesh(np.asarray(devices), ("data",))
    self._rows = NamedSharding(mesh, PartitionSpec("data"))
    self._replicated = NamedSharding(mesh, PartitionSpec())

  @classmethod
  def from_dir(cls, model_dir: str, batch_size: int,
               context_length: int | None = None) -> "Encoder":
    """The encoder of a zoo.save directory (its tokenizer at `context_length`, if given)."""
    model, _, preprocess = checkpoint.load(model_dir)
    tokenizer = checkpoint.load_tokenizer(model_dir, context_length=context_length)
    if tokenizer is None:
      raise ValueError(f"embed_cache: the model in {model_dir} has no tokenizer file")
    return cls(model, tokenizer, preprocess, batch_size)

  def _padded(self, fn, rows: np.ndarray) -> np.ndarray:
    """fn over `rows` in batches of batch_size (the last one padded: one compiled shape)."""
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      emb = fn(self._state, jax.device_put(chunk, self._rows))
      out.append(np.asarray(emb, np.float32)[:self.batch_size - pad])
    return np.concatenate(out)

  def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
    return self.pixels(self.preprocess.batch(images))

  def pixels(self, pixels: np.ndarray) -> np.ndarray:
    """Embeddings of already preprocessed images (float32 [N, H, W, 3])."""
    return self._padded(self._image, pixels)

  def texts(self, texts: Sequence[str]) -> np.ndarray:
    return self._padded(self._text, np.asarray(self.tokenizer(list(texts)), np.int32))


class TextEncoder(Encoder):
  """Jitted, fixed-batch pooled LLM embeddings of a model's LLM text tower (family llm2clip),
  batches split over the local devices like `Encoder`."""

  parts = ("text",)

  def __init__(self, model: nnx.Module, tokenizer: Any, batch_size: int):
    self.tokenizer, self.preprocess = tokenizer, None
    self._place(batch_size)
    graphdef, state = nnx.split(model.text)
    self._state = jax.device_put(state, self._replicated)
    self._text = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode(t))

  @classmethod
  def from_dir(cls, model_dir: str, batch_size: int,
               context_length: int | None = None) -> "TextEncoder":
    model, _, _ = checkpoint.load(model_dir)
    if not hasattr(model, "llm_features"):
      raise ValueError(f"embed_cache: --text_model {model_dir} holds a {type(model).__name__}; "
                       "expected a model with an LLM text tower (family llm2clip)")
    tokenizer = checkpoint.load_tokenizer(model_dir, context_length=context_length)
    if tokenizer is None:
      raise ValueError(f"embed_cache: the model in {model_dir} has no tokenizer file")
    return cls(model, tokenizer, batch_size)


def cache_shard(encoder: Encoder, path: str, out_path: str, prefix: str) -> dict[str, int]:
  """One input shard -> `out_path` with the embeddings added; {samples, skipped}."""
  source = wds.TarShardSource([path])
  parts = getattr(encoder, "parts", ("image", "text", "scale"))
  names = {f"{prefix}_{part}.npy" for part in parts}
  written = skipped = 0
  tmp = out_path + ".tmp"
  try:
    with tarfile.open(tmp, "w") as tar:
      for start in range(0, len(source), encoder.batch_size):
        raws, samples = [], []
        for i in range(start, min(start + encoder.batch_size, len(source))):
          raw = source[i]
          try:
            samples.append(wds.decode_sample(raw))
            raws.append(raw)
          except wds.SkipSample:
            skipped += 1
        if not samples:
          continue
        image_emb = encoder.images([s["image"] for s in samples]) if "image" in parts else None
        counts = [len(s["captions"]) for s in samples]
        text_emb = encoder.texts([c for s in samples for c in s["captions"]])
        offsets = np.cumsum([0] + counts)
        for j, raw in enumerate(raws):
          members = {k: v for k, v in raw.items() if k not in _INTERNAL and k not in names}
          members[f"{prefix}_text.npy"] = wds.encode_array(text_emb[offsets[j]:offsets[j + 1]])
          if image_emb is not None:
            members[f"{prefix}_image.npy"] = wds.encode_array(image_emb[j])
            members[f"{prefix}_scale.npy"] = wds.encode_array(encoder.scale)
          wds.add_members(tar, raw["__key__"], members)
          written += 1
    os.replace(tmp, out_path)
  finally:
    source.close()
    if os.path.exists(tmp):
      os.remove(tmp)
  return {"samples": written, "skipped": skipped}


def write_cache(model: str, shards: str | Sequence[str], out_dir: str, *, prefix: str = "teacher",
                batch_size: int = 128, context_length: int | None = None,
                text_only: bool = False) -> dict[str, Any]:
  """Embeds every sample of `shards` with `model` (a zoo.save directory or a pretrained: /
  hf-hub: name) into shards of the same names under `out_dir`; returns the counts.
  `text_only`: `model`'s LLM text tower, pooled caption embeddings only (TextEncoder)."""
  paths = wds.expand_shards(shards)
  if pretrained.is_ref(model):
    model = pretrained.checkpoint_dir(model)
  encoder = (TextEncoder if text_only else Encoder).from_dir(model, batch_size, context_length)
  os.makedirs(out_dir, exist_ok=True)
  outputs = [os.path.join(out_dir, os.path.basename(p)) for p in paths]
  clash = [p for p, o in zip(paths, outputs) if os.path.abspath(p) == os.path.abspath(o)]
  if clash:
    raise ValueError(f"embed_cache: --out {out_dir} holds the input shard {clash[0]}; "
                     "write the cache to another directory")
  totals = {"shards": len(paths), "samples": 0, "skipped": 0, "outputs": outputs}
  for path, out in zip(paths, outputs):
    counts = cache_shard(encoder, path, out, prefix)
    totals["samples"] += counts["samples"]
    totals["skipped"] += counts["skipped"]
  return totals


def main(argv: Sequence[str] | None = None) -> int:
  p = errors.ArgumentParser(prog="python -m zoo.data.embed_cache", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--model", help="zoo.save directory or pretrained:NAME/TAG")
  which.add_argument("--text_model", help="zoo.save directory of a model with an LLM text "
                     "tower: pooled caption embeddings only (prefix llm)")
  p.add_argument("--shards", required=True, help="input shards: glob, brace range or list")
  p.add_argument("--out", required=True, help="output directory (same shard names)")
  p.add_argument("--prefix", default=None,
                 help="array name prefix (default: teacher; llm with --text_model)")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--context_length", type=int, default=None,
                 help="tokenizer length (default: the model's)")
  args = p.parse_args(argv)
  prefix = args.prefix or ("llm" if args.text_model else "teacher")
  totals = write_cache(args.text_model or args.model, args.shards, args.out, prefix=prefix,
                       batch_size=args.batch_size, context_length=args.context_length,
                       text_only=bool(args.text_model))
  print(f"embed_cache: {totals['samples']} samples in {totals['shards']} shards -> {args.out} "
        f"({totals['skipped']} unusable samples left out)")
  return 0


if __name__ == "__main__":
  errors.quiet_logging()
  sys.exit(errors.run(main, prog="python -m zoo.data.embed_cache"))
