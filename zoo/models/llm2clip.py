"""LLM2CLIP: a zoo image tower with a decoder LLM (zoo.models.llm) as the text encoder.

Text path: LLM (frozen; mean-pooled, usually bidirectional) -> `adapter` (LLM2CLIP's text
projection: `blocks` residual LinearBlocks x + fc2(gelu(fc1(LN(x)))) at the LLM width with
hidden `expansion` x width, then LayerNorm and a Linear to `embed_dim`). LLM2CLIP uses 4 blocks
at expansion 2, ProCLIP 1 block at expansion 8. `encode_text_features(pooled)` runs the adapter
alone on precomputed LLM embeddings (the embedding cache; L2-normalized first with
`adapter_l2_input`, as the released LLM2CLIP adapters read them). `visual_teacher` holds a
frozen copy of the image tower (ProCLIP's self-distillation), `text_teacher` a CLIP text tower
(ProCLIP's stage 1). The image tower is CLIP's ViT, or EVA's (an eva.EvaVisionConfig `vision`:
the EVA02 releases). Notes: docs/families/llm2clip.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.models import clip as clip_lib, configs as registry, eva
from zoo.models.layers import LayerNorm, Linear, gelu
from zoo.models.llm import LLM, LLMConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LLM2CLIPConfig:
  """Image tower `vision`, LLM `text`, adapter (`adapter_blocks`, `adapter_expansion`)."""

  embed_dim: int = 1280
  vision: registry.VisionConfig | eva.EvaVisionConfig = registry.VisionConfig()
  text: LLMConfig = LLMConfig()
  adapter_blocks: int = 4
  adapter_expansion: float = 2.0
  kind: str = "clip"
  quick_gelu: bool = False
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: float | None = None
  image_mean: tuple[float, float, float] = registry.OPENAI_MEAN
  image_std: tuple[float, float, float] = registry.OPENAI_STD
  tokenizer: str = "clip"  # what zoo.load builds: CLIP BPE at text.context_length (demo)
  tokenizer_format: str = ""  # "hf": `tokenizer` is a tokenizer.json (the LLM's own)
  tokenizer_clean: str = "none"
  tokenizer_prefix: str = ""  # LLM2Vec's chat template around each caption (+ EOS)
  tokenizer_suffix: str = ""
  adapter_l2_input: bool = False  # released LLM2CLIP adapters read L2-normalized embeddings
  dtype: str = "float32"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LLM2CLIPConfig":
    d = dict(d)
    v = d.pop("vision")
    vision = (eva.EvaVisionConfig if "qkv" in v else registry.VisionConfig)(**v)
    text = LLMConfig.from_dict(d.pop("text"))
    for key in ("image_mean", "image_std"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(vision=vision, text=text, **d)


class LinearBlock(nnx.Module):
  """x + fc2(gelu(fc1(LN(x))))."""

  def __init__(self, width: int, expansion: float, *, dtype, rngs: nnx.Rngs):
    hidden = int(width * expansion)
    self.ln = LayerNorm(width, rngs=rngs)
    self.fc1 = Linear(width, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return x + self.fc2(gelu(self.fc1(self.ln(x)))).astype(x.dtype)


class TextAdapter(nnx.Module):
  """LLM2CLIP's text projection: residual LinearBlocks, LayerNorm, Linear to embed_dim."""

  def __init__(self, width: int, embed_dim: int, blocks: int, expansion: float, *, dtype,
               rngs: nnx.Rngs):
    self.blocks = nnx.List([LinearBlock(width, expansion, dtype=dtype, rngs=rngs)
                            for _ in range(blocks)])
    self.ln = LayerNorm(width, rngs=rngs)
    self.proj = Linear(width, embed_dim, axes=("embed", None), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    for block in self.blocks:
      x = block(x)
    return self.proj(self.ln(x))


class LLM2CLIP(clip_lib.CLIP):
  """CLIP with an LLM text tower: `encode_image`, `encode_text(tokens)`, `model(images,
  tokens)` as CLIP; the LLM's attention mask is `tokens != text.pad_token_id`."""

  def __init__(self, config: LLM2CLIPConfig, *, rngs: nnx.Rngs, remat: str = "none"):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    if isinstance(config.vision, eva.EvaVisionConfig):
      self.visual = eva.Eva(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)
    else:
      self.visual = clip_lib.VisionTransformer(config.vision, config.embed_dim,
                                               quick_gelu=config.quick_gelu, dtype=dtype, rngs=rngs)
    self.text = LLM(config.text, dtype=dtype, remat=remat, rngs=rngs)
    self.adapter = TextAdapter(config.text.width, config.embed_dim, config.adapter_blocks,
                               config.adapter_expansion, dtype=dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(config.init_logit_scale, jnp.float32),
                                 eager_sharding=False, out_sharding=())
    self.logit_bias = (nnx.Param(jnp.asarray(config.init_logit_bias, jnp.float32),
                                 eager_sharding=False, out_sharding=())
                       if config.init_logit_bias is not None else None)
    self.visual_teacher = nnx.data(None)  # ProCLIP stage 2: the frozen initial image tower
    self.text_teacher = nnx.data(None)  # ProCLIP stage 1: a CLIP text tower (frozen)

  def llm_features(self, tokens: Array) -> Array:
    """The pooled LLM embedding [B, W] (float32) of token ids [B, L]."""
    return self.text.encode(tokens)

  def encode_text_features(self, pooled: Array, normalize: bool = False) -> Array:
    """The adapter on pooled LLM embeddings [B, W] -> [B, E] float32."""
    if self.config.adapter_l2_input:
      pooled = clip_lib.l2_normalize(pooled.astype(jnp.float32))
    x = self.adapter(pooled.astype(self.adapter.proj.dtype)).astype(jnp.float32)
    return clip_lib.l2_normalize(x) if normalize else x

  def encode_text(self, tokens: Array, normalize: bool = False, *, trim_padding: bool = False
                  ) -> Array:
    del trim_padding
    return self.encode_text_features(self.llm_features(tokens), normalize)


def from_clip(clip_model: clip_lib.CLIP, text: LLMConfig | LLM, *, embed_dim: int | None = None,
              adapter_blocks: int = 4, adapter_expansion: float = 2.0, seed: int = 0,
              remat: str = "none") -> LLM2CLIP:
  """An LLM2CLIP with `clip_model`'s image tower and temperature (copied; `embed_dim` must be
  the image tower's) and an LLM: a fresh one of config `text`, or a given tower (weights kept)."""
  cc = clip_model.config
  given = text if isinstance(text, LLM) else None
  text_cfg = given.config if given is not None else text
  if embed_dim is not None and embed_dim != cc.embed_dim:
    raise ValueError(f"embed_dim {embed_dim} != the image tower's {cc.embed_dim}")
  config = LLM2CLIPConfig(
      embed_dim=cc.embed_dim, vision=cc.vision, text=text_cfg, adapter_blocks=adapter_blocks,
      adapter_expansion=adapter_expansion, kind=cc.kind, quick_gelu=cc.quick_gelu,
      init_logit_scale=cc.init_logit_scale, init_logit_bias=cc.init_logit_bias,
      image_mean=cc.image_mean, image_std=cc.image_std, dtype=cc.dtype)
  model = LLM2CLIP(config, rngs=nnx.Rngs(seed), remat=remat)
  nnx.update(model.visual, nnx.state(clip_model.visual))
  if given is not None:
    nnx.update(model.text, nnx.state(given))
  model.logit_scale[...] = clip_model.logit_scale[...]
  if model.logit_bias is not None:
    model.logit_bias[...] = clip_model.logit_bias[...]
  return model


def without_teacher(model: nnx.Module) -> nnx.Module:
  """The model without its frozen teachers (what is exported / loaded)."""
  if any(getattr(model, k, None) is not None for k in ("visual_teacher", "text_teacher")):
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state)  # a copy, so the trainer's model keeps its teachers
    model.visual_teacher = model.text_teacher = None
  return model
