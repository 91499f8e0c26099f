"""ConvNeXt CLIP (open_clip's convnext_base / _base_w / _large_d / _xxlarge, 256 / 320 px), NHWC.

The image tower is timm's ConvNeXt as open_clip's TimmModel wraps it (`timm_pool=''`): a 4x4
stride-4 stem conv + LayerNorm; four stages, each after the first opening with LayerNorm + a
2x2 stride-2 conv; blocks = 7x7 depthwise conv -> LayerNorm -> Linear(4C) -> GELU -> Linear
-> layer scale `gamma`, residual; global average pool -> LayerNorm (timm's head) -> open_clip's
projection: 'linear' (no bias) or 'mlp' (Linear+bias -> GELU -> Linear, hidden 2E). The text
tower is CLIP's. The total stride is 32: an image side that is not a multiple of 32 is refused.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.models import clip as clip_lib, configs as registry
from zoo.models.layers import LayerNorm, Linear, LoRAConv, gelu, param

Array = jax.Array
STRIDE = 32


@dataclasses.dataclass(frozen=True)
class ConvNeXtVisionConfig:
  """timm ConvNeXt `depths` / `dims` (+ LayerNorm eps) and open_clip's `proj` head."""

  image_size: int = 224
  depths: tuple[int, ...] = (3, 3, 27, 3)
  dims: tuple[int, ...] = (128, 256, 512, 1024)
  ln_eps: float = 1e-6
  proj: str = "linear"

  def __post_init__(self):
    object.__setattr__(self, "depths", tuple(int(n) for n in self.depths))
    object.__setattr__(self, "dims", tuple(int(n) for n in self.dims))
    if len(self.depths) != 4 or len(self.dims) != 4:
      raise ValueError(f"ConvNeXt depths {self.depths} / dims {self.dims}: expected 4 stages")
    if self.proj not in ("linear", "mlp"):
      raise ValueError(f"ConvNeXt proj {self.proj!r}: expected 'linear' or 'mlp'")
    if self.image_size % STRIDE:
      raise ValueError(f"image size {self.image_size}: a ConvNeXt tower needs a multiple of "
                       f"{STRIDE} (its total stride)")


@dataclasses.dataclass(frozen=True)
class ConvNeXtCLIPConfig(registry.CLIPConfig):
  """A CLIPConfig whose image tower is a timm ConvNeXt."""

  vision: ConvNeXtVisionConfig = ConvNeXtVisionConfig()


