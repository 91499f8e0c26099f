"""open_clip / OpenAI CLIP state dicts <-> zoo CLIP.

Layout (open_clip `model.CLIP` with the built-in ViT and text transformer, which is also what
OpenAI's released weights load into): `visual.conv1.weight`, `visual.class_embedding`,
`visual.positional_embedding`, `visual.ln_pre`, `visual.transformer.resblocks.N.*`,
`visual.ln_post`, `visual.proj`; text at the root: `token_embedding.weight`,
`positional_embedding`, `transformer.resblocks.N.*`, `ln_final`, `text_projection`;
`logit_scale` (and `logit_bias` when the config has one).

SigLIP (`ViT-B-16-SigLIP`, open_clip's `CustomTextCLIP` with a timm trunk) uses
`visual.trunk.*` and `text.*`; see `_siglip_rules`. A Hugging Face text tower (`CustomTextCLIP`
+ `HFTextEncoder`: roberta / xlm-roberta CLIPs) uses `text.transformer.*` + `text.proj`; see
`_hf_text_rules`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from flax import nnx

from zoo.convert import common, mclip, mobileclip as mobileclip_convert
from zoo.convert.common import Path, Rule, attn_out, conv_patch, identity, layer_norm, linear
from zoo.models import (
  clip as clip_lib,
  coca,
  configs,
  convnext,
  eva,
  m2m100,
  mobileclip,
  multilingual,
  resnet,
  vitamin,
)

# Entries of OpenAI's TorchScript state dicts that are hyper-parameters, not weights.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


# PyTorch names of a pre-LN block's parts: open_clip's ResidualAttentionBlock and timm's Block.
OPEN_CLIP_BLOCK = dict(ln_1="ln_1", qkv="attn.in_proj_weight", qkv_bias="attn.in_proj_bias",
                       out="attn.out_proj", ln_2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj")
TIMM_BLOCK = dict(ln_1="norm1", qkv="attn.qkv.weight", qkv_bias="attn.qkv.bias",
                  out="attn.proj", ln_2="norm2", fc1="mlp.fc1", fc2="mlp.fc2")


def _resblock_rules(zoo: tuple, key: str, width: int, heads: int,
                    names: dict[str, str] = OPEN_CLIP_BLOCK) -> list[Rule]:
  """A pre-LN block with a packed [3W, W] qkv projection (open_clip or timm naming)."""
  dh = width // heads
  return [
      *layer_norm(zoo + ("ln_1",), f"{key}.{names['ln_1']}"),
      Rule(zoo + ("attn", "qkv_kernel"), (f"{key}.{names['qkv']}",),
           lambda a: (a.reshape(width, 3 * width).T,),
           lambda a: a.T.reshape(width, 3, heads, dh)),
      Rule(zoo + ("attn", "qkv_bias"), (f"{key}.{names['qkv_bias']}",),
           lambda a: (a.reshape(3 * width),), lambda a: a.reshape(3, heads, dh)),
      *attn_out(zoo + ("attn",), f"{key}.{names['out']}", heads, width),
      *layer_norm(zoo + ("ln_2",), f"{key}.{names['ln_2']}"),
      *linear(zoo + ("mlp", "fc1"), f"{key}.{names['fc1']}"),
      *linear(zoo + ("mlp", "fc2"), f"{key}.{names['fc2']}"),
  ]


def _transformer_rules(zoo: tuple, key: str, width: int, heads: int, layers: int) -> list[Rule]:
  rules = []
  for i in range(layers):
    rules += _resblock_rules(zoo + ("resblocks", i), f"{key}.resblocks.{i}", width, heads)
  return rules


def _check_clip_layout(config: configs.CLIPConfig) -> None:
  v, t = config.vision, config.text
  unsupported = []
  if v.pool not in ("tok", "avg") or not v.class_token or v.patch_bias or not v.projection:
    unsupported.append("vision tower (needs class-token or average pooling, no patch bias, "
                       "proj)")
  if t.pool not in ("argmax", "eos", "last") or t.proj_bias:
    unsupported.append("text tower (needs argmax or EOS pooling and a bias-free "
                       "text_projection)")
  if unsupported:
    raise ValueError("open_clip's CLIP layout cannot hold this model's " + " and ".join(unsupported))


def _clip_rules(config: configs.CLIPConfig) -> list[Rule]:
  """Rules for open_clip `model.CLIP` (built-in VisionTransformer + text transformer)."""
  _check_clip_layout(config)
  v, t = config.vision, config.text
  rules = [
      conv_patch(("visual", "patch_kernel"), "visual.conv1.weight"),
      identity(("visual", "class_embedding"), "visual.class_embedding"),
      identity(("visual", "positional_embedding"), "visual.positional_embedding"),
      *(layer_norm(("visual", "ln_pre"), "visual.ln_pre") if v.ln_pre else []),
      *_transformer_rules(("visual", "transformer"), "visual.transformer", v.width, v.heads,
                          v.layers),
      *layer_norm(("visual", "ln_post"), "visual.ln_post"),
      identity(("visual", "proj"), "visual.proj"),
      identity(("text", "token_embedding"), "token_embedding.weight"),
      identity(("text", "positional_embedding"), "positional_embedding"),
      *_transformer_rules(("text", "transformer"), "transformer", t.width, t.heads, t.layers),
      *layer_norm(("text", "ln_final"), "ln_final"),
      identity(("text", "text_projection"), "text_projection"),
      identity(("logit_scale",), "logit_scale"),
  ]
  if config.init_logit_bias is not None:
    rules.append(identity(("logit_bias",), "logit_bias"))
  return rules


# ----------------------------------------------------------------------------- SigLIP (timm)


def _siglip_vision_rules(v: configs.VisionConfig) -> list[Rule]:
  """`visual.trunk.*`: a timm SigLIP ViT trunk (MAP head, no projection)."""
  if v.pool != "map" or v.class_token or v.ln_pre or not v.patch_bias or v.projection:
    raise ValueError("open_clip's timm SigLIP trunk layout needs MAP pooling, no class token, "
                     "no ln_pre, a patch bias and no vision projection")
  rules = [
      conv_patch(("visual", "patch_kernel"), "visual.trunk.patch_embed.proj.weight"),
      identity(("visual", "patch_bias"), "visual.trunk.patch_embed.proj.bias"),
      # timm keeps a leading batch axis on the position table: [1, N, W].
      Rule(("visual", "positional_embedding"), ("visual.trunk.pos_embed",),
           lambda a: (a.reshape((1,) + a.shape),), lambda a: a[0]),
  ]
  for i in range(v.layers):
    rules += _resblock_rules(("visual", "transformer", "resblocks", i),
                             f"visual.trunk.blocks.{i}", v.width, v.heads, TIMM_BLOCK)
  ap = ("visual", "attn_pool")
  return rules + [
      *layer_norm(("visual", "ln_post"), "visual.trunk.norm"),
      # timm's latent is [1, 1, W]; zoo's [1, W].
      Rule(ap + ("latent",), ("visual.trunk.attn_pool.latent",),
           lambda a: (a.reshape((1,) + a.shape),), lambda a: a[0]),
      *linear(ap + ("q",), "visual.trunk.attn_pool.q"),
      *linear(ap + ("kv",), "visual.trunk.attn_pool.kv"),
      *linear(ap + ("proj",), "visual.trunk.attn_pool.proj"),
      *layer_norm(ap + ("norm",), "visual.trunk.attn_pool.norm"),
      *linear(ap + ("mlp", "fc1"), "visual.trunk.attn_pool.mlp.fc1"),
      *linear(ap + ("mlp", "fc2"), "visual.trunk.attn_pool.mlp.fc2"),
  ]


def _siglip_rules(config: configs.CLIPConfig) -> list[Rule]:
  """Rules for open_clip `CustomTextCLIP` with a timm ViT trunk (MAP head) and `text.*` tower."""
  t = config.text
  if t.pool != "last" or t.causal or t.proj_bias != t.projection:
    raise ValueError("open_clip's SigLIP text tower layout needs last-token pooling, no causal "
                     "mask and a text projection with a bias (or none)")
  rules = _siglip_vision_rules(config.vision) + [
      identity(("text", "token_embedding"), "text.token_embedding.weight"),
      identity(("text", "positional_embedding"), "text.positional_embedding"),
      *_transformer_rules(("text", "transformer"), "text.transformer", t.width, t.heads,
                          t.layers),
      *layer_norm(("text", "ln_final"), "text.ln_final"),
      identity(("logit_scale",), "logit_scale"),
  ]
  if t.projection:  # open_clip's text_projection with a bias is an nn.Linear: weight [E, W]
    rules += [common.transposed(("text", "text_projection"), "text.text_projection.weight"),
              identity(("text", "proj_bias"), "text.text_projection.bias")]
  if config.init_logit_bias is not None:
    rules.append(identity(("logit_bias",), "logit_bias"))
  return rules


# ----------------------------------------------------------------------------- HF text towers

# transformers buffers older open_clip checkpoints carry (open_clip drops them when loading).
HF_TEXT_IGNORED = ("text.transformer.embeddings.position_ids",)


def _hf_text_rules(config: multilingual.MultilingualCLIPConfig) -> list[Rule]:
  """open_clip `CustomTextCLIP` + `HFTextEncoder`: `visual.*` as the built-in CLIP,
  `text.transformer.*` (the transformers encoder), `text.proj.{0,2}` (MLP) or `text.proj`."""
  if config.vision.pool == "map":  # NLLB-CLIP SigLIP: a timm SigLIP trunk
    rules = _siglip_vision_rules(config.vision)
  else:
    vision_only = configs.CLIPConfig(embed_dim=config.embed_dim, vision=config.vision)
    rules = [r for r in _clip_rules(vision_only) if r.zoo[0] == "visual"]
  t = config.text
  encoder = (mclip.m2m100_rules(t, "text.transformer.") if isinstance(t, m2m100.M2M100TextConfig)
             else mclip.text_rules(t, "text.transformer.", projection=False))
  rules += [dataclasses.replace(r, zoo=("text",) + r.zoo) for r in encoder]
  if t.proj_type == "mlp":
    rules += [*linear(("text", "proj", "fc1"), "text.proj.0", bias=False),
              *linear(("text", "proj", "fc2"), "text.proj.2", bias=False)]
  else:
    rules += linear(("text", "proj"), "text.proj", bias=t.proj_bias)
  rules.append(identity(("logit_scale",), "logit_scale"))
  if config.init_logit_bias is not None:
    rules.append(identity(("logit_bias",), "logit_bias"))
  return rules


def _build_hf_text(config: multilingual.MultilingualCLIPConfig) -> nnx.Module:
  return multilingual.MultilingualCLIP(config, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- ModifiedResNet


def _conv(zoo: Path, key: str) -> Rule:
  return conv_patch(zoo + ("kernel",), f"{key}.weight")  # HWIO <-> OIHW


def _bn(zoo: Path, key: str) -> list[Rule]:
  names = (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
           ("var", "running_var"), ("num_batches_tracked", "num_batches_tracked"))
  return [identity(zoo + (z,), f"{key}.{t}") for z, t in names]


def _resnet_rules(config: resnet.ResNetCLIPConfig) -> list[Rule]:
  """open_clip `CLIP` with a ModifiedResNet `visual` (OpenAI's RN layout) and CLIP's text."""
  text_only = configs.CLIPConfig(embed_dim=config.embed_dim, text=config.text)
  rules = [r for r in _clip_rules(text_only) if r.zoo[0] != "visual"]
  v = ("visual",)
  for i in (1, 2, 3):
    rules += [_conv(v + (f"conv{i}",), f"visual.conv{i}"), *_bn(v + (f"bn{i}",), f"visual.bn{i}")]
  for s, blocks in enumerate(config.vision.layers):
    for b in range(blocks):
      zoo, key = v + ("layers", s, b), f"visual.layer{s + 1}.{b}"
      for i in (1, 2, 3):
        rules += [_conv(zoo + (f"conv{i}",), f"{key}.conv{i}"), *_bn(zoo + (f"bn{i}",), f"{key}.bn{i}")]
      if b == 0:  # stride 2, or (stage 1) width -> 4 * width: a downsample branch
        rules += [_conv(zoo + ("downsample_conv",), f"{key}.downsample.0"),
                  *_bn(zoo + ("downsample_bn",), f"{key}.downsample.1")]
  ap = v + ("attnpool",)
  rules.append(identity(ap + ("positional_embedding",), "visual.attnpool.positional_embedding"))
  for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
    rules += linear(ap + (name,), f"visual.attnpool.{name}")
  return rules


def _build_resnet(config: resnet.ResNetCLIPConfig) -> nnx.Module:
  return resnet.ResNetCLIP(config, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- ConvNeXt (timm)


def _conv_bias(zoo: Path, key: str) -> list[Rule]:
  return [_conv(zoo, key), identity(zoo + ("bias",), f"{key}.bias")]


def _convnext_rules(config: convnext.ConvNeXtCLIPConfig) -> list[Rule]:
  """open_clip `CLIP` with a TimmModel ConvNeXt `visual` (`visual.trunk.*` + `visual.head.*`)."""
  text_only = configs.CLIPConfig(embed_dim=config.embed_dim, text=config.text)
  rules = [r for r in _clip_rules(text_only) if r.zoo[0] != "visual"]
  v, t = ("visual",), "visual.trunk"
  rules += [*_conv_bias(v + ("stem_conv",), f"{t}.stem.0"), *layer_norm(v + ("stem_norm",), f"{t}.stem.1")]
  for i, depth in enumerate(config.vision.depths):
    zoo, key = v + ("stages", i), f"{t}.stages.{i}"
    if i:
      rules += [*layer_norm(zoo + ("down_norm",), f"{key}.downsample.0"),
                *_conv_bias(zoo + ("down_conv",), f"{key}.downsample.1")]
    for j in range(depth):
      b, bk = zoo + ("blocks", j), f"{key}.blocks.{j}"
      rules += [*_conv_bias(b + ("conv_dw",), f"{bk}.conv_dw"), *layer_norm(b + ("norm",), f"{bk}.norm"),
                *linear(b + ("fc1",), f"{bk}.mlp.fc1"), *linear(b + ("fc2",), f"{bk}.mlp.fc2"),
                identity(b + ("gamma",), f"{bk}.gamma")]
  rules += layer_norm(v + ("head_norm",), f"{t}.head.norm")
  if config.vision.proj == "mlp":
    rules += [*linear(v + ("mlp_fc1",), "visual.head.mlp.fc1"),
              *linear(v + ("mlp_fc2",), "visual.head.mlp.fc2", bias=False)]
  else:
    rules += linear(v + ("proj",), "visual.head.proj", bias=False)
  return rules


def _build_convnext(config: convnext.ConvNeXtCLIPConfig) -> nnx.Module:
  return convnext.ConvNeXtCLIP(config, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- ViTamin (timm)


def _vitamin_rules(config: vitamin.ViTaminCLIPConfig) -> list[Rule]:
  """open_clip `CustomTextCLIP` with a TimmModel ViTamin `visual` (`visual.trunk.*`,
  `visual.head.proj`) and CLIP's text tower under `text.*`."""
  text_only = configs.CLIPConfig(embed_dim=config.embed_dim, text=config.text)
  rules = [r if r.zoo[0] != "text"
           else dataclasses.replace(r, torch=tuple(f"text.{k}" for k in r.torch))
           for r in _clip_rules(text_only) if r.zoo[0] != "visual"]
  cfg, v, t = config.vision, ("visual",), "visual.trunk"
  bb = f"{t}.patch_embed.backbone"
  rules += [*_conv_bias(v + ("stem_conv1",), f"{bb}.stem.conv1"),
            *layer_norm(v + ("stem_norm",), f"{bb}.stem.norm1"),
            *_conv_bias(v + ("stem_conv2",), f"{bb}.stem.conv2")]
  d_in = cfg.stem_width
  for i, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
    for j in range(depth):
      zoo, key = v + ("stages", i, j), f"{bb}.stages.{i}.{j}"
      if (d_in if j == 0 else dim) != dim:  # stride 2: pool then expand; else a 1x1 conv
        rules += _conv_bias(zoo + ("shortcut",), f"{key}.shortcut" + (".expand" if j == 0 else ""))
      rules += layer_norm(zoo + ("pre_norm",), f"{key}.pre_norm")
      for n, name in ((1, "conv1_1x1"), (2, "conv2_kxk"), (3, "conv3_1x1")):
        rules += _conv_bias(zoo + (f"conv{n}",), f"{key}.{name}")
    d_in = dim
  rules += [*layer_norm(v + ("pool_norm",), f"{bb}.pool.norm"),
            *_conv_bias(v + ("pool_conv",), f"{bb}.pool.proj")]
  if cfg.pos_embed:  # timm keeps a leading batch axis: [1, N, W]
    rules.append(Rule(v + ("positional_embedding",), (f"{t}.pos_embed",),
                      lambda a: (a.reshape((1,) + a.shape),), lambda a: a[0]))
  for i in range(cfg.layers):
    zoo, key = v + ("transformer", "resblocks", i), f"{t}.blocks.{i}"
    rules += [r for r in _resblock_rules(zoo, key, cfg.width, cfg.heads, TIMM_BLOCK)
              if r.zoo[len(zoo)] != "mlp"]
    rules += [*layer_norm(zoo + ("mlp", "norm"), f"{key}.mlp.norm"),
              *(r for w in ("w0", "w1", "w2") for r in linear(zoo + ("mlp", w), f"{key}.mlp.{w}"))]
  rules += [*layer_norm(v + ("fc_norm",), f"{t}.fc_norm"),
            *linear(v + ("proj",), "visual.head.proj", bias=False)]
  return rules


def _build_vitamin(config: vitamin.ViTaminCLIPConfig) -> nnx.Module:
  return vitamin.ViTaminCLIP(config, rngs=nnx.Rngs(0))
# ----------------------------------------------------------------------------- MobileCLIP (timm)


def _build_mobileclip_vit(config: mobileclip.MobileCLIPViTConfig) -> nnx.Module:
  return mobileclip.MobileCLIPViT(config, rngs=nnx.Rngs(0))


def _mobileclip_rules(config: mobileclip.MobileCLIPConfig, fused: bool = False) -> list[Rule]:
  """open_clip `CustomTextCLIP`: a TimmModel FastViT-MCi `visual.trunk.*` (timm's classifier
  `head.fc` is the projection) and the built-in text transformer under `text.*`."""
  text_only = configs.CLIPConfig(embed_dim=config.embed_dim, text=config.text)
  rules = [dataclasses.replace(r, torch=tuple(k if k == "logit_scale" else f"text.{k}"
                                              for k in r.torch))
           for r in _clip_rules(text_only) if r.zoo[0] != "visual"]
  if isinstance(config, mobileclip.MobileCLIPViTConfig):
    return _timm_vit_rules(config) + rules
  return mobileclip_convert.fastvit_rules(config, fused) + rules


def _timm_vit_rules(config: mobileclip.MobileCLIPViTConfig) -> list[Rule]:
  """timm VisionTransformer trunk (MobileCLIP-B's conv stem or a patch conv), class token,
  [norm_pre], timm blocks, norm, classifier `head` (with bias)."""
  v, t, z = config.vision, "visual.trunk", ("visual",)
  if v.conv_stem:
    rules, key = [], f"{t}.patch_embed.backbone"
    for i in (0, 1):
      rules += [_conv(z + ("stem", i, "conv"), f"{key}.{i}.conv"),
                *_bn(z + ("stem", i, "bn"), f"{key}.{i}.bn")]
    rules += _conv_bias(z + ("stem", 2), f"{key}.2.conv")
  else:
    rules = [_conv(z + ("stem", 0), f"{t}.patch_embed.proj")]
  rules += [Rule(z + ("cls_token",), (f"{t}.cls_token",), lambda a: (a.reshape(1, 1, a.shape[0]),),
                 lambda a: a.reshape(a.shape[-1])),
            Rule(z + ("pos_embed",), (f"{t}.pos_embed",), lambda a: (a.reshape((1,) + a.shape),),
                 lambda a: a[0])]
  if v.pre_norm:
    rules += layer_norm(z + ("norm_pre",), f"{t}.norm_pre")
  for i in range(v.layers):
    rules += _resblock_rules(z + ("transformer", "resblocks", i), f"{t}.blocks.{i}", v.width,
                             v.heads, TIMM_BLOCK)
  return rules + layer_norm(z + ("norm",), f"{t}.norm") + linear(z + ("head",), f"{t}.head")
# ----------------------------------------------------------------------------- Eva (timm)


def _eva_attn_rules(zoo: Path, key: str, v: eva.EvaVisionConfig) -> list[Rule]:
  """timm's EvaAttention / AttentionRope <-> zoo's [W, 3, H, Dh] qkv kernel and biases."""
  w, h = v.width, v.heads
  dh = w // h
  if v.qkv == "separate":  # q_proj / k_proj / v_proj; k_proj has no bias
    rules = [Rule(zoo + ("qkv_kernel",), tuple(f"{key}.{n}_proj.weight" for n in "qkv"),
                  lambda a: tuple(a[:, t].reshape(w, w).T for t in range(3)),
                  lambda *ws: np.stack([x.T.reshape(w, h, dh) for x in ws], axis=1))]
  else:
    rules = [Rule(zoo + ("qkv_kernel",), (f"{key}.qkv.weight",),
                  lambda a: (a.reshape(w, 3 * w).T,), lambda a: a.T.reshape(w, 3, h, dh))]
  if v.qkv == "fused_bias":
    rules.append(Rule(zoo + ("qkv_bias",), (f"{key}.qkv.bias",), lambda a: (a.reshape(3 * w),),
                      lambda a: a.reshape(3, h, dh)))
  else:
    names = ("q_proj.bias", "v_proj.bias") if v.qkv == "separate" else ("q_bias", "v_bias")
    rules += [Rule(zoo + (z,), (f"{key}.{n}",), lambda a: (a.reshape(w),),
                   lambda a: a.reshape(h, dh)) for z, n in zip(("q_bias", "v_bias"), names)]
  if v.scale_attn:
    rules += layer_norm(zoo + ("norm",), f"{key}.norm")
  return rules + attn_out(zoo, f"{key}.proj", h, w)


def _eva_rules(config: eva.EvaCLIPConfig) -> list[Rule]:
  """open_clip `CustomTextCLIP`: a TimmModel Eva trunk (`visual.trunk.*`, timm's head Linear
  with bias; `visual.head` is empty) and the built-in text transformer at `text.*`."""
  v, t, z, k = config.vision, config.text, ("visual",), "visual.trunk"
  # timm keeps leading batch axes: cls_token [1, 1, W], pos_embed [1, N, W].
  rules = [conv_patch(z + ("patch_kernel",), f"{k}.patch_embed.proj.weight"),
           Rule(z + ("pos_embed",), (f"{k}.pos_embed",), lambda a: (a[None],), lambda a: a[0])]
  if not v.norm_pre:
    rules.append(identity(z + ("patch_bias",), f"{k}.patch_embed.proj.bias"))
  if v.class_token:
    rules.append(Rule(z + ("cls_token",), (f"{k}.cls_token",), lambda a: (a[None, None],),
                      lambda a: a[0, 0]))
  if v.norm_pre:
    rules += layer_norm(z + ("norm_pre",), f"{k}.norm_pre")
  for i in range(v.layers):
    b, bk = z + ("blocks", i), f"{k}.blocks.{i}"
    rules += [*layer_norm(b + ("norm1",), f"{bk}.norm1"), *layer_norm(b + ("norm2",), f"{bk}.norm2"),
              *_eva_attn_rules(b + ("attn",), f"{bk}.attn", v),
              *linear(b + ("mlp", "fc2"), f"{bk}.mlp.fc2")]
    fc1 = ("fc1_g", "fc1_x") if v.mlp == "swiglu" else ("fc1",)
    rules += [r for n in fc1 for r in linear(b + ("mlp", n), f"{bk}.mlp.{n}")]
    if v.scale_mlp:
      rules += layer_norm(b + ("mlp", "norm"), f"{bk}.mlp.norm")
    if v.layer_scale and not v.post_norm:
      rules += [identity(b + (g,), f"{bk}.{g}") for g in ("gamma_1", "gamma_2")]
  rules += layer_norm(z + ("norm",), f"{k}.{'fc_norm' if v.pool == 'avg' else 'norm'}")
  if v.pool == "map":
    ap, apk = z + ("attn_pool",), f"{k}.attn_pool"
    rules += [Rule(ap + ("latent",), (f"{apk}.latent",), lambda a: (a[None],), lambda a: a[0]),
              *[r for n in ("q", "kv", "proj") for r in linear(ap + (n,), f"{apk}.{n}")],
              *layer_norm(ap + ("norm",), f"{apk}.norm"),
              *linear(ap + ("mlp", "fc1"), f"{apk}.mlp.fc1"),
              *linear(ap + ("mlp", "fc2"), f"{apk}.mlp.fc2")]
  rules += linear(z + ("head",), f"{k}.head")
  text_only = configs.CLIPConfig(embed_dim=config.embed_dim, text=config.text)
  for r in _clip_rules(text_only):
    if r.zoo[0] == "text":
      rules.append(dataclasses.replace(r, torch=tuple(f"text.{n}" for n in r.torch)))
  rules.append(identity(("logit_scale",), "logit_scale"))
  if t.pool not in ("argmax", "eos", "last") or config.init_logit_bias is not None:
    raise ValueError("open_clip's Eva CLIP layout holds a CLIP text tower and no logit bias")
  return rules


def _build_eva(config: eva.EvaCLIPConfig) -> nnx.Module:
  return eva.EvaCLIP(config, rngs=nnx.Rngs(0))
# ----------------------------------------------------------------------------- CoCa


def _coca_rules(config: coca.CoCaConfig) -> list[Rule]:
  """open_clip `CoCa`: `visual.*` (ViT + `attn_pool`), `text.*` (+ `cls_emb`), `text_decoder.*`
  (self- and cross-attention blocks, ln_final, text_projection), `logit_scale`."""
  vision = configs.VisionConfig(**{f.name: getattr(config.vision, f.name)
                                   for f in dataclasses.fields(configs.VisionConfig)})
  rules = [r for r in _clip_rules(configs.CLIPConfig(embed_dim=config.embed_dim, vision=vision))
           if r.zoo[0] == "visual"]
  rules += [dataclasses.replace(r, zoo=("text",) + r.zoo[1:], torch=tuple(f"text.{k}" for k in r.torch))
            for r in _clip_rules(configs.CLIPConfig(embed_dim=config.embed_dim, text=config.text))
            if r.zoo[0] == "text"]
  rules.append(identity(("text", "cls_emb"), "text.cls_emb"))
  ap, key, d = ("visual", "attn_pool"), "visual.attn_pool", config.embed_dim
  rules += [identity(ap + ("query",), f"{key}.query"), *layer_norm(ap + ("ln_q",), f"{key}.ln_q"),
            *layer_norm(ap + ("ln_k",), f"{key}.ln_k"),
            Rule(ap + ("qkv_bias",), (f"{key}.attn.in_proj_bias",), lambda a: (a.reshape(3 * d),),
                 lambda a: a.reshape(3, d)),
            *linear(ap + ("out",), f"{key}.attn.out_proj")]
  if d == config.vision.width:  # nn.MultiheadAttention packs equal widths
    rules.append(Rule(ap + ("qkv_kernel",), (f"{key}.attn.in_proj_weight",),
                      lambda a: (a.reshape(d, 3 * d).T,), lambda a: a.T.reshape(d, 3, d)))
  else:
    rules += [common.transposed(ap + ("q_kernel",), f"{key}.attn.q_proj_weight"),
              Rule(ap + ("kv_kernel",), (f"{key}.attn.k_proj_weight", f"{key}.attn.v_proj_weight"),
                   lambda a: (a[:, 0].T, a[:, 1].T), lambda k, v: np.stack([k.T, v.T], axis=1))]
  m, dec = config.multimodal, ("text_decoder",)
  for i in range(m.layers):
    rules += _resblock_rules(dec + ("resblocks", i), f"text_decoder.resblocks.{i}", m.width,
                             m.heads)
    rules += _resblock_rules(dec + ("cross_attn", i), f"text_decoder.cross_attn.{i}", m.width,
                             m.heads)
    rules += layer_norm(dec + ("cross_attn", i, "ln_1_kv"), f"text_decoder.cross_attn.{i}.ln_1_kv")
  rules += [*layer_norm(dec + ("ln_final",), "text_decoder.ln_final"),
            identity(dec + ("text_projection",), "text_decoder.text_projection"),
            identity(("logit_scale",), "logit_scale")]
  if config.init_logit_bias is not None:
    rules.append(identity(("logit_bias",), "logit_bias"))
  return rules


def _build_coca(config: coca.CoCaConfig) -> nnx.Module:
  return coca.CoCa(config, rngs=nnx.Rngs(0))


def rules_for(config: configs.CLIPConfig) -> list[Rule]:
  """The open_clip layout of `config`: built-in CLIP, the SigLIP timm-trunk layout, or a CLIP
  with a Hugging Face text tower (a MultilingualCLIPConfig)."""
  if isinstance(config, multilingual.MultilingualCLIPConfig):
    return _hf_text_rules(config)
  if isinstance(config, resnet.ResNetCLIPConfig):
    return _resnet_rules(config)
  if isinstance(config, convnext.ConvNeXtCLIPConfig):
    return _convnext_rules(config)
  if isinstance(config, vitamin.ViTaminCLIPConfig):
    return _vitamin_rules(config)
  if isinstance(config, (mobileclip.MobileCLIPConfig, mobileclip.MobileCLIPViTConfig)):
    return _mobileclip_rules(config)
  if isinstance(config, eva.EvaCLIPConfig):
    return _eva_rules(config)
  if isinstance(config, coca.CoCaConfig):
    return _coca_rules(config)
  if config.vision.pool == "map":
    return _siglip_rules(config)
  return _clip_rules(config)


# ----------------------------------------------------------------------------- public


def config_from_open_clip(name: str, **overrides: Any) -> configs.CLIPConfig:
  """The zoo config of open_clip model `name` (zoo's registry uses open_clip's names).

  OpenAI weights use QuickGELU: pass the `-quickgelu` name (e.g. 'ViT-B-32-quickgelu').
  """
  return configs.get_model_config(name, **overrides)


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops a DistributedDataParallel `module.` prefix when every key has it."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


strip_prefix = _strip_prefix  # public: the Long-CLIP and CLIP-MoE layouts reuse it


def from_open_clip(state_dict: Mapping[str, Any], name: str | configs.CLIPConfig,
                   **overrides: Any) -> clip_lib.CLIP:
  """A zoo CLIP holding an open_clip (or OpenAI) state dict's weights.

  `state_dict`: key -> numpy array or torch tensor (fp16/bf16 are widened to float32).
  `name`: the open_clip architecture name ('ViT-B-32', 'ViT-B-16-quickgelu', ...) or a
  CLIPConfig. Raises `StateDictError` naming the missing / unexpected / mis-shaped keys.
  """
  if isinstance(name, multilingual.MultilingualCLIPConfig):
    config = dataclasses.replace(name, **overrides)
  else:
    config = common.resolve_config(name, **overrides)
  hf_text = isinstance(config, multilingual.MultilingualCLIPConfig)
  sd = _strip_prefix(state_dict)
  fused = next((k for k in sd if ".reparam_conv." in k), None)
  if fused and isinstance(config, mobileclip.MobileCLIPConfig):  # timm's inference form
    return common.convert_from_torch(sd, _mobileclip_rules(config, fused=True), config,
                                     layout="open_clip", model=str(name) if isinstance(name, str)
                                     else "<config>", build=mobileclip_convert.build_fused)
  label = name if isinstance(name, str) else "<config>"
  if any(k in sd for k in OPENAI_META_KEYS) and not config.quick_gelu:
    raise ValueError(f"this looks like an OpenAI state dict ({', '.join(OPENAI_META_KEYS)} "
                     f"present), which uses QuickGELU, but model {label!r} uses GELU; pass "
                     f"the '-quickgelu' architecture (e.g. '{label}-quickgelu')")
  builders = ((resnet.ResNetCLIPConfig, _build_resnet),
              (convnext.ConvNeXtCLIPConfig, _build_convnext),
              (vitamin.ViTaminCLIPConfig, _build_vitamin),
              (mobileclip.MobileCLIPConfig, mobileclip_convert.build),
              (mobileclip.MobileCLIPViTConfig, _build_mobileclip_vit),
              (eva.EvaCLIPConfig, _build_eva),
              (coca.CoCaConfig, _build_coca))
  for cls, build in builders:
    if isinstance(config, cls):
      return common.convert_from_torch(sd, rules_for(config), config, layout="open_clip",
                                       model=label, ignore=lambda k: k in OPENAI_META_KEYS,
                                       build=build)
  if hf_text:
    return common.convert_from_torch(sd, rules_for(config), config, layout="open_clip", model=label,
                                     ignore=lambda k: k in HF_TEXT_IGNORED, build=_build_hf_text)
  return common.convert_from_torch(sd, rules_for(config), config, layout="open_clip",
                                   model=label, ignore=lambda k: k in OPENAI_META_KEYS)


def to_open_clip(model: nnx.Module) -> dict[str, np.ndarray]:
  """The open_clip state dict of `model` (loads into open_clip with strict=True)."""
  if mobileclip_convert.is_fused(model):
    return common.convert_to_torch(model, _mobileclip_rules(model.config, fused=True),
                                   layout="open_clip")
  return common.convert_to_torch(model, rules_for(model.config), layout="open_clip")
