"""MobileCLIP / MobileCLIP 2 (Apple): timm's FastViT-MCi image towers (fastvit_mci0..4), NHWC.

The tower is timm's FastVit as open_clip's TimmModel wraps it (`timm_pool='avg'`, no extra
projection: timm's classifier `head.fc` is the projection). It is held in its train-time
(unfused) form, which is what the released open_clip state dicts store: MobileOne blocks (an
identity batch norm, k x k conv+BN branches, a 1x1 conv+BN scale branch), RepMixer token mixers
(x + gamma * (mixer(x) - norm(x))), large-kernel downsampling (7x7 + 3x3 conv+BN, optional
squeeze-excite, GELU), conditional positional encodings (x + depthwise 7x7 conv) and attention
stages (batch norm or LayerNorm2d, 32-wide heads). Every batch norm reads its running
statistics (eval mode; `nnx.BatchStat`, frozen). The text tower is CLIP's, bidirectional
(`no_causal_mask`) for the MCi models.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.models import clip as clip_lib, configs as registry
from zoo.models.layers import (
  LayerNorm,
  Linear,
  LoRAConv,
  Transformer,
  dot_product_attention,
  gelu,
  param,
)
from zoo.models.resnet import BatchNorm

Array = jax.Array
HEAD_DIM = 32  # FastViT's attention head width


@dataclasses.dataclass(frozen=True)
class MCiVisionConfig:
  """timm FastVit arguments of a fastvit_mci* trunk, per stage; `attn_norm` 'bn' (BatchNorm2d)
  or 'ln' (LayerNorm2d, mci3/4); `stem_scale_branch` False drops the stem's 1x1 branches."""

  image_size: int = 256
  layers: tuple[int, ...] = (2, 6, 10, 2)
  embed_dims: tuple[int, ...] = (64, 128, 256, 512)
  mlp_ratios: tuple[float, ...] = (3.0, 3.0, 3.0, 3.0)
  downsamples: tuple[bool, ...] = (False, True, True, True)
  se_downsamples: tuple[bool, ...] = (False, False, True, True)
  pos_embs: tuple[bool, ...] = (False, False, False, True)
  token_mixers: tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention")
  attn_norm: str = "bn"
  stem_scale_branch: bool = True
  lkc_act: bool = True

  def __post_init__(self):
    for name, kind in (("layers", int), ("embed_dims", int), ("mlp_ratios", float),
                       ("downsamples", bool), ("se_downsamples", bool), ("pos_embs", bool),
                       ("token_mixers", str)):
      object.__setattr__(self, name, tuple(kind(x) for x in getattr(self, name)))
    sizes = {name: len(getattr(self, name)) for name in (
        "embed_dims", "mlp_ratios", "downsamples", "se_downsamples", "pos_embs", "token_mixers")}
    if any(n != len(self.layers) for n in sizes.values()) or self.attn_norm not in ("bn", "ln") \
        or set(self.token_mixers) - {"repmixer", "attention"}:
      raise ValueError(f"FastViT config: per-stage fields need {len(self.layers)} entries (got "
                       f"{sizes}), token mixers 'repmixer' | 'attention', attn_norm 'bn' | 'ln'")


@dataclasses.dataclass(frozen=True)
class MobileCLIPConfig(registry.CLIPConfig):
  """A CLIPConfig whose image tower is a FastViT-MCi trunk."""

  vision: MCiVisionConfig = MCiVisionConfig()


def se_channels(channels: int, ratio: float, divisor: int) -> int:
  """timm's make_divisible(channels * ratio, divisor, round_limit=0) (SqueezeExcite width)."""
  return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


