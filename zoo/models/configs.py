"""Architectures by name: open_clip model names -> frozen dataclass configs.

Dimensions follow open_clip's `model_configs/*.json` so that converted weights fit exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from zoo import errors

# Image normalisation constants (mean, std per RGB channel) of the preprocesses in the table.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # SigLIP / big_vision: x / 127.5 - 1
INCEPTION_STD = (0.5, 0.5, 0.5)
SIGLIP_MEAN, SIGLIP_STD = INCEPTION_MEAN, INCEPTION_STD
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Vision tower. `pool` is 'tok' (class token, CLIP), 'map' (attention pooling, SigLIP) or
  'avg' (mean of the patch tokens, CLIPA)."""

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  pool: str = "tok"
  class_token: bool = True
  ln_pre: bool = True
  patch_bias: bool = False
  ln_eps: float = 1e-5
  projection: bool = True  # False when the pooled width already is the embed dim (SigLIP).
  act: str = ""  # '' = the model's quick_gelu choice; else 'gelu' | 'quick_gelu' | 'gelu_tanh'
  # SigLIP 2 NaFlex: any H x W (multiples of the patch), the learned grid_size^2 positions
  # resized per image; at most `max_patches` patches per image (0 = no limit).
  naflex: bool = False
  max_patches: int = 0
  final_ln_after_pool: bool = False  # ln_post on the pooled token, not all tokens (CLIPA)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Text tower. `pool` is 'argmax' (EOT = largest id, CLIP), 'last' (SigLIP) or 'eos' (the
  first `eos_id`, MetaCLIP 2)."""

  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_ratio: float = 4.0
  causal: bool = True
  pool: str = "argmax"
  ln_eps: float = 1e-5
  proj_bias: bool = False
  frozen_positions: int = 0  # leading position rows that pass no gradient (Long-CLIP: 20)
  act: str = ""  # '' = the model's quick_gelu choice; else 'gelu' | 'quick_gelu' | 'gelu_tanh'
  projection: bool = True  # False: the pooled token is the embedding (SigLIP i18n SO400M)
  eos_id: int = 2  # pool 'eos': the first position holding this id (MetaCLIP 2's XLM-V)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A two-tower contrastive model. `kind` 'clip' = softmax loss, 'siglip' = sigmoid loss + bias."""

  embed_dim: int = 512
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  kind: str = "clip"
  quick_gelu: bool = False
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: float | None = None
  image_mean: tuple[float, float, float] = OPENAI_MEAN
  image_std: tuple[float, float, float] = OPENAI_STD
  tokenizer: str = "clip"  # 'clip' (BPE), 'sentencepiece', 'xlmr' or a sentencepiece .model path
  dtype: str = "float32"  # compute dtype; parameters are always float32

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    """The inverse of `to_dict`; a subclass with another image tower (ResNet, ConvNeXt) reads its
    `vision` with the class of its field's default."""
    d = dict(d)
    vision_field = next(f for f in dataclasses.fields(cls) if f.name == "vision")
    vision = type(vision_field.default)(**d.pop("vision"))
    text = TextConfig(**d.pop("text"))
    for key in ("image_mean", "image_std"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(vision=vision, text=text, **d)


def checked_config(cls: type, d: Any, what: str) -> Any:
  """`cls(**d)` for a dataclass, refusing an unknown key with one line naming it and the valid
  keys (model sub-configs such as MoE and region settings share this check)."""
  errors.check_keys(d, (f.name for f in dataclasses.fields(cls)), f"{what} config")
  return cls(**dict(d))


def _vit(image_size: int, patch: int, width: int, layers: int) -> VisionConfig:
  return VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers,
                      heads=width // 64)


_B_TEXT = TextConfig(width=512, heads=8, layers=12)
_L_TEXT = TextConfig(width=768, heads=12, layers=12)

_MODELS: dict[str, CLIPConfig] = {
    "ViT-B-32": CLIPConfig(512, _vit(224, 32, 768, 12), _B_TEXT),
    "ViT-B-16": CLIPConfig(512, _vit(224, 16, 768, 12), _B_TEXT),
    "ViT-L-14": CLIPConfig(768, _vit(224, 14, 1024, 24), _L_TEXT),
    "ViT-L-14-336": CLIPConfig(768, _vit(336, 14, 1024, 24), _L_TEXT),
    "ViT-B-16-SigLIP": CLIPConfig(
        768,
        VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12, pool="map",
                     class_token=False, ln_pre=False, patch_bias=True, ln_eps=1e-6,
                     projection=False),
        TextConfig(context_length=64, vocab_size=32000, width=768, heads=12, layers=12,
                   causal=False, pool="last", ln_eps=1e-6, proj_bias=True),
        kind="siglip", init_logit_scale=math.log(10.0), init_logit_bias=-10.0,
        image_mean=INCEPTION_MEAN, image_std=INCEPTION_STD, tokenizer="sentencepiece"),
    # Small architectures for tests and the CPU demo (not open_clip names).
    "test-tiny": CLIPConfig(
        32, VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2),
        TextConfig(width=64, heads=2, layers=2)),
    "test-tiny-siglip": CLIPConfig(
        32,
        VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, pool="map",
                     class_token=False, ln_pre=False, patch_bias=True, ln_eps=1e-6),
        TextConfig(width=64, heads=2, layers=2, causal=False, pool="last", ln_eps=1e-6,
                   proj_bias=True),
        kind="siglip", init_logit_scale=math.log(10.0), init_logit_bias=-10.0),
    "demo-tiny": CLIPConfig(
        128, VisionConfig(image_size=64, patch_size=8, width=192, layers=4, heads=3),
        TextConfig(width=128, heads=2, layers=4)),
}
for _name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"):
  _MODELS[f"{_name}-quickgelu"] = dataclasses.replace(_MODELS[_name], quick_gelu=True)
