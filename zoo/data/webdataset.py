"""WebDataset tar shards in img2dataset's layout, as a grain random-access source.

A sample is the members sharing a key (the member path up to the first dot of its basename):
`KEY.jpg` (.jpeg / .png / .webp), `KEY.txt`, optionally alternative captions `KEY.txt_1`, ...,
`KEY.json` and `KEY.NAME.npy` arrays (e.g. cached teacher embeddings). `TarShardSource` indexes
each shard's members once (names, offsets, sizes) and reads a sample with `os.pread`, so any
sample can be fetched in any order by any thread (what grain's global shuffle and exact resume
need). `decode_sample` turns raw bytes into the pipeline's sample dict and raises `SkipSample`
for corrupt images and missing / unreadable / empty captions (counted, then skipped). KEY.json
may carry `short_caption`, `label`, `captions` ({lang: caption}, or a list of alternative
captions) and `regions`: `[{"bbox": [x0, y0, x1, y1], "caption": str}]`, normalized boxes.
`write_shards(samples, out_dir, samples_per_shard)` writes such shards (tests, demos).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import threading
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_ALT_CAPTION = re.compile(r"txt_(\d+)")


class SkipSample(Exception):
  """A sample that cannot be used (corrupt image, bad caption); `reason` names the cause."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


# ----------------------------------------------------------------------------- shard lists


def expand_shards(shards: str | Sequence[str]) -> list[str]:
  """Shard paths from a glob, a comma-separated list of globs, or a list; sorted, deduplicated.

  A brace range `{000000..000009}` (WebDataset style) is expanded too.
  """
  if isinstance(shards, str):
    patterns = [p.strip() for p in shards.split(",") if p.strip()]
  else:
    patterns = [str(p) for p in shards]
  paths: list[str] = []
  for pattern in patterns:
    for expanded in _expand_braces(pattern):
      matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
      if not matches:
        raise FileNotFoundError(f"webdataset shards: pattern {expanded!r} matches no file")
      paths.extend(matches)
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"webdataset shard {p!r} does not exist")
  if not paths:
    raise ValueError("webdataset shards: no shard given (set data.shards to a glob or a list)")
  return sorted(dict.fromkeys(paths))


def _expand_braces(pattern: str) -> list[str]:
  start = pattern.find("{")
  end = pattern.find("}", start)
  if start < 0 or end < 0 or ".." not in pattern[start:end]:
    return [pattern]
  lo, hi = pattern[start + 1:end].split("..")
  width = len(lo)
  rest = _expand_braces(pattern[end + 1:])
  return [f"{pattern[:start]}{i:0{width}d}{r}" for i in range(int(lo), int(hi) + 1) for r in rest]


def host_shards(shards: Sequence[str], process_index: int, process_count: int) -> list[str]:
  """The shards host `process_index` reads: every `process_count`-th one (disjoint, covering)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  if len(shards) < process_count:
    raise ValueError(f"{len(shards)} webdataset shards cannot be split over {process_count} "
                     "hosts; write at least one shard per host")
  return list(shards[process_index::process_count])


# ----------------------------------------------------------------------------- source


def split_key(name: str) -> tuple[str, str] | None:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'); None for names without an extension."""
  dirname, base = os.path.split(name)
  if "." not in base or base.startswith("."):
    return None
  stem, ext = base.split(".", 1)
  return os.path.join(dirname, stem) if dirname else stem, ext.lower()


def index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
  """[(key, {ext: (data offset, size)})] of the regular members of one tar shard, in order."""
  samples: dict[str, dict[str, tuple[int, int]]] = {}
  try:
    with tarfile.open(path, "r:") as tar:
      for member in tar:
        if not member.isfile():
          continue
        parts = split_key(member.name)
        if parts is None:
          continue
        key, ext = parts
        samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
  except tarfile.ReadError as e:
    # A shard cut short still yields the members before the damage.
    if not samples:
      raise ValueError(f"webdataset shard {path!r} is not a readable tar file: {e}") from e
  return list(samples.items())


