"""Transformer building blocks shared by every tower (Flax NNX).

Parameters are float32 and carry logical axis names in the `out_sharding` metadata
(`embed`, `heads`, `head_dim`, `mlp`, `vocab`, `norm`); `zoo/models/sharding.py` maps them onto mesh
axes. Matmuls run in the compute `dtype`; LayerNorm statistics and softmax run in float32.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from zoo.models import sharding

Array = jax.Array


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], axes: tuple[str | None, ...]
          ) -> nnx.Param:
  """A float32 parameter annotated with logical axis names (one per dimension)."""
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, jnp.float32), eager_sharding=False, out_sharding=axes)


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, as torch.nn.GELU(): x/2 (1 + erf(x/sqrt 2)), torch's own formula.

  (jax.nn.gelu goes through erfc, which XLA:CPU evaluates several times slower than erf.)
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(2 ** -0.5)).astype(x.dtype))


def gelu_tanh(x: Array) -> Array:
  """tanh-approximated GELU, as torch.nn.GELU(approximate='tanh') (SigLIP 2, big_vision)."""
  return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu, "quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh}


def get_activation(quick: bool | str) -> Callable[[Array], Array]:
  """QuickGELU (True) or GELU (False); a string names any of ACTIVATIONS (the towers' `act`
  setting travels through the same `quick_gelu` argument)."""
  if isinstance(quick, str):
    if quick not in ACTIVATIONS:
      raise ValueError(f"unknown activation {quick!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[quick]
  return quick_gelu if quick else gelu


def shard_batch(x: Array) -> Array:
  """`x` with dim 0 (batch, or batch * tokens) constrained to the mesh's batch axes, when traced
  under a mesh (`jax.set_mesh`, as the trainer does) whose batch axes split it; else unchanged.
  Without it GSPMD may gather activations over `fsdp` instead of the fsdp-sharded weights (a
  64-chip ViT-B/16 step computed MLP hiddens of the global batch on every chip)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  axes = tuple(a for a in sharding.BATCH_AXES if a in types and mesh.shape[a] > 1)
  if (not axes or x.ndim == 0 or x.shape[0] % math.prod(mesh.shape[a] for a in axes)
      or any(types[a] == jax.sharding.AxisType.Manual for a in axes)):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the input dtype (as open_clip's LayerNorm)."""

  def __init__(self, width: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((width,), jnp.float32), eager_sharding=False, out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((width,), jnp.float32), eager_sharding=False, out_sharding=("norm",))

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(dtype)


class Linear(nnx.Module):
  """y = x @ kernel + bias with logical axes (in_axis, out_axis); kernel stored [in, out]."""

  def __init__(self, d_in: int, d_out: int, *, axes: tuple[str | None, str | None],
               use_bias: bool = True, std: float | None = None, dtype=jnp.float32,
               rngs: nnx.Rngs):
    std = d_in ** -0.5 if std is None else std
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.normal(std), (d_in, d_out), axes)
    self.bias = (nnx.Param(jnp.zeros((d_out,), jnp.float32), eager_sharding=False, out_sharding=(axes[1],))
                 if use_bias else None)
    # Low-rank update (a zoo.models.lora.LoRA) attached by zoo.models.lora.apply_lora; None = plain layer.
    self.kernel_lora = nnx.data(None)

  def __call__(self, x: Array) -> Array:
    # A 2-D matmul: XLA:CPU maps its backward (dx, dkernel) onto plain GEMMs, where a dot
    # over [B, L, W] contracts two axes for dkernel and materializes transposed copies.
    lead = x.shape[:-1]
    x = x.astype(self.dtype).reshape(-1, x.shape[-1])
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.kernel_lora is not None:
      y = y + self.kernel_lora(x)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return shard_batch(y).reshape(*lead, y.shape[-1])


