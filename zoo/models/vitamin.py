"""ViTamin CLIP (open_clip's ViTamin-S / B / L / L2 / XL and the -LTT text towers), NHWC.

The image tower is timm's `vitamin_*` as open_clip's TimmModel wraps it (`timm_pool=''`,
`timm_proj='linear'`): a conv stem (3x3 stride-2 conv, LayerNorm + GELU, 3x3 conv); two MBConv
stages whose blocks are pre-LayerNorm inverted bottlenecks (1x1 expand x4, GELU, 3x3 depthwise,
GELU, 1x1), the first of each strided (shortcut: 3x3 stride-2 average pool without the padding
in the count, then a 1x1 conv where the width changes); a LayerNorm + 3x3 stride-2 conv into the
transformer width; then a ViT over the 1/16 grid (no class token, learned positions except XL)
whose blocks' MLP is a GeGLU with its own LayerNorm; the mean token -> LayerNorm (fc_norm) ->
open_clip's bias-free projection. LayerNorms are timm's (eps 1e-6); no batch norm. The text
tower is CLIP's (open_clip's CustomTextCLIP). The total stride is 16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models import clip as clip_lib, configs as registry
from zoo.models.convnext import Conv
from zoo.models.layers import (
  Attention,
  LayerNorm,
  Linear,
  ResidualBlock,
  Transformer,
  check_remat,
  gelu,
  param,
)

Array = jax.Array
STRIDE = 16
EPS = 1e-6


def make_divisible(v: float, divisor: int = 8) -> int:
  """timm's make_divisible (the MBConv hidden width)."""
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * v else new


@dataclasses.dataclass(frozen=True)
class ViTaminVisionConfig:
  """timm's VitCfg (`stem_width`, MBConv stage `dims` / `depths`) + its ViT (`width`, `layers`,
  `heads`, GeGLU `mlp_ratio`, learned positions or none)."""

  image_size: int = 224
  stem_width: int = 64
  dims: tuple[int, int] = (64, 128)
  depths: tuple[int, int] = (2, 4)
  width: int = 384
  layers: int = 14
  heads: int = 6
  mlp_ratio: float = 2.0
  pos_embed: bool = True

  def __post_init__(self):
    object.__setattr__(self, "dims", tuple(int(n) for n in self.dims))
    object.__setattr__(self, "depths", tuple(int(n) for n in self.depths))
    if len(self.dims) != 2 or len(self.depths) != 2:
      raise ValueError(f"ViTamin dims {self.dims} / depths {self.depths}: expected 2 MBConv "
                       "stages")
    if self.image_size % STRIDE:
      raise ValueError(f"image size {self.image_size}: a ViTamin tower needs a multiple of "
                       f"{STRIDE} (its total stride)")

  @property
  def grid_size(self) -> int:
    return self.image_size // STRIDE


@dataclasses.dataclass(frozen=True)
class ViTaminCLIPConfig(registry.CLIPConfig):
  """A CLIPConfig whose image tower is a timm ViTamin."""

  vision: ViTaminVisionConfig = ViTaminVisionConfig()


def _avg_pool_3x3_s2(x: Array) -> Array:
  """nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False) on NHWC."""
  window, strides, pad = (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  # a constant init value makes it a differentiable window sum
  total = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, window, strides, pad)
  count = [np.minimum(np.arange(0, n, 2) + 2, n) - np.maximum(np.arange(0, n, 2) - 1, 0)
           for n in x.shape[1:3]]  # window cells inside the image, per output row / column
  return total / np.outer(*count).astype(x.dtype)[None, :, :, None]


