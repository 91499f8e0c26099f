"""Hugging Face transformers `SiglipModel` and `Siglip2Model` (NaFlex) <-> zoo SigLIP.

Layout: `vision_model.embeddings.patch_embedding` (SigLIP: Conv2d [W, 3, p, p] + bias;
SigLIP 2: Linear [W, p*p*3] over patches flattened (row, col, channel)),
`vision_model.embeddings.position_embedding.weight` [grid^2, W], `{vision,text}_model.encoder.
layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}`,
`vision_model.post_layernorm`, the MAP head `vision_model.head.{probe [1, 1, W],
attention.in_proj_weight [3W, W] (q, k, v), attention.in_proj_bias, attention.out_proj,
layernorm, mlp.fc1, mlp.fc2}`, `text_model.embeddings.{token,position}_embedding`,
`text_model.final_layer_norm`, `text_model.head` (Linear, last-token pooling), top-level
`logit_scale` / `logit_bias` [1]. zoo's MAP head keeps q and kv apart, so the packed
in_proj is split into them on the way in and packed again on the way out.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from flax import nnx

from zoo.convert import common
from zoo.convert.common import Rule, attn_out, identity, layer_norm, linear
from zoo.models import clip as clip_lib, configs as registry

MODEL_TYPES = ("siglip", "siglip2")
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu",
         "gelu_new": "gelu_tanh"}
_HF_ACTS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
_HEAD = "vision_model.head.attention"
_SPLIT = {f"{_HEAD}.in_proj_weight": (f"{_HEAD}.q.weight", f"{_HEAD}.kv.weight"),
          f"{_HEAD}.in_proj_bias": (f"{_HEAD}.q.bias", f"{_HEAD}.kv.bias")}


def _ignored(key: str) -> bool:
  return key.endswith(("position_ids",))


def _layers(zoo: tuple, key: str, width: int, heads: int, layers: int) -> list[Rule]:
  rules = []
  for i in range(layers):
    z, k = zoo + ("resblocks", i), f"{key}.{i}"
    rules += [*layer_norm(z + ("ln_1",), f"{k}.layer_norm1"),
              *common.split_qkv(z + ("attn",), [f"{k}.self_attn.{n}_proj" for n in "qkv"],
                                width, heads),
              *attn_out(z + ("attn",), f"{k}.self_attn.out_proj", heads, width),
              *layer_norm(z + ("ln_2",), f"{k}.layer_norm2"),
              *linear(z + ("mlp", "fc1"), f"{k}.mlp.fc1"),
              *linear(z + ("mlp", "fc2"), f"{k}.mlp.fc2")]
  return rules


def _check(config: registry.CLIPConfig) -> None:
  v, t = config.vision, config.text
  if (config.kind != "siglip" or v.pool != "map" or v.class_token or v.ln_pre or v.projection
      or not v.patch_bias or t.pool != "last" or t.causal or not t.projection
      or not t.proj_bias or config.init_logit_bias is None):
    raise ValueError("transformers' SiglipModel / Siglip2Model layout holds SigLIP models only "
                     "(MAP head, no class token or ln_pre or vision projection, bidirectional "
                     "text with last-token pooling and a biased head, logit_bias)")


def rules_for(config: registry.CLIPConfig) -> list[Rule]:
  """The SiglipModel (or, for a NaFlex config, Siglip2Model) layout of `config`."""
  _check(config)
  v, t = config.vision, config.text
  emb = "vision_model.embeddings"
  if v.naflex:  # Linear over (row, col, channel)-flattened patches
    patch = Rule(("visual", "patch_kernel"), (f"{emb}.patch_embedding.weight",),
                 lambda a: (a.reshape(-1, a.shape[-1]).T,),
                 lambda a: a.T.reshape(v.patch_size, v.patch_size, 3, -1))
  else:
    patch = common.conv_patch(("visual", "patch_kernel"), f"{emb}.patch_embedding.weight")
  ap, head = ("visual", "attn_pool"), "vision_model.head"
  scalar = lambda zoo, key: Rule(zoo, (key,), lambda a: (a.reshape(1),),  # noqa: E731
                                 lambda a: a.reshape(()))
  return [
      patch,
      identity(("visual", "patch_bias"), f"{emb}.patch_embedding.bias"),
      identity(("visual", "positional_embedding"), f"{emb}.position_embedding.weight"),
      *_layers(("visual", "transformer"), "vision_model.encoder.layers", v.width, v.heads,
               v.layers),
      *layer_norm(("visual", "ln_post"), "vision_model.post_layernorm"),
      Rule(ap + ("latent",), (f"{head}.probe",), lambda a: (a.reshape((1,) + a.shape),),
           lambda a: a[0]),
      *linear(ap + ("q",), f"{_HEAD}.q"),
      *linear(ap + ("kv",), f"{_HEAD}.kv"),
      *linear(ap + ("proj",), f"{_HEAD}.out_proj"),
      *layer_norm(ap + ("norm",), f"{head}.layernorm"),
      *linear(ap + ("mlp", "fc1"), f"{head}.mlp.fc1"),
      *linear(ap + ("mlp", "fc2"), f"{head}.mlp.fc2"),
      identity(("text", "token_embedding"), "text_model.embeddings.token_embedding.weight"),
      identity(("text", "positional_embedding"),
               "text_model.embeddings.position_embedding.weight"),
      *_layers(("text", "transformer"), "text_model.encoder.layers", t.width, t.heads, t.layers),
      *layer_norm(("text", "ln_final"), "text_model.final_layer_norm"),
      common.transposed(("text", "text_projection"), "text_model.head.weight"),
      identity(("text", "proj_bias"), "text_model.head.bias"),
      scalar(("logit_scale",), "logit_scale"),
      scalar(("logit_bias",), "logit_bias"),
  ]


def _split_head(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  sd = dict(state_dict)
  for packed, (q, kv) in _SPLIT.items():
    if packed in sd:
      a = common.to_numpy(sd.pop(packed))
      width = a.shape[0] // 3
      sd[q], sd[kv] = a[:width], a[width:]
  return sd


def _pack_head(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  for packed, (q, kv) in _SPLIT.items():
    sd[packed] = np.concatenate([sd.pop(q), sd.pop(kv)], axis=0)
  return sd


# ----------------------------------------------------------------------------- configs


def _ratio(width: int, hidden: int) -> float:
  ratio = hidden / width
  if int(width * ratio) != hidden:
    raise ValueError(f"intermediate_size {hidden} is not representable as width {width} * ratio")
  return ratio


def _act(cfg: Mapping[str, Any], where: str) -> str:
  act = cfg.get("hidden_act", "gelu_pytorch_tanh")
  if act not in _ACTS:
    raise ValueError(f"HF {where} hidden_act {act!r} is not supported (supported: "
                     f"{', '.join(_ACTS)})")
  return _ACTS[act]


def config_from_hf(hf_config: Mapping[str, Any]) -> registry.CLIPConfig:
  """A zoo SigLIP config from a transformers SiglipConfig / Siglip2Config dict."""
  naflex = hf_config["model_type"] == "siglip2"
  vc, tc = hf_config.get("vision_config") or {}, hf_config.get("text_config") or {}
  vw, tw = vc.get("hidden_size", 768), tc.get("hidden_size", 768)
  embed = tc.get("projection_size", tw)
  if vc.get("num_channels", 3) != 3 or not vc.get("vision_use_head", True):
    raise ValueError("HF SigLIP vision_config: zoo implements RGB input and the MAP head "
                     "(num_channels 3, vision_use_head true)")
  if embed != vw:
    raise ValueError(f"HF SigLIP text projection_size {embed} differs from the vision width "
                     f"{vw}: the image and text embeddings would not match")
  patch = vc.get("patch_size", 16)
  if naflex:
    grid = math.isqrt(vc.get("num_patches", 256))
    if grid * grid != vc.get("num_patches", 256):
      raise ValueError(f"HF Siglip2 num_patches {vc['num_patches']} is not a square grid")
    image_size = grid * patch
  else:
    image_size = vc.get("image_size", 224)
  vision = registry.VisionConfig(
      image_size=image_size, patch_size=patch, width=vw, layers=vc.get("num_hidden_layers", 12),
      heads=vc.get("num_attention_heads", 12), mlp_ratio=_ratio(vw, vc.get("intermediate_size",
                                                                          3072)),
      pool="map", class_token=False, ln_pre=False, patch_bias=True,
      ln_eps=vc.get("layer_norm_eps", 1e-6), projection=False, act=_act(vc, "vision_config"),
      naflex=naflex)
  text = registry.TextConfig(
      context_length=tc.get("max_position_embeddings", 64), vocab_size=tc.get("vocab_size", 32000),
      width=tw, layers=tc.get("num_hidden_layers", 12), heads=tc.get("num_attention_heads", 12),
      mlp_ratio=_ratio(tw, tc.get("intermediate_size", 3072)), causal=False, pool="last",
      ln_eps=tc.get("layer_norm_eps", 1e-6), proj_bias=True, act=_act(tc, "text_config"))
  return registry.CLIPConfig(
      embed_dim=embed, vision=vision, text=text, kind="siglip",
      init_logit_scale=math.log(10.0), init_logit_bias=-10.0,
      image_mean=registry.SIGLIP_MEAN, image_std=registry.SIGLIP_STD, tokenizer="sentencepiece")


def config_to_hf(config: registry.CLIPConfig) -> dict[str, Any]:
  """A transformers SiglipConfig (or Siglip2Config, NaFlex) dict for `config`."""
  _check(config)
  v, t = config.vision, config.text
  model_type = "siglip2" if v.naflex else "siglip"
  default = "quick_gelu" if config.quick_gelu else "gelu"
  vision = {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
            "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "num_channels": 3,
            "patch_size": v.patch_size, "hidden_act": _HF_ACTS[v.act or default],
            "layer_norm_eps": v.ln_eps, "model_type": f"{model_type}_vision_model"}
  if v.naflex:
    vision["num_patches"] = v.grid_size ** 2
  else:
    vision["image_size"] = v.image_size
  text = {"hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
          "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
          "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
          "hidden_act": _HF_ACTS[t.act or default], "layer_norm_eps": t.ln_eps,
          "projection_size": config.embed_dim, "model_type": f"{model_type}_text_model"}
  arch = "Siglip2Model" if v.naflex else "SiglipModel"
  return {"model_type": model_type, "architectures": [arch], "vision_config": vision,
          "text_config": text}


# ----------------------------------------------------------------------------- public


def from_hf(state_dict: Mapping[str, Any], config: registry.CLIPConfig, label: str
            ) -> clip_lib.CLIP:
  layout = "HF Siglip2Model" if config.vision.naflex else "HF SiglipModel"
  return common.convert_from_torch(_split_head(state_dict), rules_for(config), config,
                                   layout=layout, model=label, ignore=_ignored)


def to_hf(model: nnx.Module) -> dict[str, np.ndarray]:
  layout = "HF Siglip2Model" if model.config.vision.naflex else "HF SiglipModel"
  return _pack_head(common.convert_to_torch(model, rules_for(model.config), layout=layout))
