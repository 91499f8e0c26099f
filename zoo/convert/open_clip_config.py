"""open_clip model configs (`model_configs/*.json`, a hub repo's `model_cfg`) <-> zoo's
`registry.CLIPConfig`: built-in ViT + text transformer configs map field by field, timm-trunk
configs only for the trunks in `TIMM_TRUNKS` (SigLIP), Hugging Face text towers
(`hf_model_name`: RoBERTa / XLM-R encoders) as a MultilingualCLIPConfig; anything zoo does not
implement is a `PretrainedError`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from zoo.convert import mclip
from zoo.models import (
  coca,
  configs as registry,
  convnext,
  eva,
  m2m100,
  mobileclip,
  multilingual,
  resnet,
  vitamin,
)
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
# timm SigLIP trunks open_clip builds (timm's vision_transformer.py): name -> patch, width,
# depth, heads, mlp_ratio, activation ('' = GELU, the model's default).
def _trunks() -> dict[str, tuple]:
  out = {"vit_base_patch32_siglip_256": (32, 768, 12, 12, 4.0, "gelu_tanh")}
  for size in (224, 256, 384, 512):
    out[f"vit_base_patch16_siglip_{size}"] = (16, 768, 12, 12, 4.0, "")
  for size in (256, 384, 512):
    out[f"vit_large_patch16_siglip_{size}"] = (16, 1024, 24, 16, 4.0,
                                               "gelu_tanh" if size == 512 else "")
    out[f"vit_so400m_patch16_siglip_{size}"] = (16, 1152, 27, 16, 3.7362, "gelu_tanh")
  for size in (224, 378, 384):
    out[f"vit_so400m_patch14_siglip_{size}"] = (14, 1152, 27, 16, 3.7362, "")
  for size in (256, 384):
    out[f"vit_giantopt_patch16_siglip_{size}"] = (16, 1536, 40, 16, 4.0, "gelu_tanh")
  return out


TIMM_TRUNKS = _trunks()
# hf_tokenizer_name of an exported SigLIP config, by text vocabulary size (the repos' files).
SIGLIP_TOKENIZERS = {32000: "timm/ViT-B-16-SigLIP", 250000: "timm/ViT-B-16-SigLIP-i18n-256",
                     256000: "timm/ViT-B-16-SigLIP2"}
_TEXT_ACTS = {"gelu_tanh": {"approximate": "tanh"}}
XLMV_TOKENIZER = "facebook/xlm-v-base"  # MetaCLIP 2 worldwide


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
  if model_cfg.get("vision_cfg", {}).get("timm_model_name"):  # NLLB-CLIP SigLIP: timm trunk
    image = _siglip_image_config(model_cfg)
  else:
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


def _vitamin_config(model_cfg: Mapping[str, Any]) -> vitamin.ViTaminCLIPConfig:
  """open_clip's CustomTextCLIP over a timm ViTamin trunk (`timm_pool=''`: timm's mean token +
  fc_norm, then a bias-free linear projection) and the built-in text transformer."""
  v = dict(model_cfg["vision_cfg"])
  if v.get("timm_pool", "avg") != "" or v.get("timm_proj", "linear") != "linear" \
      or v.get("timm_proj_bias", False):
    raise PretrainedError(f"open_clip config timm trunk {v['timm_model_name']!r} with timm_pool="
                          f"{v.get('timm_pool')!r}, timm_proj={v.get('timm_proj')!r}: zoo's "
                          "ViTamin implements pool '' with a bias-free linear projection")
  trunk = vitamin.TIMM_VITAMINS[v["timm_model_name"]]
  size = _one_size(v.get("image_size", 224), "image_size")
  if trunk.pos_embed and size != trunk.image_size:
    raise PretrainedError(f"open_clip config image_size {size} with timm trunk "
                          f"{v['timm_model_name']!r}, whose positions are fixed to "
                          f"{trunk.image_size} px")
  base = config_from_open_clip_cfg(dict(model_cfg, vision_cfg={"layers": 1}, custom_text=False))
  return vitamin.ViTaminCLIPConfig(**{f.name: getattr(base, f.name)
                                      for f in dataclasses.fields(base) if f.name != "vision"},
                                   vision=dataclasses.replace(trunk, image_size=size))
def _mobileclip_config(model_cfg: Mapping[str, Any]) -> registry.CLIPConfig:
  """open_clip's TimmModel over a timm fastvit_mci* trunk (`timm_pool='avg'`) or one of
  MobileCLIP's timm ViTs (`timm_pool='token'`), no `timm_proj` (timm's classifier is the
  projection), with the built-in text tower (`custom_text`)."""
  v = dict(model_cfg["vision_cfg"])
  vit = v["timm_model_name"] in mobileclip.TIMM_VITS
  pool = "token" if vit else "avg"
  if v.get("timm_pool", "avg") != pool or v.get("timm_proj", "linear") is not None:
    raise PretrainedError(f"open_clip config timm trunk {v['timm_model_name']!r} with timm_pool="
                          f"{v.get('timm_pool')!r}, timm_proj={v.get('timm_proj', 'linear')!r}: "
                          f"zoo implements pool {pool!r} with timm's own head (no timm_proj)")
  base = config_from_open_clip_cfg(dict(model_cfg, custom_text=False, vision_cfg={"layers": 1}))
  trunk = (mobileclip.TIMM_VITS if vit else mobileclip.TIMM_MCI)[v["timm_model_name"]]
  vision = dataclasses.replace(trunk, image_size=_one_size(v.get("image_size", trunk.image_size),
                                                           "image_size"))
  cls = mobileclip.MobileCLIPViTConfig if vit else mobileclip.MobileCLIPConfig
  return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)
                if f.name != "vision"}, vision=vision)
def _eva_config(model_cfg: Mapping[str, Any]) -> eva.EvaCLIPConfig:
  """open_clip's CustomTextCLIP over a timm Eva trunk of eva.TIMM_EVAS (EVA01, EVA02, PE-Core):
  timm's own pool and head (`timm_proj` null), the built-in text transformer at `text.*`."""
  v = dict(model_cfg["vision_cfg"])
  trunk = v["timm_model_name"]
  vision = eva.trunk_config(trunk, _one_size(v.get("image_size", 224), "image_size"))
  if v.get("timm_pool", "avg") != vision.pool or v.get("timm_proj", "linear") is not None:
    raise PretrainedError(f"open_clip config timm trunk {trunk!r} with timm_pool="
                          f"{v.get('timm_pool')!r}, timm_proj={v.get('timm_proj', 'linear')!r}: "
                          f"zoo implements the trunk's own pool {vision.pool!r} and timm's head "
                          "(timm_proj null)")
  if not model_cfg.get("custom_text"):
    raise PretrainedError(f"open_clip config with timm trunk {trunk!r}: zoo implements it with "
                          "open_clip's custom text tower (custom_text true)")
  base = config_from_open_clip_cfg(dict(model_cfg, vision_cfg={"layers": 1}, custom_text=False))
  extra = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "vision"}
  if trunk.startswith("vit_pe_"):  # PE-Core's preprocessing: x / 127.5 - 1
    extra.update(image_mean=registry.INCEPTION_MEAN, image_std=registry.INCEPTION_STD)
  return eva.EvaCLIPConfig(vision=vision, **extra)


