"""ModifiedResNet CLIP (OpenAI's RN50 / RN101 / RN50x4 / RN50x16 / RN50x64), NHWC.

open_clip's `ModifiedResNet`: a stem of three 3x3 convs (the first strided) and a 2x2 average
pool; bottleneck stages whose strided blocks are anti-aliased (a 2x2 average pool after the
3x3 conv, and before the 1x1 downsample conv, instead of strided convs); attention pooling
(the mean token + learned positions, one multi-head attention read at the mean token, then
`c_proj`). Batch-norm statistics are `nnx.BatchStat` state, not parameters: frozen by default
(running statistics used, never updated); `set_batch_norm(model, update=True)` makes every
BatchNorm normalise with the batch's statistics and update the running ones as torch's
`.train()` does. The text tower is CLIP's. The total stride is 32: an image side that is not a
multiple of 32 is refused.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models import clip as clip_lib, configs as registry
from zoo.models.layers import Linear, LoRAConv, param

Array = jax.Array
STRIDE = 32


@dataclasses.dataclass(frozen=True)
class ResNetVisionConfig:
  """open_clip's ResNet vision_cfg: `layers` blocks per stage, stem `width`, heads of the
  attention pool = width * 32 // head_width."""

  image_size: int = 224
  layers: tuple[int, int, int, int] = (3, 4, 6, 3)
  width: int = 64
  head_width: int = 64
  bn_eps: float = 1e-5

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
    if len(self.layers) != 4:
      raise ValueError(f"ResNet layers {self.layers}: expected 4 stages")
    if self.image_size % STRIDE:
      raise ValueError(f"image size {self.image_size}: a ModifiedResNet needs a multiple of "
                       f"{STRIDE} (its total stride)")

  @property
  def heads(self) -> int:
    return self.width * 32 // self.head_width

  @property
  def grid_size(self) -> int:
    return self.image_size // STRIDE


@dataclasses.dataclass(frozen=True)
class ResNetCLIPConfig(registry.CLIPConfig):
  """A CLIPConfig whose image tower is a ModifiedResNet."""

  vision: ResNetVisionConfig = ResNetVisionConfig()


def _avg_pool(x: Array, k: int) -> Array:
  """nn.AvgPool2d(k) on NHWC (stride k, remainder dropped)."""
  if k == 1:
    return x
  s = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, (1, k, k, 1), (1, k, k, 1),
                            "VALID")
  return s / (k * k)


