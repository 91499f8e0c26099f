"""Multilingual CLIP: sentencepiece (XLM-R / BERT-style) text towers and teacher-student
text distillation (M-CLIP), usable with any zoo image tower.

* `MultilingualTextTransformer`: token + position (+ token-type) embeddings, embedding
  LayerNorm, post-LN bidirectional blocks over a padding mask, mean (M-CLIP) or CLS pooling,
  linear projection into the image embedding space. Attention and MLP are zoo.layers' (so LoRA
  from zoo.peft and the sharding rules apply unchanged).
* `MultilingualCLIP`: a CLIP whose text tower is that tower; `teacher_text` optionally holds
  the frozen English text tower it is distilled from (dropped on export).
* Conversion from Hugging Face XLM-R / BERT encoders and from M-CLIP's released layout
  (`transformer.*` + `LinearTransformation.*`, mean pooled over the attention mask):
  `from_hf_text`, `to_hf_text`, `text_config_from_hf`.
* The `multilingual` family: the student text tower learns the teacher's embeddings of the
  English caption from the translated caption (MSE and/or text-text InfoNCE, `config.
  multilingual`), with the image tower, temperature and teacher frozen. Per-language zero-shot
  evaluation (Babel-ImageNet format) is eval_lib's `babel_zeroshot` kind.

Tokens follow XLM-R's fairseq ids (`zoo.tokenizers.XLMRobertaTokenizer`): `<s>`=0,
`<pad>`=1, `</s>`=2; positions are RoBERTa's (pad id + 1 + index among non-pad tokens).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import clip as clip_lib
from zoo import config_utils, registry, train_lib
from zoo.layers import MLP, Attention, LayerNorm, Linear, param

Array = jax.Array

DEMO_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "demo_multilingual.model")
DISTILL_FIELDS = ("ml_tokens", "ml_en_tokens", "ml_lang")


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class MultilingualTextConfig:
  """A bidirectional sentencepiece text encoder (XLM-R / BERT layout).

  `positions`: 'roberta' (position = pad id + 1 + index among non-pad tokens, XLM-R) or
  'bert' (0..L-1). `pool`: 'mean' over non-pad tokens (M-CLIP) or 'cls' (first token).
  `context_length` is the row length the tokenizer produces (at most what the position table
  allows).
  """

  vocab_size: int = 250002
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  context_length: int = 77
  max_positions: int = 514
  type_vocab_size: int = 1
  pad_token_id: int = 1
  ln_eps: float = 1e-5
  pool: str = "mean"
  positions: str = "roberta"
  proj_bias: bool = True

  def __post_init__(self):
    if self.pool not in ("mean", "cls"):
      raise ValueError(f"multilingual text pool {self.pool!r}: expected 'mean' or 'cls'")
    if self.positions not in ("roberta", "bert"):
      raise ValueError(f"multilingual text positions {self.positions!r}: expected 'roberta' or 'bert'")
    if self.context_length > self.usable_positions:
      raise ValueError(f"context_length {self.context_length} exceeds the {self.usable_positions} "
                       f"positions a table of {self.max_positions} allows ({self.positions} style)")

  @property
  def usable_positions(self) -> int:
    return self.max_positions - (self.pad_token_id + 1 if self.positions == "roberta" else 0)


@dataclasses.dataclass(frozen=True)
class MultilingualCLIPConfig:
  """A zoo image tower (`vision`) with a multilingual text tower (`text`).

  `tokenizer` is the sentencepiece `.model` path, read with `tokenizer_format` ids ('xlmr').
  """

  embed_dim: int = 512
  vision: registry.VisionConfig = registry.VisionConfig()
  text: MultilingualTextConfig = MultilingualTextConfig()
  kind: str = "clip"
  quick_gelu: bool = False
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: float | None = None
  image_mean: tuple[float, float, float] = registry.OPENAI_MEAN
  image_std: tuple[float, float, float] = registry.OPENAI_STD
  tokenizer: str = DEMO_TOKENIZER
  tokenizer_format: str = "xlmr"
  dtype: str = "float32"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MultilingualCLIPConfig":
    d = dict(d)
    vision = registry.VisionConfig(**d.pop("vision"))
    text = MultilingualTextConfig(**d.pop("text"))
    for key in ("image_mean", "image_std"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(vision=vision, text=text, **d)


# The shipped demo vocabulary (zoo/assets/demo_multilingual.model, from `build_demo_tokenizer`)
# has 345 sentencepiece pieces -> 347 XLM-R ids.
_DEMO_VOCAB = 347
TEXT_MODELS: dict[str, MultilingualTextConfig] = {
    # Hugging Face / fairseq XLM-R (M-CLIP's `modelBase`).
    "xlm-roberta-base": MultilingualTextConfig(),
    "xlm-roberta-large": MultilingualTextConfig(width=1024, layers=24, heads=16, mlp_dim=4096),
    # Small towers on the demo vocabulary, for tests and the CPU demo.
    "xlmr-tiny": MultilingualTextConfig(vocab_size=_DEMO_VOCAB, width=64, layers=2, heads=2,
                                        mlp_dim=128, max_positions=80),
    "xlmr-demo": MultilingualTextConfig(vocab_size=_DEMO_VOCAB, width=128, layers=3, heads=2,
                                        mlp_dim=512, max_positions=80),
}


def list_text_models() -> list[str]:
  return sorted(TEXT_MODELS)


def text_config(name: str, **overrides: Any) -> MultilingualTextConfig:
  """The text architecture `name` with field overrides (unknown keys list the valid ones)."""
  if name not in TEXT_MODELS:
    raise ValueError(f"unknown multilingual text model {name!r}; known: {', '.join(list_text_models())}")
  valid = {f.name for f in dataclasses.fields(MultilingualTextConfig)}
  bad = sorted(set(overrides) - valid)
  if bad:
    raise ValueError(f"unknown multilingual text override {bad[0]!r}; valid keys: {', '.join(sorted(valid))}")
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
    self.proj = nnx.data(Linear(w, embed_dim, axes=("embed", None), use_bias=cfg.proj_bias,
                                dtype=dtype, rngs=rngs) if embed_dim is not None else None)

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
    self.text = MultilingualTextTransformer(config.text, config.embed_dim, dtype=dtype, rngs=rngs)
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


# ----------------------------------------------------------------------------- HF conversion


def text_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any
                        ) -> tuple[MultilingualTextConfig, int | None]:
  """(text config, projection dim or None) from a transformers config dict.

  Accepts XLM-R / RoBERTa / BERT configs (`model_type`, `hidden_size`, ...) and M-CLIP's
  (`modelBase`, `transformerDimensions`, `numDims`), whose encoder is `modelBase`.
  """
  hf = dict(hf_config)
  if isinstance(hf.get("encoder"), Mapping):  # written by `to-mclip`: the exact zoo config
    cfg = dataclasses.replace(MultilingualTextConfig(**hf["encoder"]), **overrides)
    return cfg, int(hf["numDims"]) if "numDims" in hf else None
  if "transformerDimensions" in hf or "numDims" in hf:  # M-CLIP's MCLIPConfig
    base = str(hf.get("modelBase", "")).split("/")[-1]
    if base not in TEXT_MODELS:
      raise ValueError(f"M-CLIP config names modelBase {hf.get('modelBase')!r}; zoo knows "
                       f"{', '.join(list_text_models())} (pass that encoder's own config.json instead)")
    cfg = text_config(base, **overrides)
    if int(hf.get("transformerDimensions", cfg.width)) != cfg.width:
      raise ValueError(f"M-CLIP transformerDimensions={hf['transformerDimensions']} but "
                       f"{base} has width {cfg.width}")
    return cfg, int(hf["numDims"]) if "numDims" in hf else None
  model_type = hf.get("model_type", "xlm-roberta")
  if model_type not in ("xlm-roberta", "roberta", "bert"):
    raise ValueError(f"unsupported text encoder model_type {model_type!r}; expected xlm-roberta, "
                     "roberta or bert")
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"hidden_act {act!r} is not supported (zoo's MLP uses exact GELU)")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size") if k not in hf]
  if missing:
    raise ValueError(f"transformers config lacks {missing}")
  fields = dict(
      vocab_size=int(hf["vocab_size"]), width=int(hf["hidden_size"]),
      layers=int(hf["num_hidden_layers"]), heads=int(hf["num_attention_heads"]),
      mlp_dim=int(hf["intermediate_size"]),
      max_positions=int(hf.get("max_position_embeddings", 512)),
      type_vocab_size=int(hf.get("type_vocab_size", 1)),
      pad_token_id=int(hf.get("pad_token_id", 1 if model_type != "bert" else 0)),
      ln_eps=float(hf.get("layer_norm_eps", 1e-12)),
      positions="bert" if model_type == "bert" else "roberta")
  fields["context_length"] = min(77, fields["max_positions"] - (
      fields["pad_token_id"] + 1 if fields["positions"] == "roberta" else 0))
  fields.update(overrides)
  return MultilingualTextConfig(**fields), None


_HF_PREFIXES = ("transformer.", "roberta.", "bert.", "")
_HF_IGNORED = ("embeddings.position_ids", "pooler.", "lm_head.", "cls.")


def _hf_prefix(state_dict: Mapping[str, Any]) -> str:
  for prefix in _HF_PREFIXES:
    if f"{prefix}embeddings.word_embeddings.weight" in state_dict:
      return prefix
  raise ValueError("not an XLM-R / BERT state dict: no '[transformer.|roberta.|bert.]embeddings."
                   f"word_embeddings.weight' key (found e.g. {sorted(state_dict)[:5]})")


def _text_rules(cfg: MultilingualTextConfig, prefix: str, projection: bool):
  from zoo.convert.common import attn_out, identity, layer_norm, linear, split_qkv

  rules = [
      identity(("token_embedding",), f"{prefix}embeddings.word_embeddings.weight"),
      identity(("positional_embedding",), f"{prefix}embeddings.position_embeddings.weight"),
      identity(("token_type_embedding",), f"{prefix}embeddings.token_type_embeddings.weight"),
      *layer_norm(("ln_embed",), f"{prefix}embeddings.LayerNorm"),
  ]
  for i in range(cfg.layers):
    zoo, key = ("blocks", i), f"{prefix}encoder.layer.{i}"
    rules += split_qkv(zoo + ("attn",), [f"{key}.attention.self.{n}" for n in ("query", "key", "value")],
                       cfg.width, cfg.heads)
    rules += attn_out(zoo + ("attn",), f"{key}.attention.output.dense", cfg.heads, cfg.width)
    rules += layer_norm(zoo + ("ln_1",), f"{key}.attention.output.LayerNorm")
    rules += linear(zoo + ("mlp", "fc1"), f"{key}.intermediate.dense")
    rules += linear(zoo + ("mlp", "fc2"), f"{key}.output.dense")
    rules += layer_norm(zoo + ("ln_2",), f"{key}.output.LayerNorm")
  if projection:
    rules += linear(("proj",), "LinearTransformation", bias=cfg.proj_bias)
  return rules


def _build_tower(spec: tuple[MultilingualTextConfig, int | None]) -> MultilingualTextTransformer:
  cfg, embed_dim = spec
  return MultilingualTextTransformer(cfg, embed_dim, rngs=nnx.Rngs(0))


def from_hf_text(state_dict: Mapping[str, Any], config: MultilingualTextConfig | Mapping[str, Any],
                 *, embed_dim: int | None = None, seed: int = 0, **overrides: Any
                 ) -> MultilingualTextTransformer:
  """A MultilingualTextTransformer from PyTorch weights (exact re-layout, every key checked).

  `state_dict`: a transformers XLMRobertaModel / BertModel (keys `embeddings.*`, `encoder.*`,
  optionally prefixed `roberta.` / `bert.`), or M-CLIP's released model (`transformer.*` +
  `LinearTransformation.{weight,bias}`). `config`: a MultilingualTextConfig, the encoder's
  config.json dict, or M-CLIP's (modelBase / transformerDimensions / numDims). Without a
  `LinearTransformation` the tower gets a fresh projection to `embed_dim` (seeded; to be
  trained, e.g. by distillation) or, with embed_dim None, none (pooled hidden states).
  """
  from zoo.convert import common

  if isinstance(config, MultilingualTextConfig):
    cfg, proj_dim = dataclasses.replace(config, **overrides), None
  else:
    cfg, proj_dim = text_config_from_hf(config, **overrides)
  prefix = _hf_prefix(state_dict)
  has_proj = "LinearTransformation.weight" in state_dict
  if has_proj:
    found = int(np.shape(state_dict["LinearTransformation.weight"])[0])
    if proj_dim is not None and proj_dim != found:
      raise ValueError(f"M-CLIP config numDims={proj_dim} but LinearTransformation.weight has {found} rows")
    if embed_dim is not None and embed_dim != found:
      raise ValueError(f"embed_dim={embed_dim} but LinearTransformation.weight projects to {found}")
    cfg = dataclasses.replace(cfg, proj_bias="LinearTransformation.bias" in state_dict)
    embed_dim = found
  ignore = lambda k: any(k.startswith(prefix + s) or k.startswith(s) for s in _HF_IGNORED)  # noqa: E731
  tower = common.convert_from_torch(
      state_dict, _text_rules(cfg, prefix, has_proj), (cfg, embed_dim if has_proj else None),
      layout="M-CLIP" if has_proj else "HF text encoder", model=f"{cfg.layers}-layer text tower",
      ignore=ignore, build=_build_tower)
  if not has_proj and embed_dim is not None:
    tower.proj = nnx.data(Linear(cfg.width, embed_dim, axes=("embed", None),
                                 use_bias=cfg.proj_bias, rngs=nnx.Rngs(seed)))
  return tower


def to_hf_text(tower: MultilingualTextTransformer, *, prefix: str = "transformer."
               ) -> dict[str, np.ndarray]:
  """The tower in M-CLIP's layout (`transformer.*` + `LinearTransformation.*`); prefix ""
  gives a bare XLMRobertaModel state dict (projection, if any, still LinearTransformation)."""
  from zoo.convert import common

  return common.convert_to_torch(tower, _text_rules(tower.cfg, prefix, tower.proj is not None),
                                 layout="M-CLIP")


# ----------------------------------------------------------------------------- tokenizers


def tokenizer_for(model_config: Any, context_length: int | None = None,
                  directory: str | None = None):
  """The XLM-R tokenizer of a MultilingualCLIPConfig (its `.model`, or the copy in a
  zoo.save `directory`)."""
  from zoo import checkpoint, tokenizers

  path = model_config.tokenizer
  if directory and os.path.isfile(os.path.join(directory, checkpoint.TOKENIZER_FILE)):
    path = os.path.join(directory, checkpoint.TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the multilingual model's sentencepiece file {path!r} does not exist")
  return tokenizers.XLMRobertaTokenizer(path, context_length or model_config.text.context_length)


def demo_corpus(scenes: int = 3000) -> list[str]:
  """Demo captions and prompts in every demo language (the demo tokenizer's training text)."""
  from zoo.data import demo

  texts = []
  for lang in demo.LANGUAGES:
    names = demo.class_names(lang)
    texts += [t.format(n) for t in demo.templates(lang) for n in names] + names
  for i in range(scenes):
    scene = demo.sample_scene(0, i)
    texts += list(demo.captions_ml(scene, i).values())
  return texts


def train_sentencepiece(texts: Sequence[str], model_path: str, vocab_size: int) -> str:
  """Trains a unigram sentencepiece model on `texts` (character coverage 1.0, no special
  pieces beyond unk/bos/eos) and writes `model_path`; returns it."""
  import io

  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2,
      hard_vocab_limit=False)
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  with open(model_path, "wb") as f:
    f.write(model.getvalue())
  return model_path


