"""Decoder LLMs as text towers: Llama 3 / 3.1 / 3.2, Qwen2, Qwen3 (LLM2CLIP, ProCLIP).

`LLM(config)(ids, attention_mask)` -> last hidden states [B, L, W] (transformers' `LlamaModel` /
`Qwen2Model` / `Qwen3Model` `last_hidden_state`); `encode(ids, mask)` pools them (mean over the
mask, or the last real token). RMSNorm, rotary embeddings (Llama 3 frequency scaling), SwiGLU,
grouped-query attention, Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm. `causal=False`
makes attention bidirectional (LLM2Vec). Projections are zoo `Linear`s (LoRA attaches), kernels
[in, out] with logical axes (embed -> fsdp, heads / mlp / vocab -> tensor); `param_dtype`
stores the weights in bfloat16; `remat` recomputes each layer in the backward.
Conversion from / to Hugging Face: zoo.convert.llm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models.layers import REMAT_POLICIES, Linear, check_remat, dot_product_attention, param

Array = jax.Array
POOLS = ("mean", "last")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """One decoder architecture. `rope_scaling`: None or Llama 3's (factor, low_freq_factor,
  high_freq_factor, original_max_position_embeddings). `qkv_bias` / `o_bias`: biases of the
  q/k/v and output projections (Qwen2: q/k/v only; Llama's attention_bias: all four).
  `qk_norm`: Qwen3's RMSNorm of each head of q and k before the rotation."""

  model_type: str = "llama"
  vocab_size: int = 128256
  width: int = 4096
  layers: int = 32
  heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  mlp_dim: int = 14336
  rms_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: tuple[float, float, float, int] | None = None
  max_positions: int = 8192
  context_length: int = 512  # the token rows a tokenizer makes for this tower (LLM2CLIP: 512)
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_word_embeddings: bool = False
  pad_token_id: int = 0
  causal: bool = True
  pool: str = "mean"
  pool_skip: int = 0  # leading positions (a fixed prompt prefix) attended to but not pooled
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f"LLM pool {self.pool!r}: expected one of {', '.join(POOLS)}")
    if self.heads % self.kv_heads:
      raise ValueError(f"LLM heads {self.heads} not divisible by kv_heads {self.kv_heads}")
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LLMConfig":
    return cls(**dict(d))


# Small towers for tests and the CPU demo (vocabulary of zoo's CLIP BPE tokenizer).
TEXT_MODELS: dict[str, LLMConfig] = {
    "llama3-8b": LLMConfig(rope_scaling=None),
    "llama3.1-8b": LLMConfig(rope_scaling=(8.0, 1.0, 4.0, 8192), max_positions=131072),
    "llama3.2-1b": LLMConfig(width=2048, layers=16, kv_heads=8, head_dim=64, mlp_dim=8192,
                             rope_scaling=(32.0, 1.0, 4.0, 8192), max_positions=131072,
                             tie_word_embeddings=True),
    "llm-tiny": LLMConfig(vocab_size=49408, width=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                          mlp_dim=128, max_positions=512, causal=False),
}


def text_config(name: str, **overrides: Any) -> LLMConfig:
  if name not in TEXT_MODELS:
    raise ValueError(f"unknown LLM text model {name!r}; known: {', '.join(sorted(TEXT_MODELS))}")
  valid = {f.name for f in dataclasses.fields(LLMConfig)}
  bad = sorted(set(overrides) - valid)
  if bad:
    raise ValueError(f"unknown LLM config key {bad[0]!r}; valid: {', '.join(sorted(valid))}")
  return dataclasses.replace(TEXT_MODELS[name], **overrides)