class LoRAConv(nnx.Module):
  """Base of the conv layers (HWIO `kernel` [k, k, d_in / groups, d_out]) that LoRA adapts.

  `kernel_lora` (a zoo.models.lora.LoRA over the kernel seen as [k*k*d_in/groups, d_out]) is
  added to the kernel before the conv (the merged-kernel form: one path for plain, grouped and
  depthwise convs, at a cost independent of the batch); merge_lora adds the same update.
  """

  kernel_lora = None

  def conv_kernel(self) -> Array:
    k = self.kernel[...]
    if self.kernel_lora is None:
      return k
    return (k.astype(jnp.float32) + self.kernel_lora.delta().reshape(k.shape)).astype(k.dtype)


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
                          is_causal: bool = False) -> Array:
  """softmax(q k^T / sqrt(Dh)) v for q, k, v [B, L, H, Dh] -> [B, L, H, Dh].

  The same math as jax.nn.dot_product_attention's XLA path (float32 logits and softmax), but
  the heads are moved next to the batch once, so both batched matmuls (and their gradients)
  have their batch axes leading and XLA:CPU adds no per-dot transposes. `mask` broadcasts to
  [B, H, L, L] (True = attend).
  """
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * np.float32(q.shape[-1] ** -0.5)
  if is_causal:
    n_q, n_k = logits.shape[-2:]
    causal = jnp.arange(n_q)[:, None] >= jnp.arange(n_k)[None, :]
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    logits = jnp.where(mask, logits, np.float32(-0.7 * np.finfo(np.float32).max))
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, v), 1, 2)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (see `dot_product_attention`).

  qkv kernel [W, 3, H, Dh] and out kernel [H, Dh, W] keep heads on their own axis so tensor
  parallelism can shard them. `qkv_lora` / `out_lora` (zoo.models.lora.LoRA, attached by
  zoo.models.lora.apply_lora) add low-rank updates of those kernels seen as [W, 3*H*Dh] / [H*Dh, W].
  """

  def __init__(self, width: int, heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs,
               out_std: float | None = None):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by heads {heads}")
    head_dim = width // heads
    self.heads, self.head_dim, self.dtype = heads, head_dim, dtype
    self.qkv_kernel = param(rngs, nnx.initializers.normal(width ** -0.5),
                            (width, 3, heads, head_dim), ("embed", None, "heads", "head_dim"))
    self.qkv_bias = nnx.Param(jnp.zeros((3, heads, head_dim), jnp.float32),
                              eager_sharding=False, out_sharding=(None, "heads", "head_dim"))
    self.out_kernel = param(rngs, nnx.initializers.normal(out_std or width ** -0.5),
                            (heads, head_dim, width), ("heads", "head_dim", "embed"))
    self.out_bias = nnx.Param(jnp.zeros((width,), jnp.float32), eager_sharding=False, out_sharding=("embed",))
    self.qkv_lora = nnx.data(None)
    self.out_lora = nnx.data(None)

  def __call__(self, x: Array, *, mask: Array | None = None, is_causal: bool = False) -> Array:
    """x [B, L, W]; mask broadcastable to [B, H, L, L] (True = attend)."""
    dt = self.dtype
    b, length, width = x.shape
    # Projections over the flattened tokens [B*L, W], output in the kernels' own axis order:
    # one contracting axis each way, so forward and backward are plain GEMMs (no transposes).
    x = x.astype(dt).reshape(b * length, width)
    qkv = jnp.einsum("nd,dthk->nthk", x, self.qkv_kernel[...].astype(dt))
    if self.qkv_lora is not None:
      qkv = qkv + self.qkv_lora(x).reshape(qkv.shape)
    qkv = shard_batch(qkv + self.qkv_bias[...].astype(dt)).reshape(b, length, *qkv.shape[1:])
    heads = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=mask,
                                  is_causal=is_causal)
    heads = heads.reshape(b * length, self.heads, self.head_dim)
    out = jnp.einsum("nhk,hkd->nd", heads, self.out_kernel[...].astype(dt))
    if self.out_lora is not None:
      out = out + self.out_lora(heads.reshape(b * length, -1))
    return shard_batch(out + self.out_bias[...].astype(dt)).reshape(b, length, -1)


class MLP(nnx.Module):
  """fc1 -> activation -> fc2 (open_clip's c_fc / c_proj)."""

  def __init__(self, width: int, hidden: int, *, quick_gelu: bool = False, dtype=jnp.float32,
               rngs: nnx.Rngs, out_std: float | None = None):
    self.fc1 = Linear(width, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs,
                      std=(2 * width) ** -0.5)
    self.fc2 = Linear(hidden, width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs,
                      std=out_std)
    self.quick_gelu = quick_gelu

  def __call__(self, x: Array) -> Array:
    return self.fc2(get_activation(self.quick_gelu)(self.fc1(x)))


class ResidualBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x)).

  `mlp` is any module mapping [B, L, W] -> [B, L, W]; CLIP-MoE swaps it for an MoE layer.
  """

  def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, quick_gelu: bool = False,
               eps: float = 1e-5, layers_for_init: int = 12, dtype=jnp.float32,
               rngs: nnx.Rngs):
    out_std = (width ** -0.5) * ((2 * layers_for_init) ** -0.5)
    self.ln_1 = LayerNorm(width, eps=eps, rngs=rngs)
    self.attn = Attention(width, heads, dtype=dtype, rngs=rngs, out_std=out_std)
    self.ln_2 = LayerNorm(width, eps=eps, rngs=rngs)
    self.mlp = MLP(width, int(width * mlp_ratio), quick_gelu=quick_gelu, dtype=dtype, rngs=rngs,
                   out_std=out_std)

  def __call__(self, x: Array, *, mask: Array | None = None, is_causal: bool = False) -> Array:
    x = x + self.attn(self.ln_1(x), mask=mask, is_causal=is_causal).astype(x.dtype)
    return x + self.mlp(self.ln_2(x)).astype(x.dtype)


# Gradient checkpointing of each residual block: what its backward may keep from the forward.
REMAT_POLICIES: dict[str, Callable | None] = {
    # Keep the matmul outputs (projections, MLP); recompute norms, GELU, softmax, attention.
    "block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep nothing but the block's input: the whole block forward runs again in the backward.
    "full": jax.checkpoint_policies.nothing_saveable,
}
REMAT_MODES = ("none", *REMAT_POLICIES)


def check_remat(mode: str) -> str:
  if mode not in REMAT_MODES:
    raise ValueError(f"unknown remat {mode!r}; expected one of {', '.join(REMAT_MODES)}")
  return mode


class Transformer(nnx.Module):
  """A stack of residual blocks (a python list so each block can be converted/replaced).

  `remat` ('none' | 'block' | 'full', see REMAT_POLICIES) wraps each block in nnx.remat:
  activations inside a block are recomputed in the backward instead of stored.
  """

  def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, *,
               quick_gelu: bool = False, eps: float = 1e-5, dtype=jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    self.remat = check_remat(remat)
    self.resblocks = nnx.List([
        ResidualBlock(width, heads, mlp_ratio, quick_gelu=quick_gelu, eps=eps,
                      layers_for_init=layers, dtype=dtype, rngs=rngs)
        for _ in range(layers)
    ])

  def __call__(self, x: Array, *, mask: Array | None = None, is_causal: bool = False,
               before_block: Callable[[int, Array], Array] | None = None) -> Array:
    """`before_block(i, x)` (optional) maps the input of block i (deep prompts, e.g. MaPLe)."""
    def run(block: nnx.Module, x: Array) -> Array:
      return block(x, mask=mask, is_causal=is_causal)

    if self.remat != "none":
      run = nnx.remat(run, policy=REMAT_POLICIES[self.remat])
    for i, block in enumerate(self.resblocks):
      if before_block is not None:
        x = before_block(i, x)
      x = run(block, shard_batch(x))
    return shard_batch(x)


def set_remat(model: nnx.Module, mode: str) -> int:
  """Sets `remat` on every Transformer inside `model` (any family); returns how many."""
  check_remat(mode)
  found = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, Transformer):
      node.remat = mode
      found += 1
  return found


class AttentionPool(nnx.Module):
  """SigLIP's multi-head attention pooling (MAP) head: one learned query attends to all tokens.

  Layout mirrors timm's `attn_pool`: latent, q, kv, proj, norm, mlp (fc1, fc2).
  """

  def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, eps: float = 1e-6,
               quick_gelu: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    self.heads, self.dtype = heads, dtype
    self.latent = param(rngs, nnx.initializers.normal(width ** -0.5), (1, width), (None, "embed"))
    self.q = Linear(width, width, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.kv = Linear(width, 2 * width, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.proj = Linear(width, width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(width, eps=eps, rngs=rngs)
    self.mlp = MLP(width, int(width * mlp_ratio), quick_gelu=quick_gelu, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """x [B, N, W] -> [B, W]; `mask` [B, N] (True = a real token) leaves padding out."""
    b, n, w = x.shape
    h = self.heads
    q = self.q(jnp.broadcast_to(self.latent[...], (b, 1, w)).astype(x.dtype))
    kv = self.kv(x).reshape(b, n, 2, h, w // h)
    out = jax.nn.dot_product_attention(
        q.reshape(b, 1, h, w // h), kv[:, :, 0], kv[:, :, 1],
        mask=None if mask is None else mask[:, None, None, :])
    out = self.proj(out.reshape(b, 1, w))
    out = out + self.mlp(self.norm(out))
    return out[:, 0]


def resize_positions(grid: Array, spatial_shapes: Array, length: int) -> Array:
  """The learned position grid [G, G, W] resized to each image's (rows, cols) patch grid,
  flattened row-major and padded to `length`: [B, length, W] (padding rows repeat the first
  position). Bilinear with antialias, half-pixel centres: F.interpolate(mode='bilinear',
  align_corners=False, antialias=True), written as its per-axis triangle weights (as
  transformers' Siglip2VisionEmbeddings.resize_positional_embeddings); works under jit with
  traced `spatial_shapes` [B, 2]."""
  g = grid.shape[0]
  sizes = jnp.asarray(spatial_shapes, jnp.float32)[:, None, :]  # [B, 1, 2]
  pos = jnp.arange(length, dtype=jnp.float32)[None, :, None]  # [1, L, 1]
  rows = jnp.floor(pos / sizes[..., 1:])
  index = jnp.concatenate([rows, pos - rows * sizes[..., 1:]], axis=-1)  # [B, L, 2]
  index = index * (pos < jnp.prod(sizes, -1, keepdims=True))
  scale = g / sizes
  support = jnp.maximum(scale, 1.0)
  center = (index + 0.5) * scale - 0.5
  source = jnp.arange(g, dtype=jnp.float32)
  w = jnp.maximum(1 - jnp.abs(source - center[..., None]) / support[..., None], 0.0)
  w = w / w.sum(-1, keepdims=True)  # [B, L, 2, G]
  weights = (w[..., 0, :, None] * w[..., 1, None, :]).reshape(*w.shape[:2], g * g)
  flat = grid.reshape(g * g, -1).astype(jnp.float32)
  return jnp.einsum("blk,kw->blw", weights, flat, precision=jax.lax.Precision.HIGHEST)
