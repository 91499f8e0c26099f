"""grain input pipelines: host-local train batches with exact resume, and eval sets.

Train (`build_train_pipeline`): MapDataset.range(N).shuffle(seed).repeat() -> (position,
index) -> host slice -> load + decode + augment + tokenize (seeded by (seed, epoch, index)) ->
to_iter_dataset(threads) [-> chunks from data.worker_processes processes], and a batching
iterator (`DataIterator`, zoo.data.batches) that drops and counts unusable samples. Order and
augmentation are a pure function of (seed, step); get_state() / set_state() restore the exact
next batch. Host p reads its rows of every global batch (demo)
or its own shards (WebDataset). Batches hold the requested `fields`: FIELDS plus those of the
`field_hooks` a model family passes. Details: docs/data.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
import sys
from typing import Any, Callable, Mapping, Protocol, Sequence

import grain
import numpy as np
from absl import flags
from PIL import Image

from zoo import transforms
from zoo.data import demo as demo_lib, fewshot, webdataset as wds
from zoo.data.batches import DataIterator, Skipped, collate, pack_chunk  # noqa: F401
from zoo.data.eval_sets import (  # noqa: F401 (the eval sets stay importable from here)
    ALL_DEMO_EVAL_SETS,
    DEMO_EVAL_SETS,
    babel_set,
    build_eval_sets,
    config_value,
    demo_eval_sets,
    language_adapters,
    webdataset_retrieval_set,
)

log = logging.getLogger("zoo.data")
_cfg = config_value

Tokenizer = Callable[[list[str]], np.ndarray]

# Fields every train batch can carry (b = host batch, L = context length); families add theirs
# through field hooks.
FIELDS: dict[str, str] = {
    "image": "float32 [b, H, W, 3], random-resized-crop, normalized (uint8 pixels with "
             "data.image_dtype='uint8')",
    "image_crop": "int32 [b, 3] with data.resize='device': (height, width, flipped) of the crop "
                  "at the top-left of each uint8 `image` canvas, resized on the device",
    "tokens": "int32 [b, L], the caption (one of the sample's captions, see data.captions)",
    "label": "int32 [b], class of the primary object (-1 when unknown)",
}
DEFAULT_RATIO = (3 / 4, 4 / 3)


@dataclasses.dataclass(frozen=True)
class SampleView:
  """What a field hook sees of one sample besides the decoded sample: its RNG (draws after the
  crop, flip and caption choice), the random-resized-crop
  (`transforms.random_resized_crop_params`) of the image of size `image_hw`, the flip, the
  requested fields, the caption tokenizer, and which of `sample["captions"]` became `tokens`."""

  rng: np.random.Generator
  crop: Any
  image_hw: tuple[int, int]
  hflip: bool
  fields: tuple[str, ...]
  tokenizer: Any
  context_length: int | None
  caption_index: int = 0

  def tokenize(self, texts: list[str], field: str, tokenizer: Any = None) -> np.ndarray:
    """int32 [N, L] of `texts` with `tokenizer` (default: the pipeline's)."""
    return tokenize(tokenizer or self.tokenizer, texts, self.context_length, field)


class FieldHook(Protocol):
  """A family's batch fields: `fields` maps each field (fnmatch patterns allowed, e.g.
  "tokens_*") to its description; the call returns the fields it provides for one sample
  (raising webdataset.SkipSample for an unusable one)."""

  fields: Mapping[str, str]
  # optional `ragged`: field -> longest length, for per-sample arrays of varying length (see
  # `collate`)

  def __call__(self, sample: Mapping[str, Any], view: SampleView) -> dict[str, np.ndarray]:
    ...


def _provides(hook: FieldHook, field: str) -> bool:
  return any(fnmatch.fnmatchcase(field, pattern) for pattern in hook.fields)


def check_fields(fields: Sequence[str], hooks: Sequence[FieldHook] = ()) -> tuple[str, ...]:
  known = {**FIELDS, **{k: v for h in hooks for k, v in h.fields.items()}}
  bad = [f for f in fields if f not in FIELDS and not any(_provides(h, f) for h in hooks)]
  if bad:
    raise ValueError(f"unknown batch field(s) {bad}; the data pipeline provides "
                     f"{', '.join(known)}")
  return tuple(dict.fromkeys(fields))


def tokenize(tokenizer: Tokenizer, texts: list[str], context_length: int | None,
             field: str = "tokens") -> np.ndarray:
  """int32 [N, L] from `tokenizer(texts)`; checks the row length against `context_length`."""
  if context_length is not None:
    try:
      ids = tokenizer(texts, context_length=context_length)
    except TypeError:  # a tokenizer callable without the keyword
      ids = tokenizer(texts)
  else:
    ids = tokenizer(texts)
  ids = np.asarray(ids)
  if ids.ndim != 2 or ids.shape[0] != len(texts):
    raise ValueError(f"tokenizer for {field!r} returned shape {ids.shape} for {len(texts)} texts; "
                     "expected [N, context_length]")
  if context_length is not None and ids.shape[1] != context_length:
    raise ValueError(f"tokenizer for {field!r} gives rows of length {ids.shape[1]}, "
                     f"context_length is {context_length}; build the tokenizer with that length")
  return ids.astype(np.int32)


# ----------------------------------------------------------------------------- per-sample transform


CAPTION_MODES = ("random", "first")
# float32: normalized on the host; uint8: the pixels (4x fewer bytes to batch and move), for a
# train step that normalizes on the device (zoo.train.step.normalize_on_device).
IMAGE_DTYPES = ("float32", "uint8")
# host: PIL crops and resizes (torchvision's bytes); device: the host only crops, into a fixed
# uint8 canvas, and the train step resizes (zoo.train.step.resize_on_device).
RESIZE_MODES = ("host", "device")


def canvas_side(canvas: int, image_size: int) -> int:
  """data.resize_canvas, with 0 meaning max(512, twice the image size)."""
  return int(canvas) or max(512, 2 * int(image_size))


def with_crop_field(fields: Sequence[str], data_cfg: Any) -> tuple[str, ...]:
  """`fields` plus "image_crop" where data.resize='device' sends image canvases (the train
  step reads both)."""
  fields = tuple(fields)
  if "image" in fields and _cfg(data_cfg, "resize", "host") == "device":
    return (*fields, "image_crop")
  return fields


def choose_caption(sample: Mapping[str, Any], rng: np.random.Generator, mode: str
                   ) -> tuple[int, str]:
  """(index, text) of the caption to train on: with mode "random" one of `sample["captions"]`
  (primary + alternatives) drawn from the sample's RNG — (seed, epoch, index) fix it, so a
  resumed run draws the same one and each epoch may draw another; "first": the primary."""
  captions = sample.get("captions") or [sample["caption"]]
  if mode == "random" and len(captions) > 1:
    i = int(rng.integers(len(captions)))
    return i, str(captions[i])
  return 0, str(captions[0])


@dataclasses.dataclass
class SampleProcessor:
  """Decoded sample + per-sample RNG -> dict of numpy arrays for the requested fields."""

  fields: tuple[str, ...]
  tokenizer: Tokenizer
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  scale: tuple[float, float] = (0.9, 1.0)
  ratio: tuple[float, float] = DEFAULT_RATIO
  hflip: bool = False
  context_length: int | None = None
  hooks: tuple[FieldHook, ...] = ()
  captions: str = "random"
  image_dtype: str = "float32"  # uint8: the cropped pixels, normalized on the device
  resize: str = "host"
  jpeg_draft: bool = False  # decode JPEGs at 1/2-1/8 size where the crop allows (changes pixels)
  canvas: int = 0  # resize="device": side of the uint8 canvas (0: max(512, 2 image_size))

  def __post_init__(self):
    if self.captions not in CAPTION_MODES:
      raise ValueError(f"data.captions={self.captions!r}: expected one of {CAPTION_MODES}")
    if self.image_dtype not in IMAGE_DTYPES:
      raise ValueError(f"data.image_dtype={self.image_dtype!r}: expected one of {IMAGE_DTYPES}")
    if self.resize not in RESIZE_MODES:
      raise ValueError(f"data.resize={self.resize!r}: expected one of {RESIZE_MODES}")
    if self.resize == "device" and self.image_dtype != "uint8":
      raise ValueError("data.resize='device' sends uint8 crops to the device: set "
                       "data.image_dtype='uint8' too")
    if self.resize == "device":
      self.canvas = canvas_side(self.canvas, self.image_size)
    if self.resize == "device" and self.canvas < self.image_size:
      raise ValueError(f"data.resize_canvas={self.canvas} is smaller than the image size "
                       f"{self.image_size}")

  def __call__(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    fields = self.fields
    image = sample["image"]  # uint8 [H, W, 3], or an RGB PIL image (no copy to numpy and back)
    if isinstance(image, Image.Image):
      if image.mode != "RGB" and not _unread(image):
        raise wds.SkipSample("bad_image_array", f"PIL mode {image.mode}")
      w, h = image.size
    else:
      image = np.asarray(image)
      if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise wds.SkipSample("bad_image_array", f"shape {image.shape} dtype {image.dtype}")
      h, w = image.shape[:2]
    crop = transforms.random_resized_crop_params(rng, h, w, self.scale, self.ratio)
    flip = bool(self.hflip and rng.random() < 0.5)
    caption_index, caption = choose_caption(sample, rng, self.captions)
    if _unread(image):  # opened lazily (data.jpeg_draft): decoded now, maybe at reduced size
      image, crop, (h, w) = self.decode(image, crop, (h, w))
      sample = {**sample, "image": image}
    out: dict[str, np.ndarray] = {}
    if "image" in fields and self.resize == "device":
      out["image"], out["image_crop"] = self.crop_to_canvas(image, crop, flip)
    elif "image" in fields:
      pixels = transforms.apply_crop_resize(image, crop, self.image_size, hflip=flip)
      out["image"] = (pixels if self.image_dtype == "uint8"
                      else transforms.normalize(pixels, self.mean, self.std))
    if "tokens" in fields:
      out["tokens"] = tokenize(self.tokenizer, [caption], self.context_length, "tokens")[0]
    if "label" in fields:
      out["label"] = np.int32(sample.get("label", -1))
    if self.hooks:
      view = SampleView(rng=rng, crop=crop, image_hw=(h, w), hflip=flip, fields=fields,
                        tokenizer=self.tokenizer, context_length=self.context_length,
                        caption_index=caption_index)
      for hook in self.hooks:
        out.update(hook(sample, view))
    return out

  def decode(self, image: Image.Image, crop: tuple[int, int, int, int], hw: tuple[int, int]
             ) -> tuple[Image.Image, tuple[int, int, int, int], tuple[int, int]]:
    """(RGB image, crop, (h, w)) of a JPEG whose header only was read: with data.jpeg_draft,
    libjpeg decodes it at 1/2, 1/4 or 1/8 of its size when the crop keeps at least image_size
    pixels a side at that scale, and the crop's edges are rounded to the reduced grid."""
    top, left, ch, cw = crop
    scale = 8 if self.jpeg_draft and image.format == "JPEG" else 1
    while scale > 1 and min(ch, cw) < scale * self.image_size:
      scale //= 2
    if scale > 1:
      image.draft("RGB", (hw[1] // scale, hw[0] // scale))
    image = wds.load_pil(image)
    w2, h2 = image.size
    if (h2, w2) == tuple(hw):
      return image, crop, hw
    sy, sx = h2 / hw[0], w2 / hw[1]
    t2, l2 = round(top * sy), round(left * sx)
    b2, r2 = min(round((top + ch) * sy), h2), min(round((left + cw) * sx), w2)
    return image, (t2, l2, b2 - t2, r2 - l2), (h2, w2)

  def crop_to_canvas(self, image: Image.Image | np.ndarray, crop: tuple[int, int, int, int],
                     flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [canvas, canvas, 3], int32 (h, w, flip)) for data.resize='device': the crop's
    pixels at the top-left, zeros elsewhere. A crop larger than the canvas is resized here (as
    data.resize='host', flip included) and sent as an image_size x image_size crop, which the
    device's resize leaves unchanged."""
    top, left, h, w = (int(v) for v in crop)
    side = self.canvas
    if h > side or w > side:
      h = w = int(self.image_size)
      pixels, flip = transforms.apply_crop_resize(image, crop, h, hflip=flip), False
    else:  # a view of the crop: one copy, into the canvas
      pixels = np.asarray(image)[top:top + h, left:left + w]
    # np.empty, and the margins zeroed: np.zeros maps fresh pages for an array this size, and
    # faulting them in cost more than the rest of this function (0.9 vs 0.1 ms at 512).
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:h, :w] = pixels
    canvas[h:] = 0
    canvas[:h, w:] = 0
    return canvas, np.array([h, w, flip], np.int32)


def _unread(image: Any) -> bool:
  """A PIL image opened but not decoded yet (its tiles still pending)."""
  return isinstance(image, Image.Image) and bool(getattr(image, "tile", None))


class _Load:
  """(position, index) -> processed sample or Skipped; augmentation seeded (seed, epoch, index)."""

  def __init__(self, source, decode: Callable[[Any], Mapping[str, Any]] | None,
               processor: SampleProcessor, seed: int, epoch_size: int, stream_id: int):
    self.source, self.decode, self.processor = source, decode, processor
    self.seed, self.epoch_size, self.stream_id = int(seed), int(epoch_size), int(stream_id)

  def __call__(self, item: tuple[int, int]):
    position, index = int(item[0]), int(item[1])
    epoch = position // self.epoch_size
    rng = np.random.default_rng([self.seed, self.stream_id, epoch, index])
    raw = self.source[index]
    key = str(raw.get("__key__", raw.get("key", index))) if isinstance(raw, Mapping) else str(index)
    try:
      sample = self.decode(raw) if self.decode is not None else raw
      return self.processor(sample, rng)
    except wds.SkipSample as e:
      return Skipped(e.reason, key, str(e))


def _with_position(position: int, index: int) -> tuple[int, int]:
  return position, index


class HostSliceMapDataset(grain.MapDataset):
  """This host's share of an infinite global stream, batch by batch.

  Element k of host p is global element (k // b) * B + p * b + k % b, i.e. host p reads rows
  [p*b, (p+1)*b) of every global batch of B = b * P rows.
  """

  def __init__(self, parent: grain.MapDataset, host_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._b, self._p, self._n = int(host_batch), int(process_index), int(process_count)

  def __len__(self) -> int:
    return sys.maxsize

  def global_index(self, index: int) -> int:
    step, row = divmod(int(index), self._b)
    return step * self._b * self._n + self._p * self._b + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.global_index(index)]

  def __str__(self) -> str:
    return f"HostSliceMapDataset(b={self._b}, process={self._p}/{self._n})"


# ----------------------------------------------------------------------------- train pipeline


def _pair(value, name: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"data.{name} must be a pair (lo, hi), got {value!r}") from e
  return lo, hi


def build_train_pipeline(data_cfg: Any, *, tokenizer: Tokenizer, image_size: int,
                         mean: Sequence[float], std: Sequence[float], global_batch_size: int,
                         seed: int, process_index: int = 0, process_count: int = 1,
                         fields: Sequence[str] = ("image", "tokens"),
                         context_length: int | None = None,
                         field_hooks: Sequence[FieldHook] = ()) -> DataIterator:
  """An infinite iterator of HOST-LOCAL train batches (dicts of numpy arrays, see FIELDS).

  data_cfg keys: `name` ("demo" | "webdataset"), `size` (demo), `shards` (webdataset: glob,
  brace range, comma-separated list or list), `random_resized_crop_scale`, `num_threads`;
  optional: `random_resized_crop_ratio`, `hflip` (off by default: captions name left / right),
  `render_size` (demo), `image_dtype` (IMAGE_DTYPES), `resize` (RESIZE_MODES) and
  `resize_canvas`, `jpeg_draft` (WebDataset JPEGs decoded at reduced size where the crop
  allows), `worker_processes` (0: `num_threads` threads here; n: n processes of `num_threads`
  threads each, the same batches), `captions` ("random": each step trains on one of a sample's
  captions, drawn by the seeded data order; "first": the primary caption only).
  `field_hooks`: a model family's extra batch fields (see FieldHook), called per sample after
  the image and caption.
  """
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  b = global_batch_size // process_count
  if b < 1:
    raise ValueError(f"global batch size {global_batch_size} gives an empty host batch")
  hooks = tuple(field_hooks)
  fields = check_fields(fields, hooks)
  name = _cfg(data_cfg, "name", "demo")
  processor = SampleProcessor(
      fields=fields, tokenizer=tokenizer, image_size=int(image_size),
      mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
      scale=_pair(_cfg(data_cfg, "random_resized_crop_scale", (0.9, 1.0)), "random_resized_crop_scale"),
      ratio=_pair(_cfg(data_cfg, "random_resized_crop_ratio", DEFAULT_RATIO), "random_resized_crop_ratio"),
      hflip=bool(_cfg(data_cfg, "hflip", False)), context_length=context_length, hooks=hooks,
      captions=str(_cfg(data_cfg, "captions", "random")),
      image_dtype=str(_cfg(data_cfg, "image_dtype", "float32")),
      resize=str(_cfg(data_cfg, "resize", "host")),
      jpeg_draft=bool(_cfg(data_cfg, "jpeg_draft", False)),
      canvas=int(_cfg(data_cfg, "resize_canvas", 0) or 0))
  if name == "demo":
    size = int(_cfg(data_cfg, "size", 20000))
    source = demo_lib.DemoSource(size, "train", int(_cfg(data_cfg, "render_size", 0)) or int(image_size))
    order = grain.MapDataset.range(size).shuffle(seed=seed).repeat()
    positions = order.map_with_index(_with_position)
    host = HostSliceMapDataset(positions, b, process_index, process_count)
    ds = host.map(_Load(source, None, processor, seed, size, stream_id=0))
    description = f"demo data ({size} scenes)"
  elif name == "fewshot":  # k shots per class (zoo.data.fewshot), e.g. for prompt learning
    source = fewshot.train_source(data_cfg, int(image_size), seed)
    size = len(source)
    order = grain.MapDataset.range(size).shuffle(seed=seed).repeat()
    positions = order.map_with_index(_with_position)
    host = HostSliceMapDataset(positions, b, process_index, process_count)
    ds = host.map(_Load(source, None, processor, seed, size, stream_id=0))
    description = (f"{len(source.classes)} classes x {_cfg(data_cfg, 'shots', 16)} shots of "
                   f"{source.data.name} ({size} images)")
  elif name == "webdataset":
    shards = _cfg(data_cfg, "shards", "")
    if not shards:
      raise ValueError("data.name='webdataset' needs data.shards (a glob or list of .tar files)")
    mine = wds.host_shards(wds.expand_shards(shards), process_index, process_count)
    source = wds.TarShardSource(mine)
    if len(source) == 0:
      raise ValueError(f"webdataset shards {mine} hold no samples")
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
    # stream_id = process_index: hosts read different shards, so their RNG streams differ.
    ds = order.map_with_index(_with_position).map(
        _Load(source, functools.partial(wds.decode_sample,
                                        pil="lazy" if processor.jpeg_draft else True),
              processor, seed, len(source), stream_id=process_index))
    size = len(source)
    description = f"webdataset shards {mine[0]}.. ({len(mine)} shards, {size} samples on this host)"
  else:
    raise ValueError(f"unknown data.name {name!r}; expected 'demo', 'webdataset' or 'fewshot'")
  threads = int(_cfg(data_cfg, "num_threads", 2))
  processes = int(_cfg(data_cfg, "worker_processes", 0))
  if processes < 0:
    raise ValueError(f"data.worker_processes={processes}: expected 0 (threads in this process) "
                     "or the number of worker processes")
  # With worker processes, process k of n loads elements k, k+n, ... (grain's mp_prefetch, each
  # with `num_threads` threads) and this process reads them round-robin: the same stream.
  # They send chunks of `chunk` consecutive elements (`pack_chunk`: one message, not one per
  # sample), which the DataIterator unpacks.
  chunk = min(16, b) if processes else 1
  buffer = max(2 * b // (processes * chunk), 2) if processes else max(2 * b, 16)
  read = grain.ReadOptions(num_threads=max(threads, 0), prefetch_buffer_size=buffer)
  if processes:
    ds = ds.batch(chunk, batch_fn=pack_chunk)
  it_ds = ds.to_iter_dataset(read)
  if processes:
    if not flags.FLAGS.is_parsed():  # grain's worker processes read its absl flags' defaults
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=processes, per_worker_buffer_size=max(b // (processes * chunk), 1)))
  log.info("data: %s, host %d/%d, host batch %d, fields %s", description, process_index,
           process_count, b, ",".join(fields))
  ragged = {k: n for h in hooks for k, n in getattr(h, "ragged", {}).items() if k in fields}
  return DataIterator(it_ds, b, max_consecutive_skips=max(1000, 2 * size), description=description,
                      ragged=ragged, processes=processes, chunk=chunk)