class Conv(LoRAConv):
  """A k x k (grouped) conv, HWIO kernel [k, k, d_in / groups, d_out], timm's symmetric padding."""

  def __init__(self, d_in: int, d_out: int, k: int, *, stride: int = 1, groups: int = 1,
               bias: bool = False, pad: int | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
    fan_in = k * k * d_in // groups
    self.kernel = param(rngs, nnx.initializers.normal(fan_in ** -0.5),
                        (k, k, d_in // groups, d_out), (None, None, None, "mlp"))
    self.bias = (nnx.Param(jnp.zeros((d_out,), jnp.float32), eager_sharding=False,
                           out_sharding=("mlp",)) if bias else None)
    self.kernel_lora = nnx.data(None)  # zoo.models.lora.apply_lora attaches one
    self.stride, self.groups, self.dtype = stride, groups, dtype
    self.pad = (stride - 1 + k - 1) // 2 if pad is None else pad  # timm get_padding: symmetric

  def __call__(self, x: Array) -> Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.conv_kernel().astype(self.dtype), (self.stride,) * 2,
        [(self.pad, self.pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class ConvBN(nnx.Module):
  """timm ConvNormAct without activation: a bias-free conv, then batch norm."""

  def __init__(self, d_in: int, d_out: int, k: int, *, stride: int = 1, groups: int = 1,
               pad: int | None = None, dtype, rngs: nnx.Rngs):
    self.conv = Conv(d_in, d_out, k, stride=stride, groups=groups, pad=pad, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(d_out)

  def __call__(self, x: Array) -> Array:
    return self.bn(self.conv(x))


class SqueezeExcite(nnx.Module):
  """timm SEModule: mean over H, W -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate."""

  def __init__(self, channels: int, reduced: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = Linear(channels, reduced, axes=("mlp", None), dtype=dtype, rngs=rngs)
    self.fc2 = Linear(reduced, channels, axes=(None, "mlp"), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    return x * jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))


class MobileOne(nnx.Module):
  """MobileOne block, train-time form: act(se(identity_bn(x) + scale(x) + sum kxk(x)))."""

  def __init__(self, d_in: int, d_out: int, k: int, *, stride: int = 1, groups: int = 1,
               se: bool = False, act: bool = True, scale_branch: bool = True, branches: int = 1,
               dtype, rngs: nnx.Rngs):
    self.identity = BatchNorm(d_in) if d_in == d_out and stride == 1 else None
    self.conv_kxk = nnx.List([ConvBN(d_in, d_out, k, stride=stride, groups=groups, dtype=dtype,
                                     rngs=rngs) for _ in range(branches)])
    self.conv_scale = (ConvBN(d_in, d_out, 1, stride=stride, groups=groups, dtype=dtype, rngs=rngs)
                       if k > 1 and scale_branch else None)
    self.se = (SqueezeExcite(d_out, se_channels(d_out, 1 / 16, 1), dtype=dtype, rngs=rngs)
               if se else None)
    self.act = act

  def __call__(self, x: Array) -> Array:
    out = 0
    if self.identity is not None:
      out = self.identity(x)
    if self.conv_scale is not None:
      out = out + self.conv_scale(x)
    for conv in self.conv_kxk:
      out = out + conv(x)
    if self.se is not None:
      out = self.se(out)
    return gelu(out) if self.act else out


class LayerScale(nnx.Module):
  def __init__(self, dim: int, init: float = 1e-5):
    self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32), eager_sharding=False,
                           out_sharding=("mlp",))

  def __call__(self, x: Array) -> Array:
    return x * self.gamma[...].astype(x.dtype)


class LargeKernelConv(nnx.Module):
  """timm ReparamLargeKernelConv, train-time form: 7x7 + 3x3 grouped conv+BN, [SE], [GELU]."""

  def __init__(self, d_in: int, d_out: int, *, se: bool, act: bool, dtype, rngs: nnx.Rngs):
    self.large_conv = ConvBN(d_in, d_out, 7, stride=2, groups=d_in, dtype=dtype, rngs=rngs)
    self.small_conv = ConvBN(d_in, d_out, 3, stride=2, groups=d_in, dtype=dtype, rngs=rngs)
    self.se = (SqueezeExcite(d_out, se_channels(d_out, 0.25, 8), dtype=dtype, rngs=rngs)
               if se else None)
    self.act = act

  def __call__(self, x: Array) -> Array:
    x = self.large_conv(x) + self.small_conv(x)
    if self.se is not None:
      x = self.se(x)
    return gelu(x) if self.act else x


class PatchEmbed(nnx.Module):
  """Downsampling: `proj` = [LargeKernelConv (stride 2), 1x1 MobileOne block]."""

  def __init__(self, d_in: int, d_out: int, *, se: bool, act: bool, dtype, rngs: nnx.Rngs):
    self.proj = nnx.List([LargeKernelConv(d_in, d_out, se=se, act=act, dtype=dtype, rngs=rngs),
                          MobileOne(d_out, d_out, 1, dtype=dtype, rngs=rngs)])

  def __call__(self, x: Array) -> Array:
    return self.proj[1](self.proj[0](x))


class PosEnc(nnx.Module):
  """Conditional positional encoding (RepConditionalPosEnc): x + depthwise 7x7 conv(x)."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.pos_enc = Conv(dim, dim, 7, groups=dim, bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return x + self.pos_enc(x)


class ConvMlp(nnx.Module):
  """Depthwise 7x7 conv+BN -> 1x1 conv -> GELU -> 1x1 conv."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.conv = ConvBN(dim, dim, 7, groups=dim, dtype=dtype, rngs=rngs)
    self.fc1 = Linear(dim, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.fc2(gelu(self.fc1(self.conv(x))))


class RepMixer(nnx.Module):
  """x + gamma * (mixer(x) - norm(x)): depthwise 3x3 MobileOne blocks without activation."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.norm = MobileOne(dim, dim, 3, groups=dim, act=False, scale_branch=False, branches=0,
                          dtype=dtype, rngs=rngs)
    self.mixer = MobileOne(dim, dim, 3, groups=dim, act=False, dtype=dtype, rngs=rngs)
    self.layer_scale = LayerScale(dim)

  def __call__(self, x: Array) -> Array:
    return x + self.layer_scale(self.mixer(x) - self.norm(x))


class RepMixerBlock(nnx.Module):
  def __init__(self, dim: int, mlp_ratio: float, *, dtype, rngs: nnx.Rngs):
    self.token_mixer = RepMixer(dim, dtype=dtype, rngs=rngs)
    self.mlp = ConvMlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.layer_scale = LayerScale(dim)

  def __call__(self, x: Array) -> Array:
    x = self.token_mixer(x)
    return x + self.layer_scale(self.mlp(x))


class Attention(nnx.Module):
  """FastViT's MHSA over the H*W tokens: bias-free qkv, 32-wide heads, output proj with bias."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.heads = dim // HEAD_DIM
    self.qkv = Linear(dim, 3 * dim, axes=("embed", "heads"), use_bias=False, dtype=dtype,
                      rngs=rngs)
    self.proj = Linear(dim, dim, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    qkv = self.qkv(x.reshape(b, h * w, c)).reshape(b, h * w, 3, self.heads, HEAD_DIM)
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(out.reshape(b, h * w, c)).reshape(b, h, w, c)


class AttentionBlock(nnx.Module):
  def __init__(self, dim: int, mlp_ratio: float, norm: str, *, dtype, rngs: nnx.Rngs):
    self.norm = BatchNorm(dim) if norm == "bn" else LayerNorm(dim, eps=1e-5, rngs=rngs)
    self.token_mixer = Attention(dim, dtype=dtype, rngs=rngs)
    self.layer_scale_1 = LayerScale(dim)
    self.mlp = ConvMlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.layer_scale_2 = LayerScale(dim)

  def __call__(self, x: Array) -> Array:
    x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
    return x + self.layer_scale_2(self.mlp(x))


class Stage(nnx.Module):
  def __init__(self, cfg: MCiVisionConfig, i: int, d_in: int, *, dtype, rngs: nnx.Rngs):
    dim = cfg.embed_dims[i]
    down = cfg.downsamples[i] or d_in != dim
    self.downsample = (PatchEmbed(d_in, dim, se=cfg.se_downsamples[i], act=cfg.lkc_act,
                                  dtype=dtype, rngs=rngs) if down else None)
    self.pos_emb = PosEnc(dim, dtype=dtype, rngs=rngs) if cfg.pos_embs[i] else None
    if cfg.token_mixers[i] == "repmixer":
      blocks = [RepMixerBlock(dim, cfg.mlp_ratios[i], dtype=dtype, rngs=rngs)
                for _ in range(cfg.layers[i])]
    else:
      blocks = [AttentionBlock(dim, cfg.mlp_ratios[i], cfg.attn_norm, dtype=dtype, rngs=rngs)
                for _ in range(cfg.layers[i])]
    self.blocks = nnx.List(blocks)

  def __call__(self, x: Array) -> Array:
    if self.downsample is not None:
      x = self.downsample(x)
    if self.pos_emb is not None:
      x = self.pos_emb(x)
    for block in self.blocks:
      x = block(x)
    return x


class FastViT(nnx.Module):
  """NHWC images [B, H, W, 3] -> [B, embed_dim]: stem, stages, final MobileOne conv (SE,
  2x channels), global average pool, timm's classifier Linear (the CLIP projection)."""

  def __init__(self, cfg: MCiVisionConfig, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    d0, sb = cfg.embed_dims[0], cfg.stem_scale_branch
    self.stem = nnx.List([
        MobileOne(3, d0, 3, stride=2, scale_branch=sb, dtype=dtype, rngs=rngs),
        MobileOne(d0, d0, 3, stride=2, groups=d0, scale_branch=sb, dtype=dtype, rngs=rngs),
        MobileOne(d0, d0, 1, scale_branch=sb, dtype=dtype, rngs=rngs)])
    stages, d_in = [], d0
    for i in range(len(cfg.layers)):
      stages.append(Stage(cfg, i, d_in, dtype=dtype, rngs=rngs))
      d_in = cfg.embed_dims[i]
    self.stages = nnx.List(stages)
    self.final_conv = MobileOne(d_in, 2 * d_in, 3, groups=d_in, se=True, dtype=dtype, rngs=rngs)
    self.head = Linear(2 * d_in, embed_dim, axes=("mlp", None), dtype=dtype, rngs=rngs)

  def __call__(self, images: Array) -> Array:
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 32:
      raise ValueError(f"images of shape {tuple(images.shape)}: a FastViT tower takes [B, H, W, 3]"
                       " with H, W >= 32")
    x = images
    for block in self.stem:
      x = block(x)
    for stage in self.stages:
      x = stage(x)
    x = self.final_conv(x)
    return self.head(jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype))


class MobileCLIP(clip_lib.CLIP):
  """CLIP with a FastViT-MCi image tower (encode_image / encode_text / __call__ as CLIP)."""

  def image_tower(self, config: MobileCLIPConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return FastViT(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class TimmViTConfig:
  """timm VisionTransformer trunks of MobileCLIP-B (vit_base_mci_224: a 3-conv stem of total
  stride 16, positions on the patch tokens only, no pre-norm, LayerNorm eps 1e-6) and
  MobileCLIP2-L-14 (vit_large_patch14_clip_224: patch conv, pre-norm, eps 1e-5); class-token
  pooling, timm's classifier Linear (with bias) as the projection."""

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  ln_eps: float = 1e-6
  conv_stem: bool = True
  pre_norm: bool = False
  embed_class: bool = False  # pos_embed also covers the class token

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class MobileCLIPViTConfig(registry.CLIPConfig):
  """A CLIPConfig whose image tower is one of MobileCLIP's timm ViT trunks."""

  vision: TimmViTConfig = TimmViTConfig()


class TimmViT(nnx.Module):
  """NHWC images [B, S, S, 3] -> [B, embed_dim] (S = config.image_size)."""

  def __init__(self, cfg: TimmViTConfig, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, w = cfg, cfg.width
    if cfg.conv_stem:  # timm ConvStem: 4x4/4 conv+BN+GELU, 2x2/2 conv+BN+GELU, 2x2/2 conv+bias
      self.stem = nnx.List([ConvBN(3, w // 4, 4, stride=4, pad=0, dtype=dtype, rngs=rngs),
                            ConvBN(w // 4, w // 4, 2, stride=2, pad=0, dtype=dtype, rngs=rngs),
                            Conv(w // 4, w, 2, stride=2, pad=0, bias=True, dtype=dtype,
                                 rngs=rngs)])
    else:
      p = cfg.patch_size
      self.stem = nnx.List([Conv(3, w, p, stride=p, pad=0, dtype=dtype, rngs=rngs)])
    self.cls_token = param(rngs, nnx.initializers.normal(1e-6), (w,), ("embed",))
    n = cfg.grid_size ** 2 + (1 if cfg.embed_class else 0)
    self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (n, w), (None, "embed"))
    self.norm_pre = LayerNorm(w, eps=cfg.ln_eps, rngs=rngs) if cfg.pre_norm else None
    self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, eps=cfg.ln_eps,
                                   dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(w, eps=cfg.ln_eps, rngs=rngs)
    self.head = Linear(w, embed_dim, axes=("embed", None), dtype=dtype, rngs=rngs)

  def __call__(self, images: Array) -> Array:
    size = self.cfg.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
      raise ValueError(f"images of shape {tuple(images.shape)}: this ViT takes [B, {size}, "
                       f"{size}, 3] (its positions are fixed to a {self.cfg.grid_size}^2 grid)")
    x = images
    for i, layer in enumerate(self.stem):
      x = layer(x)
      if self.cfg.conv_stem and i < 2:
        x = gelu(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, c))
    pos = self.pos_embed[...].astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + pos if self.cfg.embed_class else \
        jnp.concatenate([cls, x + pos], axis=1)
    if self.norm_pre is not None:
      x = self.norm_pre(x)
    return self.head(self.norm(self.transformer(x))[:, 0])


class MobileCLIPViT(clip_lib.CLIP):
  """CLIP with a timm ViT image tower (MobileCLIP-B, MobileCLIP2-B / L-14)."""

  def image_tower(self, config: MobileCLIPViTConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return TimmViT(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)


def _mci(layers, dims, mlp: float, five: bool) -> MCiVisionConfig:
  n = len(layers)
  if not five:
    return MCiVisionConfig(256, layers, dims, (mlp,) * n)
  return MCiVisionConfig(256, layers, dims, (mlp,) * n, (False,) + (True,) * 4, (False,) * 5,
                         (False, False, False, True, True),
                         ("repmixer",) * 3 + ("attention",) * 2, attn_norm="ln",
                         stem_scale_branch=False)


# timm 1.0's fastvit_mci* trunks (timm/models/fastvit.py).
TIMM_MCI = {
    "fastvit_mci0": _mci((2, 6, 10, 2), (64, 128, 256, 512), 3.0, False),
    "fastvit_mci1": _mci((4, 12, 20, 4), (64, 128, 256, 512), 3.0, False),
    "fastvit_mci2": _mci((4, 12, 24, 4), (80, 160, 320, 640), 3.0, False),
    "fastvit_mci3": _mci((2, 12, 24, 4, 2), (96, 192, 384, 768, 1536), 4.0, True),
    "fastvit_mci4": _mci((2, 12, 24, 4, 4), (128, 256, 512, 1024, 2048), 4.0, True),
}
_ZERO, _ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _mclip(trunk: str, embed_dim: int, mean_std) -> MobileCLIPConfig:
  width = embed_dim  # open_clip's MobileCLIP*.json: text width = embed dim, 64-wide heads
  return MobileCLIPConfig(
      embed_dim, TIMM_MCI[trunk],
      registry.TextConfig(width=width, heads=width // 64, layers=12, causal=False),
      image_mean=mean_std[0], image_std=mean_std[1])


# open_clip's model_configs/MobileCLIP*.json (FastViT-MCi image towers).
MOBILECLIPS = {
    "MobileCLIP-S1": _mclip("fastvit_mci1", 512, (_ZERO, _ONE)),
    "MobileCLIP-S2": _mclip("fastvit_mci2", 512, (_ZERO, _ONE)),
    "MobileCLIP2-S0": _mclip("fastvit_mci0", 512, (_ZERO, _ONE)),
    "MobileCLIP2-S2": _mclip("fastvit_mci2", 512, (_ZERO, _ONE)),
    "MobileCLIP2-S3": _mclip("fastvit_mci3", 768, (registry.OPENAI_MEAN, registry.OPENAI_STD)),
    "MobileCLIP2-S4": _mclip("fastvit_mci4", 768, (registry.OPENAI_MEAN, registry.OPENAI_STD)),
}
# timm ViT trunks of open_clip's MobileCLIP-B / MobileCLIP2-B / -L-14 configs.
TIMM_VITS = {
    "vit_base_mci_224": TimmViTConfig(),
    "vit_large_patch14_clip_224": TimmViTConfig(224, 14, 1024, 24, 16, 4.0, 1e-5, False, True,
                                                True),
}
_B = MobileCLIPViTConfig(512, TIMM_VITS["vit_base_mci_224"],  # a causal text tower, as CLIP's
                         registry.TextConfig(width=512, heads=8, layers=12), image_mean=_ZERO,
                         image_std=_ONE)
MOBILECLIPS.update({
    "MobileCLIP-B": _B, "MobileCLIP2-B": _B,
    "MobileCLIP2-L-14": MobileCLIPViTConfig(
        768, TIMM_VITS["vit_large_patch14_clip_224"],
        registry.TextConfig(width=768, heads=12, layers=12, causal=False)),
})
for _name, _config in MOBILECLIPS.items():
  registry.register(_name, _config)
clip_lib.MODEL_CLASSES.update({MobileCLIPConfig: MobileCLIP, MobileCLIPViTConfig: MobileCLIPViT})