def build_demo_tokenizer(model_path: str = DEMO_TOKENIZER, vocab_size: int = 1000) -> str:
  """(Re)builds the shipped demo vocabulary from `demo_corpus()` (the small corpus caps it
  below `vocab_size`: 345 pieces)."""
  return train_sentencepiece(demo_corpus(), model_path, vocab_size)


# ----------------------------------------------------------------------------- distillation

DEFAULTS = {
    "teacher": "",  # zoo.save directory of the English CLIP (required)
    "tokenizer": DEMO_TOKENIZER,  # the student's sentencepiece .model (XLM-R ids)
    "mse_weight": 1.0,  # M-CLIP: MSE between student and teacher embeddings
    "contrastive_weight": 0.0,  # text-text InfoNCE, student(translation) vs teacher(English)
    "contrastive_scale": 20.0,  # its fixed logit scale (inverse temperature)
    "train": "text",  # 'text': the student text tower (image tower, temperature frozen)
}


def default_settings() -> ml_collections.ConfigDict:
  """`config.multilingual` with the defaults (teacher must be set)."""
  return ml_collections.ConfigDict(dict(DEFAULTS))


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out = config_utils.section(config, "multilingual", DEFAULTS)
  if out["train"] not in ("text", "text_projection"):
    raise ValueError(f"multilingual.train={out['train']!r}: expected 'text' (whole text tower) "
                     "or 'text_projection' (projection only)")
  return out


