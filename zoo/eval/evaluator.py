"""Zero-shot classification and image<->text retrieval, as open_clip / CLIP_benchmark do them.

* Embeddings are L2-normalized float32; a model whose features are not finite is refused
  (`NonFiniteError`), not scored.
* Zero-shot classifier: per class, normalize each template's text embedding, average over the
  templates, re-normalize. Logits are `100 * image_features @ classifier`.
* Ranking ties are broken by index (lower index ranks first), i.e. the order of a stable
  descending sort; `top1` therefore agrees with `np.argmax`. NaN scores rank last.
* Retrieval: `image_retrieval_recall@k` = a text query finds one of its images in its top k;
  `text_retrieval_recall@k` = an image query finds any of its positive texts in its top k.

`BUILTIN_KINDS` are the eval-set kinds defined here (spec format: zoo.eval.suite.evaluate).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from zoo.models import sharding

Tokenizer = Callable[[list[str]], Any]
Template = str | Callable[[str], str]
Evaluator = Callable[..., dict[str, float]]

BATCH_AXES = sharding.BATCH_AXES  # mesh axes the eval batch is sharded over, as in training
ZERO_SHOT_LOGIT_SCALE = 100.0


class NonFiniteError(ValueError):
  """The model produced NaN / inf features: its weights are broken (e.g. a diverged run)."""


def _progress_bar(total: int, desc: str):
  if jax.process_index() != 0 or total < 2:
    return None
  # disable=None: only on a terminal (redrawing a nested bar in a log file adds blank lines).
  return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5,
              disable=None)


# ----------------------------------------------------------------------------- encoding


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_batch(graphdef: nnx.GraphDef, state: nnx.State, batch: Any, method: str) -> jax.Array:
  """One fixed-shape batch through `model.<method>`, L2-normalized in float32."""
  model = nnx.merge(graphdef, state)
  x = getattr(model, method)(batch, normalize=False).astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"mesh axes {mesh.axis_names} contain none of the batch axes {BATCH_AXES}; "
                     "build the mesh with zoo.models.sharding.make_mesh")
  return axes


def _place_state(state: nnx.State, mesh: Mesh) -> nnx.State:
  """Keeps leaves already laid out on `mesh`'s devices; replicates the others over the mesh."""
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and x.sharding.device_set == devices:
      return x
    return jax.device_put(x, replicated)

  return jax.tree.map(place, state)


