"""Multilingual CLIP: sentencepiece (XLM-R / BERT-style) text towers for any zoo image tower.

`MultilingualTextTransformer`: token + position (+ token-type) embeddings, embedding LayerNorm,
post-LN bidirectional blocks over a padding mask, mean (M-CLIP) or CLS pooling, a projection
into the image embedding space (zoo.models.layers' attention and MLP: LoRA and sharding apply).
`MultilingualCLIP`: a CLIP with that text tower; `teacher_text` optionally holds the frozen
English tower it is distilled from (`student_only` drops it). Ids follow XLM-R's fairseq
convention (`<s>`=0, `<pad>`=1, `</s>`=2; RoBERTa positions). open_clip's Hugging Face text
towers (roberta-ViT-B-32, xlm-roberta-*-ViT-*) are this model with an MLP projection
(`proj_type='mlp'`) and a `tokenizers` tokenizer.json. Notes: docs/families/multilingual.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import errors
from zoo.models import clip as clip_lib, configs as registry, m2m100
from zoo.models.layers import MLP, Attention, LayerNorm, Linear, gelu, param

Array = jax.Array

DEMO_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                              "demo_multilingual.model")


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class MultilingualTextConfig:
  """A bidirectional sentencepiece text encoder (XLM-R / BERT layout).

  `positions`: 'roberta' (position = pad id + 1 + index among non-pad tokens, XLM-R) or
  'bert' (0..L-1). `pool`: 'mean' over non-pad tokens (M-CLIP) or 'cls' (first token).
  `context_length` is the row length the tokenizer produces (at most what the position table
  allows; None: all of it, `usable_positions` = max_position_embeddings - 2 for XLM-R, as
  M-CLIP embeds up to its encoder's limit). `proj_type`: 'linear' (M-CLIP) or 'mlp' (open_clip's
  HFTextEncoder: Linear(W, (W+E)//2) - GELU - Linear(-> E), both without bias).
  """

  vocab_size: int = 250002
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  context_length: int | None = None
  max_positions: int = 514
  type_vocab_size: int = 1
  pad_token_id: int = 1
  ln_eps: float = 1e-5
  pool: str = "mean"
  positions: str = "roberta"
  proj_bias: bool = True
  proj_type: str = "linear"

  def __post_init__(self):
    if self.proj_type not in ("linear", "mlp"):
      raise ValueError(f"multilingual text proj_type {self.proj_type!r}: expected 'linear' or 'mlp'")
    if self.pool not in ("mean", "cls"):
      raise ValueError(f"multilingual text pool {self.pool!r}: expected 'mean' or 'cls'")
    if self.positions not in ("roberta", "bert"):
      raise ValueError(f"multilingual text positions {self.positions!r}: expected 'roberta' or 'bert'")
    if self.context_length is None:
      object.__setattr__(self, "context_length", self.usable_positions)
    if self.context_length > self.usable_positions:
      raise ValueError(f"context_length {self.context_length} exceeds the {self.usable_positions} "
                       f"positions a table of {self.max_positions} allows ({self.positions} style)")

  @property
  def usable_positions(self) -> int:
    return self.max_positions - (self.pad_token_id + 1 if self.positions == "roberta" else 0)


@dataclasses.dataclass(frozen=True)
class MultilingualCLIPConfig:
  """A zoo image tower (`vision`) with a multilingual text tower (`text`).

  `tokenizer` is the sentencepiece `.model` path, read with `tokenizer_format` ids ('xlmr'),
  or a Hugging Face tokenizer.json ('hf', open_clip's HFTokenizer; `tokenizer_clean` as its
  `clean`).
  """

  embed_dim: int = 512
  vision: registry.VisionConfig = registry.VisionConfig()
  text: MultilingualTextConfig | m2m100.M2M100TextConfig = MultilingualTextConfig()
  kind: str = "clip"
  quick_gelu: bool = False
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: float | None = None
  image_mean: tuple[float, float, float] = registry.OPENAI_MEAN
  image_std: tuple[float, float, float] = registry.OPENAI_STD
  tokenizer: str = DEMO_TOKENIZER
  tokenizer_format: str = "xlmr"
  dtype: str = "float32"
  tokenizer_clean: str = "none"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MultilingualCLIPConfig":
    d = dict(d)
    vision = registry.VisionConfig(**d.pop("vision"))
    text = d.pop("text")
    text = (m2m100.M2M100TextConfig(**text) if text.get("kind") == "m2m100"
            else MultilingualTextConfig(**text))
    for key in ("image_mean", "image_std"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(vision=vision, text=text, **d)


# The shipped demo vocabulary (zoo/assets/demo_multilingual.model, from `build_demo_tokenizer`)
# has 345 sentencepiece pieces -> 347 XLM-R ids.
_DEMO_VOCAB = 347
TEXT_MODELS: dict[str, MultilingualTextConfig | m2m100.M2M100TextConfig] = {
    # Hugging Face / fairseq XLM-R (M-CLIP's `modelBase`).
    "xlm-roberta-base": MultilingualTextConfig(),
    "xlm-roberta-large": MultilingualTextConfig(width=1024, layers=24, heads=16, mlp_dim=4096),
    "roberta-base": MultilingualTextConfig(vocab_size=50265),
    # NLLB-200 encoders (NLLB-CLIP's text towers).
    "nllb-200-distilled-600M": m2m100.M2M100TextConfig(),
    "nllb-200-distilled-1.3B": m2m100.M2M100TextConfig(layers=24, mlp_dim=8192),
    # Small towers on the demo vocabulary, for tests and the CPU demo.
    "xlmr-tiny": MultilingualTextConfig(vocab_size=_DEMO_VOCAB, width=64, layers=2, heads=2,
                                        mlp_dim=128, max_positions=80),
    "xlmr-demo": MultilingualTextConfig(vocab_size=_DEMO_VOCAB, width=128, layers=3, heads=2,
                                        mlp_dim=512, max_positions=80),
}


# open_clip's CLIPs with a Hugging Face text tower (CustomTextCLIP + HFTextEncoder): image
# architecture, text encoder, QuickGELU, pooling, projection. Text: 77 tokens.
HF_TEXT_CLIPS = {
    "roberta-ViT-B-32": ("ViT-B-32", "roberta-base", True, "mean", "mlp"),
    "xlm-roberta-base-ViT-B-32": ("ViT-B-32", "xlm-roberta-base", False, "mean", "mlp"),
    "xlm-roberta-large-ViT-H-14": ("ViT-H-14", "xlm-roberta-large", False, "mean", "mlp"),
    "nllb-clip-base": ("ViT-B-32", "nllb-200-distilled-600M", False, "cls", "linear"),
    "nllb-clip-large": ("ViT-H-14", "nllb-200-distilled-1.3B", False, "cls", "linear"),
    # NLLB-CLIP SigLIP: timm SigLIP trunks at 384 px, sigmoid loss, open_clip's default
    # temperature at init (log 1/0.07, not SigLIP's log 10).
    "nllb-clip-base-siglip": ("ViT-B-16-SigLIP-384", "nllb-200-distilled-600M", False, "cls",
                              "linear"),
    "nllb-clip-large-siglip": ("ViT-SO400M-14-SigLIP-384", "nllb-200-distilled-1.3B", False,
                               "cls", "linear"),
}


def hf_text_clip_config(vision_config: registry.CLIPConfig, text: MultilingualTextConfig, *,
                        quick_gelu: bool = False, tokenizer: str = "") -> MultilingualCLIPConfig:
  """open_clip's CustomTextCLIP with an HFTextEncoder: `vision_config`'s image tower (and embed
  dim, loss kind, temperature, bias, normalisation) with `text` read through open_clip's
  HFTokenizer ('whitespace' clean)."""
  return MultilingualCLIPConfig(
      embed_dim=vision_config.embed_dim, vision=vision_config.vision, text=text,
      kind=vision_config.kind, quick_gelu=quick_gelu,
      init_logit_scale=vision_config.init_logit_scale,
      init_logit_bias=vision_config.init_logit_bias, image_mean=vision_config.image_mean,
      image_std=vision_config.image_std, tokenizer=tokenizer, tokenizer_format="hf",
      tokenizer_clean="whitespace")


def open_clip_text(base: Any, context_length: int = 77, pool: str = "mean",
                   proj_type: str = "mlp") -> Any:
  """An encoder as open_clip's HFTextEncoder wraps it (projection without bias)."""
  return dataclasses.replace(base, context_length=context_length, pool=pool, proj_type=proj_type,
                             proj_bias=False)


for _name, (_image, _text, _quick, _pool, _proj) in HF_TEXT_CLIPS.items():
  _image_config = registry.get_model_config(_image)
  if _image_config.kind == "siglip":
    _image_config = dataclasses.replace(_image_config, init_logit_scale=math.log(1 / 0.07))
  registry.register(_name, hf_text_clip_config(
      _image_config, open_clip_text(TEXT_MODELS[_text], pool=_pool, proj_type=_proj),
      quick_gelu=_quick))


def list_text_models() -> list[str]:
  return sorted(TEXT_MODELS)


def text_config(name: str, **overrides: Any) -> MultilingualTextConfig:
  """The text architecture `name` with field overrides (unknown keys list the valid ones)."""
  if name not in TEXT_MODELS:
    raise ValueError(f"unknown multilingual text model {name!r}; known: {', '.join(list_text_models())}")
  errors.check_keys(overrides, (f.name for f in dataclasses.fields(MultilingualTextConfig)),
                    "multilingual text override")
  return dataclasses.replace(TEXT_MODELS[name], **overrides)


# ----------------------------------------------------------------------------- modules


class PostNormBlock(nnx.Module):
  """BERT / XLM-R layer: x = LN(x + attn(x)); x = LN(x + mlp(x)) (exact GELU)."""

  def __init__(self, cfg: MultilingualTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.attn = Attention(cfg.width, cfg.heads, dtype=dtype, rngs=rngs)
    self.ln_1 = LayerNorm(cfg.width, eps=cfg.ln_eps, rngs=rngs)
    self.mlp = MLP(cfg.width, cfg.mlp_dim, dtype=dtype, rngs=rngs)
    self.ln_2 = LayerNorm(cfg.width, eps=cfg.ln_eps, rngs=rngs)

  def __call__(self, x: Array, mask: Array) -> Array:
    x = self.ln_1(x + self.attn(x, mask=mask).astype(x.dtype))
    return self.ln_2(x + self.mlp(x).astype(x.dtype))


class ProjectionMLP(nnx.Module):
  """open_clip's HFTextEncoder `proj_type='mlp'`: fc1 -> exact GELU -> fc2, no biases."""

  def __init__(self, width: int, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    hidden = (width + embed_dim) // 2
    self.fc1 = Linear(width, hidden, axes=("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, embed_dim, axes=("mlp", None), use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.fc2(gelu(self.fc1(x)))


class MultilingualTextTransformer(nnx.Module):
  """Sentencepiece ids [B, L] -> projected text embedding [B, E] (or pooled [B, W] when
  `embed_dim` is None: a bare encoder, e.g. before a projection is attached)."""

  def __init__(self, cfg: MultilingualTextConfig, embed_dim: int | None, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    w, init = cfg.width, nnx.initializers.normal(0.02)
    self.token_embedding = param(rngs, init, (cfg.vocab_size, w), ("vocab", "embed"))
    self.positional_embedding = param(rngs, init, (cfg.max_positions, w), (None, "embed"))
    self.token_type_embedding = param(rngs, init, (cfg.type_vocab_size, w), (None, "embed"))
    self.ln_embed = LayerNorm(w, eps=cfg.ln_eps, rngs=rngs)
    self.blocks = nnx.List([PostNormBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.layers)])
    if embed_dim is None:
      proj = None
    elif cfg.proj_type == "mlp":
      proj = ProjectionMLP(w, embed_dim, dtype=dtype, rngs=rngs)
    else:
      proj = Linear(w, embed_dim, axes=("embed", None), use_bias=cfg.proj_bias, dtype=dtype,
                    rngs=rngs)
    self.proj = nnx.data(proj)

  def position_ids(self, token_ids: Array) -> Array:
    if self.cfg.positions == "bert":
      return jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape)
    real = (token_ids != self.cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + self.cfg.pad_token_id

  def tokens(self, token_ids: Array) -> Array:
    """The encoder's last hidden states [B, L, W] (HF `last_hidden_state`)."""
    if token_ids.ndim != 2:
      raise ValueError(f"token ids must be [B, L]; got shape {tuple(token_ids.shape)}")
    if token_ids.shape[1] > self.cfg.usable_positions:
      raise ValueError(f"tokens have length {token_ids.shape[1]} but the text tower reads at most "
                       f"{self.cfg.usable_positions}")
    x = jnp.take(self.token_embedding[...], token_ids, axis=0)
    x = x + jnp.take(self.positional_embedding[...], self.position_ids(token_ids), axis=0)
    x = self.ln_embed(x + self.token_type_embedding[...][0])
    x = x.astype(self.dtype)
    mask = (token_ids != self.cfg.pad_token_id)[:, None, None, :]
    for block in self.blocks:
      x = block(x, mask)
    return x

  def pool(self, x: Array, token_ids: Array) -> Array:
    if self.cfg.pool == "cls":
      return x[:, 0]
    real = (token_ids != self.cfg.pad_token_id).astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * real, axis=1)
    return (total / jnp.maximum(jnp.sum(real, axis=1), 1.0)).astype(x.dtype)

  def __call__(self, token_ids: Array, *, trim_padding: bool = False) -> Array:
    """`trim_padding` is accepted for interface parity with CLIP's tower and ignored."""
    del trim_padding
    pooled = self.pool(self.tokens(token_ids), token_ids)
    return self.proj(pooled) if self.proj is not None else pooled


class MultilingualCLIP(clip_lib.CLIP):
  """CLIP with a multilingual text tower: `encode_image`, `encode_text`, `model(images,
  tokens)` as CLIP. `teacher_text` (None unless distilling) is the frozen English tower."""

  def __init__(self, config: MultilingualCLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.visual = clip_lib.VisionTransformer(config.vision, config.embed_dim,
                                             quick_gelu=config.quick_gelu, dtype=dtype, rngs=rngs)
    tower = (m2m100.M2M100TextTransformer if isinstance(config.text, m2m100.M2M100TextConfig)
             else MultilingualTextTransformer)
    self.text = tower(config.text, config.embed_dim, dtype=dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(config.init_logit_scale, jnp.float32),
                                 eager_sharding=False, out_sharding=())
    self.logit_bias = (nnx.Param(jnp.asarray(config.init_logit_bias, jnp.float32),
                                 eager_sharding=False, out_sharding=())
                       if config.init_logit_bias is not None else None)
    self.teacher_text = nnx.data(None)  # a clip TextTransformer while distilling


def config_from_clip(clip_config: registry.CLIPConfig, text: MultilingualTextConfig, *,
                     tokenizer: str = DEMO_TOKENIZER, dtype: str | None = None
                     ) -> MultilingualCLIPConfig:
  """A MultilingualCLIPConfig sharing `clip_config`'s image tower, embedding and temperature."""
  return MultilingualCLIPConfig(
      embed_dim=clip_config.embed_dim, vision=clip_config.vision, text=text, kind=clip_config.kind,
      quick_gelu=clip_config.quick_gelu, init_logit_scale=clip_config.init_logit_scale,
      init_logit_bias=clip_config.init_logit_bias, image_mean=clip_config.image_mean,
      image_std=clip_config.image_std, tokenizer=tokenizer, dtype=dtype or clip_config.dtype)


def from_clip(clip_model: clip_lib.CLIP, text: MultilingualTextConfig | nnx.Module, *,
              tokenizer: str = DEMO_TOKENIZER, seed: int = 0, dtype: str | None = None,
              keep_teacher: bool = False) -> MultilingualCLIP:
  """A MultilingualCLIP with `clip_model`'s image tower and temperature (copied) and a text
  tower: a fresh one of config `text`, or a given MultilingualTextTransformer (e.g. converted
  from M-CLIP). `keep_teacher` keeps `clip_model.text` as the distillation teacher."""
  given = text if isinstance(text, MultilingualTextTransformer) else None
  text_cfg = given.cfg if given is not None else text
  config = config_from_clip(clip_model.config, text_cfg, tokenizer=tokenizer, dtype=dtype)
  model = MultilingualCLIP(config, rngs=nnx.Rngs(seed))
  if given is not None:
    if given.proj is None or given.proj.kernel.shape[1] != config.embed_dim:
      raise ValueError(f"text tower projects to {None if given.proj is None else given.proj.kernel.shape[1]}"
                       f" dims; the image tower's embedding has {config.embed_dim}")
    nnx.update(model.text, nnx.state(given))
  nnx.update(model.visual, nnx.state(clip_model.visual))
  model.logit_scale[...] = clip_model.logit_scale[...]
  if model.logit_bias is not None:
    model.logit_bias[...] = clip_model.logit_bias[...]
  if keep_teacher:
    model.teacher_text = clip_model.text
  return model


def student_only(model: nnx.Module) -> nnx.Module:
  """The model without its distillation teacher (what is exported / loaded with zoo.load)."""
  if getattr(model, "teacher_text", None) is not None:
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state)  # a copy, so the trainer's model keeps its teacher
    model.teacher_text = None
  return model


clip_lib.MODEL_CLASSES[MultilingualCLIPConfig] = MultilingualCLIP  # built by clip.create / from_config