class Conv(LoRAConv):
  """k x k conv with bias, HWIO kernel; `groups` = channels for the depthwise conv; `pad`
  (each side) defaults to k // 2 at stride 1 and 0 when strided."""

  def __init__(self, d_in: int, d_out: int, k: int, *, stride: int = 1, depthwise: bool = False,
               pad: int | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
    fan_in = k * k * (1 if depthwise else d_in)
    self.kernel = param(rngs, nnx.initializers.normal(fan_in ** -0.5),
                        (k, k, 1 if depthwise else d_in, d_out), (None, None, None, "mlp"))
    self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32), eager_sharding=False,
                          out_sharding=("mlp",))
    if pad is None:  # 'same' for stride 1; none for the patchify / downsample convs
      pad = k // 2 if stride == 1 else 0
    self.kernel_lora = nnx.data(None)  # zoo.models.lora.apply_lora attaches one
    self.stride, self.groups, self.pad, self.dtype = stride, d_in if depthwise else 1, pad, dtype

  def __call__(self, x: Array) -> Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.conv_kernel().astype(self.dtype), (self.stride,) * 2,
        [(self.pad, self.pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups)
    return y + self.bias[...].astype(self.dtype)


class Block(nnx.Module):
  def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
    self.conv_dw = Conv(dim, dim, 7, depthwise=True, dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=eps, rngs=rngs)
    self.fc1 = Linear(dim, 4 * dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = Linear(4 * dim, dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.gamma = nnx.Param(jnp.full((dim,), 1e-6, jnp.float32), eager_sharding=False,
                           out_sharding=("embed",))

  def __call__(self, x: Array) -> Array:
    y = self.fc2(gelu(self.fc1(self.norm(self.conv_dw(x)))))
    return x + y * self.gamma[...].astype(y.dtype)


class Stage(nnx.Module):
  def __init__(self, d_in: int, dim: int, depth: int, first: bool, eps: float, *, dtype,
               rngs: nnx.Rngs):
    self.down_norm = nnx.data(None if first else LayerNorm(d_in, eps=eps, rngs=rngs))
    self.down_conv = nnx.data(None if first else Conv(d_in, dim, 2, stride=2, dtype=dtype,
                                                      rngs=rngs))
    self.blocks = nnx.List([Block(dim, eps, dtype=dtype, rngs=rngs) for _ in range(depth)])

  def __call__(self, x: Array) -> Array:
    if self.down_conv is not None:
      x = self.down_conv(self.down_norm(x))
    for block in self.blocks:
      x = block(x)
    return x


class ConvNeXt(nnx.Module):
  """NHWC images [B, S, S, 3] -> [B, embed_dim]."""

  def __init__(self, cfg: ConvNeXtVisionConfig, embed_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg, eps = cfg, cfg.ln_eps
    self.stem_conv = Conv(3, cfg.dims[0], 4, stride=4, dtype=dtype, rngs=rngs)
    self.stem_norm = LayerNorm(cfg.dims[0], eps=eps, rngs=rngs)
    d_in, stages = cfg.dims[0], []
    for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
      stages.append(Stage(d_in, dim, depth, i == 0, eps, dtype=dtype, rngs=rngs))
      d_in = dim
    self.stages = nnx.List(stages)
    self.head_norm = LayerNorm(d_in, eps=eps, rngs=rngs)
    if cfg.proj == "mlp":
      self.proj = nnx.data(None)
      self.mlp_fc1 = Linear(d_in, 2 * embed_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
      self.mlp_fc2 = Linear(2 * embed_dim, embed_dim, axes=("mlp", None), use_bias=False,
                            dtype=dtype, rngs=rngs)
    else:
      self.proj = Linear(d_in, embed_dim, axes=("embed", None), use_bias=False, dtype=dtype,
                         rngs=rngs)

  def __call__(self, images: Array) -> Array:
    if images.ndim != 4 or images.shape[1] % STRIDE or images.shape[2] % STRIDE:
      raise ValueError(f"images of shape {tuple(images.shape)}: a ConvNeXt tower takes [B, H, W, "
                       f"3] with H and W multiples of {STRIDE} (its total stride)")
    x = self.stem_norm(self.stem_conv(images))
    for stage in self.stages:
      x = stage(x)
    x = self.head_norm(jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype))
    if self.proj is not None:
      return self.proj(x)
    return self.mlp_fc2(gelu(self.mlp_fc1(x)))


class ConvNeXtCLIP(clip_lib.CLIP):
  """CLIP with a ConvNeXt image tower (encode_image / encode_text / __call__ as CLIP)."""

  def image_tower(self, config: ConvNeXtCLIPConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return ConvNeXt(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)


# timm trunks open_clip's convnext configs name -> (depths, dims, LayerNorm eps).
TIMM_CONVNEXTS = {
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024), 1e-6),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536), 1e-6),
    "convnext_xxlarge": ((3, 4, 30, 3), (384, 768, 1536, 3072), 1e-5),
}


def _cx(trunk: str, image_size: int, proj: str, embed_dim: int, text_width: int,
        text_layers: int) -> ConvNeXtCLIPConfig:
  depths, dims, eps = TIMM_CONVNEXTS[trunk]
  return ConvNeXtCLIPConfig(
      embed_dim, ConvNeXtVisionConfig(image_size, depths, dims, eps, proj),
      registry.TextConfig(width=text_width, heads=text_width // 64, layers=text_layers))


# open_clip's model_configs/convnext_*.json
CONVNEXTS = {
    "convnext_base": _cx("convnext_base", 224, "linear", 512, 512, 12),
    "convnext_base_w": _cx("convnext_base", 256, "linear", 640, 640, 12),
    "convnext_base_w_320": _cx("convnext_base", 320, "linear", 640, 640, 12),
    "convnext_large_d": _cx("convnext_large", 256, "mlp", 768, 768, 16),
    "convnext_large_d_320": _cx("convnext_large", 320, "mlp", 768, 768, 16),
    "convnext_xxlarge": _cx("convnext_xxlarge", 256, "linear", 1024, 1024, 24),
}
for _name, _config in CONVNEXTS.items():
  registry.register(_name, _config)


clip_lib.MODEL_CLASSES[ConvNeXtCLIPConfig] = ConvNeXtCLIP  # built by clip.create / from_config