def build_model(config: ml_collections.ConfigDict) -> MultilingualCLIP:
  """Student over the teacher's image tower: text architecture `config.model` (see
  `list_text_models()`, + `model_overrides`), tokenizer `multilingual.tokenizer`, teacher text
  tower from `multilingual.teacher` kept as `teacher_text`. The loop then copies
  `config.init_from` (a MultilingualCLIP save, e.g. a distilled student) where names match."""
  from zoo import checkpoint

  ms = settings(config)
  if not ms["teacher"]:
    raise ValueError("config.multilingual.teacher is empty: set it to the zoo.save directory of the "
                     "English CLIP to distill from")
  teacher, _, _ = checkpoint.load(ms["teacher"])
  if not isinstance(teacher, clip_lib.CLIP) or isinstance(teacher, MultilingualCLIP):
    raise ValueError(f"multilingual.teacher {ms['teacher']} holds a {type(teacher).__name__}; "
                     "expected an English zoo CLIP")
  overrides = train_lib.model_overrides(config)
  text = text_config(config.model, **overrides)
  tok = ms["tokenizer"]
  if not os.path.isfile(tok):
    raise FileNotFoundError(f"multilingual.tokenizer {tok!r} does not exist")
  from zoo import tokenizers

  vocab = tokenizers.XLMRobertaTokenizer(tok).vocab_size
  if vocab > text.vocab_size:
    raise ValueError(f"tokenizer {tok} has {vocab} ids but text model {config.model!r} embeds "
                     f"{text.vocab_size}; set model_overrides.vocab_size={vocab}")
  return from_clip(teacher, text, tokenizer=tok, seed=config.seed, dtype=config.dtype,
                   keep_teacher=True)