def _eva_model_cfg(config: eva.EvaCLIPConfig) -> dict[str, Any]:
  """open_clip's model_cfg of an Eva CLIP (the inverse of _eva_config, open_clip's key order)."""
  v, t = config.vision, config.text
  fields = dict(dataclasses.asdict(v), image_size=None)
  names = sorted((n for n, trunk in eva.TIMM_EVAS.items()
                  if dict(dataclasses.asdict(trunk), image_size=None) == fields),
                 key=lambda n: not n.endswith(f"_{v.image_size}"))  # the trunk at this size first
  plain = registry.TextConfig(context_length=t.context_length, vocab_size=t.vocab_size,
                              width=t.width, heads=t.heads, layers=t.layers)
  if not names or t != plain or config.quick_gelu or config.init_logit_bias is not None:
    raise PretrainedError("this Eva model has no open_clip config equivalent (its trunk is none "
                          "of timm's EVA / PE-Core trunks, or its text tower is not CLIP's)")
  cfg = {"embed_dim": config.embed_dim,
         "vision_cfg": {"image_size": v.image_size, "timm_model_name": names[0],
                        "timm_model_pretrained": False, "timm_pool": v.pool, "timm_proj": None},
         "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size,
                      "width": t.width, "heads": t.heads, "layers": t.layers},
         "custom_text": True}
  if config.init_logit_scale != registry.CLIPConfig.init_logit_scale:
    cfg["init_logit_scale"] = config.init_logit_scale
  return cfg
