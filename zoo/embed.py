"""Embed a folder of images and / or a file of texts with a CLIP, and search what was written.

python -m zoo.embed (--model NAME --pretrained TAG | --model hf-hub:ORG/REPO | --checkpoint DIR)
                    [--images DIR] [--texts FILE] --out OUT [--batch_size 256]
python -m zoo.embed query --index OUT --query "a photo of a dog" [--top 10] [--over texts]

Images (recursive, any format PIL decodes; unreadable files are skipped and counted) go to
OUT/embeddings.npy (float32 [N, E], L2-normalised) + OUT/index.jsonl ({"path": absolute path}
per row, same order); texts (one per line; each distinct non-empty line once) go to
OUT/text_embeddings.npy + OUT/text_index.jsonl ({"text": ...}). OUT/embed.json names the model.
Each batch is split over the local devices (zoo.data.embed_cache.Encoder). Resumable and
append-only: rows are written in parts under OUT/.parts (each file written under a temporary
name and renamed), merged into the two files at the end; a second run embeds only the files /
texts not yet in OUT, so a killed run loses at most one part and never leaves a corrupt file.
`query` embeds the text with the model named in OUT/embed.json and prints the `--top` rows by
cosine similarity (numpy), best first: score and path (or text).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from zoo import errors
from zoo.data import embed_cache, make_shards
from zoo.weights import model_dir, pretrained as pretrained_lib

MANIFEST = "embed.json"
PARTS = ".parts"
CHUNK_BATCHES = 8  # batches per part: the work a killed run can lose


class Table:
  """One kind of rows in OUT ("image": embeddings.npy + index.jsonl, keyed by "path"; "text":
  text_embeddings.npy + text_index.jsonl, keyed by "text") and its unmerged parts."""

  def __init__(self, out: str, kind: str):
    prefix = "" if kind == "image" else "text_"
    self.out, self.kind, self.field = out, kind, "path" if kind == "image" else "text"
    self.arrays = os.path.join(out, f"{prefix}embeddings.npy")
    self.index = os.path.join(out, f"{prefix}index.jsonl")
    self.parts_dir = os.path.join(out, PARTS)

  def parts(self) -> list[str]:
    """Complete parts, in order (a part's .jsonl is renamed into place after its .npy)."""
    if not os.path.isdir(self.parts_dir):
      return []
    return sorted(os.path.join(self.parts_dir, f[:-6]) for f in os.listdir(self.parts_dir)
                  if f.startswith(self.kind + "-") and f.endswith(".jsonl"))

  def keys(self) -> set[str]:
    """The keys written so far (without reading the embeddings)."""
    out: set[str] = set()
    for jsonl in ([self.index] if os.path.isfile(self.index) else []) + [
        p + ".jsonl" for p in self.parts()]:
      with open(jsonl, encoding="utf-8") as f:
        out.update(json.loads(line)[self.field] for line in f if line.strip())
    return out

  def read(self) -> tuple[np.ndarray | None, list[str]]:
    """(embeddings, keys) written so far: the merged files, then the parts, each key once."""
    pieces = [(self.arrays, self.index)] if os.path.isfile(self.index) else []
    pieces += [(p + ".npy", p + ".jsonl") for p in self.parts()]
    arrays, keys, seen = [], [], set()
    for npy, jsonl in pieces:
      emb = np.load(npy, allow_pickle=False)
      with open(jsonl, encoding="utf-8") as f:
        rows = [json.loads(line)[self.field] for line in f if line.strip()]
      n = min(len(rows), len(emb))  # a run killed between the two renames of a merge
      fresh = [i for i in range(n) if rows[i] not in seen]
      seen.update(rows[i] for i in fresh)
      arrays.append(emb[fresh])
      keys += [rows[i] for i in fresh]
    return (np.concatenate(arrays) if arrays else None), keys

  def add(self, emb: np.ndarray, keys: Sequence[str]) -> None:
    """Writes one part (npy, then jsonl: the jsonl's presence marks it complete)."""
    os.makedirs(self.parts_dir, exist_ok=True)
    numbers = [int(f.split("-")[1].split(".")[0]) for f in os.listdir(self.parts_dir)
               if f.split("-")[-1].split(".")[0].isdigit()]
    stem = os.path.join(self.parts_dir, f"{self.kind}-{max(numbers, default=-1) + 1:06d}")
    _atomic_npy(stem + ".npy", emb)
    _atomic_text(stem + ".jsonl", "".join(json.dumps({self.field: k}, ensure_ascii=False) + "\n"
                                          for k in keys))

  def merge(self) -> int:
    """Merges the parts into the two files (arrays, then index; both atomic); the row count."""
    emb, keys = self.read()
    parts = self.parts()
    if parts:
      _atomic_npy(self.arrays, emb)
      _atomic_text(self.index, "".join(json.dumps({self.field: k}, ensure_ascii=False) + "\n"
                                       for k in keys))
      for p in parts:
        os.remove(p + ".jsonl")
        os.remove(p + ".npy")
    if os.path.isdir(self.parts_dir) and not os.listdir(self.parts_dir):
      os.rmdir(self.parts_dir)
    return len(keys)


def _atomic_npy(path: str, array: np.ndarray) -> None:
  with open(path + ".tmp", "wb") as f:
    np.save(f, np.asarray(array, np.float32), allow_pickle=False)
  os.replace(path + ".tmp", path)


def _atomic_text(path: str, text: str) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- the model


def model_source(model: str | None, pretrained: str | None, checkpoint: str | None) -> dict:
  """The one model the flags name, as stored in embed.json; a one-line error otherwise."""
  if checkpoint and (model or pretrained):
    raise errors.UserError("pass either --checkpoint DIR or --model NAME --pretrained TAG, "
                           "not both")
  if checkpoint:
    if not os.path.isdir(checkpoint):
      raise errors.UserError(f"--checkpoint {checkpoint}: " + (
          "is a file, not a directory" if os.path.exists(checkpoint) else "no such directory"))
    workdir_model = os.path.join(checkpoint, "model")
    if (not os.path.isfile(os.path.join(checkpoint, model_dir.CONFIG_FILE))
        and os.path.isfile(os.path.join(workdir_model, model_dir.CONFIG_FILE))):
      checkpoint = workdir_model  # a training workdir: its final model
    return {"checkpoint": os.path.abspath(checkpoint)}
  if not model:
    raise errors.UserError("no model: pass --model NAME --pretrained TAG, --model "
                           "hf-hub:ORG/REPO or --checkpoint DIR (a zoo.save directory)")
  if pretrained is None and not model.startswith(pretrained_lib.HF_HUB_PREFIX):
    tags = pretrained_lib.list_pretrained_tags(model) if model in pretrained_lib.list_models() \
        else []
    raise errors.UserError(f"--model {model} needs --pretrained TAG (random weights embed "
                           "nothing useful)" + (f"; its tags: {', '.join(tags)}" if tags else ""))
  return {"model": model, "pretrained": pretrained}


def open_encoder(source: dict, batch_size: int) -> embed_cache.Encoder:
  if "checkpoint" in source:
    model, tokenizer, preprocess = model_dir.load(source["checkpoint"])
  else:
    model, tokenizer, preprocess = pretrained_lib.create_model_and_transforms(
        source["model"], source["pretrained"])
  return embed_cache.Encoder(model, tokenizer, preprocess, batch_size)


def check_manifest(out: str, source: dict) -> None:
  """Writes OUT/embed.json, or refuses an OUT written with another model."""
  path = os.path.join(out, MANIFEST)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      stored = json.load(f).get("source")
    if stored != source:
      raise errors.UserError(f"--out {out} holds embeddings of another model ({stored}); "
                             "pick another --out")
    return
  os.makedirs(out, exist_ok=True)
  _atomic_text(path, json.dumps({"source": source}, indent=1) + "\n")


# ----------------------------------------------------------------------------- embedding


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def embed_images(encoder: embed_cache.Encoder, paths: Sequence[str], table: Table) -> int:
  """Embeds `paths` part by part (decode + preprocess on threads); the unreadable count."""
  def load(path: str):
    read = make_shards.read_image(path)
    return None if read is None else encoder.preprocess(read[1])

  unreadable = 0
  bar = tqdm(total=len(paths), desc="embed images", unit="img", dynamic_ncols=True, disable=None)
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for chunk in _chunks(paths, encoder.batch_size * CHUNK_BATCHES):
      pixels = list(pool.map(load, chunk))
      keep = [i for i, x in enumerate(pixels) if x is not None]
      unreadable += len(chunk) - len(keep)
      if keep:
        table.add(encoder.pixels(np.stack([pixels[i] for i in keep])), [chunk[i] for i in keep])
      bar.update(len(chunk))
  bar.close()
  return unreadable


def embed_texts(encoder: embed_cache.Encoder, texts: Sequence[str], table: Table) -> None:
  bar = tqdm(total=len(texts), desc="embed texts", unit="text", dynamic_ncols=True, disable=None)
  for chunk in _chunks(texts, encoder.batch_size * CHUNK_BATCHES):
    table.add(encoder.texts(chunk), chunk)
    bar.update(len(chunk))
  bar.close()


def read_texts(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise errors.UserError(f"--texts {path}: no such file")
  with open(path, encoding="utf-8") as f:
    texts = list(dict.fromkeys(line.strip() for line in f if line.strip()))
  if not texts:
    raise errors.UserError(f"--texts {path}: no non-empty line")
  return texts


def embed(args: argparse.Namespace) -> int:
  if not (args.images or args.texts):
    raise errors.UserError("nothing to embed: pass --images DIR and / or --texts FILE")
  if args.batch_size < 1:
    raise errors.UserError(f"--batch_size must be >= 1, got {args.batch_size}")
  source = model_source(args.model, args.pretrained, args.checkpoint)
  paths = [os.path.abspath(p) for p in make_shards.list_images(args.images)] if args.images else []
  texts = read_texts(args.texts) if args.texts else []
  if os.path.isfile(args.out):
    raise errors.UserError(f"--out {args.out}: is a file, not a directory")
  check_manifest(args.out, source)
  images, text_table = Table(args.out, "image"), Table(args.out, "text")
  done_paths, done_texts = images.keys(), text_table.keys()
  new_paths = [p for p in paths if p not in done_paths]
  new_texts = [t for t in texts if t not in done_texts]
  unreadable = 0
  if new_paths or new_texts:
    encoder = open_encoder(source, args.batch_size)
    if new_texts and encoder.tokenizer is None:
      raise errors.UserError("the model has no tokenizer file: it cannot embed --texts")
    unreadable = embed_images(encoder, new_paths, images) if new_paths else 0
    if new_texts:
      embed_texts(encoder, new_texts, text_table)
  lines = []
  if args.images:
    rows = images.merge()
    if not rows:
      raise errors.UserError(f"--images {args.images}: none of its {len(paths)} image files "
                             "could be decoded")
    lines.append(f"{len(new_paths) - unreadable} new images ({len(paths) - len(new_paths)} "
                 f"already embedded, {unreadable} unreadable file(s) skipped); {rows} rows in "
                 f"{images.arrays}")
  if args.texts:
    rows = text_table.merge()
    lines.append(f"{len(new_texts)} new texts ({len(texts) - len(new_texts)} already embedded); "
                 f"{rows} rows in {text_table.arrays}")
  print("embed: " + "; ".join(lines))
  return 0


# ----------------------------------------------------------------------------- query


def search(index: str, query: str, *, top: int = 10, over: str = "images",
           batch_size: int = 1) -> list[tuple[float, str]]:
  """[(cosine, path or text)] of the `top` rows of OUT `index` closest to the text `query`."""
  manifest = os.path.join(index, MANIFEST)
  if not os.path.isfile(manifest):
    raise errors.UserError(f"--index {index}: no {MANIFEST} (not written by python -m zoo.embed)")
  table = Table(index, "image" if over == "images" else "text")
  emb, keys = table.read()
  if emb is None or not keys:
    raise errors.UserError(f"--index {index}: no {over} embedded ({table.arrays} missing)")
  with open(manifest, encoding="utf-8") as f:
    encoder = open_encoder(json.load(f)["source"], batch_size)
  if encoder.tokenizer is None:
    raise errors.UserError("the index's model has no tokenizer file: it cannot embed --query")
  scores = emb @ encoder.texts([query])[0]
  order = np.argsort(-scores, kind="stable")[:top]
  return [(float(scores[i]), keys[i]) for i in order]


def query_main(argv: Sequence[str]) -> int:
  p = errors.ArgumentParser(prog="python -m zoo.embed query",
                            description="The rows of an index closest to a text (cosine).")
  p.add_argument("--index", required=True, help="an --out directory of python -m zoo.embed")
  p.add_argument("--query", required=True, help='the text, e.g. "a photo of a dog"')
  p.add_argument("--top", type=int, default=10, help="how many rows to print (default 10)")
  p.add_argument("--over", choices=("images", "texts"), default="images",
                 help="search the image rows (default) or the text rows")
  args = p.parse_args(argv)
  if args.top < 1:
    raise errors.UserError(f"--top must be >= 1, got {args.top}")
  for score, key in search(args.index, args.query, top=args.top, over=args.over):
    print(f"{score:.6f}\t{key}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["query"]:
    return query_main(argv[1:])
  p = errors.ArgumentParser(prog="python -m zoo.embed", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=None, help="model name (with --pretrained) or hf-hub:ORG/REPO")
  p.add_argument("--pretrained", default=None, help="pretrained tag (python -c 'import zoo; "
                 "print(zoo.list_pretrained())')")
  p.add_argument("--checkpoint", default=None,
                 help="a zoo.save directory (or a training workdir: its model/)")
  p.add_argument("--images", default=None, help="folder of images (read recursively)")
  p.add_argument("--texts", default=None, help="text file, one text per line")
  p.add_argument("--out", required=True, help="output directory (appended to on a rerun)")
  p.add_argument("--batch_size", type=int, default=256,
                 help="rows per step, rounded up to a multiple of the local devices")
  return embed(p.parse_args(argv))


if __name__ == "__main__":
  errors.quiet_logging()
  sys.exit(errors.run(main, prog="python -m zoo.embed"))
