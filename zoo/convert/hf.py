"""Hugging Face transformers `CLIPModel` state dicts and configs <-> zoo CLIP.

HF keeps separate q/k/v projections (zoo packs them into one [W, 3, H, Dh] kernel), stores
the towers' projections as bias-free nn.Linear ([E, W]; zoo: [W, E]) and names the vision
pre-norm `pre_layrnorm` (sic). Text pooling: HF takes the first `eos_token_id`; with the CLIP
vocabulary EOT (49407) is the largest id, so that is zoo's argmax pooling.
Older transformers versions saved `*.embeddings.position_ids` buffers; they are ignored.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from flax import nnx

from zoo.convert import common, hf_siglip, llm
from zoo.convert.common import Rule, attn_out, conv_patch, identity, layer_norm, linear
from zoo.models import clip as clip_lib, configs as registry


def _ignored(key: str) -> bool:
  return key.endswith("embeddings.position_ids")


def _layer_rules(zoo: tuple, key: str, width: int, heads: int) -> list[Rule]:
  rules = [*layer_norm(zoo + ("ln_1",), f"{key}.layer_norm1")]
  rules += common.split_qkv(zoo + ("attn",), [f"{key}.self_attn.{n}_proj" for n in "qkv"],
                            width, heads)
  rules += attn_out(zoo + ("attn",), f"{key}.self_attn.out_proj", heads, width)
  rules += layer_norm(zoo + ("ln_2",), f"{key}.layer_norm2")
  rules += linear(zoo + ("mlp", "fc1"), f"{key}.mlp.fc1")
  rules += linear(zoo + ("mlp", "fc2"), f"{key}.mlp.fc2")
  return rules


def _check_layout(config: registry.CLIPConfig) -> None:
  v, t = config.vision, config.text
  if (v.pool != "tok" or not v.class_token or not v.ln_pre or v.patch_bias or not v.projection
      or t.pool != "argmax" or t.proj_bias or not t.causal or config.init_logit_bias is not None):
    raise ValueError("transformers' CLIPModel layout holds only plain CLIP (class-token ViT with "
                     "ln_pre and projection, causal text tower with EOT pooling and bias-free "
                     "projection, no logit_bias); this model is not one")


def rules_for(config: registry.CLIPConfig) -> list[Rule]:
  """The CLIPModel layout of `config`."""
  _check_layout(config)
  v, t = config.vision, config.text
  vm, tm = "vision_model", "text_model"
  rules = [
      conv_patch(("visual", "patch_kernel"), f"{vm}.embeddings.patch_embedding.weight"),
      identity(("visual", "class_embedding"), f"{vm}.embeddings.class_embedding"),
      identity(("visual", "positional_embedding"), f"{vm}.embeddings.position_embedding.weight"),
      *layer_norm(("visual", "ln_pre"), f"{vm}.pre_layrnorm"),
      *layer_norm(("visual", "ln_post"), f"{vm}.post_layernorm"),
      common.transposed(("visual", "proj"), "visual_projection.weight"),
      identity(("text", "token_embedding"), f"{tm}.embeddings.token_embedding.weight"),
      identity(("text", "positional_embedding"), f"{tm}.embeddings.position_embedding.weight"),
      *layer_norm(("text", "ln_final"), f"{tm}.final_layer_norm"),
      common.transposed(("text", "text_projection"), "text_projection.weight"),
      identity(("logit_scale",), "logit_scale"),
  ]
  for i in range(v.layers):
    rules += _layer_rules(("visual", "transformer", "resblocks", i),
                          f"{vm}.encoder.layers.{i}", v.width, v.heads)
  for i in range(t.layers):
    rules += _layer_rules(("text", "transformer", "resblocks", i),
                          f"{tm}.encoder.layers.{i}", t.width, t.heads)
  return rules


# ----------------------------------------------------------------------------- configs


def _mlp_ratio(width: int, hidden: int) -> float:
  ratio = hidden / width
  if int(width * ratio) != hidden:  # zoo builds int(width * mlp_ratio) hidden units
    raise ValueError(f"intermediate_size {hidden} is not representable as width {width} * ratio")
  return ratio


def config_from_hf(hf_config: Mapping[str, Any]) -> registry.CLIPConfig:
  """A zoo CLIPConfig from a transformers CLIPConfig dict (e.g. a model's config.json)."""
  if hasattr(hf_config, "to_dict"):
    hf_config = hf_config.to_dict()
  model_type = hf_config.get("model_type", "clip")
  if model_type in hf_siglip.MODEL_TYPES:
    return hf_siglip.config_from_hf(hf_config)
  if model_type != "clip":
    raise ValueError(f"HF config model_type {model_type!r} is not supported by from-hf: it "
                     "converts transformers CLIPModel, SiglipModel and Siglip2Model "
                     "(model_type 'clip', 'siglip', 'siglip2')")
  try:
    vc, tc = hf_config["vision_config"], hf_config["text_config"]
  except KeyError as e:
    raise ValueError(f"not a transformers CLIPConfig dict: missing {e.args[0]!r}") from None
  acts = {vc.get("hidden_act", "quick_gelu"), tc.get("hidden_act", "quick_gelu")}
  if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
    raise ValueError(f"unsupported hidden_act {sorted(acts)}: zoo supports 'gelu' or "
                     "'quick_gelu', the same for both towers")
  eos = tc.get("eos_token_id", 2)
  vocab = tc.get("vocab_size", 49408)
  if eos not in (2, vocab - 1):
    raise ValueError(f"text eos_token_id {eos} is not the largest id ({vocab - 1}); zoo pools "
                     "the text tower at the largest token id (argmax) as CLIP does")
  vw, tw = vc.get("hidden_size", 768), tc.get("hidden_size", 512)
  vision = registry.VisionConfig(
      image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 32), width=vw,
      layers=vc.get("num_hidden_layers", 12), heads=vc.get("num_attention_heads", 12),
      mlp_ratio=_mlp_ratio(vw, vc.get("intermediate_size", 3072)),
      ln_eps=vc.get("layer_norm_eps", 1e-5))
  if vc.get("num_channels", 3) != 3:
    raise ValueError(f"num_channels {vc['num_channels']} unsupported; zoo images are RGB")
  text = registry.TextConfig(
      context_length=tc.get("max_position_embeddings", 77), vocab_size=vocab, width=tw,
      layers=tc.get("num_hidden_layers", 12), heads=tc.get("num_attention_heads", 8),
      mlp_ratio=_mlp_ratio(tw, tc.get("intermediate_size", 2048)),
      ln_eps=tc.get("layer_norm_eps", 1e-5))
  return registry.CLIPConfig(
      embed_dim=hf_config.get("projection_dim", 512), vision=vision, text=text,
      quick_gelu=acts == {"quick_gelu"},
      init_logit_scale=float(hf_config.get("logit_scale_init_value", math.log(1 / 0.07))))