_COCA_VISION = ("attentional_pool", "attn_pooler_heads", "attn_pooler_queries", "output_tokens")
_COCA_MULTIMODAL = ("width", "heads", "layers", "mlp_ratio", "context_length", "vocab_size",
                    "attn_pooler_heads", "dim_head", "n_queries", "norm_kwargs")


def _coca_config(model_cfg: Mapping[str, Any]) -> coca.CoCaConfig:
  """open_clip's CoCa: a built-in ViT with the attentional pooler, the built-in text tower with
  `embed_cls`, and the multimodal decoder (`multimodal_cfg`)."""
  v, t = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
  m = dict(model_cfg["multimodal_cfg"])
  if t.get("hf_model_name") or v.get("timm_model_name"):
    raise PretrainedError("open_clip CoCa config with a Hugging Face text tower or a timm trunk "
                          "is not implemented in zoo (built-in ViT + text transformer only)")
  if v.get("attentional_pool") is not True or not t.get("embed_cls"):
    raise PretrainedError("open_clip CoCa config: zoo implements vision_cfg.attentional_pool="
                          "true with text_cfg.embed_cls=true (open_clip's CoCa)")
  extra = sorted(set(m) - set(_COCA_MULTIMODAL))
  if extra:
    raise PretrainedError(f"open_clip config multimodal_cfg.{extra[0]} is not implemented in zoo")
  base = config_from_open_clip_cfg(dict(
      {k: x for k, x in model_cfg.items() if k not in ("multimodal_cfg", "custom_text")},
      vision_cfg={k: x for k, x in v.items() if k not in _COCA_VISION},
      text_cfg={k: x for k, x in t.items() if k not in ("embed_cls", "output_tokens", "pad_id")}))
  vision = coca.CoCaVisionConfig(
      **{f.name: getattr(base.vision, f.name) for f in dataclasses.fields(registry.VisionConfig)},
      attn_pooler_heads=int(v.get("attn_pooler_heads", 8)),
      attn_pooler_queries=int(v.get("attn_pooler_queries", 256)))
  multimodal = coca.MultimodalConfig(
      width=int(m.get("width", 512)), heads=int(m.get("heads", 8)), layers=int(m.get("layers", 12)),
      mlp_ratio=float(m.get("mlp_ratio", 4.0)), context_length=int(m.get("context_length", 77)),
      ln_eps=_eps(m))
  return coca.CoCaConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)
                            if f.name != "vision"},
                         vision=vision, multimodal=multimodal, pad_id=int(t.get("pad_id", 0)))