class TarShardSource:
  """grain RandomAccessDataSource over the samples of a list of tar shards.

  `source[i]` -> {"__key__": str, "__shard__": str, ext: bytes, ...}.
  """

  def __init__(self, shards: Sequence[str]):
    self.shards = list(shards)
    if not self.shards:
      raise ValueError("TarShardSource needs at least one shard")
    self._entries: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
    for shard_id, path in enumerate(self.shards):
      for key, members in index_shard(path):
        self._entries.append((shard_id, key, members))
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._entries)

  def _fd(self, shard_id: int) -> int:
    fd = self._fds.get(shard_id)
    if fd is None:
      with self._lock:
        fd = self._fds.get(shard_id)
        if fd is None:
          fd = os.open(self.shards[shard_id], os.O_RDONLY)
          self._fds[shard_id] = fd
    return fd

  def __getitem__(self, index: int) -> dict[str, Any]:
    shard_id, key, members = self._entries[int(index)]
    fd = self._fd(shard_id)
    out: dict[str, Any] = {"__key__": key, "__shard__": self.shards[shard_id]}
    for ext, (offset, size) in members.items():
      out[ext] = os.pread(fd, size, offset)
    return out

  def close(self) -> None:
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass

  def __getstate__(self):  # file descriptors do not travel to worker processes
    state = dict(self.__dict__)
    state["_fds"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"TarShardSource({len(self.shards)} shards, {len(self)} samples)"


# ----------------------------------------------------------------------------- decoding


def decode_pil(data: bytes, load: bool = True) -> Image.Image:
  """RGB PIL image from encoded bytes (fully decoded); raises SkipSample for anything PIL cannot
  decode. With load=False only the header is read (the caller may `Image.draft` first, then
  `load_pil`)."""
  try:
    im = Image.open(io.BytesIO(data))  # an in-memory file: nothing to close
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise SkipSample("corrupt_image", str(e)) from e
  return load_pil(im) if load else im


def load_pil(im: Image.Image) -> Image.Image:
  """`im` decoded in full (a truncated file fails here) and in RGB; raises SkipSample."""
  try:
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise SkipSample("corrupt_image", str(e)) from e


def decode_image(data: bytes) -> np.ndarray:
  """uint8 RGB [H, W, 3] from encoded bytes; raises SkipSample for anything PIL cannot decode."""
  return np.asarray(decode_pil(data))


def _text(data: bytes, what: str) -> str:
  try:
    text = data.decode("utf-8").strip()
  except UnicodeDecodeError as e:
    raise SkipSample(f"unreadable_{what}", str(e)) from e
  if not text:
    raise SkipSample(f"empty_{what}")
  return text


def first_sentence(text: str) -> str:
  """The text up to and including its first sentence end ('.', '!', '?', '。'), else all of it."""
  for i, ch in enumerate(text):
    if ch in ".!?。" and (i + 1 == len(text) or text[i + 1].isspace() or ch == "。"):
      return text[:i + 1].strip()
  return text.strip()


def alternative_captions(raw: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
  """`KEY.txt_1`, `KEY.txt_2`, ... (numeric order) then a `captions` list in KEY.json; empty or
  undecodable alternatives are dropped (the sample keeps its primary caption)."""
  numbered = sorted((int(m.group(1)), ext) for ext in raw
                    if isinstance(ext, str) and (m := _ALT_CAPTION.fullmatch(ext)))
  texts = []
  for _, ext in numbered:
    try:
      texts.append(_text(raw[ext], "caption"))
    except SkipSample:
      continue
  listed = meta.get("captions")
  if isinstance(listed, list):
    texts += [str(t).strip() for t in listed if isinstance(t, str) and t.strip()]
  return texts


def decode_arrays(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{NAME: array} of the `KEY.NAME.npy` members (numpy format, never unpickled)."""
  arrays = {}
  for ext, data in raw.items():
    if isinstance(ext, str) and ext.endswith(".npy"):
      try:
        arrays[ext[:-4]] = np.load(io.BytesIO(data), allow_pickle=False)
      except (ValueError, OSError, EOFError) as e:
        raise SkipSample("unreadable_array", f"{raw.get('__key__')}.{ext}: {e}") from e
  return arrays


def decode_sample(raw: Mapping[str, Any], pil: bool | str = False) -> dict[str, Any]:
  """Raw tar members -> sample dict (image: uint8 [H, W, 3], or with `pil` the RGB PIL image,
  with pil="lazy" the PIL image with only its header read (`decode_pil(load=False)`);
  caption(s), long/short caption, label, regions, ml, arrays).

  `captions` is the primary caption followed by its alternatives (`alternative_captions`);
  `arrays` holds the `KEY.NAME.npy` members. Raises SkipSample (reason: missing_image,
  corrupt_image, missing_caption, empty_caption, unreadable_caption, unreadable_json,
  unreadable_array) for samples that cannot be used.
  """
  image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
  if image_ext is None:
    raise SkipSample("missing_image", str(raw.get("__key__")))
  if "txt" not in raw:
    raise SkipSample("missing_caption", str(raw.get("__key__")))
  text = _text(raw["txt"], "caption")
  meta: dict[str, Any] = {}
  if "json" in raw:
    try:
      meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SkipSample("unreadable_json", str(e)) from e
    if not isinstance(meta, dict):
      raise SkipSample("unreadable_json", "KEY.json is not an object")
  image = (decode_pil(raw[image_ext], load=pil != "lazy") if pil
           else decode_image(raw[image_ext]))
  sample: dict[str, Any] = {
      "key": raw.get("__key__", ""),
      "image": image,
      "caption": text,
      "long_caption": text,
      "short_caption": str(meta.get("short_caption") or first_sentence(text)),
      "label": int(meta["label"]) if isinstance(meta.get("label"), (int, np.integer)) else -1,
      "captions": [text] + alternative_captions(raw, meta),
      "arrays": decode_arrays(raw),
  }
  regions = meta.get("regions") or []
  boxes, region_captions, region_labels = [], [], []
  for r in regions if isinstance(regions, list) else []:
    if not isinstance(r, Mapping) or "bbox" not in r or not r.get("caption"):
      continue  # a malformed region is dropped, the sample is kept
    try:
      box = np.asarray(r["bbox"], np.float32).reshape(-1)
    except (TypeError, ValueError):
      continue
    if box.shape != (4,) or not np.all(np.isfinite(box)):
      continue
    boxes.append(box)
    region_captions.append(str(r["caption"]))
    region_labels.append(int(r["label"]) if isinstance(r.get("label"), int) else -1)
  sample["boxes"] = np.stack(boxes) if boxes else np.zeros((0, 4), np.float32)
  sample["region_captions"] = region_captions
  sample["region_labels"] = np.asarray(region_labels, np.int32)
  captions = meta.get("captions")
  sample["captions_ml"] = ({str(k): str(v) for k, v in captions.items() if v}
                           if isinstance(captions, Mapping) else {})
  return sample


# ----------------------------------------------------------------------------- writer


def encode_image(image: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(
      buf, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper(),
      **({"quality": quality} if fmt in ("jpg", "jpeg") else {}))
  return buf.getvalue()


def encode_array(array: np.ndarray) -> bytes:
  """A `KEY.NAME.npy` member: numpy's format, no pickles."""
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  return buf.getvalue()


def add_members(tar: tarfile.TarFile, key: str, members: Mapping[str, bytes]) -> None:
  """Appends one sample's members as `KEY.ext` (mtime 0: reproducible shards)."""
  for ext, data in members.items():
    info = tarfile.TarInfo(f"{key}.{ext}")
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def sample_to_members(sample: Mapping[str, Any], image_format: str = "jpg") -> dict[str, bytes]:
  """A sample dict (demo layout) -> {ext: bytes} for one tar sample.

  `image` may be a uint8 array or already-encoded bytes; `caption` (or `long_caption` when
  `caption_field='long'`) goes to KEY.txt, the rest of a `captions` list to KEY.txt_1, ...;
  `arrays` ({NAME: array}) to KEY.NAME.npy; short caption, label, regions, multilingual
  captions go to KEY.json.
  """
  image = sample["image"]
  members = {image_format: image if isinstance(image, bytes) else encode_image(image, image_format)}
  caption = sample.get("caption", "")
  members["txt"] = caption if isinstance(caption, bytes) else str(caption).encode("utf-8")
  for i, alt in enumerate(list(sample.get("captions") or [])[1:], start=1):
    members[f"txt_{i}"] = alt if isinstance(alt, bytes) else str(alt).encode("utf-8")
  for name, array in dict(sample.get("arrays") or {}).items():
    members[f"{name}.npy"] = encode_array(array)
  meta: dict[str, Any] = {}
  if sample.get("short_caption"):
    meta["short_caption"] = sample["short_caption"]
  if "label" in sample:
    meta["label"] = int(sample["label"])
  if "boxes" in sample and len(sample["boxes"]):
    labels = sample.get("region_labels")
    meta["regions"] = [
        {"bbox": [float(v) for v in box], "caption": cap,
         **({"label": int(labels[i])} if labels is not None else {})}
        for i, (box, cap) in enumerate(zip(np.asarray(sample["boxes"]), sample["region_captions"]))]
  if sample.get("captions_ml"):
    meta["captions"] = dict(sample["captions_ml"])
  if meta:
    members["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
  return members


def write_shards(samples: Iterable[Mapping[str, Any]], out_dir: str, samples_per_shard: int = 1000,
                 *, prefix: str = "shard", image_format: str = "jpg",
                 caption_field: str = "caption") -> list[str]:
  """Writes samples as img2dataset-style tar shards `out_dir/{prefix}-000000.tar`, ...

  Keys are `{shard:06d}{i:04d}` (img2dataset's numbering). A sample may hold bytes for
  `image` / `caption` to write corrupt members on purpose. `caption_field` picks the text for
  KEY.txt (e.g. 'long_caption' for Long-CLIP data). Returns the shard paths.
  """
  if samples_per_shard < 1:
    raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
  os.makedirs(out_dir, exist_ok=True)
  paths: list[str] = []
  tar = None
  count = 0
  try:
    for i, sample in enumerate(samples):
      shard, pos = divmod(i, samples_per_shard)
      if pos == 0:
        if tar is not None:
          tar.close()
        paths.append(os.path.join(out_dir, f"{prefix}-{shard:06d}.tar"))
        tar = tarfile.open(paths[-1], "w")
      sample = dict(sample)
      if caption_field != "caption":
        sample["caption"] = sample[caption_field]
      add_members(tar, f"{shard:06d}{pos:04d}", sample_to_members(sample, image_format))
      count += 1
  finally:
    if tar is not None:
      tar.close()
  if count == 0:
    raise ValueError("write_shards: no samples given")
  return paths
