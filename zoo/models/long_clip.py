"""Long-CLIP's model side: knowledge-preserved positional stretching (77 -> 248 text positions).

The first `keep` = 20 learned positions are kept bit for bit; slot j >= keep reads source
coordinate keep + (j - keep) / factor, factor = (new_length - keep) / (L - keep), interpolated
on [floor, floor + 1] clipped to the last segment (the tail extrapolates, as Long-CLIP). The
frozen prefix is `TextConfig.frozen_positions`. `pca_reconstruct` gives PCM's coarse image
feature. Paper notes: docs/families/long_clip.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models import clip as clip_lib

Array = jax.Array

LONG_CLIP_CONTEXT_LENGTH = 248
LONG_CLIP_KEEP = 20
LONG_CLIP_COMPONENTS = 32


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
                      keep: int = LONG_CLIP_KEEP, *, freeze: bool = True) -> clip_lib.CLIP:
  """A copy of `model` whose text tower reads `new_length` tokens (Long-CLIP stretching).

  Every other weight is shared unchanged; `model.config.text.context_length` becomes
  `new_length`, so `zoo.get_tokenizer(name, context_length=new_length)` and `zoo.save/load`
  follow. With `freeze` the text config gets `frozen_positions = keep` (those rows pass no
  gradient, as Long-CLIP fine-tunes). The input model is not modified.
  """
  if not isinstance(model, clip_lib.CLIP):
    raise TypeError(f"stretch_positions needs a zoo CLIP model, got {type(model).__name__}")
  old = model.config.text.context_length
  table = np.asarray(jax.device_get(model.text.positional_embedding[...]))
  if table.shape[0] != old:
    raise ValueError(f"text positional_embedding has {table.shape[0]} rows but the config says "
                     f"context_length={old}")
  new_table = stretch_table(table, new_length, keep)
  text = dataclasses.replace(model.config.text, context_length=new_length,
                             frozen_positions=keep if freeze else 0)
  config = dataclasses.replace(model.config, text=text)
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
  return stretched


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