# The larger native ViTs of open_clip's table (model_configs/*.json): width, heads from
# head_width, mlp_ratio, image size; text towers at the same widths.
def _text(width: int, heads: int, layers: int) -> TextConfig:
  return TextConfig(width=width, heads=heads, layers=layers)


_H_TEXT = _text(1024, 16, 24)
for _name, _embed, _vision, _txt in (
    ("ViT-B-32-256", 512, _vit(256, 32, 768, 12), _B_TEXT),
    ("ViT-B-16-plus-240", 640, _vit(240, 16, 896, 12), _text(640, 10, 12)),
    ("ViT-H-14", 1024, dataclasses.replace(_vit(224, 14, 1280, 32), heads=16), _H_TEXT),
    ("ViT-H-14-378", 1024, dataclasses.replace(_vit(378, 14, 1280, 32), heads=16), _H_TEXT),
    ("ViT-g-14", 1024, VisionConfig(image_size=224, patch_size=14, width=1408, layers=40,
                                    heads=16, mlp_ratio=4.3637), _H_TEXT),
    ("ViT-bigG-14", 1280, VisionConfig(image_size=224, patch_size=14, width=1664, layers=48,
                                       heads=16, mlp_ratio=4.9231), _text(1280, 20, 32)),
):
  _MODELS[_name] = CLIPConfig(_embed, _vision, _txt)
for _name in ("ViT-H-14", "ViT-H-14-378", "ViT-bigG-14"):
  _MODELS[f"{_name}-quickgelu"] = dataclasses.replace(_MODELS[_name], quick_gelu=True)
