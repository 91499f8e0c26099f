"""open_clip model configs (`model_configs/*.json`, a hub repo's `model_cfg`) <-> zoo's
`registry.CLIPConfig`: built-in ViT + text transformer configs map field by field, timm-trunk
configs only for the trunks in `TIMM_TRUNKS` (SigLIP), Hugging Face text towers
(`hf_model_name`: RoBERTa / XLM-R encoders) as a MultilingualCLIPConfig; anything zoo does not
implement is a `PretrainedError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from zoo.convert import mclip
from zoo.models import configs as registry, convnext, m2m100, multilingual, resnet
from zoo.weights.hub import PretrainedError

# open_clip CLIPVisionCfg / CLIPTextCfg fields zoo's towers implement only at these defaults.
_VISION_FIXED = dict(ls_init_value=None, patch_dropout=0.0, attentional_pool=False,
                     no_ln_pre=False, pos_embed_type="learnable", final_ln_after_pool=False,
                     pool_type="tok", act_kwargs=None, block_type=None, qk_norm=False,
                     scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
                     scale_attn=False, scale_fc=False)
_TEXT_FIXED = dict(ls_init_value=None, embed_cls=False, no_causal_mask=False,
                   final_ln_after_pool=False, pool_type="argmax", proj_bias=False,
                   proj_type="linear", act_kwargs=None, block_type=None, qk_norm=False,
                   scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
                   scale_attn=False, scale_fc=False, hf_model_name=None)
# timm trunks (open_clip's SigLIP configs) -> the zoo architecture with the same towers.
TIMM_TRUNKS = {"vit_base_patch16_siglip_224": "ViT-B-16-SigLIP"}
SIGLIP_TOKENIZERS = {"ViT-B-16-SigLIP": "timm/ViT-B-16-SigLIP"}


def _one_size(value: Any, key: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise PretrainedError(f"open_clip config {key}={value}: zoo needs square images/patches")
    value = value[0]
  return int(value)


def _check_fixed(cfg: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
  for key, default in fixed.items():
    if cfg.get(key, default) != default:
      raise PretrainedError(f"open_clip config {where}.{key}={cfg[key]!r} is not implemented "
                            f"in zoo (supported: {default!r})")


def _eps(cfg: Mapping[str, Any], default: float = 1e-5) -> float:
  return float((cfg.get("norm_kwargs") or {}).get("eps", default))


# open_clip HFTextEncoder poolers zoo implements (the HF pooler layer itself is not).
HF_POOLERS = {"mean_pooler": "mean", "cls_last_hidden_state_pooler": "cls"}


def _hf_text_config(model_cfg: Mapping[str, Any], hf_config: Mapping[str, Any] | None
                    ) -> multilingual.MultilingualCLIPConfig:
  """A CustomTextCLIP with an HFTextEncoder: the image tower as a built-in CLIP's, the encoder
  from `hf_config` (its config.json, as AutoConfig reads it) or zoo's known encoders."""
  t = dict(model_cfg["text_cfg"])
  name = t["hf_model_name"]
  if hf_config is not None:
    try:
      encoder, _ = mclip.text_config_from_hf(hf_config)
    except ValueError as e:
      raise PretrainedError(f"open_clip config's text encoder {name!r}: {e}") from None
  elif name.split("/")[-1] in multilingual.TEXT_MODELS:
    encoder = multilingual.TEXT_MODELS[name.split("/")[-1]]
  else:
    raise PretrainedError(f"open_clip config's Hugging Face text tower {name!r} is not one zoo "
                          f"knows ({', '.join(multilingual.list_text_models())}) and its "
                          "config.json was not given")
  pooler = t.get("hf_pooler_type", "mean_pooler")
  proj = t.get("hf_proj_type", "mlp")
  if pooler == "cls_pooler" and isinstance(encoder, m2m100.M2M100TextConfig):
    pooler = "cls_last_hidden_state_pooler"  # an encoder without a pooler layer: the first token
  if pooler not in HF_POOLERS or proj not in ("mlp", "linear"):
    raise PretrainedError(f"open_clip config text_cfg hf_pooler_type={pooler!r} / hf_proj_type="
                          f"{proj!r} is not implemented in zoo (poolers: {', '.join(HF_POOLERS)};"
                          " projections: mlp, linear)")
  image = config_from_open_clip_cfg({k: v for k, v in model_cfg.items() if k != "text_cfg"})
  text = multilingual.open_clip_text(encoder, int(t.get("context_length", 77)), HF_POOLERS[pooler],
                                     proj)
  config = multilingual.hf_text_clip_config(image, text, quick_gelu=image.quick_gelu)
  clean = (t.get("tokenizer_kwargs") or {}).get("clean", "whitespace")
  return dataclasses.replace(config, tokenizer_clean=clean)


