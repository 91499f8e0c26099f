"""EVA01 / EVA02 / PE-Core CLIP: timm's `Eva` vision trunk as open_clip's TimmModel wraps it, NHWC.

The trunk (timm eva.py): a patch conv (no bias after PE's pre-transformer norm), a class token
or none, learned absolute positions, [norm_pre], blocks, then 'token' (class token after the
final norm), 'map' (attention pool over all tokens) or 'avg' (mean of the patches + fc_norm)
pooling, and timm's head Linear(width, embed_dim) with bias. Blocks are pre-norm with optional
layer scale, or post-norm (EVA02-E: x + norm(attn(x))). Attention: q/k/v projections with q and
v biases only (EVA: fused weight + q_bias/v_bias; EVA02: separate q/k/v_proj) or all three (PE);
2-D rotary positions on the patch tokens (timm's RotaryEmbeddingCat: interleaved pairs,
per-axis bands 1/T^(i/n), 'ij' or 'xy' grid, EVA02's rescale to a reference grid, PE's +1
offset); sub-LN inside attention (before the output projection) and inside the MLP. MLPs: GELU,
or SwiGLU, unpacked (fc1_g, fc1_x) or packed (one fc1, gate first). The text tower is CLIP's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models import clip as clip_lib, configs as registry
from zoo.models.layers import AttentionPool, LayerNorm, Linear, dot_product_attention, gelu, param

Array = jax.Array
QKV_LAYOUTS = ("fused", "separate", "fused_bias")
MLPS = ("gelu", "swiglu", "swiglu_packed")
POOLS = ("token", "map", "avg")


@dataclasses.dataclass(frozen=True)
class EvaVisionConfig:
  """timm Eva's hyper-parameters as open_clip's trunks use them. `qkv`: 'fused' (qkv.weight +
  q_bias, v_bias: EVA01, EVA02-E), 'separate' (q/k/v_proj, no k bias: EVA02 B/L), 'fused_bias'
  (qkv.weight + qkv.bias: PE). `mlp_dim` is timm's int(width * mlp_ratio)."""

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  mlp: str = "gelu"
  scale_mlp: bool = False  # LayerNorm on the MLP's hidden activations (sub-LN)
  scale_attn: bool = False  # LayerNorm on the attention output before its projection
  qkv: str = "fused"
  post_norm: bool = False
  norm_pre: bool = False  # PE: LayerNorm before the blocks; the patch conv then has no bias
  class_token: bool = True
  layer_scale: bool = False
  rope: bool = False
  rope_ref: int = 0  # EVA02: positions rescaled to this reference grid side (0 = none)
  rope_offset: float = 0.0
  rope_xy: bool = False  # timm's grid_indexing 'xy' (PE) instead of 'ij'
  rope_temperature: float = 10000.0
  pool: str = "token"
  pool_heads: int = 8
  pool_mlp_ratio: float = 4.0
  ln_eps: float = 1e-6

  def __post_init__(self):
    for key, allowed in (("qkv", QKV_LAYOUTS), ("mlp", MLPS), ("pool", POOLS)):
      if getattr(self, key) not in allowed:
        raise ValueError(f"Eva {key} {getattr(self, key)!r}: expected one of {', '.join(allowed)}")
    if self.pool == "token" and not self.class_token:
      raise ValueError("Eva pool 'token' needs the class token")
    if self.width % self.heads or (self.width // self.heads) % 4 and self.rope:
      raise ValueError(f"Eva width {self.width} / heads {self.heads}: the head width must divide "
                       "evenly (and by 4 with rotary positions)")
    if self.image_size % self.patch_size:
      raise ValueError(f"Eva image size {self.image_size} is not a multiple of the patch "
                       f"{self.patch_size}")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def prefix_tokens(self) -> int:
    return 1 if self.class_token else 0


@dataclasses.dataclass(frozen=True)
class EvaCLIPConfig(registry.CLIPConfig):
  """A CLIPConfig whose image tower is timm's Eva (EVA01, EVA02, PE-Core)."""

  vision: EvaVisionConfig = EvaVisionConfig()


def rope_tables(cfg: EvaVisionConfig, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
  """(sin, cos) [rows*cols, head_dim] float32 of timm's RotaryEmbeddingCat (in_pixels=False):
  bands 1/T^(i/n) for n = head_dim/4, index grid (+offset, rescaled to the reference grid),
  per-axis angles concatenated, each repeated for an interleaved (x0, x1) pair."""
  dh = cfg.width // cfg.heads
  n = dh // 4
  bands = np.float32(1.0) / (np.float32(cfg.rope_temperature)
                             ** (np.arange(n, dtype=np.float32) / np.float32(n)))
  shape = [rows, cols]
  if cfg.rope_xy:
    shape = shape[::-1]
  axes = [np.arange(s, dtype=np.float32) + np.float32(cfg.rope_offset) for s in shape]
  if cfg.rope_ref:
    axes = [a / np.float32(s) * np.float32(cfg.rope_ref) for a, s in zip(axes, shape)]
  grid = np.stack(np.meshgrid(*axes, indexing="xy" if cfg.rope_xy else "ij"), axis=-1)
  angles = (grid[..., None] * bands).reshape(rows * cols, 2 * n)
  sin, cos = np.sin(angles, dtype=np.float32), np.cos(angles, dtype=np.float32)
  return np.repeat(sin, 2, axis=-1), np.repeat(cos, 2, axis=-1)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
  """x [B, N, H, Dh] rotated in interleaved pairs: x * cos + (-x1, x0, -x3, x2, ...) * sin."""
  rot = jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
  return (x * cos[:, None, :] + rot * sin[:, None, :]).astype(x.dtype)


class EvaAttention(nnx.Module):
  """Self-attention with zoo's [W, 3, H, Dh] qkv kernel, q and v biases (and a k bias for PE),
  rotary positions on the patch tokens and an optional LayerNorm before the output projection."""

  def __init__(self, cfg: EvaVisionConfig, *, dtype, rngs: nnx.Rngs):
    w, h = cfg.width, cfg.heads
    dh = w // h
    self.heads, self.head_dim, self.dtype = h, dh, dtype
    self.prefix = cfg.prefix_tokens
    self.qkv_kernel = param(rngs, nnx.initializers.normal(w ** -0.5), (w, 3, h, dh),
                            ("embed", None, "heads", "head_dim"))

    def bias(shape, axes):
      return nnx.Param(jnp.zeros(shape, jnp.float32), eager_sharding=False, out_sharding=axes)

    k_bias = cfg.qkv == "fused_bias"
    self.qkv_bias = nnx.data(bias((3, h, dh), (None, "heads", "head_dim")) if k_bias else None)
    self.q_bias = nnx.data(None if k_bias else bias((h, dh), ("heads", "head_dim")))
    self.v_bias = nnx.data(None if k_bias else bias((h, dh), ("heads", "head_dim")))
    self.norm = nnx.data(LayerNorm(w, eps=cfg.ln_eps, rngs=rngs) if cfg.scale_attn else None)
    self.out_kernel = param(rngs, nnx.initializers.normal(w ** -0.5), (h, dh, w),
                            ("heads", "head_dim", "embed"))
    self.out_bias = bias((w,), ("embed",))

  def __call__(self, x: Array, rope: tuple[Array, Array] | None) -> Array:
    dt = self.dtype
    b, n, w = x.shape
    qkv = jnp.einsum("nd,dthk->nthk", x.astype(dt).reshape(b * n, w),
                     self.qkv_kernel[...].astype(dt)).reshape(b, n, 3, self.heads, self.head_dim)
    if self.qkv_bias is not None:
      qkv = qkv + self.qkv_bias[...].astype(dt)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.q_bias is not None:
      q, v = q + self.q_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
    if rope is not None:
      p = self.prefix
      q = jnp.concatenate([q[:, :p], apply_rope(q[:, p:], *rope)], axis=1)
      k = jnp.concatenate([k[:, :p], apply_rope(k[:, p:], *rope)], axis=1)
    out = dot_product_attention(q, k, v).reshape(b, n, w)
    if self.norm is not None:
      out = self.norm(out)
    out = jnp.einsum("nhk,hkd->nd", out.reshape(b * n, self.heads, self.head_dim),
                     self.out_kernel[...].astype(dt))
    return (out + self.out_bias[...].astype(dt)).reshape(b, n, w)


class EvaMLP(nnx.Module):
  """GELU MLP (fc1, fc2), SwiGLU (fc1_g, fc1_x, fc2) or packed SwiGLU (fc1 = [gate | x], fc2),
  with an optional LayerNorm on the hidden activations."""

  def __init__(self, cfg: EvaVisionConfig, *, dtype, rngs: nnx.Rngs):
    w, hidden, kind = cfg.width, cfg.mlp_dim, cfg.mlp
    self.kind = kind

    def lin(d_in, d_out, axes):
      return Linear(d_in, d_out, axes=axes, dtype=dtype, rngs=rngs)

    self.fc1 = nnx.data(None if kind == "swiglu" else
                        lin(w, 2 * hidden if kind == "swiglu_packed" else hidden, ("embed", "mlp")))
    self.fc1_g = nnx.data(lin(w, hidden, ("embed", "mlp")) if kind == "swiglu" else None)
    self.fc1_x = nnx.data(lin(w, hidden, ("embed", "mlp")) if kind == "swiglu" else None)
    self.norm = nnx.data(LayerNorm(hidden, eps=cfg.ln_eps, rngs=rngs) if cfg.scale_mlp else None)
    self.fc2 = lin(hidden, w, ("mlp", "embed"))

  def __call__(self, x: Array) -> Array:
    if self.kind == "gelu":
      h = gelu(self.fc1(x))
    elif self.kind == "swiglu":
      h = jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x)
    else:
      gate, h = jnp.split(self.fc1(x), 2, axis=-1)
      h = jax.nn.silu(gate) * h
    if self.norm is not None:
      h = self.norm(h)
    return self.fc2(h)


class EvaBlock(nnx.Module):
  """Pre-norm (x + g1 * attn(norm1(x)); x + g2 * mlp(norm2(x))) or post-norm block."""

  def __init__(self, cfg: EvaVisionConfig, *, dtype, rngs: nnx.Rngs):
    self.post_norm = cfg.post_norm
    self.norm1 = LayerNorm(cfg.width, eps=cfg.ln_eps, rngs=rngs)
    self.attn = EvaAttention(cfg, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(cfg.width, eps=cfg.ln_eps, rngs=rngs)
    self.mlp = EvaMLP(cfg, dtype=dtype, rngs=rngs)
    scale = cfg.layer_scale and not cfg.post_norm

    def gamma():
      return nnx.Param(jnp.ones((cfg.width,), jnp.float32), eager_sharding=False,
                       out_sharding=("embed",))

    self.gamma_1 = nnx.data(gamma() if scale else None)
    self.gamma_2 = nnx.data(gamma() if scale else None)

  def __call__(self, x: Array, rope: tuple[Array, Array] | None) -> Array:
    if self.post_norm:
      x = x + self.norm1(self.attn(x, rope)).astype(x.dtype)
      return x + self.norm2(self.mlp(x)).astype(x.dtype)
    y = self.attn(self.norm1(x), rope)
    if self.gamma_1 is not None:
      y = y * self.gamma_1[...].astype(y.dtype)
    x = x + y.astype(x.dtype)
    y = self.mlp(self.norm2(x))
    if self.gamma_2 is not None:
      y = y * self.gamma_2[...].astype(y.dtype)
    return x + y.astype(x.dtype)


class Eva(nnx.Module):
  """timm's Eva trunk + head: NHWC images [B, S, S, 3] -> [B, embed_dim]."""

  def __init__(self, cfg: EvaVisionConfig, embed_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    w, p = cfg.width, cfg.patch_size
    self.patch_kernel = param(rngs, nnx.initializers.normal((3 * p * p) ** -0.5), (p, p, 3, w),
                              (None, None, None, "embed"))
    self.patch_bias = nnx.data(None if cfg.norm_pre else nnx.Param(
        jnp.zeros((w,), jnp.float32), eager_sharding=False, out_sharding=("embed",)))
    self.cls_token = nnx.data(param(rngs, nnx.initializers.normal(0.02), (w,), ("embed",))
                              if cfg.class_token else None)
    self.pos_embed = param(rngs, nnx.initializers.normal(0.02),
                           (cfg.grid_size ** 2 + cfg.prefix_tokens, w), (None, "embed"))
    self.norm_pre = nnx.data(LayerNorm(w, eps=cfg.ln_eps, rngs=rngs) if cfg.norm_pre else None)
    self.blocks = nnx.List([EvaBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.layers)])
    # timm: the final norm after the blocks, or (avg pooling) fc_norm after the pool
    self.norm = LayerNorm(w, eps=cfg.ln_eps, rngs=rngs)
    self.attn_pool = nnx.data(
        AttentionPool(w, cfg.pool_heads, cfg.pool_mlp_ratio, eps=cfg.ln_eps, dtype=dtype,
                      rngs=rngs) if cfg.pool == "map" else None)
    self.head = Linear(w, embed_dim, axes=("embed", None), dtype=dtype, rngs=rngs)

  def tokens(self, images: Array) -> Array:
    """All tokens after the blocks (and the final norm unless pooling is 'avg'):
    [B, prefix + N, width]."""
    cfg = self.cfg
    b, h, w, c = images.shape
    p = cfg.patch_size
    if h != cfg.image_size or w != cfg.image_size or c != 3:
      raise ValueError(f"images of shape {tuple(images.shape)}: this Eva tower takes [B, "
                       f"{cfg.image_size}, {cfg.image_size}, 3]")
    g = cfg.grid_size
    x = images.astype(self.dtype).reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, p * p * c) @ self.patch_kernel[...].astype(self.dtype).reshape(p * p * c, -1)
    if self.patch_bias is not None:
      x = x + self.patch_bias[...].astype(self.dtype)
    x = x.reshape(b, g * g, -1)
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embed[...].astype(x.dtype)
    if self.norm_pre is not None:
      x = self.norm_pre(x)
    rope = None
    if cfg.rope:
      sin, cos = rope_tables(cfg, g, g)
      rope = (jnp.asarray(sin), jnp.asarray(cos))
    for block in self.blocks:
      x = block(x, rope)
    return x if cfg.pool == "avg" else self.norm(x)

  def __call__(self, images: Array) -> Array:
    x = self.tokens(images)
    if self.attn_pool is not None:
      pooled = self.attn_pool(x)
    elif self.cfg.pool == "avg":
      pooled = self.norm(x[:, self.cfg.prefix_tokens:].mean(axis=1))
    else:
      pooled = x[:, 0]
    return self.head(pooled)


class EvaCLIP(clip_lib.CLIP):
  """CLIP with an Eva image tower (encode_image / encode_text / __call__ as CLIP)."""

  def image_tower(self, config: EvaCLIPConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return Eva(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)


def _eva(image_size, patch, width, layers, heads, mlp_ratio, **kw) -> EvaVisionConfig:
  return EvaVisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers,
                         heads=heads, mlp_dim=int(width * mlp_ratio), **kw)


def _eva02(image_size, patch, width, layers, heads) -> EvaVisionConfig:
  return _eva(image_size, patch, width, layers, heads, 4 * 2 / 3, mlp="swiglu", scale_mlp=True,
              scale_attn=True, qkv="separate", rope=True, rope_ref=16)


def _pe(image_size, patch, width, layers, heads, mlp_ratio=4.0, **kw) -> EvaVisionConfig:
  return _eva(image_size, patch, width, layers, heads, mlp_ratio, qkv="fused_bias", norm_pre=True,
              rope=True, rope_ref=image_size // patch, rope_offset=1.0, rope_xy=True, pool="map",
              ln_eps=1e-5, **kw)


# timm (eva.py) trunks open_clip's EVA / PE-Core configs name -> their hyper-parameters.
TIMM_EVAS = {
    "eva_giant_patch14_224": _eva(224, 14, 1408, 40, 16, 6144 / 1408),
    "eva02_base_patch16_clip_224": _eva02(224, 16, 768, 12, 12),
    "eva02_large_patch14_clip_224": _eva02(224, 14, 1024, 24, 16),
    "eva02_large_patch14_clip_336": _eva02(336, 14, 1024, 24, 16),
    "eva02_enormous_patch14_clip_224": _eva(224, 14, 1792, 64, 16, 15360 / 1792, post_norm=True),
    "vit_pe_core_tiny_patch16_384": _pe(384, 16, 192, 12, 3),
    "vit_pe_core_small_patch16_384": _pe(384, 16, 384, 12, 6),
    "vit_pe_core_base_patch16_224": _pe(224, 16, 768, 12, 12),
    "vit_pe_core_large_patch14_336": _pe(336, 14, 1024, 24, 16),
    "vit_pe_core_gigantic_patch14_448": dataclasses.replace(
        _pe(448, 14, 1536, 50, 16, 8960 / 1536), class_token=False, rope_offset=0.0),
}


def _text(width: int, heads: int, layers: int, context: int = 77) -> registry.TextConfig:
  return registry.TextConfig(context_length=context, width=width, heads=heads, layers=layers)


# open_clip's model_configs/{EVA*,PE-Core*}.json: trunk, image size, embed dim, text tower.
_PE = dict(image_mean=registry.INCEPTION_MEAN, image_std=registry.INCEPTION_STD)
EVAS = {
    "EVA01-g-14": ("eva_giant_patch14_224", 224, 1024, _text(768, 12, 12), {}),
    "EVA01-g-14-plus": ("eva_giant_patch14_224", 224, 1024, _text(1024, 16, 24), {}),
    "EVA02-B-16": ("eva02_base_patch16_clip_224", 224, 512, _text(512, 8, 12), {}),
    "EVA02-L-14": ("eva02_large_patch14_clip_224", 224, 768, _text(768, 12, 12), {}),
    "EVA02-L-14-336": ("eva02_large_patch14_clip_336", 336, 768, _text(768, 12, 12), {}),
    "EVA02-E-14": ("eva02_enormous_patch14_clip_224", 224, 1024, _text(1024, 16, 24), {}),
    "EVA02-E-14-plus": ("eva02_enormous_patch14_clip_224", 224, 1024, _text(1280, 20, 32), {}),
    "PE-Core-T-16-384": ("vit_pe_core_tiny_patch16_384", 384, 512, _text(512, 8, 12, 32), _PE),
    "PE-Core-S-16-384": ("vit_pe_core_small_patch16_384", 384, 512, _text(512, 8, 12, 32), _PE),
    "PE-Core-B-16": ("vit_pe_core_base_patch16_224", 224, 1024, _text(1024, 16, 24, 32), _PE),
    "PE-Core-L-14-336": ("vit_pe_core_large_patch14_336", 336, 1024, _text(1024, 16, 24, 32),
                         _PE),
    "PE-Core-bigG-14-448": ("vit_pe_core_gigantic_patch14_448", 448, 1280,
                            _text(1280, 20, 24, 72), _PE),
}


def trunk_config(trunk: str, image_size: int) -> EvaVisionConfig:
  """The timm trunk's config at `image_size` (open_clip's vision_cfg.image_size); the rotary
  reference grid stays the trunk's (timm's ref_feat_shape)."""
  return dataclasses.replace(TIMM_EVAS[trunk], image_size=image_size)


for _name, (_trunk, _size, _embed, _txt, _extra) in EVAS.items():
  registry.register(_name, EvaCLIPConfig(_embed, trunk_config(_trunk, _size), _txt, **_extra))


clip_lib.MODEL_CLASSES[EvaCLIPConfig] = EvaCLIP  # built by clip.create / from_config
