"""LoRA adapters on any zoo model: attach, train alone, merge (files: zoo.weights.adapters).

LoRA (Hu et al., 2021) adds a trainable low-rank update to a frozen weight matrix:
y = x @ W + (x @ A @ B) * alpha / rank, with A [d_in, r] random and B [r, d_out] zero, so a
freshly attached adapter leaves the model's outputs unchanged. zoo's weights are Linear.kernel
[in, out]; Attention.qkv_kernel [W, 3, H, Dh] seen as [W, 3*H*Dh]; Attention.out_kernel
[H, Dh, W] seen as [H*Dh, W]; the HWIO kernels of ResNet / ConvNeXt / MobileCLIP convs
(layers.LoRAConv) [k, k, in/groups, out] seen as [k*k*in/groups, out] (a conv adds the update
to its kernel before convolving). Each layer carries an optional LoRA beside it (`kernel_lora`,
`qkv_lora`, `out_lora`). Kernels are addressed by their '/'-joined path in the model, e.g.
"text/transformer/resblocks/0/attn/qkv_kernel", and chosen by regular expressions
(re.search). Train only the adapters (trainable=is_lora_path); `merge_lora` folds them into
the kernels so the result is a plain zoo model again (zoo.save, conversion).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.models import layers

Array = jax.Array



# ----------------------------------------------------------------------------- the module


def _lora_a_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  """peft's A init: kaiming_uniform(a=sqrt(5)) over fan_in = d_in, i.e. U(-1/sqrt(d_in), ...)."""
  bound = shape[0] ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRA(nnx.Module):
  """Low-rank update (x @ a @ b) * alpha / rank of a [d_in, d_out] weight; b starts at zero.

  `axes` are the logical sharding names of the (flattened) base kernel's in and out
  dimensions: `a` is sharded like the kernel's rows, `b` like its columns.
  """

  def __init__(self, d_in: int, d_out: int, *, rank: int, alpha: float,
               axes: tuple[str | None, str | None] = (None, None), rngs: nnx.Rngs):
    if not isinstance(rank, (int, np.integer)) or rank <= 0:
      raise ValueError(f"LoRA rank must be a positive int; got {rank!r}")
    self.rank, self.alpha = int(rank), float(alpha)
    self.scale = self.alpha / self.rank
    self.patterns: tuple[str, ...] = ()  # the apply_lora targets that chose this kernel
    self.a = layers.param(rngs, _lora_a_init, (d_in, self.rank), (axes[0], None))
    self.b = nnx.Param(jnp.zeros((self.rank, d_out), jnp.float32), eager_sharding=False,
                       out_sharding=(None, axes[1]))

  def __call__(self, x: Array) -> Array:
    """[..., d_in] -> [..., d_out] in x's dtype."""
    dt = x.dtype
    return (x @ self.a[...].astype(dt) @ self.b[...].astype(dt)) * jnp.asarray(self.scale, dt)

  def delta(self) -> Array:
    """The dense float32 update [d_in, d_out] that `merge_lora` adds to the kernel."""
    return (self.a[...].astype(jnp.float32) @ self.b[...].astype(jnp.float32)) * self.scale


# ----------------------------------------------------------------------------- kernel sites


@dataclasses.dataclass(frozen=True)
class Site:
  """One LoRA-able kernel: `layer.<kernel>` whose first `n_in` dims are its input."""

  path: str  # '/'-joined kernel path
  layer: nnx.Module
  kernel: str
  lora: str
  n_in: int

  @property
  def variable(self) -> nnx.Variable:
    return getattr(self.layer, self.kernel)

  @property
  def attached(self) -> LoRA | None:
    return getattr(self.layer, self.lora)

  @property
  def dims(self) -> tuple[int, int]:
    shape = self.variable.shape
    return int(np.prod(shape[:self.n_in])), int(np.prod(shape[self.n_in:]))

  @property
  def axes(self) -> tuple[str | None, str | None]:
    """Logical axes of the flattened (in, out) dims: those of each group's outermost dim
    (contiguous blocks of a flattened dim are blocks of its outermost component)."""
    names = self.variable.get_metadata().get("out_sharding") or (None,) * self.variable.ndim
    return names[0], names[self.n_in]


# (layer type, kernel attribute, LoRA attribute, number of input dims of the kernel)
_SITE_KINDS = (
    (layers.Linear, "kernel", "kernel_lora", 1),
    (layers.Attention, "qkv_kernel", "qkv_lora", 1),
    (layers.Attention, "out_kernel", "out_lora", 2),
    (layers.LoRAConv, "kernel", "kernel_lora", 3),  # HWIO conv kernels, seen as [k*k*in, out]
)
LORA_ATTRS = frozenset(kind[2] for kind in _SITE_KINDS)
_LORA_OF = {kind[1]: kind[2] for kind in _SITE_KINDS}  # kernel attribute -> LoRA attribute