class Conv(LoRAConv):
  """A bias-free k x k conv, HWIO kernel (output channels on the 'mlp' logical axis)."""

  def __init__(self, d_in: int, d_out: int, k: int, *, stride: int = 1, dtype=jnp.float32,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal((2.0 / (k * k * d_in)) ** 0.5)
    self.kernel = param(rngs, init, (k, k, d_in, d_out), (None, None, None, "mlp"))
    self.kernel_lora = nnx.data(None)  # zoo.models.lora.apply_lora attaches one
    self.stride, self.pad, self.dtype = stride, k // 2, dtype

  def __call__(self, x: Array) -> Array:
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.conv_kernel().astype(self.dtype), (self.stride,) * 2,
        [(self.pad, self.pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm(nnx.Module):
  """nn.BatchNorm2d over the channel axis; running statistics are nnx.BatchStat
  (`num_batches_tracked` kept for open_clip's state dict). Frozen (`update` False): the running
  statistics normalise. `update`: torch's train mode: the batch's mean / biased variance over
  every axis but the channels normalise (differentiated), and the running statistics move by
  `momentum` (torch's 0.1) towards them, the variance unbiased. Under a mesh the means run over
  the global (sharded) batch: synchronised batch norm."""

  momentum = 0.1

  def __init__(self, n: int, *, eps: float = 1e-5, zero_init: bool = False):
    self.scale = nnx.Param((jnp.zeros if zero_init else jnp.ones)((n,), jnp.float32),
                           eager_sharding=False, out_sharding=("mlp",))
    self.bias = nnx.Param(jnp.zeros((n,), jnp.float32), eager_sharding=False,
                          out_sharding=("mlp",))
    self.mean = nnx.BatchStat(jnp.zeros((n,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((n,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.eps, self.update = eps, False

  def __call__(self, x: Array) -> Array:
    if self.update:
      return self._batch_stats(x)
    inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
    return (x - self.mean[...].astype(x.dtype)) * inv.astype(x.dtype) + self.bias[...].astype(x.dtype)

  def _batch_stats(self, x: Array) -> Array:
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes)
    var = jnp.mean(jnp.square(xf - mean), axes)
    n = int(np.prod(x.shape[:-1]))
    m, sg = self.momentum, jax.lax.stop_gradient
    self.mean[...] = (1 - m) * self.mean[...] + m * sg(mean)
    self.var[...] = (1 - m) * self.var[...] + m * sg(var) * (n / max(n - 1, 1))
    self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    inv = jax.lax.rsqrt(var + self.eps) * self.scale[...]
    return ((xf - mean) * inv + self.bias[...]).astype(x.dtype)


def set_batch_norm(model: nnx.Module, update: bool) -> int:
  """Puts every BatchNorm of `model` in update (torch `.train()`) or frozen mode; returns how
  many there are."""
  norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
  for m in norms:
    m.update = bool(update)
  return len(norms)


class Bottleneck(nnx.Module):
  def __init__(self, d_in: int, planes: int, stride: int, *, eps: float, dtype, rngs: nnx.Rngs):
    out = planes * 4
    self.conv1 = Conv(d_in, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(planes, eps=eps)
    self.conv2 = Conv(planes, planes, 3, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(planes, eps=eps)
    self.conv3 = Conv(planes, out, 1, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(out, eps=eps, zero_init=True)
    self.stride = stride
    if stride > 1 or d_in != out:
      self.downsample_conv = Conv(d_in, out, 1, dtype=dtype, rngs=rngs)
      self.downsample_bn = BatchNorm(out, eps=eps)
    else:
      self.downsample_conv = self.downsample_bn = nnx.data(None)

  def __call__(self, x: Array) -> Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(_avg_pool(y, self.stride)))
    if self.downsample_conv is not None:
      x = self.downsample_bn(self.downsample_conv(_avg_pool(x, self.stride)))
    return jax.nn.relu(y + x)


class AttentionPool(nnx.Module):
  """open_clip's AttentionPool2d: mean token + positions, attention read at the mean token."""

  def __init__(self, grid: int, width: int, heads: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
    self.positional_embedding = param(rngs, nnx.initializers.normal(width ** -0.5),
                                      (grid * grid + 1, width), (None, "embed"))
    std = width ** -0.5
    self.q_proj, self.k_proj, self.v_proj = (
        Linear(width, width, axes=("embed", "heads"), std=std, dtype=dtype, rngs=rngs)
        for _ in range(3))
    self.c_proj = Linear(width, out_dim, axes=("heads", None), std=std, dtype=dtype, rngs=rngs)
    self.heads = heads

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    x = x + self.positional_embedding[...].astype(x.dtype)
    dh = c // self.heads
    q = self.q_proj(x[:, :1]).reshape(b, 1, self.heads, dh)
    k = self.k_proj(x).reshape(b, -1, self.heads, dh)
    v = self.v_proj(x).reshape(b, -1, self.heads, dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * dh ** -0.5, k).astype(jnp.float32)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, c)
    return self.c_proj(out)


class ModifiedResNet(nnx.Module):
  """NHWC images [B, S, S, 3] (S = config.image_size) -> [B, embed_dim]."""

  def __init__(self, cfg: ResNetVisionConfig, embed_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg, w, eps = cfg, cfg.width, cfg.bn_eps
    self.conv1 = Conv(3, w // 2, 3, stride=2, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(w // 2, eps=eps)
    self.conv2 = Conv(w // 2, w // 2, 3, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(w // 2, eps=eps)
    self.conv3 = Conv(w // 2, w, 3, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(w, eps=eps)
    stages, d_in = [], w
    for i, blocks in enumerate(cfg.layers):
      planes = w * 2 ** i
      stage = []
      for j in range(blocks):
        stage.append(Bottleneck(d_in, planes, 2 if (i > 0 and j == 0) else 1, eps=eps,
                                dtype=dtype, rngs=rngs))
        d_in = planes * 4
      stages.append(nnx.List(stage))
    self.layers = nnx.List(stages)
    self.attnpool = AttentionPool(cfg.grid_size, w * 32, cfg.heads, embed_dim, dtype=dtype,
                                  rngs=rngs)

  def __call__(self, images: Array) -> Array:
    size = self.cfg.image_size
    if images.ndim != 4 or tuple(images.shape[1:3]) != (size, size):
      raise ValueError(f"images of shape {tuple(images.shape)}: this ModifiedResNet takes "
                       f"[B, {size}, {size}, 3] (its attention pool is fixed to a "
                       f"{self.cfg.grid_size}x{self.cfg.grid_size} grid)")
    x = jax.nn.relu(self.bn1(self.conv1(images)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    x = _avg_pool(jax.nn.relu(self.bn3(self.conv3(x))), 2)
    for stage in self.layers:
      for block in stage:
        x = block(x)
    return self.attnpool(x)


class ResNetCLIP(clip_lib.CLIP):
  """CLIP with a ModifiedResNet image tower (encode_image / encode_text / __call__ as CLIP)."""

  def image_tower(self, config: ResNetCLIPConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return ModifiedResNet(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)


def _rn(image_size: int, layers, width: int, embed_dim: int, text_width: int, text_heads: int):
  return ResNetCLIPConfig(embed_dim, ResNetVisionConfig(image_size, tuple(layers), width),
                          registry.TextConfig(width=text_width, heads=text_heads, layers=12))


# open_clip's model_configs/RN*.json (and their -quickgelu forms, OpenAI's weights).
RESNETS = {
    "RN50": _rn(224, (3, 4, 6, 3), 64, 1024, 512, 8),
    "RN101": _rn(224, (3, 4, 23, 3), 64, 512, 512, 8),
    "RN50x4": _rn(288, (4, 6, 10, 6), 80, 640, 640, 10),
    "RN50x16": _rn(384, (6, 8, 18, 8), 96, 768, 768, 12),
    "RN50x64": _rn(448, (3, 15, 36, 10), 128, 1024, 1024, 16),
}
for _name, _config in RESNETS.items():
  registry.register(_name, _config)
  registry.register(f"{_name}-quickgelu", dataclasses.replace(_config, quick_gelu=True))


clip_lib.MODEL_CLASSES[ResNetCLIPConfig] = ResNetCLIP  # built by clip.create / from_config
