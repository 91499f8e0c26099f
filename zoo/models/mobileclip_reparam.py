"""MobileCLIP's FastViT-MCi tower re-parameterized: the train-time branches fused for inference.

`reparameterize(model)` returns a copy of a MobileCLIP model whose re-parameterisable blocks are
single convs with bias, as timm's fastvit `reparameterize` methods (`inference_mode=True`) build
them: every MobileOne block (identity BN + k x k conv+BN branches + 1x1 conv+BN scale branch,
stem and final conv included) and large-kernel downsampling conv (7x7 + 3x3 conv+BN) becomes
`reparam_conv` (+ its SE and GELU), a RepMixer (x + gamma (mixer(x) - norm(x))) one depthwise
`reparam_conv`, a conditional positional encoding (x + dw conv(x)) one `reparam_conv`. The
batch norms timm keeps (ConvMlp's conv+BN, the attention stages' norm) stay. The outputs equal
the train-time model's up to float rounding; the caller's model is not changed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.models import mobileclip as mc
from zoo.models.layers import gelu

Array = jax.Array


class RepConvAct(nnx.Module):
  """timm MobileOneBlock / ReparamLargeKernelConv in inference mode: act(se(reparam_conv(x)))."""

  def __init__(self, reparam_conv: mc.Conv, se: mc.SqueezeExcite | None, act: bool):
    self.reparam_conv, self.se, self.act = reparam_conv, se, act

  def __call__(self, x: Array) -> Array:
    x = self.reparam_conv(x)
    if self.se is not None:
      x = self.se(x)
    return gelu(x) if self.act else x


class RepConv(nnx.Module):
  """timm RepMixer / RepConditionalPosEnc in inference mode: one conv with bias (no skip)."""

  def __init__(self, reparam_conv: mc.Conv):
    self.reparam_conv = reparam_conv

  def __call__(self, x: Array) -> Array:
    return self.reparam_conv(x)


def _fuse_bn(kernel: Array, bn: mc.BatchNorm) -> tuple[Array, Array]:
  """A bias-free HWIO conv followed by batch norm -> (kernel, bias)."""
  t = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.eps)
  return kernel * t, bn.bias[...] - bn.mean[...] * t


def _identity(k: int, channels: int, groups: int) -> Array:
  """The HWIO kernel of a k x k (grouped) conv that returns its input."""
  per_group = channels // groups
  eye = jnp.zeros((k, k, per_group, channels), jnp.float32)
  return eye.at[k // 2, k // 2, jnp.arange(channels) % per_group, jnp.arange(channels)].set(1.0)


def _conv(kernel: Array, bias: Array, *, stride: int, groups: int, pad: int, dtype) -> mc.Conv:
  k, _, d_in_g, d_out = kernel.shape
  conv = mc.Conv(d_in_g * groups, d_out, k, stride=stride, groups=groups, bias=True, pad=pad,
                 dtype=dtype, rngs=nnx.Rngs(0))
  conv.kernel[...], conv.bias[...] = kernel, bias
  return conv


def _mobileone_kernel_bias(block: mc.MobileOne, k: int, groups: int) -> tuple[Array, Array]:
  """timm MobileOneBlock._get_kernel_bias over the HWIO kernels."""
  kernel, bias = 0.0, 0.0
  if block.conv_scale is not None:
    ks, bs = _fuse_bn(block.conv_scale.conv.kernel[...], block.conv_scale.bn)
    p = k // 2
    kernel, bias = kernel + jnp.pad(ks, ((p, p), (p, p), (0, 0), (0, 0))), bias + bs
  if block.identity is not None:
    n = block.identity.scale.shape[0]
    ki, bi = _fuse_bn(_identity(k, n, groups), block.identity)
    kernel, bias = kernel + ki, bias + bi
  for branch in block.conv_kxk:
    kb, bb = _fuse_bn(branch.conv.kernel[...], branch.bn)
    kernel, bias = kernel + kb, bias + bb
  return kernel, bias


def fuse_mobileone(block: mc.MobileOne) -> RepConvAct:
  conv = block.conv_kxk[0].conv
  k = conv.kernel.shape[0]
  kernel, bias = _mobileone_kernel_bias(block, k, conv.groups)
  return RepConvAct(_conv(kernel, bias, stride=conv.stride, groups=conv.groups, pad=conv.pad,
                          dtype=conv.dtype), block.se, block.act)


def fuse_large_kernel(block: mc.LargeKernelConv) -> RepConvAct:
  large, small = block.large_conv.conv, block.small_conv.conv
  kernel, bias = _fuse_bn(large.kernel[...], block.large_conv.bn)
  ks, bs = _fuse_bn(small.kernel[...], block.small_conv.bn)
  p = (large.kernel.shape[0] - small.kernel.shape[0]) // 2
  kernel, bias = kernel + jnp.pad(ks, ((p, p), (p, p), (0, 0), (0, 0))), bias + bs
  return RepConvAct(_conv(kernel, bias, stride=large.stride, groups=large.groups, pad=large.pad,
                          dtype=large.dtype), block.se, block.act)


def fuse_repmixer(mixer: mc.RepMixer) -> RepConv:
  """x + gamma (mixer(x) - norm(x)) -> one depthwise conv (timm RepMixer.reparameterize)."""
  conv = mixer.mixer.conv_kxk[0].conv
  k, groups = conv.kernel.shape[0], conv.groups
  km, bm = _mobileone_kernel_bias(mixer.mixer, k, groups)
  kn, bn = _mobileone_kernel_bias(mixer.norm, k, groups)
  gamma = mixer.layer_scale.gamma[...]
  kernel = _identity(k, gamma.shape[0], groups) + gamma * (km - kn)
  return RepConv(_conv(kernel, gamma * (bm - bn), stride=1, groups=groups, pad=conv.pad,
                       dtype=conv.dtype))


def fuse_pos_enc(pos: mc.PosEnc) -> RepConv:
  """x + dw conv(x) -> one depthwise conv (timm RepConditionalPosEnc.reparameterize)."""
  conv = pos.pos_enc
  k = conv.kernel.shape[0]
  kernel = _identity(k, conv.kernel.shape[-1], conv.groups) + conv.kernel[...]
  return RepConv(_conv(kernel, conv.bias[...], stride=1, groups=conv.groups, pad=conv.pad,
                       dtype=conv.dtype))


def reparameterize(model: mc.MobileCLIP) -> mc.MobileCLIP:
  """A copy of `model` (MobileCLIP, FastViT-MCi tower) in the fused inference form."""
  if not isinstance(model, mc.MobileCLIP):
    raise TypeError(f"reparameterize takes a MobileCLIP (FastViT-MCi) model, got "
                    f"{type(model).__name__}")
  model = nnx.clone(model)
  visual = model.visual
  for i, block in enumerate(visual.stem):
    if isinstance(block, mc.MobileOne):
      visual.stem[i] = fuse_mobileone(block)
  for stage in visual.stages:
    if stage.downsample is not None and isinstance(stage.downsample.proj[0], mc.LargeKernelConv):
      proj = stage.downsample.proj
      proj[0], proj[1] = fuse_large_kernel(proj[0]), fuse_mobileone(proj[1])
    if isinstance(stage.pos_emb, mc.PosEnc):
      stage.pos_emb = fuse_pos_enc(stage.pos_emb)
    for block in stage.blocks:
      if isinstance(block, mc.RepMixerBlock) and isinstance(block.token_mixer, mc.RepMixer):
        block.token_mixer = fuse_repmixer(block.token_mixer)
  if isinstance(visual.final_conv, mc.MobileOne):
    visual.final_conv = fuse_mobileone(visual.final_conv)
  return model