def config_to_hf(config: registry.CLIPConfig) -> dict[str, Any]:
  """A transformers CLIPConfig dict for `config` (`transformers.CLIPConfig(**d)`); a SigLIP
  model gives a SiglipConfig (Siglip2Config for NaFlex) dict."""
  if config.kind == "siglip":
    return hf_siglip.config_to_hf(config)
  _check_layout(config)
  v, t = config.vision, config.text
  act = "quick_gelu" if config.quick_gelu else "gelu"
  return {
      "model_type": "clip",
      "architectures": ["CLIPModel"],
      "projection_dim": config.embed_dim,
      "logit_scale_init_value": config.init_logit_scale,
      "vision_config": {
          "hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
          "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3,
          "hidden_act": act, "layer_norm_eps": v.ln_eps, "projection_dim": config.embed_dim,
      },
      "text_config": {
          "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
          "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
          "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
          "hidden_act": act, "layer_norm_eps": t.ln_eps, "projection_dim": config.embed_dim,
          "bos_token_id": t.vocab_size - 2, "eos_token_id": t.vocab_size - 1, "pad_token_id": 1,
      },
  }


# ----------------------------------------------------------------------------- public


def _resolve(name_or_config: str | registry.CLIPConfig | Mapping[str, Any]
             ) -> tuple[registry.CLIPConfig, str]:
  if not isinstance(name_or_config, (str, registry.CLIPConfig)):  # dict / transformers config
    return config_from_hf(name_or_config), "<hf config>"
  config = common.resolve_config(name_or_config)
  return config, name_or_config if isinstance(name_or_config, str) else "<config>"


def from_hf(state_dict: Mapping[str, Any],
            name_or_config: str | registry.CLIPConfig | Mapping[str, Any]) -> clip_lib.CLIP:
  """A zoo CLIP holding a transformers CLIPModel (or SiglipModel / Siglip2Model: the config's
  `model_type` decides) state dict's weights.

  `name_or_config`: a zoo/open_clip name ('ViT-B-32-quickgelu' for openai/clip-vit-base-patch32),
  a zoo CLIPConfig, or the HF config (dict or transformers.CLIPConfig).
  """
  if _llm_config(name_or_config):
    return llm.from_hf(state_dict, name_or_config)
  config, label = _resolve(name_or_config)
  if config.kind == "siglip":
    return hf_siglip.from_hf(state_dict, config, label)
  return common.convert_from_torch(state_dict, rules_for(config), config, layout="HF CLIPModel",
                                   model=label, ignore=_ignored)


def to_hf(model: nnx.Module) -> dict[str, np.ndarray]:
  """The transformers CLIPModel (SiglipModel, Siglip2Model; LlamaModel / Qwen2Model / Qwen3Model
  for an LLM tower) state dict of `model` (load_state_dict(strict=True) works)."""
  if isinstance(model, llm.llm_lib.LLM):
    return llm.to_hf(model)
  if getattr(model.config, "kind", "clip") == "siglip":
    return hf_siglip.to_hf(model)
  return common.convert_to_torch(model, rules_for(model.config), layout="HF CLIPModel")


# ----------------------------------------------------------------------------- LLM text towers

SUPPORTED_MODEL_TYPES = ("clip", *hf_siglip.MODEL_TYPES, *llm.MODEL_TYPES)


def _llm_config(config: Any) -> bool:
  """True for a Llama / Qwen2 / Qwen3 config (zoo.convert.llm); an HF config of an unsupported
  model_type is a one-line error naming the supported ones."""
  if isinstance(config, llm.llm_lib.LLMConfig):
    return True
  if isinstance(config, (str, registry.CLIPConfig)):
    return False
  d = config.to_dict() if hasattr(config, "to_dict") else config
  kind = d.get("model_type", "clip")
  if kind not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"HF config model_type {kind!r} is not supported by from_hf; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  return kind in llm.MODEL_TYPES
