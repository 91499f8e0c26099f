"""The region family's eval kinds: region zero-shot classification, region <-> caption retrieval,
grounding IoU, and the region features of the head or of a plain CLIP's baselines."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from zoo import transforms
from zoo.data import webdataset as wds
from zoo.eval import evaluator
from zoo.models import clip as clip_lib
from zoo.models.region import RegionBaselines, RegionCLIP

Array = jax.Array


REGION_METHODS = ("head", "crop", "pooled_patches")


def region_features(model: clip_lib.CLIP, images: Any, boxes: Any, *, method: str = "head",
                    batch_size: int = 256, mesh: jax.sharding.Mesh | None = None,
                    roi_size: int | None = None, crop_context: float = 1.0) -> np.ndarray:
  """L2-normalized region features [N, R, E] (numpy) of `method` (REGION_METHODS); padded
  boxes (zero width or height) give zero rows. `roi_size` (pooled_patches): default the
  model's region roi_size, else 4. `crop_context` (crop): box enlargement factor."""
  if method not in REGION_METHODS:
    raise ValueError(f"region method {method!r}; expected one of {REGION_METHODS}")
  boxes = np.asarray(boxes, np.float32)
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != np.shape(images)[0]:
    raise ValueError(f"boxes must be [N, R, 4] for {np.shape(images)[0]} images, got {boxes.shape}")
  inputs = {"images": np.asarray(images, np.float32), "boxes": boxes}
  if method == "head":
    if not isinstance(model, RegionCLIP):
      raise ValueError(f"method 'head' needs a RegionCLIP, got {type(model).__name__}; use "
                       "'crop' or 'pooled_patches' for a plain CLIP")
    return evaluator.encode_batched(model, inputs, "encode_region_batch", batch_size=batch_size,
                                   mesh=mesh)
  rc = getattr(model.config, "region", None)
  size = roi_size or (rc.roi_size if rc is not None else 4)
  sr = rc.sampling_ratio if (rc is not None and roi_size is None) else 0
  wrapper = RegionBaselines(model, size, sr, crop_context)
  name = "crop_regions" if method == "crop" else "pooled_regions"
  # crops multiply the batch by R: keep the image-tower batch near `batch_size`
  bs = max(1, batch_size // boxes.shape[1]) if method == "crop" else batch_size
  return evaluator.encode_batched(wrapper, inputs, name, batch_size=bs, mesh=mesh)


def _valid_region_lists(spec: Mapping[str, Any]) -> tuple[np.ndarray, list[str]]:
  """(mask [N, R] of boxes with a caption, captions in the order of mask's True entries)."""
  mask = np.asarray(spec["box_mask"], bool)
  caps = spec.get("region_captions")
  flat: list[str] = []
  if caps is None:
    return mask, flat
  if len(caps) != mask.shape[0]:
    raise ValueError(f"region_captions has {len(caps)} entries for {mask.shape[0]} images")
  for i, row in enumerate(caps):
    k = int(mask[i].sum())
    if len(row) != k or not mask[i, :k].all():
      raise ValueError(f"region_captions[{i}] has {len(row)} captions but box_mask[{i}] = "
                       f"{mask[i].tolist()}; expected one caption per real box, boxes first")
    flat.extend(row)
  return mask, flat


@functools.partial(jax.jit, static_argnums=0)
def _ground_batch(graphdef: nnx.GraphDef, state: nnx.State, images: Array, text: Array) -> Array:
  model = nnx.merge(graphdef, state)
  _, patches = model.image_and_patches(images)
  return model.ground(patches, text)


def predict_boxes(model: RegionCLIP, images: Any, text_features: Any, *, batch_size: int = 64
                  ) -> np.ndarray:
  """The grounding head's boxes [N, R, 4] for caption embeddings [N, R, E] (normalized, as in
  training) over preprocessed images [N, H, W, 3]; fixed-size jitted batches, one device."""
  images, text = np.asarray(images, np.float32), np.asarray(text_features, np.float32)
  n = images.shape[0]
  graphdef, state = nnx.split(model)
  bs = min(batch_size, n)
  out = []
  for start in range(0, n, bs):
    # the last batch is padded (repeating its last row) to the same shape: one compilation
    chunk = [np.concatenate([a[start:start + bs]] + [a[-1:]] * (start + bs - n)) if start + bs > n
             else a[start:start + bs] for a in (images, text)]
    out.append(np.asarray(_ground_batch(graphdef, state, *chunk))[:min(bs, n - start)])
  return np.concatenate(out, axis=0)


def _region_text_metrics(model: clip_lib.CLIP, spec: Mapping[str, Any], feats: np.ndarray,
                         mask: np.ndarray, captions: list[str], tokenizer, *,
                         mesh: jax.sharding.Mesh | None, batch_size: int) -> dict[str, float]:
  """Region <-> caption recall@{1,5} (identical captions merged into one text; a text query
  is a hit when any region it describes ranks in its top k) and, for a model with a grounding
  head, the IoU of the boxes it predicts from the captions (mean, and the share >= 0.5)."""
  unique = sorted(set(captions))
  index = {c: j for j, c in enumerate(unique)}
  txt = evaluator.encode_texts(model, tokenizer(unique), batch_size=max(batch_size, 1024), mesh=mesh)
  which = np.array([index[c] for c in captions], np.int64)
  ret = evaluator.retrieval_metrics(feats[mask], txt, [[j] for j in which], ks=(1, 5))
  out = {}
  for k in (1, 5):
    out[f"text_to_region_recall@{k}"] = ret[f"image_retrieval_recall@{k}"]
    out[f"region_to_text_recall@{k}"] = ret[f"text_retrieval_recall@{k}"]
  if isinstance(model, RegionCLIP) and model.grounding is not None:
    text = np.zeros((*mask.shape, txt.shape[1]), np.float32)
    text[mask] = txt[which]
    pred = predict_boxes(model, spec["images"], text)
    iou = box_iou_numpy(pred[mask], np.asarray(spec["boxes"], np.float32)[mask])
    out["grounding_miou"] = float(iou.mean())
    out["grounding_acc@0.5"] = float((iou >= 0.5).mean())
  return out


def box_iou_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of paired xyxy boxes [M, 4] -> [M] (numpy)."""
  lt = np.maximum(a[:, :2], b[:, :2])
  rb = np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)
  return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def _spec_features(model: clip_lib.CLIP, spec: Mapping[str, Any], *, batch_size: int,
                   mesh: jax.sharding.Mesh | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
  method = spec.get("method") or ("head" if isinstance(model, RegionCLIP) else "crop")
  mask, captions = _valid_region_lists(spec)
  boxes = np.where(mask[..., None], np.asarray(spec["boxes"], np.float32), 0.0)
  feats = region_features(model, spec["images"], boxes, method=method, batch_size=batch_size,
                          mesh=mesh, roi_size=spec.get("roi_size"),
                          crop_context=float(spec.get("crop_context", 1.0)))
  return feats, mask, captions


def eval_region_zeroshot(model: clip_lib.CLIP, spec: Mapping[str, Any], tokenizer, *,
                         mesh: jax.sharding.Mesh | None = None, batch_size: int = 256
                         ) -> dict[str, float]:
  """Region classification (zero-shot top-1 / top-5 / mean per-class recall over the valid
  boxes with a label) and, with region_captions, the `_region_text_metrics`.

  Spec: images [N, H, W, 3] preprocessed, boxes [N, R, 4], box_mask [N, R], region_labels
  [N, R] (-1 = none), class_names, templates; optional region_captions (per image, the real
  boxes' captions), `method` (REGION_METHODS; default 'head' for a RegionCLIP, else 'crop'),
  `roi_size` (pooled_patches: RoIAlign bins per side), `crop_context` (crop: box scale).
  """
  for key in ("images", "boxes", "box_mask", "region_labels", "class_names", "templates"):
    if key not in spec:
      raise ValueError(f"eval set kind 'region_zeroshot' misses key {key!r}; it has {sorted(spec)}")
  feats, mask, captions = _spec_features(model, spec, batch_size=batch_size, mesh=mesh)
  labels = np.asarray(spec["region_labels"])
  labelled = mask & (labels >= 0)
  classifier = evaluator.zero_shot_classifier(model, tokenizer, spec["class_names"],
                                             spec["templates"], batch_size=max(batch_size, 1024),
                                             mesh=mesh)
  out = evaluator.zero_shot_metrics(feats[labelled], labels[labelled].astype(np.int64), classifier)
  out["num_regions"] = float(labelled.sum())
  if captions:
    out.update(_region_text_metrics(model, spec, feats, mask, captions, tokenizer, mesh=mesh,
                                    batch_size=batch_size))
  return out


def eval_region_retrieval(model: clip_lib.CLIP, spec: Mapping[str, Any], tokenizer, *,
                          mesh: jax.sharding.Mesh | None = None, batch_size: int = 256
                          ) -> dict[str, float]:
  """Region <-> caption retrieval (+ grounding IoU) of a set without class names: images,
  boxes, box_mask, region_captions (e.g. `webdataset_region_set`)."""
  for key in ("images", "boxes", "box_mask", "region_captions"):
    if key not in spec:
      raise ValueError(f"eval set kind 'region_retrieval' misses key {key!r}; it has {sorted(spec)}")
  feats, mask, captions = _spec_features(model, spec, batch_size=batch_size, mesh=mesh)
  if not captions:
    raise ValueError("eval set kind 'region_retrieval' holds no region")
  out = _region_text_metrics(model, spec, feats, mask, captions, tokenizer, mesh=mesh,
                             batch_size=batch_size)
  out["num_regions"] = float(mask.sum())
  return out


def webdataset_region_set(shards: Any, *, image_size: int, mean: Any, std: Any,
                          max_regions: int = 8, max_samples: int = 0) -> dict[str, Any]:
  """A `region_retrieval` eval set from WebDataset shards whose KEY.json has `regions`
  ({bbox, caption} with normalized boxes): eval preprocessing (resize + centre crop), boxes
  moved into the crop, regions that leave it dropped, samples without a region skipped."""
  source = wds.TarShardSource(wds.expand_shards(shards))
  pre = transforms.make_preprocess(image_size, mean, std)
  images, all_boxes, masks, captions = [], [], [], []
  try:
    for i in range(len(source)):
      if max_samples and len(images) >= max_samples:
        break
      try:
        s = wds.decode_sample(source[i])
      except wds.SkipSample:
        continue
      h, w = s["image"].shape[:2]
      if not len(s["boxes"]):
        continue
      moved, keep = transforms.transform_boxes(s["boxes"], pre.crop_box(h, w), (h, w))
      idx = np.flatnonzero(keep)[:max_regions]
      if not len(idx):
        continue
      boxes = np.zeros((max_regions, 4), np.float32)
      boxes[:len(idx)] = moved[idx]
      images.append(pre(s["image"]))
      all_boxes.append(boxes)
      masks.append(np.arange(max_regions) < len(idx))
      captions.append([s["region_captions"][j] for j in idx])
  finally:
    source.close()
  if not images:
    raise ValueError(f"webdataset shards {shards!r} hold no sample with a region inside the "
                     "eval crop (KEY.json 'regions': [{'bbox': [x0, y0, x1, y1], 'caption': ...}])")
  return {"kind": "region_retrieval", "images": np.stack(images), "boxes": np.stack(all_boxes),
          "box_mask": np.stack(masks), "region_captions": captions}


_WDS_SETS: dict[tuple, dict[str, Any]] = {}


def webdataset_region_metrics(model: clip_lib.CLIP, data: Any, tokenizer,
                              mesh: jax.sharding.Mesh | None) -> dict[str, float]:
  """The region family's extra eval: with WebDataset data and `data.eval_shards`, region <->
  caption retrieval (+ grounding) over the eval shards' regions as `regions/...` (demo data
  gets its `regions` set from data.eval_sets instead)."""
  if data.get("name", "demo") != "webdataset" or not data.get("eval_shards", ""):
    return {}
  mc = model.config
  key = (str(data.eval_shards), mc.vision.image_size, int(data.get("max_regions", 4)),
         int(data.get("eval_size", 0)))
  if key not in _WDS_SETS:
    _WDS_SETS[key] = webdataset_region_set(
        data.eval_shards, image_size=mc.vision.image_size, mean=mc.image_mean, std=mc.image_std,
        max_regions=key[2], max_samples=key[3])
  metrics = eval_region_retrieval(model, _WDS_SETS[key], tokenizer, mesh=mesh)
  return {f"regions/{k}": v for k, v in metrics.items()}