def _coca_model_cfg(config: coca.CoCaConfig) -> dict[str, Any]:
  """open_clip's model_cfg of a CoCa config (the inverse of _coca_config)."""
  vision = {f.name: getattr(config.vision, f.name) for f in dataclasses.fields(registry.VisionConfig)}
  base = open_clip_model_cfg(registry.CLIPConfig(
      **{f.name: getattr(config, f.name) for f in dataclasses.fields(registry.CLIPConfig)
         if f.name != "vision"}, vision=registry.VisionConfig(**vision)))
  base["vision_cfg"].update(attentional_pool=True, attn_pooler_heads=config.vision.attn_pooler_heads,
                            attn_pooler_queries=config.vision.attn_pooler_queries,
                            output_tokens=True)
  base["text_cfg"].update(embed_cls=True, output_tokens=True, pad_id=config.pad_id)
  m = config.multimodal
  base["multimodal_cfg"] = {"context_length": m.context_length,
                            "vocab_size": config.text.vocab_size, "width": m.width,
                            "heads": m.heads, "layers": m.layers, "mlp_ratio": m.mlp_ratio}
  if m.ln_eps != 1e-5:
    base["multimodal_cfg"]["norm_kwargs"] = {"eps": m.ln_eps}
  base["custom_text"] = True
  return base


def config_from_open_clip_cfg(model_cfg: Mapping[str, Any],
                              hf_config: Mapping[str, Any] | None = None) -> registry.CLIPConfig:
  """The zoo CLIPConfig of an open_clip model config (`model_configs/*.json` / hub `model_cfg`).

  Built-in ViT + text transformer configs map field by field; timm-trunk configs only for the
  trunks in TIMM_TRUNKS (SigLIP); a Hugging Face text tower (`hf_model_name`) gives a
  MultilingualCLIPConfig (`hf_config`: that encoder's config.json, else zoo's known encoders).
  Anything zoo does not implement is a PretrainedError.
  """
  if model_cfg.get("multimodal_cfg"):
    return _coca_config(model_cfg)
  v, t = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
  if t.get("hf_model_name") and (v.get("timm_model_name") in TIMM_TRUNKS or (
      not v.get("timm_model_name") and v.get("layers") is not None
      and not isinstance(v.get("layers"), (list, tuple)))):
    return _hf_text_config(model_cfg, hf_config)
  if v.get("timm_model_name") in convnext.TIMM_CONVNEXTS:
    return _convnext_config(model_cfg)
  if v.get("timm_model_name") in vitamin.TIMM_VITAMINS:
    return _vitamin_config(model_cfg)
  if v.get("timm_model_name") in (*mobileclip.TIMM_MCI, *mobileclip.TIMM_VITS):
    return _mobileclip_config(model_cfg)
  if v.get("timm_model_name") in eva.TIMM_EVAS:
    return _eva_config(model_cfg)
  if v.get("timm_model_name"):
    return _siglip_config(model_cfg, v, t)
  if model_cfg.get("custom_text") or t.get("hf_model_name"):
    raise PretrainedError("open_clip config uses a custom / Hugging Face text tower "
                          "(custom_text, hf_model_name), which zoo's open_clip layout lacks")
  _check_fixed(v, {k: d for k, d in _VISION_FIXED.items()
                   if k not in ("no_ln_pre", "pool_type", "final_ln_after_pool")}, "vision_cfg")
  if v.get("pool_type", "tok") not in ("tok", "avg"):
    raise PretrainedError(f"open_clip config vision_cfg.pool_type={v['pool_type']!r} is not "
                          "implemented in zoo (supported: 'tok', 'avg')")
  pool = t.get("pool_type", "argmax")
  if pool not in ("argmax", "eos", "last"):
    raise PretrainedError(f"open_clip config text_cfg.pool_type={pool!r} is not implemented in "
                          "zoo (supported: 'argmax', 'eos', 'last')")
  _check_fixed(t, {k: d for k, d in _TEXT_FIXED.items() if k not in ("pool_type",
                                                                      "no_causal_mask")},
               "text_cfg")
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
        mlp_ratio=float(v.get("mlp_ratio", 4.0)), ln_eps=_eps(v),
        ln_pre=not v.get("no_ln_pre", False), pool=v.get("pool_type", "tok"),
        final_ln_after_pool=bool(v.get("final_ln_after_pool", False)))
  text = registry.TextConfig(
      context_length=int(t.get("context_length", 77)), vocab_size=int(t.get("vocab_size", 49408)),
      width=int(t.get("width", 512)), heads=int(t.get("heads", 8)), layers=int(t.get("layers", 12)),
      mlp_ratio=float(t.get("mlp_ratio", 4.0)), ln_eps=_eps(t), pool=pool,
      eos_id=int(t.get("eos_id", 2)), causal=not t.get("no_causal_mask", False))
  extra = {}
  if pool == "eos":  # MetaCLIP 2: the XLM-V vocabulary (fairseq / XLM-R id convention)
    extra["tokenizer"] = "xlmr"
  elif t.get("hf_tokenizer_name"):  # CLIPA: BERT's tokenizer.json
    extra["tokenizer"] = "hf_tokenizers"
  if model_cfg.get("init_logit_scale") is not None:
    extra["init_logit_scale"] = float(model_cfg["init_logit_scale"])
  if model_cfg.get("init_logit_bias") is not None:
    extra["init_logit_bias"] = float(model_cfg["init_logit_bias"])
  cls = resnet.ResNetCLIPConfig if isinstance(vision, resnet.ResNetVisionConfig) else registry.CLIPConfig
  return cls(embed_dim=int(model_cfg.get("embed_dim", 512)), vision=vision, text=text,
             quick_gelu=bool(model_cfg.get("quick_gelu", False)), **extra)