class MbConvBlock(nnx.Module):
  """timm's MbConvLNBlock: shortcut + 1x1(LN(x)) -> GELU -> 3x3 dw (stride) -> GELU -> 1x1."""

  def __init__(self, d_in: int, d_out: int, stride: int, *, dtype, rngs: nnx.Rngs):
    mid = make_divisible(d_out * 4.0)
    self.stride = stride
    self.shortcut = nnx.data(Conv(d_in, d_out, 1, dtype=dtype, rngs=rngs) if d_in != d_out
                             else None)
    self.pre_norm = LayerNorm(d_in, eps=EPS, rngs=rngs)
    self.conv1 = Conv(d_in, mid, 1, dtype=dtype, rngs=rngs)
    self.conv2 = Conv(mid, mid, 3, stride=stride, depthwise=True, pad=1, dtype=dtype, rngs=rngs)
    self.conv3 = Conv(mid, d_out, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    short = _avg_pool_3x3_s2(x) if self.stride == 2 else x
    if self.shortcut is not None:
      short = self.shortcut(short)
    y = gelu(self.conv2(gelu(self.conv1(self.pre_norm(x)))))
    return self.conv3(y) + short


class GeGluMlp(nnx.Module):
  """timm's GeGluMlp: LN -> GELU(w0 x) * w1 x -> w2."""

  def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.norm = LayerNorm(width, eps=EPS, rngs=rngs)
    self.w0 = Linear(width, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.w1 = Linear(width, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.w2 = Linear(hidden, width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.norm(x)
    return self.w2(gelu(self.w0(x)) * self.w1(x))


class GeGluBlock(ResidualBlock):
  """timm's ViT block with a GeGLU MLP (ResidualBlock's forward: pre-LN attention and MLP)."""

  def __init__(self, width: int, heads: int, mlp_ratio: float, *, dtype, rngs: nnx.Rngs):
    self.ln_1 = LayerNorm(width, eps=EPS, rngs=rngs)
    self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
    self.ln_2 = LayerNorm(width, eps=EPS, rngs=rngs)
    self.mlp = GeGluMlp(width, int(width * mlp_ratio), dtype=dtype, rngs=rngs)


class GeGluTransformer(Transformer):
  """Transformer (its forward, remat and set_remat) over GeGluBlocks."""

  def __init__(self, cfg: ViTaminVisionConfig, *, dtype, remat: str = "none", rngs: nnx.Rngs):
    self.remat = check_remat(remat)
    self.resblocks = nnx.List([GeGluBlock(cfg.width, cfg.heads, cfg.mlp_ratio, dtype=dtype,
                                          rngs=rngs) for _ in range(cfg.layers)])


class ViTamin(nnx.Module):
  """NHWC images [B, H, W, 3] (H, W multiples of 16; = image_size with learned positions) ->
  [B, embed_dim]."""

  def __init__(self, cfg: ViTaminVisionConfig, embed_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    s = cfg.stem_width
    self.stem_conv1 = Conv(3, s, 3, stride=2, pad=1, dtype=dtype, rngs=rngs)
    self.stem_norm = LayerNorm(s, eps=EPS, rngs=rngs)
    self.stem_conv2 = Conv(s, s, 3, dtype=dtype, rngs=rngs)
    stages, d_in = [], s
    for dim, depth in zip(cfg.dims, cfg.depths):
      stages.append(nnx.List([MbConvBlock(d_in if j == 0 else dim, dim, 2 if j == 0 else 1,
                                          dtype=dtype, rngs=rngs) for j in range(depth)]))
      d_in = dim
    self.stages = nnx.List(stages)
    self.pool_norm = LayerNorm(d_in, eps=EPS, rngs=rngs)
    self.pool_conv = Conv(d_in, cfg.width, 3, stride=2, pad=1, dtype=dtype, rngs=rngs)
    self.positional_embedding = nnx.data(
        param(rngs, nnx.initializers.normal(0.02), (cfg.grid_size ** 2, cfg.width),
              (None, "embed")) if cfg.pos_embed else None)
    self.transformer = GeGluTransformer(cfg, dtype=dtype, rngs=rngs)
    self.fc_norm = LayerNorm(cfg.width, eps=EPS, rngs=rngs)
    self.proj = Linear(cfg.width, embed_dim, axes=("embed", None), use_bias=False, dtype=dtype,
                       rngs=rngs)

  def tokens(self, images: Array) -> Array:
    """The transformer's output tokens [B, (H/16)*(W/16), width]."""
    size = self.cfg.image_size
    if (images.ndim != 4 or images.shape[1] % STRIDE or images.shape[2] % STRIDE
        or (self.cfg.pos_embed and tuple(images.shape[1:3]) != (size, size))):
      need = (f"[B, {size}, {size}, 3] (its positions are fixed to a {self.cfg.grid_size}x"
              f"{self.cfg.grid_size} grid)" if self.cfg.pos_embed
              else f"[B, H, W, 3] with H and W multiples of {STRIDE} (its total stride)")
      raise ValueError(f"images of shape {tuple(images.shape)}: this ViTamin tower takes {need}")
    x = self.stem_conv2(gelu(self.stem_norm(self.stem_conv1(images))))
    for stage in self.stages:
      for block in stage:
        x = block(x)
    x = self.pool_conv(self.pool_norm(x))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if self.positional_embedding is not None:
      x = x + self.positional_embedding[...].astype(x.dtype)
    return self.transformer(x)

  def __call__(self, images: Array) -> Array:
    x = self.tokens(images)
    x = self.fc_norm(jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype))
    return self.proj(x)


class ViTaminCLIP(clip_lib.CLIP):
  """CLIP with a ViTamin image tower (encode_image / encode_text / __call__ as CLIP)."""

  def image_tower(self, config: ViTaminCLIPConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return ViTamin(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)


def _trunk(stem: int, width: int, layers: int, heads: int, image_size: int,
           pos_embed: bool = True) -> ViTaminVisionConfig:
  return ViTaminVisionConfig(image_size, stem, (stem, 2 * stem), (2, 4), width, layers, heads,
                             2.0, pos_embed)


# timm's vitamin_* trunks (timm/models/vitamin.py) by name.
TIMM_VITAMINS = {
    "vitamin_small_224": _trunk(64, 384, 14, 6, 224),
    "vitamin_base_224": _trunk(128, 768, 14, 12, 224),
    **{f"vitamin_large{v}_{s}": _trunk(160, 1024, 31, 16, s)
       for v in ("", "2") for s in (224, 256, 336, 384)},
    **{f"vitamin_xlarge_{s}": _trunk(192, 1152, 32, 16, s, pos_embed=False)
       for s in (256, 336, 384)},
}


def _vt(trunk: str, embed_dim: int, text: tuple[int, int, int], image_size: int | None = None
        ) -> ViTaminCLIPConfig:
  vision = TIMM_VITAMINS[trunk]
  if image_size is not None:
    vision = dataclasses.replace(vision, image_size=image_size)
  width, heads, layers = text
  return ViTaminCLIPConfig(embed_dim, vision,
                           registry.TextConfig(width=width, heads=heads, layers=layers))


_LTT = (768, 12, 12)  # the "larger text tower" of -LTT (and of ViTamin-L)
# open_clip's model_configs/ViTamin-*.json. ViTamin-XL-384's config reads 256 px images (its
# trunk has no positions, so any multiple of 16 fits; open_clip preprocesses at 256).
VITAMINS = {
    "ViTamin-S": _vt("vitamin_small_224", 384, (384, 6, 12)),
    "ViTamin-S-LTT": _vt("vitamin_small_224", 768, _LTT),
    "ViTamin-B": _vt("vitamin_base_224", 512, (512, 8, 12)),
    "ViTamin-B-LTT": _vt("vitamin_base_224", 768, _LTT),
    **{f"ViTamin-L{'' if s == 224 else f'-{s}'}": _vt(f"vitamin_large_{s}", 768, _LTT)
       for s in (224, 256, 336, 384)},
    **{f"ViTamin-L2{'' if s == 224 else f'-{s}'}": _vt(f"vitamin_large2_{s}", 1024, (1024, 16, 24))
       for s in (224, 256, 336, 384)},
    **{f"ViTamin-XL-{s}": _vt(f"vitamin_xlarge_{s}", 1152, (1152, 16, 27),
                              image_size=256 if s == 384 else s) for s in (256, 336, 384)},
}
for _name, _config in VITAMINS.items():
  registry.register(_name, _config)
clip_lib.MODEL_CLASSES[ViTaminCLIPConfig] = ViTaminCLIP