def _convnext_config(model_cfg: Mapping[str, Any]) -> convnext.ConvNeXtCLIPConfig:
  """open_clip's TimmModel over a timm ConvNeXt (`timm_pool=''`: timm's avg pool + LayerNorm
  head) with a 'linear' or 'mlp' projection, and the built-in text transformer."""
  v = dict(model_cfg["vision_cfg"])
  if v.get("timm_pool", "avg") != "" or v.get("timm_proj", "linear") not in ("linear", "mlp") \
      or v.get("timm_proj_bias", False):
    raise PretrainedError(f"open_clip config timm trunk {v['timm_model_name']!r} with timm_pool="
                          f"{v.get('timm_pool')!r}, timm_proj={v.get('timm_proj')!r}: zoo's "
                          "ConvNeXt implements pool '' with a bias-free linear or mlp projection")
  depths, dims, eps = convnext.TIMM_CONVNEXTS[v["timm_model_name"]]
  base = config_from_open_clip_cfg(dict(model_cfg, vision_cfg={"layers": 1}))
  vision = convnext.ConvNeXtVisionConfig(_one_size(v.get("image_size", 224), "image_size"), depths,
                                         dims, eps, v.get("timm_proj", "linear"))
  return convnext.ConvNeXtCLIPConfig(**{f.name: getattr(base, f.name)
                                        for f in dataclasses.fields(base) if f.name != "vision"},
                                     vision=vision)


def config_from_open_clip_cfg(model_cfg: Mapping[str, Any],
                              hf_config: Mapping[str, Any] | None = None) -> registry.CLIPConfig:
  """The zoo CLIPConfig of an open_clip model config (`model_configs/*.json` / hub `model_cfg`).

  Built-in ViT + text transformer configs map field by field; timm-trunk configs only for the
  trunks in TIMM_TRUNKS (SigLIP); a Hugging Face text tower (`hf_model_name`) gives a
  MultilingualCLIPConfig (`hf_config`: that encoder's config.json, else zoo's known encoders).
  Anything zoo does not implement is a PretrainedError.
  """
  v, t = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
  if t.get("hf_model_name") and not v.get("timm_model_name") and v.get("layers") is not None \
      and not isinstance(v.get("layers"), (list, tuple)):
    return _hf_text_config(model_cfg, hf_config)
  if v.get("timm_model_name") in convnext.TIMM_CONVNEXTS:
    return _convnext_config(model_cfg)
  if v.get("timm_model_name"):
    base = TIMM_TRUNKS.get(v["timm_model_name"])
    if base is None:
      raise PretrainedError(f"open_clip config uses timm trunk {v['timm_model_name']!r}; zoo "
                            f"implements {', '.join(TIMM_TRUNKS)}")
    config = registry.get_model_config(base)
    want = dict(image_size=config.vision.image_size, context_length=config.text.context_length,
                vocab_size=config.text.vocab_size, width=config.text.width,
                layers=config.text.layers, heads=config.text.heads,
                embed_dim=config.embed_dim)
    got = dict(image_size=_one_size(v.get("image_size", 224), "image_size"),
               **{k: t.get(k) for k in ("context_length", "vocab_size", "width", "layers",
                                        "heads")}, embed_dim=model_cfg.get("embed_dim"))
    if got != want or v.get("timm_pool") != "map" or v.get("timm_proj") != "none":
      raise PretrainedError(f"open_clip config with timm trunk {v['timm_model_name']!r} differs "
                            f"from zoo's {base} ({got} vs {want})")
    return config
  if model_cfg.get("custom_text") or t.get("hf_model_name"):
    raise PretrainedError("open_clip config uses a custom / Hugging Face text tower "
                          "(custom_text, hf_model_name), which zoo's open_clip layout lacks")
  _check_fixed(v, _VISION_FIXED, "vision_cfg")
  _check_fixed(t, _TEXT_FIXED, "text_cfg")
  if v.get("layers") is None:
    raise PretrainedError("open_clip config's vision_cfg has no 'layers'")
  width = int(v.get("width", 768))
  if isinstance(v["layers"], (list, tuple)):  # ModifiedResNet
    vision = resnet.ResNetVisionConfig(
        image_size=_one_size(v.get("image_size", 224), "image_size"), layers=tuple(v["layers"]),
        width=width, head_width=int(v.get("head_width", 64)))
  else:
    vision = registry.VisionConfig(
        image_size=_one_size(v.get("image_size", 224), "image_size"),
        patch_size=_one_size(v.get("patch_size", 16), "patch_size"), width=width,
        layers=int(v["layers"]), heads=width // int(v.get("head_width", 64)),
        mlp_ratio=float(v.get("mlp_ratio", 4.0)), ln_eps=_eps(v))
  text = registry.TextConfig(
      context_length=int(t.get("context_length", 77)), vocab_size=int(t.get("vocab_size", 49408)),
      width=int(t.get("width", 512)), heads=int(t.get("heads", 8)), layers=int(t.get("layers", 12)),
      mlp_ratio=float(t.get("mlp_ratio", 4.0)), ln_eps=_eps(t))
  extra = {}
  if model_cfg.get("init_logit_scale") is not None:
    extra["init_logit_scale"] = float(model_cfg["init_logit_scale"])
  if model_cfg.get("init_logit_bias") is not None:
    extra["init_logit_bias"] = float(model_cfg["init_logit_bias"])
  cls = resnet.ResNetCLIPConfig if isinstance(vision, resnet.ResNetVisionConfig) else registry.CLIPConfig
  return cls(embed_dim=int(model_cfg.get("embed_dim", 512)), vision=vision, text=text,
             quick_gelu=bool(model_cfg.get("quick_gelu", False)), **extra)