def _leading_dim(inputs: Any, what: str) -> int:
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError(f"{what}: no arrays given")
  sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(f"{what}: every array needs the same leading (batch) dimension, got "
                     f"shapes {[np.shape(x) for x in leaves]}")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"{what}: empty batch (leading dimension 0)")
  return n


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Pads the leading dim to `rows` by repeating the last row (real data: no NaNs, no masks)."""
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)], axis=0)


def _to_numpy(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def encode_batched(model: nnx.Module, inputs: Any, method: str, *, batch_size: int = 256,
                   mesh: Mesh | None = None) -> np.ndarray:
  """`model.<method>(batch, normalize=False)` over `inputs` in fixed-size batches -> float32 [N, E].

  `inputs` is an array or a pytree of arrays sharing the leading dimension N (e.g. a dict of
  token ids and attention mask). The model is split once; one jitted pure function runs every
  batch, and the last batch is padded to the same shape, so it compiles once per (model, batch
  shape). With `mesh`, the batch is sharded over its batch axes (those of `BATCH_AXES`, i.e.
  "data", "expert", "fsdp", that the mesh has) and the batch size is rounded up to a multiple of
  their device count; parameters not yet on the mesh are replicated over it. Multi-host runs
  need `mesh` and the full `inputs` on every host. Outputs are L2-normalized.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  inputs = jax.tree.map(np.asarray, inputs)
  n = _leading_dim(inputs, f"{type(model).__name__}.{method} inputs")
  graphdef, state = nnx.split(model)
  if mesh is None:
    shards, batch_sharding = 1, None
  else:
    axes = _batch_axes(mesh)
    shards = math.prod(mesh.shape[a] for a in axes)
    batch_sharding = NamedSharding(mesh, P(axes))
    state = _place_state(state, mesh)
  # Small sets are not padded up to a large batch_size; either way a multiple of the shards.
  bs = -(-min(batch_size, n) // shards) * shards

  def put(batch):
    if batch_sharding is None:
      return batch
    # Each process fills its own shards from its (full, identical) host copy: multi-host safe.
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, batch_sharding, lambda idx, a=a: a[idx]),
        batch)

  outputs = []
  bar = _progress_bar(-(-n // bs), f"{method.replace('_', ' ')}s ({n})")
  try:
    for start in range(0, n, bs):
      chunk = jax.tree.map(lambda a: _pad_rows(a[start:start + bs], bs), inputs)
      outputs.append((_encode_batch(graphdef, state, put(chunk), method), min(bs, n - start)))
      if bar is not None:
        bar.update(1)
    feats = np.concatenate([_to_numpy(out)[:valid] for out, valid in outputs], axis=0)
  finally:
    if bar is not None:
      bar.close()
  finite = np.isfinite(feats).all(axis=1)
  if not finite.all():
    raise NonFiniteError(f"{type(model).__name__}.{method} gave non-finite features for "
                         f"{int((~finite).sum())} of {n} inputs: the model's weights are NaN/inf "
                         "(a diverged run?); refusing to score it")
  return feats


def encode_images(model: nnx.Module, images: np.ndarray, batch_size: int = 256,
                  mesh: Mesh | None = None) -> np.ndarray:
  """Preprocessed NHWC images -> L2-normalized float32 [N, E] numpy (see `encode_batched`)."""
  if np.ndim(images) != 4:
    raise ValueError(f"images: expected [N, H, W, C], got shape {np.shape(images)}")
  return encode_batched(model, images, "encode_image", batch_size=batch_size, mesh=mesh)


def encode_texts(model: nnx.Module, tokens: Any, batch_size: int = 1024,
                 mesh: Mesh | None = None) -> np.ndarray:
  """Token ids int32 [N, L] (or a pytree of such arrays) -> L2-normalized float32 [N, E]."""
  if isinstance(tokens, (np.ndarray, jax.Array)) and np.ndim(tokens) != 2:
    raise ValueError(f"tokens: expected [N, L] token ids, got shape {np.shape(tokens)}")
  return encode_batched(model, tokens, "encode_text", batch_size=batch_size, mesh=mesh)


# ----------------------------------------------------------------------------- zero-shot


def format_template(template: Template, class_name: str) -> str:
  """Fills a prompt template: `{}` or `{c}` placeholders, or a callable `class_name -> str`."""
  if callable(template):
    return template(class_name)
  if "{}" not in template and "{c}" not in template:
    raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name")
  return template.replace("{c}", class_name).replace("{}", class_name)


def zero_shot_classifier(model: nnx.Module, tokenizer: Tokenizer, class_names: Sequence[str],
                         templates: Sequence[Template], *, batch_size: int = 1024,
                         mesh: Mesh | None = None) -> np.ndarray:
  """Class-name x template prompts -> zero-shot weights float32 [E, C].

  Per class: each template's text embedding normalized, averaged over templates, re-normalized.
  """
  if not class_names:
    raise ValueError("class_names is empty")
  if not templates:
    raise ValueError("templates is empty")
  texts = [format_template(t, c) for c in class_names for t in templates]
  emb = encode_texts(model, tokenizer(texts), batch_size=batch_size, mesh=mesh)
  if emb.shape[0] != len(texts):
    raise ValueError(f"tokenizer returned {emb.shape[0]} rows for {len(texts)} prompts")
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  return np.ascontiguousarray(emb.T.astype(np.float32))


def stable_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Rank of column targets[i] in row i of `scores` under a stable descending sort, [Q];
  NaN scores rank last: a NaN never outranks a number, and a NaN target score gets rank
  C (= the number of columns), so it is no hit at any k.

  rank = #(scores > target score) + #(scores == target score at a lower index).
  """
  t = np.take_along_axis(scores, targets[:, None], axis=1)
  lower = np.arange(scores.shape[1])[None, :] < targets[:, None]
  ranks = (scores > t).sum(axis=1) + ((scores == t) & lower).sum(axis=1)
  return np.where(np.isnan(t[:, 0]), scores.shape[1], ranks)


def zero_shot_metrics(image_features: np.ndarray, labels: np.ndarray, classifier: np.ndarray, *,
                      logit_scale: float = ZERO_SHOT_LOGIT_SCALE) -> dict[str, float]:
  """Top-1, top-5 (top-min(5, C)) accuracy and mean per-class recall of `scale * img @ W`.

  Mean per-class recall averages the recall of the classes present in `labels` (balanced
  accuracy, as CLIP_benchmark / sklearn compute it).
  """
  image_features = np.asarray(image_features, np.float32)
  classifier = np.asarray(classifier, np.float32)
  labels = np.asarray(labels)
  if image_features.ndim != 2 or classifier.ndim != 2 or image_features.shape[1] != classifier.shape[0]:
    raise ValueError(f"image_features [N, E] and classifier [E, C] do not fit: "
                     f"{image_features.shape} vs {classifier.shape}")
  num_classes = classifier.shape[1]
  if labels.shape != (image_features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels: expected int [{image_features.shape[0]}], got {labels.dtype} {labels.shape}")
  if labels.size == 0:
    raise ValueError("zero_shot_metrics: no images")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  logits = logit_scale * (image_features @ classifier)
  ranks = stable_ranks(logits, labels.astype(np.int64))
  correct = ranks == 0
  present = np.unique(labels)
  recalls = [correct[labels == c].mean() for c in present]
  return {
      "top1": float(correct.mean()),
      "top5": float((ranks < min(5, num_classes)).mean()),
      "mean_per_class_recall": float(np.mean(recalls)),
  }


# ----------------------------------------------------------------------------- retrieval


def _best_positive_ranks(scores: np.ndarray, positives: list[list[int]],
                         chunk: int = 1024) -> np.ndarray:
  """Per query row, the best (smallest) stable rank among its positive columns, [Q]."""
  q = scores.shape[0]
  width = max(len(p) for p in positives)
  pos = np.array([list(p) + [p[0]] * (width - len(p)) for p in positives], np.int64)  # pad: repeat
  best = np.empty(q, np.int64)
  for s in range(0, q, chunk):  # bounded memory for large query sets
    block, pb = scores[s:s + chunk], pos[s:s + chunk]
    ranks = np.stack([stable_ranks(block, pb[:, j]) for j in range(width)], axis=1)
    best[s:s + chunk] = ranks.min(axis=1)
  return best


def retrieval_metrics(image_features: np.ndarray, text_features: np.ndarray,
                      image_to_texts: Sequence[Sequence[int]],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Image<->text recall@k (CLIP_benchmark): a query is a hit if any positive is in its top k.

  `image_retrieval_recall@k`: text queries ranking images; `text_retrieval_recall@k`: image
  queries ranking texts. `image_to_texts[i]` lists the texts describing image i.
  """
  img = np.asarray(image_features, np.float32)
  txt = np.asarray(text_features, np.float32)
  if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
    raise ValueError(f"image_features [N, E] and text_features [T, E] do not fit: {img.shape} vs {txt.shape}")
  n, t = img.shape[0], txt.shape[0]
  if len(image_to_texts) != n:
    raise ValueError(f"image_to_texts has {len(image_to_texts)} entries for {n} images")
  text_to_images: list[list[int]] = [[] for _ in range(t)]
  for i, texts in enumerate(image_to_texts):
    if len(texts) == 0:
      raise ValueError(f"image_to_texts[{i}] is empty: every image needs at least one text")
    for j in texts:
      if not 0 <= int(j) < t:
        raise ValueError(f"image_to_texts[{i}] holds text index {j}, outside [0, {t})")
      text_to_images[int(j)].append(i)
  orphans = [j for j, imgs in enumerate(text_to_images) if not imgs]
  if orphans:
    raise ValueError(f"texts {orphans[:10]} belong to no image in image_to_texts")
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
  scores = txt @ img.T  # [T, N]
  image_ranks = _best_positive_ranks(scores, text_to_images)
  text_ranks = _best_positive_ranks(np.ascontiguousarray(scores.T), [list(map(int, p)) for p in image_to_texts])
  out = {}
  for k in ks:
    out[f"image_retrieval_recall@{k}"] = float((image_ranks < k).mean())
    out[f"text_retrieval_recall@{k}"] = float((text_ranks < k).mean())
  return out


# ----------------------------------------------------------------------------- dispatch


def _require(spec: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
  missing = [k for k in keys if k not in spec]
  if missing:
    raise ValueError(f"eval set {where} misses keys {missing}; it has {sorted(spec)}")


def eval_zeroshot(model: nnx.Module, spec: Mapping[str, Any], tokenizer: Tokenizer, *,
                  mesh: Mesh | None = None, batch_size: int = 256) -> dict[str, float]:
  """Zero-shot classification of `spec["images"]` against `class_names` x `templates`."""
  _require(spec, ("images", "labels", "class_names", "templates"), "'zeroshot'")
  classifier = zero_shot_classifier(model, tokenizer, spec["class_names"], spec["templates"],
                                    batch_size=max(batch_size, 1024), mesh=mesh)
  feats = encode_images(model, spec["images"], batch_size=batch_size, mesh=mesh)
  return zero_shot_metrics(feats, spec["labels"], classifier)


def eval_retrieval(model: nnx.Module, spec: Mapping[str, Any], tokenizer: Tokenizer, *,
                   mesh: Mesh | None = None, batch_size: int = 256) -> dict[str, float]:
  """Image<->caption retrieval recall@{1,5,10} (or `spec["ks"]`)."""
  _require(spec, ("images", "captions", "image_to_captions"), "'retrieval'")
  img = encode_images(model, spec["images"], batch_size=batch_size, mesh=mesh)
  txt = encode_texts(model, tokenizer(list(spec["captions"])), batch_size=max(batch_size, 1024), mesh=mesh)
  return retrieval_metrics(img, txt, spec["image_to_captions"], ks=spec.get("ks", (1, 5, 10)))


def eval_benchmark(model: nnx.Module, spec: Mapping[str, Any], tokenizer: Tokenizer, *,
                   mesh: Mesh | None = None, batch_size: int = 256) -> dict[str, float]:
  """A benchmark by name (zoo.data.eval_sets.benchmark_eval_sets), streamed: `spec["chunks"]()`
  yields (images, labels) for task zeroshot_classification, (images, caption lists) for
  zeroshot_retrieval; image features are kept, not images. A set with no image is an error."""
  _require(spec, ("task", "chunks"), "'benchmark'")
  feats, targets = [], []
  for images, ys in spec["chunks"]():
    feats.append(encode_images(model, images, batch_size=batch_size, mesh=mesh))
    targets.extend(ys)
  if not feats:
    raise ValueError(f"eval set {spec.get('benchmark', {}).get('dataset', '?')}: "
                     f"{spec.get('source', 'its source')} yielded no images")
  img = np.concatenate(feats)
  if spec["task"] == "zeroshot_classification":
    _require(spec, ("class_names", "templates"), "'benchmark' (classification)")
    labels = np.asarray(targets, np.int64)
    if labels.max() >= len(spec["class_names"]):
      raise ValueError(f"{spec.get('source')}: labels reach {labels.max()} but "
                       f"{len(spec['class_names'])} class names are given")
    classifier = zero_shot_classifier(model, tokenizer, spec["class_names"], spec["templates"],
                                      batch_size=max(batch_size, 1024), mesh=mesh)
    out = zero_shot_metrics(img, labels, classifier)
  else:
    captions = [c for caps in targets for c in caps]
    image_to_texts, start = [], 0
    for caps in targets:
      image_to_texts.append(list(range(start, start + len(caps))))
      start += len(caps)
    txt = encode_texts(model, tokenizer(captions), batch_size=max(batch_size, 1024), mesh=mesh)
    out = retrieval_metrics(img, txt, image_to_texts, ks=spec.get("ks", (1, 5, 10)))
  return {**out, "num_images": float(img.shape[0])}


BUILTIN_KINDS: dict[str, Evaluator] = {"zeroshot": eval_zeroshot, "retrieval": eval_retrieval,
                                       "benchmark": eval_benchmark}
