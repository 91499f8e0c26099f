"""CLIP and SigLIP in Flax NNX: ViT image tower, transformer text tower, contrastive heads.

The forward pass is open_clip's (and OpenAI's) exactly, so converted weights give the same
features: see tests/test_convert.py for the parity checks against PyTorch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models import configs
from zoo.models.layers import AttentionPool, LayerNorm, Transformer, param, resize_positions

Array = jax.Array


def _dtype(name: str):
  return jnp.dtype(name)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / ||x|| along the last axis, in float32 (as torch.nn.functional.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class VisionTransformer(nnx.Module):
  """ViT: patch embedding, [class token], positions, [ln_pre], blocks, ln_post, pool, proj."""

  def __init__(self, cfg: configs.VisionConfig, embed_dim: int, *, quick_gelu: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    w, p = cfg.width, cfg.patch_size
    scale = w ** -0.5
    quick_gelu = cfg.act or quick_gelu
    # Conv with stride = kernel = patch, stored HWIO so it applies as one einsum over patches.
    self.patch_kernel = param(rngs, nnx.initializers.normal((3 * p * p) ** -0.5), (p, p, 3, w),
                              (None, None, None, "embed"))
    self.patch_bias = (nnx.Param(jnp.zeros((w,), jnp.float32), eager_sharding=False, out_sharding=("embed",))
                       if cfg.patch_bias else None)
    n_tokens = cfg.grid_size ** 2 + (1 if cfg.class_token else 0)
    self.class_embedding = (param(rngs, nnx.initializers.normal(scale), (w,), ("embed",))
                            if cfg.class_token else None)
    self.positional_embedding = param(rngs, nnx.initializers.normal(scale), (n_tokens, w),
                                      (None, "embed"))
    self.ln_pre = LayerNorm(w, eps=cfg.ln_eps, rngs=rngs) if cfg.ln_pre else None
    self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu=quick_gelu,
                                   eps=cfg.ln_eps, dtype=dtype, rngs=rngs)
    self.ln_post = LayerNorm(w, eps=cfg.ln_eps, rngs=rngs)
    self.attn_pool = (AttentionPool(w, cfg.heads, cfg.mlp_ratio, eps=cfg.ln_eps,
                                    quick_gelu=quick_gelu, dtype=dtype, rngs=rngs)
                      if cfg.pool == "map" else None)
    self.proj = (param(rngs, nnx.initializers.normal(scale), (w, embed_dim), ("embed", None))
                 if cfg.projection else None)

  def patch_embed(self, images: Array) -> Array:
    """images [B, H, W, 3] -> patch tokens [B, gh*gw, width]."""
    b, h, w, c = images.shape
    p = self.cfg.patch_size
    if h == w == self.cfg.image_size and h % p:  # a strided conv drops the last pixels (384/14)
      h = w = self.cfg.grid_size * p
      images = images[:, :h, :w]
    if h % p or w % p or c != 3:
      raise ValueError(f"images must be [B, H, W, 3] with H, W multiples of {p}; got {images.shape}")
    # Patches as rows [B*gh*gw, p*p*3] times the kernel [p*p*3, width]: one plain GEMM.
    x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, p * p * c) @ self.patch_kernel[...].astype(self.dtype).reshape(p * p * c, -1)
    if self.patch_bias is not None:
      x = x + self.patch_bias[...].astype(self.dtype)
    return x.reshape(b, (h // p) * (w // p), -1)

  def patchify(self, images: Array) -> Array:
    """NaFlex input: images [B, H, W, 3] -> patches [B, (H/p)*(W/p), p*p*3], row-major, each
    flattened (row, col, channel) as transformers' Siglip2 processor; one-line errors for a
    side that is not a multiple of the patch or a patch count over `max_patches`."""
    b, h, w, c = images.shape
    p, budget = self.cfg.patch_size, self.cfg.max_patches
    if h % p or w % p or c != 3:
      raise ValueError(f"NaFlex images must be [B, H, W, 3] with H and W multiples of the patch "
                       f"size {p}; got {tuple(images.shape)}")
    if budget and (h // p) * (w // p) > budget:
      raise ValueError(f"images {h}x{w} give {(h // p) * (w // p)} patches of {p}px, over the "
                       f"model's budget of {budget} (max_patches); resize them to fit first")
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def patch_tokens(self, patches: Array, spatial_shapes: Array, mask: Array | None = None
                   ) -> Array:
    """NaFlex tokens after the final LayerNorm: patches [B, N, p*p*3], spatial_shapes [B, 2]
    (rows, cols of patches per image), mask [B, N] (True = a real patch, None = all)."""
    w, g = self.cfg.width, self.cfg.grid_size
    x = patches.astype(self.dtype) @ self.patch_kernel[...].astype(self.dtype).reshape(-1, w)
    if self.patch_bias is not None:
      x = x + self.patch_bias[...].astype(self.dtype)
    pos = resize_positions(self.positional_embedding[...].reshape(g, g, w), spatial_shapes,
                           x.shape[1])
    x = x + pos.astype(x.dtype)
    x = self.transformer(x, mask=None if mask is None else mask[:, None, None, :])
    return self.ln_post(x)

  def encode_patches(self, patches: Array, spatial_shapes: Array, mask: Array | None = None
                     ) -> Array:
    """NaFlex pooled embedding [B, E] of a padded patch batch (see `patch_tokens`)."""
    return self.attn_pool(self.patch_tokens(patches, spatial_shapes, mask), mask)

  def tokens(self, images: Array, *, prompts: Array | None = None,
             before_block: Callable[[int, Array], Array] | None = None) -> Array:
    """All output tokens after the final LayerNorm (before it with `final_ln_after_pool`):
    [B, N(+1), width].

    Prompt learning (zoo.models.prompt): `prompts` [B or 1, P, width] are appended after the
    positional embedding and dropped from the output; `before_block(i, x)` maps block i's input.
    """
    if self.cfg.naflex:
      if prompts is not None or before_block is not None:
        raise ValueError("prompt learning on a NaFlex image tower is not implemented")
      b, h, w, _ = images.shape
      p = self.cfg.patch_size
      shapes = jnp.broadcast_to(jnp.asarray([h // p, w // p], jnp.int32), (b, 2))
      return self.patch_tokens(self.patchify(images), shapes)
    x = self.patch_embed(images)
    if self.class_embedding is not None:
      cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
      x = jnp.concatenate([cls, x], axis=1)
    pos = self.positional_embedding[...]
    if pos.shape[0] != x.shape[1]:
      raise ValueError(f"image gives {x.shape[1]} tokens but the positional embedding has "
                       f"{pos.shape[0]}; expected images of {self.cfg.image_size}px")
    x = x + pos.astype(x.dtype)
    n = x.shape[1]
    if prompts is not None:
      prompts = jnp.broadcast_to(prompts.astype(x.dtype), (x.shape[0], *prompts.shape[-2:]))
      x = jnp.concatenate([x, prompts], axis=1)
    if self.ln_pre is not None:
      x = self.ln_pre(x)
    x = self.transformer(x, before_block=before_block)[:, :n]
    return x if self.cfg.final_ln_after_pool else self.ln_post(x)

  def __call__(self, images: Array, *, return_tokens: bool = False, prompts: Array | None = None,
               before_block: Callable[[int, Array], Array] | None = None):
    """Pooled, projected image embedding [B, E] (and the patch tokens [B, N, width])."""
    # before ln_post when it follows the pooling (CLIPA)
    x = self.tokens(images, prompts=prompts, before_block=before_block)
    if self.attn_pool is not None:
      pooled = self.attn_pool(x)
    elif self.cfg.pool == "avg":  # mean of the patch tokens (open_clip pool_type 'avg')
      pooled = x[:, 1:].mean(axis=1) if self.class_embedding is not None else x.mean(axis=1)
    else:
      pooled = x[:, 0]
    if self.cfg.final_ln_after_pool:
      pooled = self.ln_post(pooled)
    if self.proj is not None:
      pooled = pooled @ self.proj[...].astype(pooled.dtype)
    if return_tokens:
      patches = x[:, 1:] if self.class_embedding is not None else x
      return pooled, patches
    return pooled


class TextTransformer(nnx.Module):
  """Token + position embeddings, (causal) blocks, ln_final, EOT/last pooling, projection."""

  def __init__(self, cfg: configs.TextConfig, embed_dim: int, *, quick_gelu: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    w = cfg.width
    quick_gelu = cfg.act or quick_gelu
    self.token_embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, w),
                                 ("vocab", "embed"))
    self.positional_embedding = param(rngs, nnx.initializers.normal(0.01),
                                      (cfg.context_length, w), (None, "embed"))
    self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu=quick_gelu,
                                   eps=cfg.ln_eps, dtype=dtype, rngs=rngs)
    self.ln_final = LayerNorm(w, eps=cfg.ln_eps, rngs=rngs)
    self.text_projection = (param(rngs, nnx.initializers.normal(w ** -0.5), (w, embed_dim),
                                  ("embed", None)) if cfg.projection else None)
    self.proj_bias = (nnx.Param(jnp.zeros((embed_dim,), jnp.float32), eager_sharding=False, out_sharding=(None,))
                      if cfg.proj_bias else None)

  def embed(self, token_ids: Array) -> Array:
    """Token embeddings [B, L, width] in the compute dtype (no positions)."""
    return jnp.take(self.token_embedding[...], token_ids, axis=0).astype(self.dtype)

  def tokens(self, token_ids: Array, *, embeddings: Array | None = None,
             before_block: Callable[[int, Array], Array] | None = None) -> Array:
    """All output tokens after ln_final: [B, L, width].

    Prompt learning (zoo.models.prompt): `embeddings` [B, L, width] replace `embed(token_ids)`;
    `before_block(i, x)` maps block i's input (deep prompts).
    """
    length = token_ids.shape[1]
    if length > self.positional_embedding.shape[0]:
      raise ValueError(f"tokens have length {length} but the text tower reads at most "
                       f"{self.positional_embedding.shape[0]} (context_length)")
    x = (self.embed(token_ids) if embeddings is None else embeddings.astype(self.dtype))
    pos = self.positional_embedding[...][:length]
    if self.cfg.frozen_positions:  # Long-CLIP fine-tuning: the kept rows get no gradient
      k = self.cfg.frozen_positions
      pos = jnp.concatenate([jax.lax.stop_gradient(pos[:k]), pos[k:]], axis=0)
    x = x + pos.astype(self.dtype)
    x = self.transformer(x, is_causal=self.cfg.causal, before_block=before_block)
    return self.ln_final(x)

  def pool(self, x: Array, token_ids: Array) -> Array:
    if self.cfg.pool == "argmax":  # EOT has the largest id in the CLIP vocabulary
      idx = jnp.argmax(token_ids, axis=-1)
      return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    if self.cfg.pool == "last":
      return x[:, -1]
    if self.cfg.pool == "eos":  # the first EOS (open_clip's pool_type 'eos')
      idx = jnp.argmax(token_ids == self.cfg.eos_id, axis=-1)
      return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    raise ValueError(f"unknown text pool {self.cfg.pool!r}; expected 'argmax', 'last' or 'eos'")

  def __call__(self, token_ids: Array, *, trim_padding: bool = False) -> Array:
    """int32 [B, L] -> projected text embedding [B, E].

    `trim_padding` (causal towers with argmax pooling only; otherwise ignored): run the tower
    on the shortest length bucket that holds every sequence's pooled (EOT) token. Causal
    attention makes positions after it irrelevant, so the result is the same while captions
    much shorter than the context cost proportionally less. Buckets are static shapes chosen
    inside jit with lax.switch (one compiled branch per bucket).
    """
    if trim_padding and self.cfg.causal and self.cfg.pool == "argmax":
      return self._bucketed(token_ids)
    return self._project(self.pool(self.tokens(token_ids), token_ids))

  def encode_embeddings(self, embeddings: Array, token_ids: Array, *,
                        before_block: Callable[[int, Array], Array] | None = None) -> Array:
    """Projected text embedding [B, E] of token `embeddings` [B, L, width] (pooled where
    `token_ids` [B, L] put the EOT / last token): learned prompts in place of some tokens."""
    x = self.tokens(token_ids, embeddings=embeddings, before_block=before_block)
    return self._project(self.pool(x, token_ids))

  def _project(self, x: Array) -> Array:
    if self.text_projection is not None:
      x = x @ self.text_projection[...].astype(x.dtype)
    if self.proj_bias is not None:
      x = x + self.proj_bias[...].astype(x.dtype)
    return x

  def _bucketed(self, token_ids: Array, buckets: tuple[int, ...] = (8, 16, 24, 32, 48, 64)
                ) -> Array:
    length = token_ids.shape[1]
    sizes = sorted({b for b in buckets if b < length} | {length})
    needed = jnp.max(jnp.argmax(token_ids, axis=-1)) + 1
    index = jnp.searchsorted(jnp.asarray(sizes), needed)

    def branch(size: int):
      def run(ids: Array) -> Array:
        ids = ids[:, :size]
        return self._project(self.pool(self.tokens(ids), ids))
      return run

    return jax.lax.switch(index, [branch(s) for s in sizes], token_ids)


RAW_PIXEL_THRESHOLD = 10.0  # preprocessed images lie within about [-3, 3]; pixels go to 255


def check_images(images: Any, where: str = "encode_image") -> None:
  """Refuses what is not a preprocessed float batch [B, H, W, 3] with one ValueError: an
  unbatched image, integer (uint8) pixels, a non-array. Shape and dtype only, so it costs nothing
  under jit; the value range (raw float pixels) is checked only for a concrete numpy array."""
  expected = (f"{where} expects preprocessed float images [B, H, W, 3] "
              "(e.g. preprocess.batch([...]))")
  shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"{expected}; got a {type(images).__name__}")
  shape = tuple(shape)
  if not jnp.issubdtype(dtype, jnp.floating):
    what = "uint8 pixels" if dtype == np.uint8 else f"dtype {dtype}"
    raise ValueError(f"{expected}; got {what}" + (f" of shape {shape}" if len(shape) != 4 else "")
                     + "; apply the model's preprocess first")
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"{expected}; got shape {shape}")
  if isinstance(images, np.ndarray) and images.size:
    top = float(np.max(np.abs(images)))
    if top > RAW_PIXEL_THRESHOLD:
      raise ValueError(f"{expected}; got values up to {top:g} (raw pixels?); apply the model's "
                       "preprocess first")


class CLIP(nnx.Module):
  """Image and text towers with a learned temperature (and SigLIP's bias).

  `model(images, tokens)` returns a dict: normalized `image_features`, `text_features`,
  `logit_scale` (exp of the learned log-scale) and, for SigLIP, `logit_bias`.
  """

  def __init__(self, config: configs.CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = _dtype(config.dtype)
    self.visual = self.image_tower(config, dtype, rngs)
    self.text = TextTransformer(config.text, config.embed_dim, quick_gelu=config.quick_gelu,
                                dtype=dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(config.init_logit_scale, jnp.float32),
                                 eager_sharding=False, out_sharding=())
    self.logit_bias = (nnx.Param(jnp.asarray(config.init_logit_bias, jnp.float32), eager_sharding=False, out_sharding=())
                       if config.init_logit_bias is not None else None)

  def image_tower(self, config: configs.CLIPConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    """The image tower: a ViT here; CLIPs with another tower kind (ResNet, ConvNeXt, ViTamin,
    MobileCLIP, Eva) override only this."""
    return VisionTransformer(config.vision, config.embed_dim, quick_gelu=config.quick_gelu,
                             dtype=dtype, rngs=rngs)

  def encode_image(self, images: Array, normalize: bool = False) -> Array:
    """images NHWC float32, already preprocessed -> [B, E] float32 (`check_images` refuses
    an unbatched image or raw pixels with one line)."""
    check_images(images)
    x = self.visual(images).astype(jnp.float32)
    return l2_normalize(x) if normalize else x

  def encode_patches(self, patches: Array, spatial_shapes: Array, mask: Array | None = None,
                     normalize: bool = False) -> Array:
    """SigLIP 2 NaFlex: a padded batch of patchified images of different sizes -> [B, E]
    (`VisionTransformer.patch_tokens` describes the inputs)."""
    x = self.visual.encode_patches(patches, spatial_shapes, mask).astype(jnp.float32)
    return l2_normalize(x) if normalize else x

  def encode_text(self, tokens: Array, normalize: bool = False, *, trim_padding: bool = False
                  ) -> Array:
    """tokens int32 [B, L] -> [B, E] float32 (`trim_padding`: see TextTransformer)."""
    # Only pass the flag when set, so replacement text towers (other families) need not take it.
    x = (self.text(tokens, trim_padding=True) if trim_padding else self.text(tokens))
    x = x.astype(jnp.float32)
    return l2_normalize(x) if normalize else x

  def __call__(self, images: Array, tokens: Array) -> dict[str, Array]:
    out = {
        "image_features": self.encode_image(images, normalize=True),
        "text_features": self.encode_text(tokens, normalize=True),
        "logit_scale": jnp.exp(self.logit_scale[...]),
    }
    if self.logit_bias is not None:
      out["logit_bias"] = self.logit_bias[...]
    return out


# CLIPConfig subclasses of other image towers -> their model class (each tower's module adds
# its own), so `create` / `from_config` (the train loop's builder) build any registered name.
MODEL_CLASSES: dict[type, Callable[..., nnx.Module]] = {}


def create(name: str, *, seed: int = 0, **overrides) -> CLIP:
  """Builds the architecture `name` (see `configs.list_architectures()`) with fresh weights."""
  return from_config(configs.get_model_config(name, **overrides), seed=seed)


def from_config(config: configs.CLIPConfig, *, seed: int = 0) -> CLIP:
  return MODEL_CLASSES.get(type(config), CLIP)(config, rngs=nnx.Rngs(seed))