# SigLIP / SigLIP 2 at every size and resolution of open_clip's table: timm trunks (no class
# token, MAP head; SigLIP 2 and the /16 SO400M, /32, L-512 and g-opt trunks use tanh GELU),
# sentencepiece text towers (32k English, 250k i18n, 256k Gemma for SigLIP 2; tanh GELU).
def _siglip(image_size: int, patch: int, width: int, layers: int, mlp_ratio: float,
            vision_act: str, text: tuple, embed_dim: int | None = None, text_act: str = "",
            text_projection: bool = True) -> CLIPConfig:
  context, vocab, t_width, t_layers, t_mlp = text
  return CLIPConfig(
      embed_dim or width,
      VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers,
                   heads=width // 64 if width <= 768 else 16, mlp_ratio=mlp_ratio, pool="map",
                   class_token=False, ln_pre=False, patch_bias=True, ln_eps=1e-6,
                   projection=False, act=vision_act),
      TextConfig(context_length=context, vocab_size=vocab, width=t_width,
                 heads=t_width // 64 if t_width <= 768 else 16, layers=t_layers,
                 mlp_ratio=t_mlp, causal=False, pool="last", ln_eps=1e-6,
                 proj_bias=text_projection, act=text_act, projection=text_projection),
      kind="siglip", init_logit_scale=math.log(10.0), init_logit_bias=-10.0,
      image_mean=INCEPTION_MEAN, image_std=INCEPTION_STD, tokenizer="sentencepiece")


_SO = 3.7362  # SO400M's mlp_ratio (both towers)
for _size in (256, 384, 512):
  _MODELS[f"ViT-B-16-SigLIP-{_size}"] = _siglip(_size, 16, 768, 12, 4.0, "",
                                                (64, 32000, 768, 12, 4.0))
_MODELS["ViT-B-16-SigLIP-i18n-256"] = _siglip(256, 16, 768, 12, 4.0, "", (64, 250000, 768, 12, 4.0))
for _size in (256, 384):
  _MODELS[f"ViT-L-16-SigLIP-{_size}"] = _siglip(_size, 16, 1024, 24, 4.0, "",
                                                (64, 32000, 1024, 24, 4.0))
_MODELS["ViT-SO400M-14-SigLIP"] = _siglip(224, 14, 1152, 27, _SO, "", (16, 32000, 1152, 27, _SO))
for _size in (378, 384):
  _MODELS[f"ViT-SO400M-14-SigLIP-{_size}"] = _siglip(_size, 14, 1152, 27, _SO, "",
                                                     (64, 32000, 1152, 27, _SO))
_MODELS["ViT-SO400M-16-SigLIP-i18n-256"] = _siglip(
    256, 16, 1152, 27, _SO, "gelu_tanh", (64, 250000, 1152, 27, _SO), text_projection=False)
_GEMMA_B, _GEMMA_L, _GEMMA_SO = ((64, 256000, 768, 12, 4.0), (64, 256000, 1024, 24, 4.0),
                                 (64, 256000, 1152, 27, _SO))
for _name, _cfg in (
    ("ViT-B-32-SigLIP2-256", _siglip(256, 32, 768, 12, 4.0, "gelu_tanh", _GEMMA_B)),
    *((f"ViT-B-16-SigLIP2{'' if s == 224 else f'-{s}'}",
       _siglip(s, 16, 768, 12, 4.0, "", _GEMMA_B)) for s in (224, 256, 384, 512)),
    *((f"ViT-L-16-SigLIP2-{s}", _siglip(s, 16, 1024, 24, 4.0, "gelu_tanh" if s == 512 else "",
                                        _GEMMA_L)) for s in (256, 384, 512)),
    *((f"ViT-SO400M-14-SigLIP2{'' if s == 224 else f'-{s}'}",
       _siglip(s, 14, 1152, 27, _SO, "", _GEMMA_SO)) for s in (224, 378)),
    *((f"ViT-SO400M-16-SigLIP2-{s}", _siglip(s, 16, 1152, 27, _SO, "gelu_tanh", _GEMMA_SO))
      for s in (256, 384, 512)),
    *((f"ViT-gopt-16-SigLIP2-{s}", _siglip(s, 16, 1536, 40, 4.0, "gelu_tanh", _GEMMA_SO))
      for s in (256, 384)),
):
  _MODELS[_name] = dataclasses.replace(_cfg, text=dataclasses.replace(_cfg.text, act="gelu_tanh"))
