"""grain input pipelines: host-local train batches with exact resume, and eval sets.

Train (`build_train_pipeline`): a sample stream per host, built with grain's dataset API —

  MapDataset.range(N).shuffle(seed).repeat()      # global order: a pure function of (seed, epoch)
    .map_with_index(-> (position, index))
    [host slice]                                  # which positions this host reads
    .map(load + decode + augment + tokenize)      # augmentation seeded by (seed, epoch, index)
    .to_iter_dataset(ReadOptions(num_threads))    # threads; state = next position

and a thin batching iterator on top (`DataIterator`) that drops samples whose decoding failed
(corrupt image, empty caption) and counts them. Data order and augmentation are a pure
function of (seed, step), and `get_state()` / `set_state()` (JSON-able) restore the exact
next batch, skip counts included.

Host slicing:
* demo data: host p of P reads positions [s*B + p*b, s*B + (p+1)*b) of the global stream for
  step s (B global, b = B / P host batch). The global batch is therefore the same for any
  number of hosts, and every host reads only its own samples.
* WebDataset: host p reads only shards p, p+P, p+2P, ... (each host indexes and opens its own
  shards) and shuffles its own samples.

Batches are dicts of numpy arrays with the requested `fields` (see FIELDS).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from zoo import transforms
from zoo.data import demo as demo_lib
from zoo.data import webdataset as wds

log = logging.getLogger("zoo.data")

Tokenizer = Callable[[list[str]], np.ndarray]

# Fields a train batch can carry (b = host batch, L = context length, R = data.max_regions).
FIELDS: dict[str, str] = {
    "image": "float32 [b, H, W, 3], random-resized-crop, normalized",
    "tokens": "int32 [b, L], the caption",
    "long_tokens": "int32 [b, L], the long caption (Long-CLIP)",
    "short_tokens": "int32 [b, L], the short caption (Long-CLIP)",
    "label": "int32 [b], class of the primary object (-1 when unknown)",
    "boxes": "float32 [b, R, 4], normalized xyxy after the crop, zero-padded",
    "box_mask": "bool [b, R], True for real boxes",
    "region_tokens": "int32 [b, R, L], region captions, zero rows for padding",
    "region_labels": "int32 [b, R], class per region (-1 for padding / unknown)",
    "ml_tokens": "int32 [b, L], the caption in a language drawn per sample (multilingual "
                 "tokenizer: text_tokenizers['ml_tokens'])",
    "ml_lang": "int32 [b], index of that language in data.languages",
    "ml_en_tokens": "int32 [b, L], the parallel English caption (teacher tokenizer)",
    "tokens_<lang>": "int32 [b, L], the caption in language <lang> (e.g. tokens_de)",
}
_REGION_FIELDS = ("boxes", "box_mask", "region_tokens", "region_labels")
DEFAULT_RATIO = (3 / 4, 4 / 3)


def _cfg(data_cfg: Any, key: str, default: Any) -> Any:
  """data_cfg[key] for a ConfigDict / dict, `default` when absent or empty."""
  try:
    value = data_cfg.get(key, default)
  except AttributeError:
    value = getattr(data_cfg, key, default)
  return default if value is None or (isinstance(value, str) and not value) else value


def languages(data_cfg: Any) -> tuple[str, ...]:
  """The multilingual languages of a data config (`data.languages`; default: the demo's 8)."""
  langs = _cfg(data_cfg, "languages", demo_lib.LANGUAGES)
  if isinstance(langs, str):
    langs = [x.strip() for x in langs.split(",") if x.strip()]
  return tuple(langs) or demo_lib.LANGUAGES


def check_fields(fields: Sequence[str]) -> tuple[str, ...]:
  bad = [f for f in fields if f not in FIELDS and not f.startswith("tokens_")]
  if bad:
    raise ValueError(f"unknown batch field(s) {bad}; the data pipeline provides "
                     f"{', '.join(FIELDS)}")
  out = list(dict.fromkeys(fields))
  if "boxes" in out and "box_mask" not in out:
    out.append("box_mask")
  if "ml_tokens" in out and "ml_lang" not in out:
    out.append("ml_lang")
  return tuple(out)


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


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Marker for a sample that could not be used; the batching iterator counts it."""

  reason: str
  key: str
  detail: str = ""


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
  max_regions: int = 4
  min_box_visible: float = 0.5
  context_length: int | None = None
  languages: tuple[str, ...] = demo_lib.LANGUAGES
  text_tokenizers: Mapping[str, Tokenizer] = dataclasses.field(default_factory=dict)

  def _tok(self, field: str, texts: list[str]) -> np.ndarray:
    tok = self.text_tokenizers.get(field)
    if tok is None and (field.startswith("tokens_") or field == "ml_tokens"):
      tok = self.text_tokenizers.get("ml_tokens")
    return tokenize(tok or self.tokenizer, texts, self.context_length, field)

  def __call__(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    fields = self.fields
    image = np.asarray(sample["image"])
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise wds.SkipSample("bad_image_array", f"shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    crop = transforms.random_resized_crop_params(rng, h, w, self.scale, self.ratio)
    flip = bool(self.hflip and rng.random() < 0.5)
    out: dict[str, np.ndarray] = {}
    if "image" in fields:
      pixels = transforms.apply_crop_resize(image, crop, self.image_size, hflip=flip)
      out["image"] = transforms.normalize(pixels, self.mean, self.std)
    if "tokens" in fields:
      out["tokens"] = self._tok("tokens", [sample["caption"]])[0]
    if "long_tokens" in fields:
      out["long_tokens"] = self._tok("long_tokens", [sample.get("long_caption") or sample["caption"]])[0]
    if "short_tokens" in fields:
      text = sample.get("short_caption") or wds.first_sentence(sample["caption"])
      out["short_tokens"] = self._tok("short_tokens", [text])[0]
    if "label" in fields:
      out["label"] = np.int32(sample.get("label", -1))
    if any(f in fields for f in _REGION_FIELDS):
      out.update(self._regions(sample, crop, (h, w), flip))
    if "ml_tokens" in fields or "ml_en_tokens" in fields or any(f.startswith("tokens_") for f in fields):
      out.update(self._multilingual(sample, rng))
    return out

  def _regions(self, sample, crop, hw, flip) -> dict[str, np.ndarray]:
    r = self.max_regions
    boxes = np.asarray(sample.get("boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    captions = list(sample.get("region_captions", []))
    labels = np.asarray(sample.get("region_labels", np.full(len(boxes), -1)), np.int32)
    if len(captions) != len(boxes) or len(labels) != len(boxes):
      raise wds.SkipSample("bad_regions", f"{len(boxes)} boxes, {len(captions)} captions")
    moved, keep = transforms.transform_boxes(boxes, crop, hw, flip, min_visible=self.min_box_visible)
    idx = np.flatnonzero(keep)[:r]  # regions that leave the crop are dropped
    out_boxes = np.zeros((r, 4), np.float32)
    mask = np.zeros((r,), bool)
    out_labels = np.full((r,), -1, np.int32)
    out_boxes[:len(idx)] = moved[idx]
    mask[:len(idx)] = True
    out_labels[:len(idx)] = labels[idx]
    out = {"boxes": out_boxes, "box_mask": mask, "region_labels": out_labels}
    if "region_tokens" in self.fields:
      length = self.context_length or int(self._tok("region_tokens", [""]).shape[1])
      toks = np.zeros((r, length), np.int32)
      if len(idx):
        toks[:len(idx)] = self._tok("region_tokens", [captions[i] for i in idx])
      out["region_tokens"] = toks
    return {k: v for k, v in out.items() if k in self.fields}

  def _multilingual(self, sample, rng) -> dict[str, np.ndarray]:
    ml = dict(sample.get("captions_ml") or {})
    out: dict[str, np.ndarray] = {}
    if "ml_tokens" in self.fields:
      avail = [i for i, lang in enumerate(self.languages) if lang in ml]
      if not avail:
        raise wds.SkipSample("missing_language", f"none of {self.languages} in the sample")
      li = avail[int(rng.integers(len(avail)))]
      out["ml_tokens"] = self._tok("ml_tokens", [ml[self.languages[li]]])[0]
      out["ml_lang"] = np.int32(li)
    if "ml_en_tokens" in self.fields:
      out["ml_en_tokens"] = self._tok("ml_en_tokens", [ml.get("en") or sample["caption"]])[0]
    for f in self.fields:
      if f.startswith("tokens_"):
        lang = f[len("tokens_"):]
        if lang not in ml:
          raise wds.SkipSample("missing_language", lang)
        out[f] = self._tok(f, [ml[lang]])[0]
    return out


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


# ----------------------------------------------------------------------------- batching iterator


def collate(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


class DataIterator(Iterator[dict]):
  """Host-local batches from a grain sample iterator; skips and counts unusable samples.

  `skipped` is the number of samples dropped so far (in the batches returned), also by reason
  in `skipped_by_reason`. `get_state()` / `set_state()` cover the grain position and the
  counts, so a restored iterator continues exactly where the saved one was.
  """

  def __init__(self, dataset: grain.IterDataset, batch_size: int, *, max_consecutive_skips: int,
               description: str = ""):
    self._dataset = dataset
    self._it = iter(dataset)
    self.batch_size = int(batch_size)
    self._max_skips = int(max_consecutive_skips)
    self.description = description
    self.skipped = 0
    self.skipped_by_reason: dict[str, int] = {}

  def __iter__(self) -> "DataIterator":
    return self

  def _count_skip(self, item: Skipped) -> None:
    self.skipped += 1
    self.skipped_by_reason[item.reason] = self.skipped_by_reason.get(item.reason, 0) + 1
    if self.skipped <= 10 or self.skipped % 1000 == 0:
      log.warning("data: skipped sample %s (%s) — %d skipped so far", item.key,
                  item.detail or item.reason, self.skipped)

  def __next__(self) -> dict[str, np.ndarray]:
    items: list[dict] = []
    consecutive = 0
    while len(items) < self.batch_size:
      item = next(self._it)
      if isinstance(item, Skipped):
        self._count_skip(item)
        consecutive += 1
        if consecutive > self._max_skips:
          raise RuntimeError(f"data: {consecutive} samples in a row could not be used "
                             f"({self.skipped_by_reason}) in {self.description}; check the data")
        continue
      consecutive = 0
      items.append(item)
    return collate(items)

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "skipped": int(self.skipped),
            "skipped_by_reason": dict(self.skipped_by_reason)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or "grain" not in state:
      raise ValueError(f"data iterator state must be a dict with a 'grain' entry, got {state!r:.200}")
    self._it.set_state(state["grain"])
    self.skipped = int(state.get("skipped", 0))
    self.skipped_by_reason = {str(k): int(v) for k, v in dict(state.get("skipped_by_reason", {})).items()}

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


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
                         text_tokenizers: Mapping[str, Tokenizer] | None = None) -> DataIterator:
  """An infinite iterator of HOST-LOCAL train batches (dicts of numpy arrays, see FIELDS).

  data_cfg keys: `name` ("demo" | "webdataset"), `size` (demo), `shards` (webdataset: glob,
  brace range, comma-separated list or list), `random_resized_crop_scale`, `max_regions`,
  `num_threads`; optional: `random_resized_crop_ratio`, `hflip` (off by default: captions
  name left / right), `min_box_visible`, `languages`, `render_size` (demo).
  `text_tokenizers` maps a field (e.g. "ml_tokens") to its own tokenizer (multilingual
  students); other fields use `tokenizer`.
  """
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  b = global_batch_size // process_count
  if b < 1:
    raise ValueError(f"global batch size {global_batch_size} gives an empty host batch")
  fields = check_fields(fields)
  name = _cfg(data_cfg, "name", "demo")
  processor = SampleProcessor(
      fields=fields, tokenizer=tokenizer, image_size=int(image_size),
      mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
      scale=_pair(_cfg(data_cfg, "random_resized_crop_scale", (0.9, 1.0)), "random_resized_crop_scale"),
      ratio=_pair(_cfg(data_cfg, "random_resized_crop_ratio", DEFAULT_RATIO), "random_resized_crop_ratio"),
      hflip=bool(_cfg(data_cfg, "hflip", False)), max_regions=int(_cfg(data_cfg, "max_regions", 4)),
      min_box_visible=float(_cfg(data_cfg, "min_box_visible", 0.5)),
      context_length=context_length, languages=languages(data_cfg),
      text_tokenizers=dict(text_tokenizers or {}))
  if name == "demo":
    size = int(_cfg(data_cfg, "size", 20000))
    source = demo_lib.DemoSource(size, "train", int(_cfg(data_cfg, "render_size", 0)) or int(image_size))
    order = grain.MapDataset.range(size).shuffle(seed=seed).repeat()
    positions = order.map_with_index(lambda pos, idx: (pos, idx))
    host = HostSliceMapDataset(positions, b, process_index, process_count)
    ds = host.map(_Load(source, None, processor, seed, size, stream_id=0))
    description = f"demo data ({size} scenes)"
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
    ds = order.map_with_index(lambda pos, idx: (pos, idx)).map(
        _Load(source, wds.decode_sample, processor, seed, len(source), stream_id=process_index))
    size = len(source)
    description = f"webdataset shards {mine[0]}.. ({len(mine)} shards, {size} samples on this host)"
  else:
    raise ValueError(f"unknown data.name {name!r}; expected 'demo' or 'webdataset'")
  threads = int(_cfg(data_cfg, "num_threads", 2))
  read = grain.ReadOptions(num_threads=max(threads, 0), prefetch_buffer_size=max(2 * b, 16))
  it_ds = ds.to_iter_dataset(read)
  log.info("data: %s, host %d/%d, host batch %d, fields %s", description, process_index,
           process_count, b, ",".join(fields))
  return DataIterator(it_ds, b, max_consecutive_skips=max(1000, 2 * size), description=description)


# ----------------------------------------------------------------------------- eval sets

DEMO_EVAL_SETS = ("zeroshot", "retrieval")
ALL_DEMO_EVAL_SETS = ("zeroshot", "retrieval", "retrieval_long", "regions", "multilingual")


def _demo_items(split: str, size: int, render_size: int) -> list[dict]:
  src = demo_lib.DemoSource(size, split, render_size)
  return [src[i] for i in range(size)]


def _pad_regions(items: Sequence[Mapping[str, Any]], crop_fn, max_regions: int):
  n = len(items)
  boxes = np.zeros((n, max_regions, 4), np.float32)
  mask = np.zeros((n, max_regions), bool)
  labels = np.full((n, max_regions), -1, np.int32)
  captions: list[list[str]] = []
  for i, s in enumerate(items):
    h, w = np.asarray(s["image"]).shape[:2]
    moved, keep = transforms.transform_boxes(s["boxes"], crop_fn(h, w), (h, w))
    idx = np.flatnonzero(keep)[:max_regions]
    boxes[i, :len(idx)], mask[i, :len(idx)] = moved[idx], True
    labels[i, :len(idx)] = np.asarray(s["region_labels"])[idx]
    captions.append([s["region_captions"][j] for j in idx])
  return boxes, mask, labels, captions


def demo_eval_sets(data_cfg: Any, *, image_size: int, mean: Sequence[float],
                   std: Sequence[float]) -> dict[str, dict]:
  """Held-out demo eval sets (disjoint seeds from train), chosen by `data.eval_sets`.

  * zeroshot (kind "zeroshot"): images, labels, class_names, templates (English);
  * retrieval (kind "retrieval"): images, one caption each;
  * retrieval_long (kind "retrieval"): the same images with their long captions;
  * regions (kind "region_zeroshot"): images, boxes [N, R, 4], box_mask, region_labels,
    region_captions, class_names, templates — for region heads;
  * multilingual (kind "babel_zeroshot"): images, labels, and Babel-ImageNet-format
    `class_labels` / `prompts` for every demo language (upper-case codes), all 24 classes;
  * babel (kind "babel_zeroshot", when `data.babel_labels` names a Babel label file): the
    multilingual split's images scored with that file (and `data.babel_prompts`).
  """
  size = int(_cfg(data_cfg, "eval_size", 1000))
  render = int(_cfg(data_cfg, "render_size", 0)) or int(image_size)
  names = _cfg(data_cfg, "eval_sets", DEMO_EVAL_SETS)
  names = [x.strip() for x in names.split(",")] if isinstance(names, str) else list(names)
  bad = [n for n in names if n not in ALL_DEMO_EVAL_SETS]
  if bad:
    raise ValueError(f"unknown data.eval_sets {bad}; demo eval sets: {', '.join(ALL_DEMO_EVAL_SETS)}")
  pre = transforms.make_preprocess(image_size, mean, std)
  cache: dict[str, list[dict]] = {}

  def items(split):
    if split not in cache:
      cache[split] = _demo_items(split, size, render)
    return cache[split]

  def images(split):
    return pre.batch([s["image"] for s in items(split)])

  sets: dict[str, dict] = {}
  if "zeroshot" in names:
    sets["zeroshot"] = {"kind": "zeroshot", "images": images("zeroshot"),
                        "labels": np.asarray([s["label"] for s in items("zeroshot")], np.int32),
                        "class_names": demo_lib.class_names(), "templates": demo_lib.templates()}
  if "retrieval" in names or "retrieval_long" in names:
    ims = images("retrieval")
    one_each = [[i] for i in range(size)]
    if "retrieval" in names:
      sets["retrieval"] = {"kind": "retrieval", "images": ims, "image_to_captions": one_each,
                           "captions": [s["caption"] for s in items("retrieval")]}
    if "retrieval_long" in names:
      sets["retrieval_long"] = {"kind": "retrieval", "images": ims, "image_to_captions": one_each,
                                "captions": [s["long_caption"] for s in items("retrieval")]}
  if "regions" in names:
    boxes, mask, labels, caps = _pad_regions(items("regions"), pre.crop_box,
                                             int(_cfg(data_cfg, "max_regions", 4)))
    sets["regions"] = {"kind": "region_zeroshot", "images": images("regions"), "boxes": boxes,
                       "box_mask": mask, "region_labels": labels, "region_captions": caps,
                       "class_names": demo_lib.class_names(), "templates": demo_lib.templates()}
  if "multilingual" in names or _cfg(data_cfg, "babel_labels", ""):
    ml_images = images("multilingual")
    ml_labels = np.asarray([s["label"] for s in items("multilingual")], np.int32)
  if "multilingual" in names:
    # Babel-ImageNet's format, in memory: every demo language (not only the training ones)
    # names all classes.
    langs = demo_lib.LANGUAGES
    every = list(range(demo_lib.num_classes()))
    sets["multilingual"] = {
        "kind": "babel_zeroshot", "images": ml_images, "labels": ml_labels,
        "class_labels": {lang.upper(): [every, demo_lib.class_names(lang)] for lang in langs},
        "prompts": {lang.upper(): demo_lib.templates(lang) for lang in langs},
        "templates": demo_lib.templates("en")}
  if _cfg(data_cfg, "babel_labels", ""):
    sets["babel"] = babel_set(data_cfg, ml_images, ml_labels)
  return sets


def babel_set(data_cfg: Any, images: np.ndarray, labels: np.ndarray) -> dict:
  """A "babel_zeroshot" eval set over (images, labels) from Babel-ImageNet's own files:
  `data.babel_labels` (labels JSON), `data.babel_prompts` (optional prompts JSON)."""
  from zoo import eval_lib

  labels_file = _cfg(data_cfg, "babel_labels", "")
  prompts_file = _cfg(data_cfg, "babel_prompts", "")
  spec = {"kind": "babel_zeroshot", "images": images, "labels": labels,
          "class_labels": eval_lib.load_babel_labels(labels_file),
          "prompts": eval_lib.load_babel_prompts(prompts_file) if prompts_file else None}
  top = max(max(idx) for idx, _ in spec["class_labels"].values())
  if labels.size and top > int(labels.max()) and top >= 1000:
    log.warning("babel labels %s index classes up to %d; the eval images' labels reach %d",
                labels_file, top, int(labels.max()))
  return spec


def language_adapters(data_cfg: Any) -> dict[str, str]:
  """`data.language_adapters` ("AR=dir,SW=dir") -> {language: zoo.peft adapter directory}."""
  given = _cfg(data_cfg, "language_adapters", "")
  if not given:
    return {}
  if isinstance(given, Mapping):
    return {str(k): str(v) for k, v in given.items()}
  out = {}
  for item in str(given).split(","):
    lang, sep, path = item.strip().partition("=")
    if not sep or not lang or not path:
      raise ValueError(f"data.language_adapters entry {item!r}: expected LANG=adapter_directory")
    out[lang.strip()] = path.strip()
  return out


def webdataset_retrieval_set(shards: str | Sequence[str], *, image_size: int, mean: Sequence[float],
                             std: Sequence[float], max_samples: int = 0) -> dict:
  """Retrieval eval set (all samples of `shards`, every host) with eval preprocessing.

  Unusable samples are skipped; their number is in the set's `skipped` entry and logged.
  """
  source = wds.TarShardSource(wds.expand_shards(shards))
  pre = transforms.make_preprocess(image_size, mean, std)
  images, captions, skipped = [], [], 0
  for i in range(len(source)):
    if max_samples and len(images) >= max_samples:
      break
    raw = source[i]
    try:
      s = wds.decode_sample(raw)
    except wds.SkipSample as e:
      skipped += 1
      log.warning("eval data: skipped sample %s (%s)", raw.get("__key__"), e)
      continue
    images.append(pre(s["image"]))
    captions.append(s["caption"])
  source.close()
  if not images:
    raise ValueError(f"webdataset eval shards {shards!r} hold no usable sample ({skipped} skipped)")
  if skipped:
    log.warning("eval data: %d samples skipped in %s", skipped, shards)
  n = len(images)
  return {"kind": "retrieval", "images": np.stack(images), "captions": captions,
          "image_to_captions": [[i] for i in range(n)], "skipped": skipped}


def build_eval_sets(data_cfg: Any, *, tokenizer: Tokenizer | None = None, image_size: int,
                    mean: Sequence[float], std: Sequence[float]) -> dict[str, dict]:
  """Eval sets for `zoo.eval_lib.evaluate` (full sets, host-local numpy, same on every host).

  demo: the held-out sets of `demo_eval_sets` (`data.eval_sets`, default zeroshot +
  retrieval); webdataset: a retrieval set from `data.eval_shards` when given. Either way,
  `data.tfds` (a dict: name, split, data_dir, size, image_key, label_key) adds a TFDS
  zero-shot set named "tfds_<name>". The tokenizer is not needed: eval_lib tokenizes.
  """
  del tokenizer  # eval_lib tokenizes class prompts and captions itself
  name = _cfg(data_cfg, "name", "demo")
  sets: dict[str, dict] = {}
  if name == "demo":
    sets.update(demo_eval_sets(data_cfg, image_size=image_size, mean=mean, std=std))
  elif name == "webdataset":
    eval_shards = _cfg(data_cfg, "eval_shards", "")
    if eval_shards:
      sets["retrieval"] = webdataset_retrieval_set(
          eval_shards, image_size=image_size, mean=mean, std=std,
          max_samples=int(_cfg(data_cfg, "eval_size", 0)))
  else:
    raise ValueError(f"unknown data.name {name!r}; expected 'demo' or 'webdataset'")
  tfds_cfg = _cfg(data_cfg, "tfds", None)
  if tfds_cfg and _cfg(tfds_cfg, "name", ""):
    from zoo.data import tfds as tfds_lib

    tfds_name = _cfg(tfds_cfg, "name", "")
    tfds_set = tfds_lib.zero_shot_set(
        tfds_name, split=_cfg(tfds_cfg, "split", "test"), data_dir=_cfg(tfds_cfg, "data_dir", None),
        image_size=image_size, mean=mean, std=std, size=int(_cfg(tfds_cfg, "size", 0)),
        image_key=_cfg(tfds_cfg, "image_key", "image"), label_key=_cfg(tfds_cfg, "label_key", "label"))
    sets[f"tfds_{tfds_name.split('/')[0].split(':')[0]}"] = tfds_set
    if _cfg(data_cfg, "babel_labels", ""):  # Babel-ImageNet over the TFDS set (e.g. imagenet2012)
      sets["babel"] = babel_set(data_cfg, tfds_set["images"], tfds_set["labels"])
  elif name != "demo" and _cfg(data_cfg, "babel_labels", ""):
    raise ValueError("data.babel_labels needs class-indexed eval images: the demo data or a "
                     "data.tfds set (e.g. imagenet2012)")
  adapters = language_adapters(data_cfg)
  for spec in sets.values():
    if adapters and spec["kind"] == "babel_zeroshot":
      spec["adapters"] = adapters
  return sets