def distill_forward(model: MultilingualCLIP, batch: Mapping[str, Array], rng: Array) -> dict:
  """Student embedding of the translated caption, teacher embedding of the English one."""
  del rng
  if getattr(model, "teacher_text", None) is None:
    raise ValueError("the multilingual family needs a model with a teacher_text tower "
                     "(built from config.multilingual.teacher)")
  missing = [k for k in ("ml_tokens", "ml_en_tokens") if k not in batch]
  if missing:
    raise ValueError(f"multilingual batch lacks {missing}; it has {sorted(batch)}")
  student = model.text(batch["ml_tokens"]).astype(jnp.float32)
  teacher = jax.lax.stop_gradient(model.teacher_text(batch["ml_en_tokens"]).astype(jnp.float32))
  return {"student": student, "teacher": teacher}


def distill_loss(outputs: dict, batch: dict, ctx: train_lib.LossContext) -> tuple[Array, dict]:
  """`mse_weight` * MSE(student, teacher) + `contrastive_weight` * InfoNCE over the batch."""
  from zoo import losses

  ms = settings(ctx.config)
  s, t = outputs["student"], outputs["teacher"]
  mse = jnp.mean(jnp.square(s - t))
  sn, tn = clip_lib.l2_normalize(s), clip_lib.l2_normalize(t)
  metrics = {"mse": mse, "cosine": jnp.mean(jnp.sum(sn * tn, axis=-1))}
  loss = ms["mse_weight"] * mse
  if ms["contrastive_weight"]:
    nce = losses.contrastive_loss(sn, tn, jnp.asarray(ms["contrastive_scale"], jnp.float32),
                                  kind="softmax", impl=ctx.impl, mesh=ctx.mesh)
    metrics["contrastive"] = nce
    loss = loss + ms["contrastive_weight"] * nce
  return loss, metrics


