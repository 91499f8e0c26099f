"""Long-CLIP: knowledge-preserved positional stretching and primary-component matching.

Long-CLIP (Zhang et al., ECCV 2024, arXiv 2403.15378; public code beichenzbc/Long-CLIP) fine-tunes
a trained CLIP so that its text tower reads 248 tokens instead of 77:

* **Knowledge-preserved stretching** (`stretch_positions`). The first `keep` = 20 learned
  positions, the ones CLIP actually trained well, are kept bit for bit. The remaining
  L - keep positions are stretched by linear interpolation to fill new_length - keep slots.
  With Long-CLIP's numbers (77 -> 248, keep 20) the factor is (248 - 20) / (77 - 20) = 4:
  new[keep + 4i + r] = (1 - r/4) * old[keep + i] + (r/4) * old[keep + i + 1], r = 0..3, and for
  the last original position (no right neighbour) Long-CLIP extrapolates along the last
  segment: new[244 + r] = old[76] + (r/4) * (old[76] - old[75]). We implement the general form
  of exactly this rule: slot j >= keep reads source coordinate s = keep + (j - keep) / factor,
  factor = (new_length - keep) / (L - keep), interpolating on the segment [floor(s), floor(s)+1]
  clipped to the last segment [L-2, L-1] (so the tail extrapolates as above). For integer
  factors the original positions land exactly on slots keep + factor * i. Computed in float64,
  stored in the table's dtype. During fine-tuning Long-CLIP trains only positions >= keep
  (its `positional_embedding` is frozen and `positional_embedding_res` is masked to rows >= 20);
  the `long_clip` family does the same (`freeze_kept_positions`).

* **Primary-component matching** (`pca_reconstruct`, `pcm_loss`). The fine image feature is
  matched with the long caption; a coarse image feature, the batch's image features
  reconstructed from their top-k principal components, is matched with the short caption.
  As in Long-CLIP's `CLIP.PCA`: the PCA runs on the L2-normalized image features, centred
  (subtract the batch mean), basis from the SVD of the centred matrix, reconstruction
  (x - mean) V_k V_k^T + mean, and the reconstruction is used without re-normalizing
  (`renormalize_coarse=True` re-normalizes). Long-CLIP uses k = 32 and weight 1.
  Differences, on purpose: (1) Long-CLIP computes the PCA per GPU (its local batch, before
  all-gather); here it is computed over the GLOBAL batch (plain jnp under jit: GSPMD gathers
  the [B, E] features for the SVD), so the result does not depend on the device count;
  (2) Long-CLIP's cross-entropy uses label smoothing 0.1; we use zoo's standard contrastive
  loss (`zoo.losses.contrastive_loss`, no smoothing) so the fused kernels apply.

* Conversion of Long-CLIP's released PyTorch checkpoints (`from_long_clip` / `to_long_clip`):
  OpenAI layout with a 248-row text `positional_embedding` plus `positional_embedding_res`;
  the text tower adds `positional_embedding * mask1 + positional_embedding_res * mask2` with
  mask1 = rows [0, 20), mask2 = rows [20, 248), which is one table for zoo.

* Eval: `long_retrieval` eval-set kind (image <-> long caption R@K, the captions tokenized at
  the model's own context length) registered with `zoo.eval_lib`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import clip as clip_lib
from zoo import config_utils, eval_lib, losses, registry, train_lib

Array = jax.Array
log = logging.getLogger("zoo.long_clip")

LONG_CLIP_CONTEXT_LENGTH = 248
LONG_CLIP_KEEP = 20
LONG_CLIP_COMPONENTS = 32
LONG_CLIP_FIELDS = ("image", "long_tokens", "short_tokens")
# Name of the static attribute on the text tower that tells the long_clip forward how many
# leading positions are frozen (no gradient) during fine-tuning.
_FROZEN_ATTR = "frozen_positions"


# ----------------------------------------------------------------------------- stretching


def stretch_coordinates(length: int, new_length: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
  """For each new slot j: the left source index i0 [new_length] and weight t (new = (1-t) old[i0]
  + t old[i0+1]). Slots < keep copy (t = 0); the tail past old[L-1] extrapolates on [L-2, L-1]."""
  if not 0 <= keep <= length - 2:
    raise ValueError(f"stretch_positions: keep={keep} must be in [0, {length - 2}] for a table of "
                     f"{length} positions (two originals past `keep` are needed to interpolate)")
  if new_length <= length:
    raise ValueError(f"stretch_positions: new_length={new_length} must exceed the current "
                     f"context length {length}")
  factor = (new_length - keep) / (length - keep)
  j = np.arange(new_length, dtype=np.float64)
  s = np.where(j < keep, j, keep + (j - keep) / factor)
  i0 = np.minimum(np.floor(s), length - 2).astype(np.int64)
  i0 = np.where(j < keep, j.astype(np.int64), i0)
  t = np.where(j < keep, 0.0, s - i0)
  return i0, t


def stretch_table(table: Any, new_length: int = LONG_CLIP_CONTEXT_LENGTH,
                  keep: int = LONG_CLIP_KEEP) -> np.ndarray:
  """A [L, W] position table stretched to [new_length, W] (module docstring has the rule).

  Rows [0, keep) are copied bit for bit; the rest are computed in float64 and cast back.
  """
  table = np.asarray(table)
  if table.ndim != 2:
    raise ValueError(f"stretch_table: expected a [positions, width] table, got shape {table.shape}")
  i0, t = stretch_coordinates(table.shape[0], new_length, keep)
  wide = table.astype(np.float64)
  out = (1.0 - t)[:, None] * wide[i0] + t[:, None] * wide[np.minimum(i0 + 1, table.shape[0] - 1)]
  out = out.astype(table.dtype)
  out[:keep] = table[:keep]
  return out


def stretch_positions(model: clip_lib.CLIP, new_length: int = LONG_CLIP_CONTEXT_LENGTH,
                      keep: int = LONG_CLIP_KEEP) -> clip_lib.CLIP:
  """A copy of `model` whose text tower reads `new_length` tokens (Long-CLIP stretching).

  Every other weight is shared unchanged; `model.config.text.context_length` becomes
  `new_length`, so `zoo.get_tokenizer(name, context_length=new_length)` and `zoo.save/load`
  follow. The returned text tower has `frozen_positions = keep` (see `long_clip_forward`).
  The input model is not modified.
  """
  if not isinstance(model, clip_lib.CLIP):
    raise TypeError(f"stretch_positions needs a zoo CLIP model, got {type(model).__name__}")
  old = model.config.text.context_length
  table = np.asarray(jax.device_get(model.text.positional_embedding[...]))
  if table.shape[0] != old:
    raise ValueError(f"text positional_embedding has {table.shape[0]} rows but the config says "
                     f"context_length={old}")
  new_table = stretch_table(table, new_length, keep)
  config = dataclasses.replace(
      model.config, text=dataclasses.replace(model.config.text, context_length=new_length))
  stretched = nnx.eval_shape(lambda: clip_lib.CLIP(config, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  flat = dict(nnx.to_flat_state(state))
  new_flat = dict(nnx.to_flat_state(nnx.state(stretched)))
  for path, var in new_flat.items():
    if path == ("text", "positional_embedding"):
      var.set_value(jnp.asarray(new_table))
    else:
      var.set_value(flat[path].get_value())
  nnx.update(stretched, nnx.from_flat_state(new_flat))
  setattr(stretched.text, _FROZEN_ATTR, keep)
  return stretched


# ----------------------------------------------------------------------------- PCM loss


def pca_reconstruct(x: Array, components: int) -> Array:
  """Rows of `x` [B, E] reconstructed from the top `components` principal components of the batch.

  Long-CLIP's PCA: centre by the batch mean, V_k = top-k right singular vectors of the centred
  matrix, return (x - mean) V_k V_k^T + mean, float32. Differentiable (through the SVD).
  """
  if x.ndim != 2:
    raise ValueError(f"pca_reconstruct: expected [batch, dim] features, got shape {x.shape}")
  if not 1 <= components <= min(x.shape):
    raise ValueError(f"pca_reconstruct: components={components} must be in [1, min(batch, dim)="
                     f"{min(x.shape)}] for features of shape {x.shape}")
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=0, keepdims=True)
  centred = x - mean
  _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
  basis = vt[:components]  # [k, E], rows orthonormal
  return (centred @ basis.T) @ basis + mean


def pcm_loss(image_features: Array, long_text_features: Array, short_text_features: Array,
             logit_scale: Array, *, components: int = LONG_CLIP_COMPONENTS,
             short_weight: float = 1.0, renormalize_coarse: bool = False,
             impl: str = "reference", mesh: jax.sharding.Mesh | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """Long-CLIP's loss: CL(fine image, long text) + short_weight * CL(coarse image, short text).

  Features are L2-normalized [B, E] (row i of each is one sample); the coarse image feature is
  `pca_reconstruct(image_features, components)` over the (global) batch; CL is CLIP's softmax
  contrastive loss (`zoo.losses.contrastive_loss`). Returns (total, metrics).
  """
  shapes = {image_features.shape, long_text_features.shape, short_text_features.shape}
  if len(shapes) != 1:
    raise ValueError(f"pcm_loss: image, long-text and short-text features must share one [B, E] "
                     f"shape, got {image_features.shape}, {long_text_features.shape}, "
                     f"{short_text_features.shape}")
  coarse = pca_reconstruct(image_features, components)
  if renormalize_coarse:
    coarse = clip_lib.l2_normalize(coarse)
  loss_long = losses.contrastive_loss(image_features, long_text_features, logit_scale,
                                      kind="softmax", impl=impl, mesh=mesh)
  loss_short = losses.contrastive_loss(coarse, short_text_features, logit_scale,
                                       kind="softmax", impl=impl, mesh=mesh)
  total = loss_long + short_weight * loss_short
  return total, {"loss": total, "loss_long": loss_long, "loss_short": loss_short,
                 "logit_scale": logit_scale}


# ----------------------------------------------------------------------------- family


def _text_tower_with_frozen_prefix(model: clip_lib.CLIP) -> nnx.Module:
  """The text tower; when it has `frozen_positions = k > 0`, a view of it whose first k
  position rows pass no gradient (Long-CLIP trains only positions >= keep)."""
  text = model.text
  keep = int(getattr(text, _FROZEN_ATTR, 0) or 0)
  if not keep:
    return text
  graphdef, state = nnx.split(text)
  view = nnx.merge(graphdef, state)  # new Variables over the same arrays: the caller's stays as is
  table = view.positional_embedding[...]
  view.positional_embedding.set_value(
      jnp.concatenate([jax.lax.stop_gradient(table[:keep]), table[keep:]], axis=0))
  return view


def long_clip_forward(model: clip_lib.CLIP, batch: Mapping[str, Array], rng: Array) -> dict:
  """Normalized image features, long- and short-caption text features, logit scale."""
  del rng
  missing = [k for k in LONG_CLIP_FIELDS if k not in batch]
  if missing:
    raise ValueError(f"long_clip batch lacks {missing}; it has {sorted(batch)}")
  text = _text_tower_with_frozen_prefix(model)
  # Each field runs at the width the data delivers (causal towers give the same features for
  # any padding), so short captions may come at 77 tokens to save compute.
  encode = lambda tokens: clip_lib.l2_normalize(text(tokens).astype(jnp.float32))
  return {
      "image_features": model.encode_image(batch["image"], normalize=True),
      "long_text_features": encode(batch["long_tokens"]),
      "short_text_features": encode(batch["short_tokens"]),
      "logit_scale": jnp.exp(model.logit_scale[...]),
  }


def long_clip_loss(outputs: dict, batch: dict, ctx: train_lib.LossContext
                   ) -> tuple[Array, dict]:
  """`pcm_loss` with the settings of `config.long_clip`."""
  del batch
  lc = settings(ctx.config)
  return pcm_loss(outputs["image_features"], outputs["long_text_features"],
                  outputs["short_text_features"], outputs["logit_scale"],
                  components=lc["components"], short_weight=lc["short_weight"],
                  renormalize_coarse=lc["renormalize_coarse"], impl=ctx.impl, mesh=ctx.mesh)


DEFAULTS = {
    "context_length": LONG_CLIP_CONTEXT_LENGTH,  # text positions after stretching
    "keep": LONG_CLIP_KEEP,  # leading positions kept bit-identical (and frozen)
    "components": LONG_CLIP_COMPONENTS,  # principal components of the coarse image feature
    "short_weight": 1.0,  # weight of the coarse-image <-> short-caption term
    "renormalize_coarse": False,  # Long-CLIP uses the PCA reconstruction as is
    "freeze_kept_positions": True,  # no gradient into positions [0, keep)
}


def default_settings() -> ml_collections.ConfigDict:
  """`config.long_clip` with Long-CLIP's defaults."""
  return ml_collections.ConfigDict(dict(DEFAULTS))


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.long_clip` over the defaults; unknown keys are errors listing the valid ones."""
  return config_utils.section(config, "long_clip", DEFAULTS)


def build_model(config: ml_collections.ConfigDict) -> clip_lib.CLIP:
  """`config.model` with `config.init_from`'s weights, reading `long_clip.context_length` tokens.

  `init_from` holding a CLIP of another context length (77) is loaded and stretched; one that
  already reads `context_length` tokens (a Long-CLIP checkpoint) is loaded as is; without
  `init_from` the fresh model is stretched. The loop's own `init_from` copy afterwards only
  overwrites tensors of equal shape, i.e. with the same weights.
  """
  from zoo import checkpoint

  lc = settings(config)
  target = lc["context_length"]
  source_length = None
  if config.get("init_from", ""):
    source_length = checkpoint.load_config(config.init_from)[0].text.context_length
  if source_length == target:  # as train_lib.build_clip_model, with the long text context
    overrides = train_lib.model_overrides(config)
    overrides["text"] = {**overrides.get("text", {}), "context_length": target}
    model = clip_lib.create(config.model, seed=config.seed, dtype=config.dtype, **overrides)
  else:
    model = train_lib.build_clip_model(config)
  train_lib.init_params_from(config, model)
  length = model.config.text.context_length
  if length != target:
    if length > target:
      raise ValueError(f"long_clip.context_length={target} is shorter than the model's text "
                       f"context {length}; Long-CLIP only stretches")
    model = stretch_positions(model, target, lc["keep"])
  setattr(model.text, _FROZEN_ATTR, lc["keep"] if lc["freeze_kept_positions"] else 0)
  return model


# ----------------------------------------------------------------------------- eval


def eval_long_retrieval(model: nnx.Module, spec: Mapping[str, Any], tokenizer, *,
                        mesh: jax.sharding.Mesh | None = None, batch_size: int = 256
                        ) -> dict[str, float]:
  """Image <-> long-caption recall@K; captions are tokenized at the model's context length.

  Spec: `images`, `captions` (long), `image_to_captions` as a "retrieval" set. With the CLIP
  BPE tokenizer it also reports `truncated_fraction`, the share of captions longer than the
  model reads. (The demo data's "retrieval_long" set, kind "retrieval", gives the same recalls
  when the tokenizer has the model's context length, as the train loop's does.)
  """
  missing = [k for k in ("images", "captions", "image_to_captions") if k not in spec]
  if missing:
    raise ValueError(f"eval set 'long_retrieval' misses keys {missing}; it has {sorted(spec)}")
  length = int(model.config.text.context_length)
  captions = list(spec["captions"])
  tokens = tokenizer(captions, context_length=length)
  img = eval_lib.encode_images(model, spec["images"], batch_size=batch_size, mesh=mesh)
  txt = eval_lib.encode_texts(model, tokens, batch_size=max(batch_size, 1024), mesh=mesh)
  metrics = eval_lib.retrieval_metrics(img, txt, spec["image_to_captions"],
                                       ks=spec.get("ks", (1, 5, 10)))
  from zoo import tokenizers

  if isinstance(tokenizer, tokenizers.ClipTokenizer):
    lengths = np.array([len(tokenizer.encode(c)) + 2 for c in captions])  # + SOT, EOT
    metrics["truncated_fraction"] = float(np.mean(lengths > length))
  return metrics


if "long_retrieval" not in eval_lib.evaluator_kinds():
  eval_lib.register_evaluator("long_retrieval", eval_long_retrieval)


# ----------------------------------------------------------------------------- conversion


def from_long_clip(state_dict: Mapping[str, Any], name: str | registry.CLIPConfig = "ViT-B-16-quickgelu",
                   keep: int = LONG_CLIP_KEEP, **overrides: Any) -> clip_lib.CLIP:
  """A zoo CLIP from a Long-CLIP PyTorch state dict (LongCLIP-B: 'ViT-B-16-quickgelu',
  LongCLIP-L: 'ViT-L-14-quickgelu').

  Long-CLIP's text positions are `positional_embedding` rows [0, keep) and
  `positional_embedding_res` rows [keep, L) (its mask1 / mask2); both tables must be [L, W].
  Everything else goes through `zoo.convert.from_open_clip` with text.context_length = L.
  """
  from zoo.convert import common, open_clip as oc

  sd = oc._strip_prefix(state_dict)
  for key in ("positional_embedding", "positional_embedding_res"):
    if key not in sd:
      raise common.StateDictError(f"Long-CLIP state dict lacks {key!r}; got e.g. "
                                  f"{sorted(sd)[:5]} (is this a plain CLIP? use from_open_clip)")
  pos = common.as_float32(common.to_numpy(sd.pop("positional_embedding")))
  res = common.as_float32(common.to_numpy(sd.pop("positional_embedding_res")))
  if pos.ndim != 2 or pos.shape != res.shape or not 0 <= keep < pos.shape[0]:
    raise common.StateDictError(f"Long-CLIP positional_embedding {pos.shape} and "
                                f"positional_embedding_res {res.shape} must be equal [L, W] "
                                f"tables with L > keep={keep}")
  sd["positional_embedding"] = np.concatenate([pos[:keep], res[keep:]], axis=0)
  text = dict(overrides.pop("text", {}) or {})
  text["context_length"] = pos.shape[0]
  return oc.from_open_clip(sd, name, text=text, **overrides)


def to_long_clip(model: clip_lib.CLIP) -> dict[str, np.ndarray]:
  """Long-CLIP's state-dict layout of `model`: the open_clip/OpenAI keys plus
  `positional_embedding_res` (both tables hold the full table, so any mask split reads it)."""
  from zoo.convert import open_clip as oc

  sd = oc.to_open_clip(model)
  sd["positional_embedding_res"] = np.array(sd["positional_embedding"], copy=True)
  return sd


# ----------------------------------------------------------------------------- register


train_lib.register_family(train_lib.Family(
    "long_clip", forward=long_clip_forward, loss=long_clip_loss, fields=LONG_CLIP_FIELDS,
    build_model=build_model))


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
  """python -m zoo.long_clip {from-long-clip,to-long-clip} --input ... --output ... [--model]."""
  import argparse
  import os

  from zoo import checkpoint
  from zoo.convert.__main__ import read_state_dict, write_safetensors

  parser = argparse.ArgumentParser(
      prog="python -m zoo.long_clip",
      description="Long-CLIP PyTorch checkpoints (e.g. longclip-B.pt) <-> zoo checkpoints.")
  parser.add_argument("command", choices=["from-long-clip", "to-long-clip"])
  parser.add_argument("--model", default="ViT-B-16-quickgelu",
                      help="architecture (from-long-clip): ViT-B-16-quickgelu for LongCLIP-B, "
                      "ViT-L-14-quickgelu for LongCLIP-L")
  parser.add_argument("--input", required=True, help="weights file (from-*) or zoo checkpoint dir")
  parser.add_argument("--output", required=True,
                      help="zoo checkpoint dir (from-*) or a .pt (torch.save, what Long-CLIP's "
                      "longclip.load reads) / .safetensors file (to-*)")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  if args.command == "from-long-clip":
    model = from_long_clip(read_state_dict(args.input), args.model)
    out = checkpoint.save(model, args.output, {"converted_from": args.input, "layout": "long_clip"},
                          overwrite=args.overwrite)
    print(f"wrote zoo checkpoint {out}")
    return 0
  model, _, _ = checkpoint.load(args.input)
  state_dict = to_long_clip(model)
  if os.path.exists(args.output) and not args.overwrite:
    parser.error(f"{args.output} exists; pass --overwrite")
  if args.output.endswith(".safetensors"):
    write_safetensors(state_dict, args.output, {"format": "pt"})
  elif args.output.endswith((".pt", ".pth")):
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
               args.output)
  else:
    parser.error(f"--output {args.output!r} must end with .pt, .pth or .safetensors")
  print(f"wrote {len(state_dict)} tensors to {args.output}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
