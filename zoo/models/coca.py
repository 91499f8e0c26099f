"""CoCa (Yu et al., 2022) as open_clip builds it: contrastive towers + a captioning decoder.

Image tower: CLIP's ViT, then an attentional pooler (`attn_pooler_queries` learned queries,
cross-attention over the ViT tokens), ln_post on every query; the first query, projected, is
the contrastive embedding, the others are the image tokens the decoder reads. Text tower: CLIP's
causal transformer with a learned `cls_emb` appended after the tokens; its output (ln_final,
projection) is the text embedding, the tokens before it (no ln_final) feed the decoder. Its
attention also masks pad keys, shifted by one as open_clip's released CoCa weights expect.
Decoder: per layer a causal self-attention block then a cross-attention block over the image
tokens, ln_final, a projection to the vocabulary. `generate` captions images under jit with
fixed shapes (full recompute of the prefix each step, no KV cache): greedy / top-k / top-p
sampling as open_clip's `generate`, and a beam search.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.models import clip as clip_lib, configs as registry
from zoo.models.layers import (
  Attention,
  LayerNorm,
  Linear,
  ResidualBlock,
  Transformer,
  dot_product_attention,
  param,
)

Array = jax.Array
SOT_ID, EOT_ID = 49406, 49407  # CLIP BPE start / end of text
GENERATION_TYPES = ("top_k", "top_p", "beam_search")


@dataclasses.dataclass(frozen=True)
class CoCaVisionConfig(registry.VisionConfig):
  """CLIP's ViT config plus the attentional pooler (open_clip `attentional_pool=True`)."""
  attn_pooler_queries: int = 256
  attn_pooler_heads: int = 8


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
  """open_clip's `multimodal_cfg`: the captioning decoder (vocabulary: the text tower's)."""
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0
  context_length: int = 76  # open_clip's causal mask size: the longest decoder input
  ln_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CoCaConfig(registry.CLIPConfig):
  """A CoCa model; `text.context_length` is the tokenizer's (76), the tower adds the cls slot."""

  vision: CoCaVisionConfig = CoCaVisionConfig()
  text: registry.TextConfig = registry.TextConfig(context_length=76)
  multimodal: MultimodalConfig = MultimodalConfig()
  pad_id: int = 0

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CoCaConfig":
    d = dict(d)
    return dataclasses.replace(super().from_dict({k: v for k, v in d.items() if k != "multimodal"}),
                               multimodal=MultimodalConfig(**d["multimodal"]))