def trainable_for(config: ml_collections.ConfigDict) -> Callable[[tuple[str, ...]], bool]:
  """Only the student text tower (or its projection) trains; never the teacher or images."""
  projection_only = settings(config)["train"] == "text_projection"

  def trainable(path: tuple[str, ...]) -> bool:
    if not path or path[0] != "text":
      return False
    return not projection_only or (len(path) > 1 and path[1] == "proj")

  return trainable


def distill_tokenizers(config: ml_collections.ConfigDict, model: MultilingualCLIP) -> dict:
  """Batch field -> tokenizer: the teacher's for the English caption (`ml_en_tokens`)."""
  from zoo import checkpoint

  teacher_dir = settings(config)["teacher"]
  length = train_lib.context_length(config, model)
  return {"ml_en_tokens": checkpoint.load_tokenizer(teacher_dir, context_length=length)}


train_lib.register_family(train_lib.Family(
    "multilingual", forward=distill_forward, loss=distill_loss, fields=DISTILL_FIELDS,
    build_model=build_model, make_trainable=trainable_for, export=student_only,
    text_tokenizers=distill_tokenizers))


# ----------------------------------------------------------------------------- command line


def _weights_in(path: str) -> str:
  """The weight file of a HF model directory (or `path` itself when it is a file)."""
  if os.path.isfile(path):
    return path
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def main(argv: list[str] | None = None) -> int:
  """python -m zoo.multilingual {build,to-mclip} ... (see --help)."""
  import argparse
  import json

  from zoo import checkpoint
  from zoo.convert.__main__ import read_state_dict, write_safetensors

  parser = argparse.ArgumentParser(
      prog="python -m zoo.multilingual",
      description="build: a MultilingualCLIP from a zoo CLIP (image tower, temperature, teacher) "
      "and a HF XLM-R / BERT encoder or an M-CLIP release (text tower). to-mclip: its text tower "
      "in M-CLIP's layout (model.safetensors + config.json).")
  parser.add_argument("command", choices=["build", "to-mclip"])
  parser.add_argument("--teacher", help="build: zoo.save directory of the (English) CLIP")
  parser.add_argument("--text", help="build: HF model directory (config.json + model.safetensors "
                      "or pytorch_model.bin) of XLM-R / BERT or M-CLIP")
  parser.add_argument("--tokenizer", help="build: the encoder's sentencepiece .model")
  parser.add_argument("--input", help="to-mclip: a MultilingualCLIP zoo.save directory")
  parser.add_argument("--output", required=True)
  parser.add_argument("--seed", type=int, default=0, help="build: seed of a fresh projection")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    if args.command == "build":
      missing = [f"--{k}" for k in ("teacher", "text", "tokenizer") if not getattr(args, k)]
      if missing:
        parser.error(f"build needs {' '.join(missing)}")
      teacher, _, _ = checkpoint.load(args.teacher)
      config_path = os.path.join(args.text if os.path.isdir(args.text) else
                                 os.path.dirname(args.text), "config.json")
      with open(config_path) as f:
        hf_config = json.load(f)
      tower = from_hf_text(read_state_dict(_weights_in(args.text)), hf_config,
                           embed_dim=teacher.config.embed_dim, seed=args.seed)
      model = from_clip(teacher, tower, tokenizer=os.path.abspath(args.tokenizer))
      out = checkpoint.save(model, args.output, {"built_from": {"teacher": args.teacher,
                                                                "text": args.text}},
                            overwrite=args.overwrite)
      print(f"wrote zoo checkpoint {out}")
      return 0
    if not args.input:
      parser.error("to-mclip needs --input")
    model, _, _ = checkpoint.load(args.input)
    if not isinstance(model, MultilingualCLIP):
      parser.error(f"{args.input} holds a {type(model).__name__}, not a MultilingualCLIP")
    if os.path.exists(args.output) and not args.overwrite:
      parser.error(f"{args.output} exists; pass --overwrite")
    os.makedirs(args.output, exist_ok=True)
    write_safetensors(to_hf_text(model.text), os.path.join(args.output, "model.safetensors"),
                      {"format": "pt"})
    cfg = model.config.text
    with open(os.path.join(args.output, "config.json"), "w") as f:
      json.dump({"model_type": "M-CLIP", "transformerDimensions": cfg.width,
                 "numDims": model.config.embed_dim, "encoder": dataclasses.asdict(cfg)}, f, indent=2)
    print(f"wrote {args.output}/model.safetensors and config.json")
    return 0
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  raise SystemExit(main())