def _siglip_vision(v: Mapping[str, Any]) -> registry.VisionConfig:
  """The image tower of a timm SigLIP trunk of TIMM_TRUNKS (MAP head, no projection)."""
  trunk = TIMM_TRUNKS.get(v["timm_model_name"])
  if trunk is None:
    raise PretrainedError(f"open_clip config uses timm trunk {v['timm_model_name']!r}; zoo "
                          f"implements timm's SigLIP trunks ({len(TIMM_TRUNKS)} vit_*_siglip_* "
                          "models)")
  if v.get("timm_pool") != "map" or v.get("timm_proj", "none") != "none":
    raise PretrainedError(f"open_clip config with timm trunk {v['timm_model_name']!r}: zoo "
                          "implements timm_pool='map', timm_proj='none' (SigLIP)")
  patch, width, layers, heads, mlp_ratio, act = trunk
  return registry.VisionConfig(
      image_size=_one_size(v.get("image_size", 224), "image_size"), patch_size=patch,
      width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio, pool="map",
      class_token=False, ln_pre=False, patch_bias=True, ln_eps=1e-6, projection=False, act=act)


def _siglip_image_config(model_cfg: Mapping[str, Any]) -> registry.CLIPConfig:
  """The image side of a CustomTextCLIP over a timm SigLIP trunk with a Hugging Face text tower
  (NLLB-CLIP SigLIP): sigmoid loss, open_clip's default temperature unless the config sets one."""
  vision = _siglip_vision(model_cfg["vision_cfg"])
  return registry.CLIPConfig(
      embed_dim=int(model_cfg.get("embed_dim", vision.width)), vision=vision, kind="siglip",
      init_logit_scale=float(model_cfg.get("init_logit_scale", math.log(1 / 0.07))),
      init_logit_bias=float(model_cfg.get("init_logit_bias", -10.0)),
      image_mean=registry.INCEPTION_MEAN, image_std=registry.INCEPTION_STD)


