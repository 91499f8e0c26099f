"""The NLLB (M2M100) encoder as open_clip's HFTextEncoder wraps it (NLLB-CLIP's text tower).

Token embeddings scaled by sqrt(width) (`scale_embedding`), fixed sinusoidal positions indexed
as in fairseq (pad id + 1 + index among non-pad tokens; the pad row is zero), pre-LN
bidirectional blocks over a padding mask (ReLU MLP), a final LayerNorm, first-token pooling
(open_clip's `cls_pooler`: an encoder has no pooler layer) and a projection into the image
embedding space.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models.layers import Attention, LayerNorm, Linear, param

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class M2M100TextConfig:
  """transformers M2M100Config's encoder fields (facebook/nllb-200-distilled-600M: 1024 wide,
  12 layers, 16 heads, ffn 4096, vocab 256206) and open_clip's pooling / projection."""

  vocab_size: int = 256206
  width: int = 1024
  layers: int = 12
  heads: int = 16
  mlp_dim: int = 4096
  context_length: int = 77
  max_positions: int = 1024
  pad_token_id: int = 1
  scale_embedding: bool = True
  ln_eps: float = 1e-5
  pool: str = "cls"
  proj_type: str = "linear"
  proj_bias: bool = False
  kind: str = "m2m100"

  def __post_init__(self):
    if self.pool != "cls" or self.proj_type != "linear":
      raise ValueError("the M2M100 text tower implements cls pooling with a linear projection")


def sinusoidal_table(rows: int, width: int, padding_idx: int) -> np.ndarray:
  """M2M100SinusoidalPositionalEmbedding.get_embedding (float32, the pad row zero)."""
  half = width // 2
  freq = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1)))
  arg = np.arange(rows, dtype=np.float32)[:, None] * freq[None, :]
  table = np.concatenate([np.sin(arg), np.cos(arg)], axis=1).astype(np.float32)
  if width % 2:
    table = np.concatenate([table, np.zeros((rows, 1), np.float32)], axis=1)
  table[padding_idx] = 0
  return table


class EncoderLayer(nnx.Module):
  """x + attn(LN(x)); x + fc2(relu(fc1(LN(x))))."""

  def __init__(self, cfg: M2M100TextConfig, *, dtype, rngs: nnx.Rngs):
    self.ln_1 = LayerNorm(cfg.width, eps=cfg.ln_eps, rngs=rngs)
    self.attn = Attention(cfg.width, cfg.heads, dtype=dtype, rngs=rngs)
    self.ln_2 = LayerNorm(cfg.width, eps=cfg.ln_eps, rngs=rngs)
    self.fc1 = Linear(cfg.width, cfg.mlp_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = Linear(cfg.mlp_dim, cfg.width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, mask: Array) -> Array:
    x = x + self.attn(self.ln_1(x), mask=mask).astype(x.dtype)
    return x + self.fc2(jax.nn.relu(self.fc1(self.ln_2(x)))).astype(x.dtype)


class M2M100TextTransformer(nnx.Module):
  """NLLB ids [B, L] -> projected text embedding [B, E]."""

  def __init__(self, cfg: M2M100TextConfig, embed_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    self.token_embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.width),
                                 ("vocab", "embed"))
    self.blocks = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.layers)])
    self.ln_final = LayerNorm(cfg.width, eps=cfg.ln_eps, rngs=rngs)
    self.proj = Linear(cfg.width, embed_dim, axes=("embed", None), use_bias=cfg.proj_bias,
                       dtype=dtype, rngs=rngs)

  def tokens(self, token_ids: Array) -> Array:
    """The encoder's last hidden states [B, L, W]."""
    cfg = self.cfg
    if token_ids.ndim != 2:
      raise ValueError(f"token ids must be [B, L]; got shape {tuple(token_ids.shape)}")
    if token_ids.shape[1] + cfg.pad_token_id + 1 > cfg.max_positions + 2:
      raise ValueError(f"tokens have length {token_ids.shape[1]} but the text tower reads at most "
                       f"{cfg.max_positions + 1 - cfg.pad_token_id}")
    scale = math.sqrt(cfg.width) if cfg.scale_embedding else 1.0
    x = jnp.take(self.token_embedding[...], token_ids, axis=0) * scale
    real = (token_ids != cfg.pad_token_id).astype(jnp.int32)
    positions = jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
    table = sinusoidal_table(cfg.max_positions + 2, cfg.width, cfg.pad_token_id)
    x = (x + jnp.take(jnp.asarray(table), positions, axis=0)).astype(self.dtype)
    mask = (token_ids != cfg.pad_token_id)[:, None, None, :]
    for block in self.blocks:
      x = block(x, mask)
    return self.ln_final(x)

  def __call__(self, token_ids: Array, *, trim_padding: bool = False) -> Array:
    """`trim_padding` is accepted for interface parity with CLIP's tower and ignored."""
    del trim_padding
    return self.proj(self.tokens(token_ids)[:, 0])
