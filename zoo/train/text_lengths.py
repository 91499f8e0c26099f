"""Text-length trimming in training (`config.data.text_lengths`).

Each host batch's `tokens` are cut to the smallest length bucket that holds its longest caption
(its last EOT), so the text tower runs on, say, 24 positions instead of 77 and jit compiles one
step per bucket. Exact only for towers whose pooled output ignores what follows the EOT: causal
attention with argmax (EOT) pooling and no per-token routing (CLIP, Long-CLIP's tower); `check`
refuses the rest (SigLIP's last-token pooling reads the padding, bidirectional towers attend to
it, MoE routing gives padding tokens expert capacity). Positions are sliced by the tower
(`positional_embedding[:L]`). With several hosts the bucket is the largest any host needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from zoo.models import clip as clip_lib, moe as moe_lib

FIELD = "tokens"


def auto_buckets(context_length: int) -> tuple[int, ...]:
  """Multiples of 8 up to 32, then of 16, below `context_length`, and `context_length`:
  77 -> (8, 16, 24, 32, 48, 64, 77); at most a handful of compiled shapes."""
  sizes = [s for s in (8, 16, 24, 32) if s < context_length]
  sizes += list(range(48, context_length, 16))
  return tuple(sizes) + (int(context_length),)


def parse(spec: Any, context_length: int) -> tuple[int, ...]:
  """`data.text_lengths` -> sorted buckets ending at `context_length`; () when off ("")."""
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return ()
  if isinstance(spec, str) and spec.strip().lower() == "auto":
    return auto_buckets(context_length)
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  try:
    sizes = sorted({int(str(s).strip()) for s in items if str(s).strip()})
  except ValueError:
    raise ValueError(f"data.text_lengths={spec!r}: expected comma-separated lengths "
                     "(e.g. '16,32,48,77'), 'auto' or '' (off)") from None
  if not sizes or sizes[0] < 1 or sizes[-1] > context_length:
    raise ValueError(f"data.text_lengths={spec!r}: lengths must lie in [1, context_length="
                     f"{context_length}]")
  return tuple(s for s in sizes if s < context_length) + (int(context_length),)


def check(model: nnx.Module, fields: tuple[str, ...]) -> None:
  """Raises ValueError (one line naming the cause) when trimming would change the results."""
  text = getattr(model, "text", None)
  cfg = getattr(text, "cfg", None)
  if FIELD not in fields:
    raise ValueError(f"data.text_lengths trims the batch field {FIELD!r}; this family's batch "
                     f"has {', '.join(fields)}: set data.text_lengths=''")
  if type(text) is not clip_lib.TextTransformer or cfg is None:
    raise ValueError(f"data.text_lengths: the text tower {type(text).__name__} is not a CLIP "
                     "causal tower (its output may depend on padding); set data.text_lengths=''")
  if not cfg.causal or cfg.pool != "argmax":
    raise ValueError(f"data.text_lengths: this text tower (causal={cfg.causal}, pool="
                     f"{cfg.pool!r}) reads the padding, so trimming changes its output (only "
                     "causal towers with EOT pooling, e.g. CLIP); set data.text_lengths=''")
  if any(isinstance(m, moe_lib.MoEMLP) for _, m in nnx.iter_graph(text)):
    raise ValueError("data.text_lengths: the text tower has MoE layers, whose routing gives "
                     "padding tokens expert capacity; set data.text_lengths=''")


@dataclasses.dataclass(frozen=True)
class Trim:
  """Host batch -> the same batch with `tokens` cut to the bucket of its longest caption."""

  buckets: tuple[int, ...]
  multihost: bool = False

  def length(self, tokens: np.ndarray) -> int:
    needed = int(np.max(np.argmax(tokens, axis=-1))) + 1 if tokens.size else 1
    if self.multihost:
      needed = int(np.max(multihost_utils.process_allgather(np.int32(needed))))
    return next((b for b in self.buckets if b >= needed), tokens.shape[1])

  def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(batch)
    tokens = np.asarray(out[FIELD])
    out[FIELD] = np.ascontiguousarray(tokens[:, :self.length(tokens)])
    return out


def build(spec: Any, model: nnx.Module, fields: tuple[str, ...], context_length: int
          ) -> Trim | None:
  """The trimming of `data.text_lengths` for `model` (None when off), checked."""
  buckets = parse(spec, context_length)
  if not buckets:
    return None
  check(model, fields)
  return Trim(buckets, multihost=jax.process_count() > 1)