def kernel_sites(model: nnx.Module) -> list[Site]:
  """Every LoRA-able kernel of `model`, in graph order."""
  out = []
  for path, node in nnx.iter_graph(model):
    for cls, kernel, lora, n_in in _SITE_KINDS:
      if isinstance(node, cls):
        prefix = "/".join(map(str, path))
        out.append(Site(f"{prefix}/{kernel}" if prefix else kernel, node, kernel, lora, n_in))
  return out


def lora_prefix(kernel_path: str) -> str:
  """Path of the LoRA module of a kernel (its params are '<prefix>/a' and '<prefix>/b')."""
  parent, _, kernel = kernel_path.rpartition("/")
  lora = _LORA_OF.get(kernel)
  if lora is None:
    raise ValueError(f"{kernel_path!r} is not a LoRA-able kernel path (its last name must be one "
                     f"of {sorted(_LORA_OF)})")
  return f"{parent}/{lora}" if parent else lora


def _patterns(targets: str | Sequence[str]) -> list[str]:
  items = targets.split(",") if isinstance(targets, str) else list(targets)
  out = [t.strip() for t in items if t and t.strip()]
  if not out:
    raise ValueError(f"LoRA targets are empty ({targets!r}); give regexes over kernel paths, e.g. "
                     r"'^text/.*attn/(qkv|out)_kernel$' or 'mlp/fc[12]/kernel'")
  for t in out:
    try:
      re.compile(t)
    except re.error as e:
      raise ValueError(f"LoRA target {t!r} is not a valid regular expression: {e}") from None
  return out


def describe_sites(sites: Sequence[Site], n: int = 6) -> str:
  shown = ", ".join(s.path for s in sites[:n])
  return f"{shown}, ... ({len(sites)} in all)" if len(sites) > n else shown or "(none)"


# ----------------------------------------------------------------------------- attach / merge


def apply_lora(model: nnx.Module, *, targets: str | Sequence[str], rank: int, alpha: float,
               seed: int = 0, replace: bool = False) -> list[str]:
  """Attaches a LoRA to every kernel whose path matches a target regex; returns those paths.

  `targets`: regexes (a sequence or one comma-separated string) searched in kernel paths
  such as "visual/transformer/resblocks/3/mlp/fc1/kernel". A kernel that already has a LoRA
  is an error unless `replace`. Each adapter's init depends only on (seed, its path).
  """
  patterns = _patterns(targets)
  sites = kernel_sites(model)
  matched = [s for s in sites if any(re.search(p, s.path) for p in patterns)]
  if not matched:
    raise ValueError(f"LoRA targets {patterns} match no kernel of {type(model).__name__}; "
                     f"available kernels: {describe_sites(sites)}")
  taken = [s.path for s in matched if s.attached is not None]
  if taken and not replace:
    raise ValueError(f"kernels already have LoRA: {', '.join(taken[:6])}"
                     f"{' ...' if len(taken) > 6 else ''}; pass replace=True or call "
                     "remove_lora first")
  root = jax.random.key(seed)
  for site in matched:
    d_in, d_out = site.dims
    key = jax.random.fold_in(root, zlib.crc32(site.path.encode()))
    lora = LoRA(d_in, d_out, rank=rank, alpha=alpha, axes=site.axes, rngs=nnx.Rngs(params=key))
    lora.patterns = tuple(p for p in patterns if re.search(p, site.path))
    setattr(site.layer, site.lora, lora)
  return [s.path for s in matched]


def is_lora_path(path: Sequence[str]) -> bool:
  """Optimizer-mask predicate (train_lib's `trainable`): True exactly for LoRA parameters."""
  return any(name in LORA_ATTRS for name in path)


def lora_paths(model: nnx.Module) -> list[str]:
  """Paths of the kernels that carry a LoRA."""
  return [s.path for s in kernel_sites(model) if s.attached is not None]


def keep_placement(new: Array, old: Any) -> Array:
  """`new` on `old`'s sharding when `old` is a placed jax.Array (sharded models stay sharded)."""
  sharding = getattr(old, "sharding", None)
  return jax.device_put(new, sharding) if isinstance(sharding, jax.sharding.Sharding) else new


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every LoRA into its kernel (kernel += delta) and detaches it, in place.

  The result has exactly the parameters of the plain architecture, so zoo.save / zoo.load
  and conversion apply; its outputs equal the unmerged model's up to float rounding.
  """
  for site in kernel_sites(model):
    lora = site.attached
    if lora is None:
      continue
    var = site.variable
    old = var.get_value()
    merged = old.astype(jnp.float32) + lora.delta().reshape(old.shape)
    var.set_value(keep_placement(merged.astype(old.dtype), old))
    setattr(site.layer, site.lora, None)
  return model


def remove_lora(model: nnx.Module) -> list[str]:
  """Detaches every LoRA without merging (the base model as it was); returns their kernel paths."""
  removed = []
  for site in kernel_sites(model):
    if site.attached is not None:
      setattr(site.layer, site.lora, None)
      removed.append(site.path)
  return removed