def _siglip_config(model_cfg: Mapping[str, Any], v: Mapping[str, Any], t: Mapping[str, Any]
                   ) -> registry.CLIPConfig:
  """A SigLIP / SigLIP 2 config: a timm trunk of TIMM_TRUNKS (MAP head, no projection) and
  open_clip's custom text tower (bidirectional, last-token pooling)."""
  vision = _siglip_vision(v)
  free = ("no_causal_mask", "pool_type", "proj_bias", "proj_type", "act_kwargs")
  _check_fixed(t, {k: d for k, d in _TEXT_FIXED.items() if k not in free}, "text_cfg")
  if not t.get("no_causal_mask") or t.get("pool_type") != "last":
    raise PretrainedError("open_clip config with a timm SigLIP trunk: zoo implements the "
                          "bidirectional text tower with last-token pooling")
  act = t.get("act_kwargs")
  if act not in (None, _TEXT_ACTS["gelu_tanh"]):
    raise PretrainedError(f"open_clip config text_cfg.act_kwargs={act!r} is not implemented")
  if t.get("proj_type", "linear") not in ("linear", "none"):
    raise PretrainedError(f"open_clip config text_cfg.proj_type={t['proj_type']!r} is not "
                          "implemented in zoo (supported: 'linear', 'none')")
  projection = t.get("proj_type", "linear") != "none"
  text = registry.TextConfig(
      context_length=int(t.get("context_length", 64)), vocab_size=int(t.get("vocab_size", 32000)),
      width=int(t.get("width", 768)), heads=int(t.get("heads", 12)),
      layers=int(t.get("layers", 12)), mlp_ratio=float(t.get("mlp_ratio", 4.0)), causal=False,
      pool="last", ln_eps=_eps(t), proj_bias=bool(t.get("proj_bias", False)),
      act="gelu_tanh" if act else "", projection=projection)
  return registry.CLIPConfig(
      embed_dim=int(model_cfg.get("embed_dim", vision.width)), vision=vision, text=text,
      kind="siglip",
      init_logit_scale=float(model_cfg.get("init_logit_scale", math.log(10.0))),
      init_logit_bias=float(model_cfg.get("init_logit_bias", -10.0)),
      image_mean=registry.INCEPTION_MEAN, image_std=registry.INCEPTION_STD,
      tokenizer="sentencepiece")