def inv_frequencies(cfg: LLMConfig) -> np.ndarray:
  """Rotary inverse frequencies [head_dim / 2] (float32), with Llama 3's scaling if set."""
  dim = cfg.head_dim
  inv = (1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
  inv = inv.astype(np.float32)
  if cfg.rope_scaling is None:
    return inv
  factor, low, high, old = cfg.rope_scaling
  low_wavelen, high_wavelen = old / low, old / high
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, L, H, Dh] rotated (the halves convention of transformers' rotate_half)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, statistics in float32, the product in x's dtype (as transformers)."""

  def __init__(self, width: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((width,), jnp.float32), eager_sharding=False,
                            out_sharding=("norm",))

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(dtype) * h.astype(dtype)


class SelfAttention(nnx.Module):
  """Grouped-query attention with rotary positions (q_proj / k_proj / v_proj / o_proj)."""

  def __init__(self, cfg: LLMConfig, *, dtype, rngs: nnx.Rngs):
    w, h, kv, dh = cfg.width, cfg.heads, cfg.kv_heads, cfg.head_dim
    self.heads, self.kv_heads, self.head_dim = h, kv, dh
    lin = lambda i, o, ax, b: Linear(i, o, axes=ax, use_bias=b, dtype=dtype, rngs=rngs)
    self.q_proj = lin(w, h * dh, ("embed", "heads"), cfg.qkv_bias)
    self.k_proj = lin(w, kv * dh, ("embed", "heads"), cfg.qkv_bias)
    self.v_proj = lin(w, kv * dh, ("embed", "heads"), cfg.qkv_bias)
    self.o_proj = lin(h * dh, w, ("heads", "embed"), cfg.o_bias)
    self.q_norm = nnx.data(RMSNorm(dh, cfg.rms_eps) if cfg.qk_norm else None)
    self.k_norm = nnx.data(RMSNorm(dh, cfg.rms_eps) if cfg.qk_norm else None)

  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, causal: bool) -> Array:
    b, length, _ = x.shape
    q = self.q_proj(x).reshape(b, length, self.heads, self.head_dim)
    k = self.k_proj(x).reshape(b, length, self.kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, length, self.kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    group = self.heads // self.kv_heads
    if group > 1:
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    out = dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    return self.o_proj(out.reshape(b, length, self.heads * self.head_dim))


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LLMConfig, *, dtype, rngs: nnx.Rngs):
    w, m, bias = cfg.width, cfg.mlp_dim, cfg.mlp_bias
    self.gate_proj = Linear(w, m, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs)
    self.up_proj = Linear(w, m, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs)
    self.down_proj = Linear(m, w, axes=("mlp", "embed"), use_bias=bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.width, cfg.rms_eps)
    self.self_attn = SelfAttention(cfg, dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.width, cfg.rms_eps)
    self.mlp = SwiGLU(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, causal: bool) -> Array:
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, causal).astype(x.dtype)
    return x + self.mlp(self.post_attention_layernorm(x)).astype(x.dtype)


class LLM(nnx.Module):
  """The decoder stack (transformers' `*Model`, no LM head): embed_tokens, layers, norm.

  `dtype`: compute dtype; `remat`: 'none' | 'block' | 'full' (zoo.models.layers.REMAT_POLICIES).
  """

  def __init__(self, config: LLMConfig, *, dtype=jnp.float32, remat: str = "none",
               rngs: nnx.Rngs):
    self.config, self.dtype, self.remat = config, jnp.dtype(dtype), check_remat(remat)
    self.embed_tokens = param(rngs, nnx.initializers.normal(0.02),
                              (config.vocab_size, config.width), ("vocab", "embed"))
    self.layers = nnx.List([DecoderLayer(config, dtype=self.dtype, rngs=rngs)
                            for _ in range(config.layers)])
    self.norm = RMSNorm(config.width, config.rms_eps)
    if config.param_dtype != "float32":
      pdt = jnp.dtype(config.param_dtype)
      for _, var in nnx.iter_graph(self):
        if isinstance(var, nnx.Param):
          var.set_value(var.get_value().astype(pdt))

  def rotary(self, length: int) -> tuple[Array, Array]:
    """cos, sin [1, L, 1, Dh] in the compute dtype (positions 0..L-1)."""
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_frequencies(self.config)[None]
    emb = np.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    return jnp.asarray(np.cos(emb), self.dtype), jnp.asarray(np.sin(emb), self.dtype)

  def __call__(self, ids: Array, attention_mask: Array | None = None) -> Array:
    """ids int [B, L], attention_mask [B, L] (1 = token, 0 = padding) -> [B, L, W]."""
    if ids.ndim != 2:
      raise ValueError(f"token ids must be [B, L]; got shape {tuple(ids.shape)}")
    b, length = ids.shape
    if length > self.config.max_positions:
      raise ValueError(f"tokens have length {length}; the LLM reads at most "
                       f"{self.config.max_positions}")
    if attention_mask is None:
      attention_mask = jnp.ones((b, length), jnp.int32)
    mask = attention_mask.astype(bool)[:, None, None, :]
    cos, sin = self.rotary(length)
    x = jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.dtype)
    causal = self.config.causal

    def run(layer: nnx.Module, x: Array) -> Array:
      return layer(x, cos, sin, mask, causal)

    if self.remat != "none":
      run = nnx.remat(run, policy=REMAT_POLICIES[self.remat])
    for layer in self.layers:
      x = run(layer, x)
    return self.norm(x)

  def encode(self, ids: Array, attention_mask: Array | None = None) -> Array:
    """Pooled [B, W] (float32): mean over the mask, or the last real token."""
    if attention_mask is None:
      attention_mask = (ids != self.config.pad_token_id).astype(jnp.int32)
    pooled = attention_mask
    if self.config.pool_skip:  # LLM2Vec pools the text, not its instruction / chat prefix
      pooled = attention_mask * (jnp.arange(ids.shape[1]) >= self.config.pool_skip)
    return pool(self(ids, attention_mask), pooled, self.config.pool)

  def logits(self, hidden: Array) -> Array:
    """Next-token logits with the tied input embedding (tie_word_embeddings models only)."""
    if not self.config.tie_word_embeddings:
      raise ValueError("this LLM's output head is not tied to embed_tokens; zoo keeps no lm_head")
    return hidden @ self.embed_tokens[...].astype(hidden.dtype).T


def pool(hidden: Array, attention_mask: Array, kind: str) -> Array:
  """[B, L, W] -> [B, W] float32: 'mean' over mask == 1, or 'last' (the last position with
  mask == 1: right or left padding)."""
  m = attention_mask.astype(jnp.float32)
  h = hidden.astype(jnp.float32)
  if kind == "mean":
    return jnp.sum(h * m[..., None], axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)[:, None]
  last = m.shape[1] - 1 - jnp.argmax(m[:, ::-1], axis=1)
  return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