# MetaCLIP 2 "worldwide": H / bigG towers, a causal text tower over the XLM-V vocabulary
# (901,629 ids) pooled at the first EOS (id 2).
for _name in ("ViT-H-14", "ViT-H-14-378", "ViT-bigG-14"):
  _base = _MODELS[_name]
  _MODELS[_name.replace("-14", "-14-worldwide")] = dataclasses.replace(
      _base, text=dataclasses.replace(_base.text, vocab_size=901629, pool="eos", eos_id=2),
      tokenizer="xlmr")
_MODELS["ViT-bigG-14-worldwide-378"] = dataclasses.replace(
    _MODELS["ViT-bigG-14-worldwide"],
    vision=dataclasses.replace(_MODELS["ViT-bigG-14-worldwide"].vision, image_size=378))
_MODELS["ViT-H-14-worldwide-quickgelu"] = dataclasses.replace(_MODELS["ViT-H-14-worldwide"],
                                                              quick_gelu=True)
# CLIPA (UCSC-VLAA): no ln_pre, the patch tokens averaged then ln_post; a bidirectional text
# tower over BERT's uncased WordPiece vocabulary, 32 tokens, pooled at the last position.
for _name, _vit_name in (("ViT-L-14", "ViT-L-14"), ("ViT-H-14", "ViT-H-14"),
                         ("ViT-bigG-14", "ViT-bigG-14")):
  _base = _MODELS[_vit_name]
  for _size in (224, 336):
    _MODELS[f"{_name}-CLIPA{'' if _size == 224 else f'-{_size}'}"] = dataclasses.replace(
        _base,
        vision=dataclasses.replace(_base.vision, image_size=_size, ln_pre=False, pool="avg",
                                   final_ln_after_pool=True),
        text=dataclasses.replace(_base.text, context_length=32, vocab_size=32000, causal=False,
                                 pool="last"),
        tokenizer="hf_tokenizers")
# Long-CLIP releases (BeichenZhang/LongCLIP-B, -L): OpenAI towers, text read to 248 tokens.
for _name in ("ViT-B-16", "ViT-L-14"):
  _MODELS[f"LongCLIP-{_name}"] = dataclasses.replace(
      _MODELS[f"{_name}-quickgelu"],
      text=dataclasses.replace(_MODELS[_name].text, context_length=248))


def list_architectures() -> list[str]:
  """Every architecture name (`zoo.list_models()` adds the pretrained releases)."""
  return sorted(_MODELS)


def register(name: str, config: CLIPConfig) -> None:
  """Adds an architecture (e.g. from a family module or a user's notebook)."""
  _MODELS[name] = config


def get_model_config(name: str, **overrides: Any) -> CLIPConfig:
  """The config of `name`, with top-level fields or nested `vision=`/`text=` dicts replaced."""
  if name not in _MODELS:
    known = list_architectures()
    hint = errors.did_you_mean(name, known)
    listing = ("see zoo.list_models()" if hint
               else f"known models: {', '.join(known)}")
    raise ValueError(f"Unknown model {name!r}{hint}; {listing}")
  return apply_overrides(_MODELS[name], **overrides)


def apply_overrides(config: CLIPConfig, **overrides: Any) -> CLIPConfig:
  """Returns `config` with overrides; unknown keys are errors that list the valid ones."""
  errors.check_keys(overrides, (f.name for f in dataclasses.fields(config)), "model override")
  changes: dict[str, Any] = {}
  for key, value in overrides.items():
    if key in ("vision", "text", "multimodal") and not dataclasses.is_dataclass(value):
      value = dict(value.to_dict() if hasattr(value, "to_dict") else value)  # dict / ConfigDict
      sub = getattr(config, key)
      errors.check_keys(value, (f.name for f in dataclasses.fields(sub)), f"{key} override")
      value = dataclasses.replace(sub, **value)
    changes[key] = value
  return dataclasses.replace(config, **changes)