class AttentionalPooler(nnx.Module):
  """open_clip's AttentionalPooler: queries (ln_q) attend to ln_k(tokens) in one MHA (packed
  `qkv_kernel` when both widths agree, as torch packs them, else `q_kernel` + `kv_kernel`)."""

  def __init__(self, d_model: int, context_dim: int, heads: int, queries: int, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.heads, self.dtype, self.packed = heads, dtype, d_model == context_dim
    normal = nnx.initializers.normal
    self.query = param(rngs, normal(1.0), (queries, d_model), (None, "embed"))
    self.ln_q = LayerNorm(d_model, rngs=rngs)
    self.ln_k = LayerNorm(context_dim, rngs=rngs)
    if self.packed:
      self.qkv_kernel = param(rngs, normal(d_model ** -0.5), (d_model, 3, d_model),
                              ("embed", None, "mlp"))
    else:
      self.q_kernel = param(rngs, normal(d_model ** -0.5), (d_model, d_model), ("embed", "mlp"))
      self.kv_kernel = param(rngs, normal(context_dim ** -0.5), (context_dim, 2, d_model),
                             ("embed", None, "mlp"))
    self.qkv_bias = nnx.Param(jnp.zeros((3, d_model), jnp.float32), eager_sharding=False,
                              out_sharding=(None, "mlp"))
    self.out = Linear(d_model, d_model, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x [B, N, context_dim] -> [B, queries, d_model]."""
    dt = self.dtype
    b, n, _ = x.shape
    x = self.ln_k(x).astype(dt)
    if self.packed:
      kernel = self.qkv_kernel[...].astype(dt)
      wq, wkv = kernel[:, 0], kernel[:, 1:]
    else:
      wq, wkv = self.q_kernel[...].astype(dt), self.kv_kernel[...].astype(dt)
    bias = self.qkv_bias[...].astype(dt)
    q = self.ln_q(self.query[...]).astype(dt) @ wq + bias[0]
    kv = jnp.einsum("bnc,ctd->bntd", x, wkv) + bias[1:]
    d, h = q.shape[-1], self.heads
    q = jnp.broadcast_to(q.reshape(1, -1, h, d // h), (b, q.shape[0], h, d // h))
    kv = kv.reshape(b, n, 2, h, d // h)
    return self.out(dot_product_attention(q, kv[:, :, 0], kv[:, :, 1]).reshape(b, -1, d))


class CoCaVision(clip_lib.VisionTransformer):
  """ViT (class token, ln_pre, blocks) -> attentional pooler -> ln_post -> (pooled @ proj,
  the other queries' tokens)."""

  def __init__(self, cfg: CoCaVisionConfig, embed_dim: int, *, quick_gelu: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    # The ViT part is CLIP's with ln_post moved after the pooler (`tokens` skips it).
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(registry.VisionConfig)}
    self.cfg = registry.VisionConfig(**dict(base, final_ln_after_pool=True, pool="tok"))
    self.dtype = dtype
    w, p = cfg.width, cfg.patch_size
    scale = w ** -0.5
    self.patch_kernel = param(rngs, nnx.initializers.normal((3 * p * p) ** -0.5), (p, p, 3, w),
                              (None, None, None, "embed"))
    self.patch_bias = None
    self.class_embedding = param(rngs, nnx.initializers.normal(scale), (w,), ("embed",))
    self.positional_embedding = param(rngs, nnx.initializers.normal(scale),
                                      (cfg.grid_size ** 2 + 1, w), (None, "embed"))
    self.ln_pre = LayerNorm(w, eps=cfg.ln_eps, rngs=rngs)
    self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio,
                                   quick_gelu=cfg.act or quick_gelu, eps=cfg.ln_eps, dtype=dtype,
                                   rngs=rngs)
    self.attn_pool = AttentionalPooler(embed_dim, w, cfg.attn_pooler_heads,
                                       cfg.attn_pooler_queries, dtype=dtype, rngs=rngs)
    self.ln_post = LayerNorm(embed_dim, eps=cfg.ln_eps, rngs=rngs)
    self.proj = param(rngs, nnx.initializers.normal(embed_dim ** -0.5), (embed_dim, embed_dim),
                      ("embed", None))

  def __call__(self, images: Array, *, return_tokens: bool = False, **kwargs):
    """Contrastive embedding [B, E] (and the decoder's image tokens [B, queries - 1, E])."""
    x = self.ln_post(self.attn_pool(self.tokens(images, **kwargs)))
    pooled = x[:, 0] @ self.proj[...].astype(x.dtype)
    return (pooled, x[:, 1:]) if return_tokens else pooled


class CoCaText(clip_lib.TextTransformer):
  """CLIP's causal text tower with `cls_emb` appended (one more position row)."""
  def __init__(self, cfg: registry.TextConfig, embed_dim: int, *, pad_id: int = 0,
               quick_gelu: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(dataclasses.replace(cfg, context_length=cfg.context_length + 1), embed_dim,
                     quick_gelu=quick_gelu, dtype=dtype, rngs=rngs)
    self.pad_id = pad_id
    self.cls_emb = param(rngs, nnx.initializers.normal(0.01), (cfg.width,), ("embed",))

  def features(self, token_ids: Array) -> tuple[Array, Array]:
    """int32 [B, L] -> (text embedding [B, E], token states [B, L, width] for the decoder)."""
    b, length = token_ids.shape
    if length + 1 > self.positional_embedding.shape[0]:
      raise ValueError(f"tokens have length {length} but the CoCa text tower reads at most "
                       f"{self.positional_embedding.shape[0] - 1} (context_length)")
    x = self.embed(token_ids)
    cls = jnp.broadcast_to(self.cls_emb[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([x, cls], axis=1)
    x = x + self.positional_embedding[...][:length + 1].astype(x.dtype)
    # open_clip's legacy CoCa mask: key j > 0 is dropped when token j - 1 is padding.
    valid = jnp.concatenate([jnp.ones((b, 1), bool), token_ids != self.pad_id], axis=1)
    x = self.transformer(x, mask=valid[:, None, None, :], is_causal=True)
    return self._project(self.ln_final(x[:, -1])), x[:, :-1]

  def __call__(self, token_ids: Array, **_) -> Array:
    return self.features(token_ids)[0]


class CrossAttention(Attention):
  """Attention's parameters with queries from `x`, keys / values from `context`."""
  def __call__(self, x: Array, context: Array) -> Array:
    dt, h, dh = self.dtype, self.heads, self.head_dim
    (b, n, w), m = x.shape, context.shape[1]
    kernel, bias = self.qkv_kernel[...].astype(dt), self.qkv_bias[...].astype(dt)
    xq, xc = x.astype(dt).reshape(b * n, w), context.astype(dt).reshape(b * m, w)
    q = jnp.einsum("nd,dhk->nhk", xq, kernel[:, 0]) + bias[0]
    kv = jnp.einsum("nd,dthk->nthk", xc, kernel[:, 1:]) + bias[1:]
    if self.qkv_lora is not None:
      q = q + self.qkv_lora(xq).reshape(b * n, 3, h, dh)[:, 0]
      kv = kv + self.qkv_lora(xc).reshape(b * m, 3, h, dh)[:, 1:]
    kv = kv.reshape(b, m, 2, h, dh)
    heads = dot_product_attention(q.reshape(b, n, h, dh), kv[:, :, 0], kv[:, :, 1]).reshape(
        b * n, h, dh)
    out = jnp.einsum("nhk,hkd->nd", heads, self.out_kernel[...].astype(dt))
    if self.out_lora is not None:
      out = out + self.out_lora(heads.reshape(b * n, -1))
    return (out + self.out_bias[...].astype(dt)).reshape(b, n, -1)


class CrossBlock(ResidualBlock):
  """open_clip's cross-attention ResidualAttentionBlock: x + attn(ln_1(x), ln_1_kv(image))."""
  def __init__(self, width: int, heads: int, mlp_ratio: float, *, layers: int, eps: float,
               quick_gelu: bool, dtype, rngs: nnx.Rngs):
    super().__init__(width, heads, mlp_ratio, quick_gelu=quick_gelu, eps=eps,
                     layers_for_init=layers, dtype=dtype, rngs=rngs)
    self.attn = CrossAttention(width, heads, dtype=dtype, rngs=rngs,
                               out_std=(width ** -0.5) * ((2 * layers) ** -0.5))
    self.ln_1_kv = LayerNorm(width, eps=eps, rngs=rngs)

  def __call__(self, x: Array, image: Array) -> Array:
    x = x + self.attn(self.ln_1(x), self.ln_1_kv(image)).astype(x.dtype)
    return x + self.mlp(self.ln_2(x)).astype(x.dtype)


class MultimodalDecoder(nnx.Module):
  """open_clip's MultimodalTransformer: causal self-attention and cross-attention blocks in
  turn, ln_final, `text_projection` [width, vocab] to the caption logits."""

  def __init__(self, cfg: MultimodalConfig, vocab_size: int, *, quick_gelu: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    w, n = cfg.width, cfg.layers
    self.resblocks = nnx.List([
        ResidualBlock(w, cfg.heads, cfg.mlp_ratio, quick_gelu=quick_gelu, eps=cfg.ln_eps,
                      layers_for_init=n, dtype=dtype, rngs=rngs) for _ in range(n)])
    self.cross_attn = nnx.List([
        CrossBlock(w, cfg.heads, cfg.mlp_ratio, layers=n, eps=cfg.ln_eps, quick_gelu=quick_gelu,
                   dtype=dtype, rngs=rngs) for _ in range(n)])
    self.ln_final = LayerNorm(w, eps=cfg.ln_eps, rngs=rngs)
    self.text_projection = param(rngs, nnx.initializers.normal(w ** -0.5), (w, vocab_size),
                                 ("embed", "vocab"))

  def __call__(self, image_tokens: Array, x: Array) -> Array:
    """image tokens [B, M, width], text token states [B, L, width] -> logits [B, L, vocab]."""
    for block, cross in zip(self.resblocks, self.cross_attn):
      x = cross(block(x, is_causal=True), image_tokens)
    return self.ln_final(x) @ self.text_projection[...].astype(x.dtype)


class CoCa(clip_lib.CLIP):
  """CoCa: `encode_image` / `encode_text` as CLIP; `model(images, tokens)` adds the caption
  `logits` [B, L-1, vocab] (teacher forcing on tokens[:, :-1]) and their `labels` tokens[:, 1:];
  `generate(images, ...)` captions."""

  def __init__(self, config: CoCaConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    m = config.multimodal
    if m.width != config.text.width or m.width != config.embed_dim:
      raise ValueError(f"CoCa decoder width {m.width} must equal the text width "
                       f"{config.text.width} and embed_dim {config.embed_dim}")
    self.visual = CoCaVision(config.vision, config.embed_dim, quick_gelu=config.quick_gelu,
                             dtype=dtype, rngs=rngs)
    self.text = CoCaText(config.text, config.embed_dim, pad_id=config.pad_id,
                         quick_gelu=config.quick_gelu, dtype=dtype, rngs=rngs)
    self.text_decoder = MultimodalDecoder(m, config.text.vocab_size,
                                          quick_gelu=config.quick_gelu, dtype=dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(config.init_logit_scale, jnp.float32),
                                 eager_sharding=False, out_sharding=())
    self.logit_bias = (nnx.Param(jnp.asarray(config.init_logit_bias, jnp.float32),
                                 eager_sharding=False, out_sharding=())
                       if config.init_logit_bias is not None else None)

  def image_tokens(self, images: Array) -> tuple[Array, Array]:
    """(contrastive image embedding [B, E], decoder image tokens [B, queries - 1, E])."""
    clip_lib.check_images(images)
    return self.visual(images, return_tokens=True)

  def caption_logits(self, image_tokens: Array, token_ids: Array) -> Array:
    """Next-token logits [B, L, vocab] (float32) after each of `token_ids` [B, L]."""
    _, states = self.text.features(token_ids)
    return self.text_decoder(image_tokens, states).astype(jnp.float32)

  def __call__(self, images: Array, tokens: Array) -> dict[str, Array]:
    pooled, image_tokens = self.image_tokens(images)
    text, states = self.text.features(tokens)
    out = {
        "image_features": clip_lib.l2_normalize(pooled),
        "text_features": clip_lib.l2_normalize(text),
        "logit_scale": jnp.exp(self.logit_scale[...]),
        "logits": self.text_decoder(image_tokens, states[:, :-1]).astype(jnp.float32),
        "labels": tokens[:, 1:],
    }
    if self.logit_bias is not None:
      out["logit_bias"] = self.logit_bias[...]
    return out

  def generate(self, images: Array, seq_len: int = 30, **kwargs: Any) -> Array:
    return generate(self, images, seq_len=seq_len, **kwargs)  # captions [B, seq_len] int32


# ----------------------------------------------------------------------------- generation


def _process(logits: Array, tokens: Array, t: Array, *, min_seq_len: int, eos_id: int,
             repetition_penalty: float) -> Array:
  """open_clip's logit processors: eos banned below `min_seq_len` tokens (sot included),
  transformers' repetition penalty over the tokens so far (positions < t)."""
  logits = jnp.where((jnp.arange(logits.shape[-1]) == eos_id) & (t < min_seq_len), -jnp.inf,
                     logits)
  if repetition_penalty != 1.0:
    seen = jnp.broadcast_to(jnp.arange(tokens.shape[1]) < t, tokens.shape)
    present = jnp.zeros(logits.shape, bool).at[
        jnp.arange(tokens.shape[0])[:, None], tokens].max(seen)
    penalized = jnp.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
    logits = jnp.where(present, penalized, logits)
  return logits


def _warp(logits: Array, generation_type: str, top_k: int, top_p: float) -> Array:
  """transformers' TopKLogitsWarper / TopPLogitsWarper (keep at least one token)."""
  if generation_type == "top_k":
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)
  order = jnp.argsort(logits, axis=-1)  # ascending
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  drop = (cum <= 1 - top_p).at[..., -1].set(False)
  remove = jnp.zeros_like(drop).at[jnp.arange(logits.shape[0])[:, None], order].set(drop)
  return jnp.where(remove, -jnp.inf, logits)


def _sample(model: CoCa, image_tokens: Array, batch: int, rng: Array, *, seq_len: int,
            generation_type: str, top_k: int, top_p: float, temperature: float,
            min_seq_len: int, repetition_penalty: float, sot_id: int, eos_id: int,
            pad_id: int) -> Array:
  tokens = jnp.full((batch, seq_len), pad_id, jnp.int32).at[:, 0].set(sot_id)

  def cond(state):
    t, _, done, _ = state
    return (t < seq_len) & ~jnp.all(done)

  def body(state):
    t, tokens, done, rng = state
    logits = jax.lax.dynamic_index_in_dim(model.caption_logits(image_tokens, tokens), t - 1,
                                          axis=1, keepdims=False)
    logits = _process(logits, tokens, t, min_seq_len=min_seq_len, eos_id=eos_id,
                      repetition_penalty=repetition_penalty)
    logits = _warp(logits, generation_type, top_k, top_p)
    rng, key = jax.random.split(rng)
    if generation_type == "top_k" and top_k == 1:
      sample = jnp.argmax(logits, axis=-1)  # the one token left: multinomial picks it
    else:
      sample = jax.random.categorical(key, logits / temperature, axis=-1)
    sample = jnp.where(t + 1 == seq_len, eos_id, sample)  # the last slot ends the caption
    sample = jnp.where(done, pad_id, sample).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, sample, t, axis=1)
    return t + 1, tokens, done | (sample == eos_id) | (sample == pad_id), rng

  return jax.lax.while_loop(cond, body, (jnp.asarray(1), tokens, jnp.zeros((batch,), bool),
                                         rng))[1]


def _beam_search(model: CoCa, image_tokens: Array, batch: int, *, seq_len: int, num_beams: int,
                 min_seq_len: int, repetition_penalty: float, length_penalty: float,
                 sot_id: int, eos_id: int, pad_id: int) -> Array:
  """open_clip's `_generate_beamsearch` (transformers 4's BeamSearchScorer, one group) at fixed
  shapes; beams score the sum of the processed raw logits, as open_clip's (no log-softmax)."""
  k, image_tokens = num_beams, jnp.repeat(image_tokens, num_beams, axis=0)
  beams = jnp.full((batch, k, seq_len), pad_id, jnp.int32).at[..., 0].set(sot_id)
  scores = jnp.full((batch, k), -1e9, jnp.float32).at[:, 0].set(0.0)
  pool = jnp.full((batch, k, seq_len), pad_id, jnp.int32)
  pool_scores = jnp.full((batch, k), -jnp.inf, jnp.float32)

  def add_to_pool(pool, pool_scores, seqs, seq_scores):
    seqs = jnp.concatenate([pool, seqs], axis=1)
    seq_scores = jnp.concatenate([pool_scores, seq_scores], axis=1)
    best = jax.lax.top_k(seq_scores, k)[1]
    return (jnp.take_along_axis(seqs, best[..., None], axis=1),
            jnp.take_along_axis(seq_scores, best, axis=1))

  def body(t, state):
    beams, scores, pool, pool_scores, done = state
    flat = beams.reshape(batch * k, seq_len)
    logits = jax.lax.dynamic_index_in_dim(model.caption_logits(image_tokens, flat), t - 1,
                                          axis=1, keepdims=False).astype(jnp.float32)
    logits = _process(logits, flat, t, min_seq_len=min_seq_len, eos_id=eos_id,
                      repetition_penalty=repetition_penalty)
    vocab = logits.shape[-1]
    cand = (scores[..., None] + logits.reshape(batch, k, vocab)).reshape(batch, k * vocab)
    top, index = jax.lax.top_k(cand, 2 * k)
    origin, token = index // vocab, (index % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(beams, origin[..., None], axis=1)
    seqs = jax.lax.dynamic_update_index_in_dim(seqs, token, t, axis=2)
    is_eos = token == eos_id
    norm = (t + 1.0) ** length_penalty  # the length of the caption with its eos
    ended = jnp.where(is_eos & (jnp.arange(2 * k) < k) & ~done[:, None], top / norm, -jnp.inf)
    pool, pool_scores = add_to_pool(pool, pool_scores, seqs, ended)
    done = done | (jnp.all(pool_scores > -jnp.inf, 1) & (pool_scores.min(1) >= top[:, 0] / norm))
    # The k best candidates that do not end continue (stable: rank order kept).
    keep = jnp.argsort(is_eos.astype(jnp.int32) * (2 * k) + jnp.arange(2 * k), axis=-1)[:, :k]
    beams = jnp.take_along_axis(seqs, keep[..., None], axis=1)
    scores = jnp.take_along_axis(jnp.where(is_eos, -jnp.inf, top), keep, axis=1)
    return beams, scores, pool, pool_scores, done

  beams, scores, pool, pool_scores, done = jax.lax.fori_loop(
      1, seq_len, body, (beams, scores, pool, pool_scores, jnp.zeros((batch,), bool)))
  final = jnp.where(done[:, None], -jnp.inf, scores / float(seq_len) ** length_penalty)
  return add_to_pool(pool, pool_scores, beams, final)[0][:, 0]


@functools.partial(nnx.jit, static_argnames=(
    "seq_len", "generation_type", "top_k", "top_p", "temperature", "num_beams", "min_seq_len",
    "repetition_penalty", "length_penalty", "sot_id", "eos_id", "pad_id"))
def _generate(model, images, rng, *, seq_len, generation_type, top_k, top_p, temperature,
              num_beams, min_seq_len, repetition_penalty, length_penalty, sot_id, eos_id,
              pad_id):
  _, image_tokens = model.image_tokens(images)
  common = dict(seq_len=seq_len, min_seq_len=min_seq_len, repetition_penalty=repetition_penalty,
                sot_id=sot_id, eos_id=eos_id, pad_id=pad_id)
  if generation_type == "beam_search":
    return _beam_search(model, image_tokens, images.shape[0], num_beams=num_beams,
                        length_penalty=length_penalty, **common)
  return _sample(model, image_tokens, images.shape[0], rng, generation_type=generation_type,
                 top_k=top_k, top_p=top_p, temperature=temperature, **common)


def generate(model: CoCa, images: Array, *, seq_len: int = 30, generation_type: str = "top_k",
             top_k: int = 1, top_p: float = 0.1, temperature: float = 1.0, num_beams: int = 6,
             num_beam_groups: int = 3, min_seq_len: int = 5, repetition_penalty: float = 1.0,
             length_penalty: float = 1.0, sot_id: int = SOT_ID, eos_id: int = EOT_ID,
             pad_id: int | None = None, rng: Array | None = None) -> Array:
  """Captions of preprocessed `images` [B, H, W, 3] as open_clip's `generate(...,
  fixed_output_length=True)`: int32 [B, seq_len], sot first, eos after a caption that ends, then
  `pad_id` (the model's, 0). 'top_k' (top_k=1: greedy) / 'top_p' sample with `rng` after
  open_clip's processors (eos banned before `min_seq_len` tokens, repetition penalty,
  temperature); 'beam_search' is open_clip's, whose groups get no diversity penalty: identical
  searches of num_beams // num_beam_groups beams, run once here. Compiled once per set of static
  arguments (fixed shapes; each step recomputes the prefix)."""
  if generation_type not in GENERATION_TYPES:
    raise ValueError(f"generation_type {generation_type!r}: expected one of "
                     f"{', '.join(GENERATION_TYPES)}")
  limit = model.config.text.context_length
  if not min_seq_len < seq_len <= limit:
    raise ValueError(f"seq_len {seq_len}: expected min_seq_len ({min_seq_len}) < seq_len <= "
                     f"{limit} (the text context)")
  if not 1 <= num_beam_groups <= num_beams or num_beams % num_beam_groups:
    raise ValueError(f"num_beams {num_beams}, num_beam_groups {num_beam_groups}: expected "
                     "num_beams a positive multiple of num_beam_groups")
  return _generate(model, jnp.asarray(images, jnp.float32),
                   jax.random.key(0) if rng is None else rng, seq_len=seq_len,
                   generation_type=generation_type, top_k=int(top_k), top_p=float(top_p),
                   temperature=float(temperature), num_beams=num_beams // num_beam_groups,
                   min_seq_len=int(min_seq_len), repetition_penalty=float(repetition_penalty),
                   length_penalty=float(length_penalty), sot_id=int(sot_id), eos_id=int(eos_id),
                   pad_id=int(model.config.pad_id if pad_id is None else pad_id))


# ----------------------------------------------------------------------------- the table


def _coca(embed: int, image: tuple, text: tuple, pooler_heads: int, queries: int = 256
          ) -> CoCaConfig:
  """image (size, patch, width, layers, heads), text = decoder (width, heads, layers)."""
  (size, patch, width, layers, heads), (t_width, t_heads, t_layers) = image, text
  return CoCaConfig(
      embed_dim=embed,
      vision=CoCaVisionConfig(image_size=size, patch_size=patch, width=width, layers=layers,
                              heads=heads, attn_pooler_heads=pooler_heads,
                              attn_pooler_queries=queries),
      text=registry.TextConfig(context_length=76, width=t_width, heads=t_heads, layers=t_layers),
      multimodal=MultimodalConfig(width=t_width, heads=t_heads, layers=t_layers))


# open_clip's model_configs/coca_ViT-*.json, and a small CoCa for the CPU demo and tests.
COCAS = {"coca_ViT-B-32": _coca(512, (224, 32, 768, 12, 12), (512, 8, 12), 8),
         "coca_ViT-L-14": _coca(768, (224, 14, 1024, 24, 16), (768, 12, 12), 8),
         "coca-demo-tiny": _coca(64, (32, 8, 64, 2, 2), (64, 2, 2), 2, queries=8)}
for _name, _config in COCAS.items():
  registry.register(_name, _config)
clip_lib.MODEL_CLASSES[CoCaConfig] = CoCa