def same_towers(a: registry.CLIPConfig, b: registry.CLIPConfig) -> bool:
  """Equal architectures (towers, embedding, activation), ignoring preprocessing fields."""
  keys = ("embed_dim", "vision", "text", "kind", "quick_gelu")
  return all(getattr(a, k) == getattr(b, k) for k in keys)


def open_clip_model_cfg(config: Any) -> dict[str, Any]:
  """open_clip's `model_cfg` for a zoo CLIPConfig (the inverse of config_from_open_clip_cfg)."""
  if type(config) is not registry.CLIPConfig:
    raise PretrainedError(f"open_clip's layout has no {type(config).__name__} (MoE / XLM-R "
                          "towers); use zoo.convert.clip_moe.export_safetensors or python -m zoo.convert "
                          "to-mclip for those")
  for name, base in ((n, registry.get_model_config(n)) for n in TIMM_TRUNKS.values()):
    if config.vision.pool == "map" and same_towers(config, base):
      trunk = next(k for k, n in TIMM_TRUNKS.items() if n == name)
      t = config.text
      return {"embed_dim": config.embed_dim, "init_logit_bias": config.init_logit_bias,
              "custom_text": True,
              "vision_cfg": {"image_size": config.vision.image_size, "timm_model_name": trunk,
                             "timm_model_pretrained": False, "timm_pool": "map",
                             "timm_proj": "none"},
              "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size,
                           "hf_tokenizer_name": SIGLIP_TOKENIZERS[name],
                           "tokenizer_kwargs": {"clean": "canonicalize"}, "width": t.width,
                           "heads": t.heads, "layers": t.layers, "no_causal_mask": True,
                           "proj_bias": True, "pool_type": "last",
                           "norm_kwargs": {"eps": t.ln_eps}}}
  v, t = config.vision, config.text
  if (v.pool != "tok" or not v.class_token or not v.ln_pre or v.patch_bias or not v.projection
      or t.pool != "argmax" or not t.causal or t.proj_bias or config.tokenizer != "clip"):
    raise PretrainedError("this model's towers have no open_clip config equivalent (open_clip's "
                          "built-in CLIP: class-token ViT, causal text tower, CLIP BPE)")
  vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width,
            "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio, "patch_size": v.patch_size}
  text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
          "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}
  if v.ln_eps != 1e-5:
    vision["norm_kwargs"] = {"eps": v.ln_eps}
  if t.ln_eps != 1e-5:
    text["norm_kwargs"] = {"eps": t.ln_eps}
  cfg = {"embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu, "vision_cfg": vision,
         "text_cfg": text, "init_logit_scale": config.init_logit_scale}
  if config.init_logit_bias is not None:
    cfg["init_logit_bias"] = config.init_logit_bias
  return cfg