def _siglip_model_cfg(config: registry.CLIPConfig) -> dict[str, Any]:
  """open_clip's model_cfg of a SigLIP config (the inverse of _siglip_config)."""
  v, t = config.vision, config.text
  dims = (v.patch_size, v.width, v.layers, v.heads, v.mlp_ratio, v.act)
  names = [n for n, d in TIMM_TRUNKS.items() if d == dims]
  if not names or v.ln_eps != 1e-6 or t.causal or t.pool != "last":
    raise PretrainedError("this SigLIP model's vision tower matches no timm SigLIP trunk "
                          f"(patch, width, depth, heads, mlp_ratio, act = {dims})")
  trunk = next((n for n in names if n.endswith(f"_{v.image_size}")), names[0])
  text = {"context_length": t.context_length, "vocab_size": t.vocab_size,
          "hf_tokenizer_name": SIGLIP_TOKENIZERS.get(t.vocab_size, SIGLIP_TOKENIZERS[32000]),
          "tokenizer_kwargs": {"clean": "canonicalize"}, "width": t.width, "heads": t.heads,
          "layers": t.layers}
  if t.mlp_ratio != 4.0:
    text["mlp_ratio"] = t.mlp_ratio
  text.update({"no_causal_mask": True, "pool_type": "last"})
  if t.projection:
    text["proj_bias"] = t.proj_bias
  else:
    text["proj_type"] = "none"
  text["norm_kwargs"] = {"eps": t.ln_eps}
  if t.act:
    text["act_kwargs"] = _TEXT_ACTS[t.act]
  # open_clip's own key order (model_configs/*.json), so an export equals its config.
  order = ("context_length", "vocab_size", "hf_tokenizer_name", "tokenizer_kwargs", "width",
           "heads", "layers", "mlp_ratio", "no_causal_mask", "proj_bias", "pool_type",
           "proj_type", "norm_kwargs", "act_kwargs")
  cfg = {"embed_dim": config.embed_dim, "init_logit_bias": config.init_logit_bias,
         "custom_text": True,
         "vision_cfg": {"image_size": v.image_size, "timm_model_name": trunk,
                        "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
         "text_cfg": {k: text[k] for k in order if k in text}}
  if config.init_logit_scale != math.log(10.0):
    cfg["init_logit_scale"] = config.init_logit_scale
  return cfg


def tokenizer_entry(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The pretrained table's tokenizer of an open_clip model config: CLIP BPE, or the hub
  tokenizer's sentencepiece file (T5 `spiece.model`: pad = EOS = 1; SigLIP 2's Gemma
  `tokenizer.model` (256k): EOS 1 appended, pad 0)."""
  text = model_cfg.get("text_cfg", {})
  if text.get("hf_model_name"):  # open_clip's HFTokenizer over the hub repo's tokenizer.json
    return {"kind": "hf", "hf_hub": text.get("hf_tokenizer_name") or text["hf_model_name"],
            "file": "tokenizer.json",
            "clean": (text.get("tokenizer_kwargs") or {}).get("clean", "whitespace")}
  if not text.get("hf_tokenizer_name"):
    return {"kind": "clip"}
  entry = {"kind": "sentencepiece", "hf_hub": text["hf_tokenizer_name"], "file": "spiece.model",
           "clean": (text.get("tokenizer_kwargs") or {}).get("clean", "canonicalize")}
  if not model_cfg.get("custom_text") and text.get("pool_type") == "last":  # CLIPA: BERT
    kwargs = text.get("tokenizer_kwargs") or {}
    return {"kind": "hf_tokenizers", "hf_hub": text["hf_tokenizer_name"],
            "file": "tokenizer.json", "clean": kwargs.get("clean", "whitespace"),
            "strip_sep_token": bool(kwargs.get("strip_sep_token", False))}
  if text.get("pool_type") == "eos":  # XLM-V: sentencepiece + fairseq ids, as XLM-R
    return {"kind": "xlmr", "hf_hub": text["hf_tokenizer_name"], "file": "sentencepiece.bpe.model"}
  if int(text.get("vocab_size", 0)) == 256000:
    entry.update(file="tokenizer.model", pad_id=0)
  return entry


def same_towers(a: registry.CLIPConfig, b: registry.CLIPConfig) -> bool:
  """Equal architectures (towers, embedding, activation), ignoring preprocessing fields."""
  keys = ("embed_dim", "vision", "text", "kind", "quick_gelu")
  return all(getattr(a, k) == getattr(b, k) for k in keys)


def open_clip_model_cfg(config: Any) -> dict[str, Any]:
  """open_clip's `model_cfg` for a zoo CLIPConfig (the inverse of config_from_open_clip_cfg)."""
  if isinstance(config, eva.EvaCLIPConfig):
    return _eva_model_cfg(config)
  if type(config) is coca.CoCaConfig:
    return _coca_model_cfg(config)
  if type(config) is not registry.CLIPConfig:
    raise PretrainedError(f"open_clip's layout has no {type(config).__name__} (MoE / XLM-R "
                          "towers); use zoo.convert.clip_moe.export_safetensors or python -m zoo.convert "
                          "to-mclip for those")
  if config.vision.pool == "map" and config.kind == "siglip":
    return _siglip_model_cfg(config)
  v, t = config.vision, config.text
  tokenizer = {"eos": "xlmr", "last": "hf_tokenizers"}.get(t.pool, "clip")
  if (v.pool not in ("tok", "avg") or not v.class_token or v.patch_bias or not v.projection
      or t.pool not in ("argmax", "eos", "last") or t.causal != (t.pool != "last")
      or t.proj_bias or config.tokenizer != tokenizer):
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
  if t.pool == "eos":
    text.update(hf_tokenizer_name=XLMV_TOKENIZER, pool_type="eos", eos_id=t.eos_id)
  if t.pool == "last":  # CLIPA
    text.update(hf_tokenizer_name="bert-base-uncased",
                tokenizer_kwargs={"strip_sep_token": True}, pool_type="last",
                no_causal_mask=True)
  if not v.ln_pre:
    vision["no_ln_pre"] = True
  if v.pool != "tok":
    vision["pool_type"] = v.pool
  if v.final_ln_after_pool:
    vision["final_ln_after_pool"] = True
  cfg = {"embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu, "vision_cfg": vision,
         "text_cfg": text, "init_logit_scale": config.init_logit_scale}
  if config.init_logit_bias is not None:
    cfg["init_logit_bias"] = config.init_logit_bias
  return cfg
