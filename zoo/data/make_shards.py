"""A folder of images (and captions) -> WebDataset tar shards in img2dataset's layout.

python -m zoo.data.make_shards --images DIR [--captions FILE.jsonl] --out DIR --shard_size 10000

Every image under DIR (recursive, sorted; any format PIL reads) becomes one sample of shards
`00000.tar`, `00001.tar`, ...: `KEY.jpg` / `KEY.png` / `KEY.webp` (the file's bytes, or PNG for
other formats), `KEY.txt` (its caption) and `KEY.json` ({key, url: its path under DIR, caption,
width, height}); KEY is the shard number then the sample's place in it (img2dataset's keys).
Captions come from a JSON-lines file of {"path": ..., "caption": ...} (paths relative to DIR or
absolute), else the file name's stem. Files PIL cannot decode are skipped and counted. Each
shard is written under a temporary name and renamed when complete. `list_images` and
`read_image` are also what `python -m zoo.embed` reads folders with.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFile

from zoo import errors
from zoo.data import webdataset as wds

# PIL's format name -> the member extension zoo's reader takes as is; others become PNG.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def image_extensions() -> set[str]:
  """Lower-case file extensions of the formats PIL decodes ('.jpg', '.png', '.tif', ...; not
  its identify-only stubs, e.g. HDF5, nor video)."""
  exts = Image.registered_extensions()
  return {ext.lower() for ext, fmt in exts.items() if fmt in Image.OPEN and fmt != "MPEG"
          and not (isinstance(Image.OPEN[fmt][0], type)
                  and issubclass(Image.OPEN[fmt][0], ImageFile.StubImageFile))}


def list_images(root: str) -> list[str]:
  """Sorted paths of the image files under `root` (recursive, hidden files and folders left
  out); a one-line error when `root` is not a directory or holds no image file."""
  if not os.path.isdir(root):
    raise errors.UserError(f"--images {root}: " + ("is a file, not a directory"
                                                   if os.path.exists(root) else "no such directory"))
  exts = image_extensions()
  paths = []
  for folder, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    paths += [os.path.join(folder, f) for f in files
              if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts]
  if not paths:
    raise errors.UserError(f"--images {root}: no image files found (looked for "
                           f"{', '.join(sorted(exts)[:6])}, ... in it and its subfolders)")
  return sorted(paths)


def read_image(path: str) -> tuple[bytes, np.ndarray, str] | None:
  """(file bytes, uint8 RGB [H, W, 3], PIL format name) of an image file; None when it cannot be
  read or decoded."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as im:
      fmt = im.format or ""
    return data, wds.decode_image(data), fmt
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, wds.SkipSample):
    return None


def read_captions(path: str, root: str) -> dict[str, str]:
  """{absolute image path: caption} from a JSON-lines file of {"path": ..., "caption": ...}."""
  captions = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.UserError(f"--captions {path} line {number}: not JSON ({e.msg})") from e
      if not (isinstance(row, dict) and isinstance(row.get("path"), str)
              and isinstance(row.get("caption"), str)):
        raise errors.UserError(f"--captions {path} line {number}: expected "
                               '{"path": "...", "caption": "..."}')
      captions[os.path.abspath(os.path.join(root, row["path"]))] = row["caption"]
  return captions


def _write_shard(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
  tmp = path + ".tmp"
  try:
    with tarfile.open(tmp, "w") as tar:
      for key, members in samples:
        wds.add_members(tar, key, members)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def make_shards(images: str, out_dir: str, *, captions: str | None = None,
                shard_size: int = 10000, overwrite: bool = False) -> dict[str, Any]:
  """Writes the images under `images` as shards in `out_dir` (see the module doc); returns
  {shards: [paths], samples, skipped, uncaptioned}."""
  if shard_size < 1:
    raise errors.UserError(f"--shard_size must be >= 1, got {shard_size}")
  paths = list_images(images)
  by_path = read_captions(captions, images) if captions else {}
  if os.path.isdir(out_dir) and any(f.endswith(".tar") for f in os.listdir(out_dir)):
    if not overwrite:
      raise errors.OutputExists(out_dir, what="--out directory (it holds .tar shards)")
    for f in os.listdir(out_dir):
      if f.endswith(".tar"):
        os.remove(os.path.join(out_dir, f))
  os.makedirs(out_dir, exist_ok=True)
  width = len(str(shard_size - 1))
  shards: list[str] = []
  pending: list[tuple[str, dict[str, bytes]]] = []
  skipped = uncaptioned = 0

  def flush():
    shards.append(os.path.join(out_dir, f"{len(shards):05d}.tar"))
    _write_shard(shards[-1], pending)
    pending.clear()

  for path in paths:
    read = read_image(path)
    if read is None:
      skipped += 1
      continue
    data, array, fmt = read
    caption = by_path.get(os.path.abspath(path))
    if not (caption or "").strip():  # none given (or empty): the file name's stem
      uncaptioned += 1
      caption = os.path.splitext(os.path.basename(path))[0]
    ext = KEPT_FORMATS.get(fmt)
    if ext is None:
      data, ext = wds.encode_image(array, "png"), "png"
    key = f"{len(shards):05d}{len(pending):0{width}d}"
    meta = {"key": key, "url": os.path.relpath(path, images), "caption": caption,
            "width": int(array.shape[1]), "height": int(array.shape[0])}
    pending.append((key, {ext: data, "txt": caption.encode("utf-8"),
                          "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}))
    if len(pending) == shard_size:
      flush()
  if pending:
    flush()
  if not shards:
    raise errors.UserError(f"--images {images}: none of its {len(paths)} image files could be "
                           "decoded")
  return {"shards": shards, "samples": len(paths) - skipped, "skipped": skipped,
          "uncaptioned": uncaptioned if captions else 0}


def main(argv: Sequence[str] | None = None) -> int:
  p = errors.ArgumentParser(prog="python -m zoo.data.make_shards", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", required=True, help="folder of images (read recursively)")
  p.add_argument("--captions", default=None,
                 help='JSON lines {"path": ..., "caption": ...} (default: the file stems)')
  p.add_argument("--out", required=True, help="output directory for 00000.tar, ...")
  p.add_argument("--shard_size", type=int, default=10000, help="samples per shard")
  p.add_argument("--overwrite", action="store_true", help="replace the .tar shards in --out")
  args = p.parse_args(argv)
  if args.captions and not os.path.isfile(args.captions):
    raise errors.UserError(f"--captions {args.captions}: no such file")
  totals = make_shards(args.images, args.out, captions=args.captions,
                       shard_size=args.shard_size, overwrite=args.overwrite)
  extra = (f", {totals['uncaptioned']} without a caption in {args.captions} (file stem used)"
           if totals["uncaptioned"] else "")
  print(f"make_shards: {totals['samples']} images in {len(totals['shards'])} shards -> "
        f"{args.out} ({totals['skipped']} unreadable file(s) skipped{extra})")
  return 0


if __name__ == "__main__":
  sys.exit(errors.run(main, prog="python -m zoo.data.make_shards"))
