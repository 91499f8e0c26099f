"""LoRA adapters on any zoo model: attach, train alone, merge, save / load, switch per language.

LoRA (Hu et al., 2021) adds a trainable low-rank update to a frozen weight matrix:
y = x @ W + (x @ A @ B) * alpha / rank, with A [d_in, r] random and B [r, d_out] zero, so a
freshly attached adapter leaves the model's outputs unchanged. zoo's matmul weights are

    Linear.kernel          [in, out]       MLP fc1 / fc2, SigLIP attention-pool q / kv / proj
    Attention.qkv_kernel   [W, 3, H, Dh]   seen as [W, 3*H*Dh]
    Attention.out_kernel   [H, Dh, W]      seen as [H*Dh, W]

and each layer carries an optional LoRA beside it (`kernel_lora`, `qkv_lora`, `out_lora`; see
zoo/layers.py). Kernels are addressed by their '/'-joined path in the model, e.g.
"text/transformer/resblocks/0/attn/qkv_kernel", and chosen by regular expressions
(re.search). Train only the adapters with `make_optimizer(..., trainable=is_lora_path)`;
`merge_lora` folds them into the kernels so the result is a plain zoo model again (zoo.save,
conversion). `save_adapters` / `load_adapters` store the adapters alone (safetensors + JSON),
and `with_adapter` swaps one in for a block of code, e.g. a language's adapter of a
multilingual text tower during that language's evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import zlib
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import layers

Array = jax.Array

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "zoo-lora"
FORMAT_VERSION = 1
_TMP_SUFFIX = ".zoo-tmp"
_OLD_SUFFIX = ".zoo-old"


def default_settings() -> ml_collections.ConfigDict:
  """`config.peft`: LoRA off by default (rank 0)."""
  return ml_collections.ConfigDict(dict(
      rank=0,  # LoRA rank; 0 = no LoRA (full fine-tuning as configured)
      alpha=16.0,  # update scale = alpha / rank
      # comma-separated regexes over kernel paths, e.g. "^text/.*attn/(qkv|out)_kernel$"
      targets="",
      adapter_from="",  # a save_adapters directory to start from (overrides rank/alpha/targets)
      language="",  # stored in the adapter's metadata (language-specific text adapters)
  ))


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
class _Site:
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
)
LORA_ATTRS = frozenset(kind[2] for kind in _SITE_KINDS)
_LORA_OF = {kind[1]: kind[2] for kind in _SITE_KINDS}  # kernel attribute -> LoRA attribute


def _sites(model: nnx.Module) -> list[_Site]:
  """Every LoRA-able kernel of `model`, in graph order."""
  out = []
  for path, node in nnx.iter_graph(model):
    for cls, kernel, lora, n_in in _SITE_KINDS:
      if isinstance(node, cls):
        prefix = "/".join(map(str, path))
        out.append(_Site(f"{prefix}/{kernel}" if prefix else kernel, node, kernel, lora, n_in))
  return out


def _lora_prefix(kernel_path: str) -> str:
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


def _examples(sites: Sequence[_Site], n: int = 6) -> str:
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
  sites = _sites(model)
  matched = [s for s in sites if any(re.search(p, s.path) for p in patterns)]
  if not matched:
    raise ValueError(f"LoRA targets {patterns} match no kernel of {type(model).__name__}; "
                     f"available kernels: {_examples(sites)}")
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
  return [s.path for s in _sites(model) if s.attached is not None]


def _keep_placement(new: Array, old: Any) -> Array:
  """`new` on `old`'s sharding when `old` is a placed jax.Array (sharded models stay sharded)."""
  sharding = getattr(old, "sharding", None)
  return jax.device_put(new, sharding) if isinstance(sharding, jax.sharding.Sharding) else new


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every LoRA into its kernel (kernel += delta) and detaches it, in place.

  The result has exactly the parameters of the plain architecture, so zoo.save / zoo.load
  and conversion apply; its outputs equal the unmerged model's up to float rounding.
  """
  for site in _sites(model):
    lora = site.attached
    if lora is None:
      continue
    var = site.variable
    old = var.get_value()
    merged = old.astype(jnp.float32) + lora.delta().reshape(old.shape)
    var.set_value(_keep_placement(merged.astype(old.dtype), old))
    setattr(site.layer, site.lora, None)
  return model


def remove_lora(model: nnx.Module) -> list[str]:
  """Detaches every LoRA without merging (the base model as it was); returns their kernel paths."""
  removed = []
  for site in _sites(model):
    if site.attached is not None:
      setattr(site.layer, site.lora, None)
      removed.append(site.path)
  return removed


def apply_settings(model: nnx.Module, settings: Mapping[str, Any]) -> list[str]:
  """Applies `config.peft` (see default_settings) to `model`; returns the LoRA kernel paths.

  `adapter_from` loads a saved adapter (its rank / alpha / targets win); else `rank` > 0
  attaches fresh adapters on `targets`; else nothing happens ([]).
  """
  if settings.get("adapter_from", ""):
    load_adapters(model, settings["adapter_from"])
    return lora_paths(model)
  rank = int(settings.get("rank", 0))
  if rank < 0:
    raise ValueError(f"peft.rank must be >= 0 (0 = off); got {rank}")
  if rank == 0:
    return []
  if not settings.get("targets", ""):
    raise ValueError(f"peft.rank={rank} but peft.targets is empty; set comma-separated regexes "
                     r"over kernel paths, e.g. --config.peft.targets='attn/(qkv|out)_kernel$'")
  return apply_lora(model, targets=settings["targets"], rank=rank,
                    alpha=float(settings.get("alpha", 16.0)), seed=int(settings.get("seed", 0)))


# ----------------------------------------------------------------------------- save / load


def _host_array(x: Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def lora_state(model: nnx.Module) -> dict[str, np.ndarray]:
  """Every LoRA parameter as {'<layer path>/<lora attr>/a' | '.../b': host array}."""
  out = {}
  for site in _sites(model):
    lora = site.attached
    if lora is not None:
      prefix = _lora_prefix(site.path)
      out[f"{prefix}/a"] = _host_array(lora.a.get_value())
      out[f"{prefix}/b"] = _host_array(lora.b.get_value())
  return out


def _uniform(model: nnx.Module) -> tuple[int, float, list[str], list[str]]:
  """(rank, alpha, kernel paths, patterns) of the model's LoRAs (error if none or mixed)."""
  loras = [(s.path, s.attached) for s in _sites(model) if s.attached is not None]
  if not loras:
    raise ValueError(f"{type(model).__name__} has no LoRA to save; call apply_lora first")
  kinds = {(l.rank, l.alpha) for _, l in loras}
  if len(kinds) > 1:
    raise ValueError(f"save_adapters needs one (rank, alpha) for all LoRAs; found {sorted(kinds)}")
  rank, alpha = kinds.pop()
  patterns = list(dict.fromkeys(p for _, l in loras for p in l.patterns))
  return rank, alpha, [p for p, _ in loras], patterns


def save_adapters(model: nnx.Module, directory: str | os.PathLike, *,
                  metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
  """Writes only the LoRA parameters (adapter.safetensors) and adapter_config.json, atomically.

  The config holds rank, alpha, targets (the exact kernel paths, anchored: what
  load_adapters applies), the kernel paths, the regexes originally given to apply_lora
  (`patterns`, for the record) and `metadata` (JSON, e.g. {"language": "ar"}). Returns the
  directory path.
  """
  from safetensors.numpy import save_file

  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} already exists; pass overwrite=True or pick a new "
                          "directory")
  rank, alpha, paths, patterns = _uniform(model)
  tensors = {k: np.ascontiguousarray(v) for k, v in lora_state(model).items()}
  config = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "rank": rank, "alpha": alpha,
      "targets": [f"^{re.escape(p)}$" for p in paths], "kernel_paths": paths,
      "patterns": patterns,
      "metadata": dict(metadata or {}), "model_class": type(model).__name__,
  }
  json.dumps(config)  # fail before writing anything when metadata is not JSON
  if jax.process_index() != 0:
    return directory
  tmp = directory + _TMP_SUFFIX
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(tensors, os.path.join(tmp, ADAPTER_FILE), metadata={"format": FORMAT})
  with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
  if os.path.exists(directory):  # swap in place, then drop the old copy
    os.rename(directory, directory + _OLD_SUFFIX)
    os.rename(tmp, directory)
    shutil.rmtree(directory + _OLD_SUFFIX)
  else:
    os.rename(tmp, directory)
  return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The parsed adapter_config.json of a save_adapters directory."""
  path = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no LoRA adapter at {directory}: {CONFIG_FILE} is missing "
                            "(not written by zoo.peft.save_adapters?)")
  with open(path) as f:
    config = json.load(f)
  if config.get("format") != FORMAT:
    raise ValueError(f"{path} is not a zoo LoRA adapter config (format {config.get('format')!r})")
  if config.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(f"{path} has format version {config['format_version']}; this zoo reads up to "
                     f"{FORMAT_VERSION}: upgrade zoo")
  return config


def _expected(model: nnx.Module, config: Mapping[str, Any]
              ) -> tuple[dict[str, tuple[int, ...]], list[str], list[_Site]]:
  """(key -> shape the model needs, problems, sites to attach) for loading `config`."""
  sites = {s.path: s for s in _sites(model)}
  attached = [p for p, s in sites.items() if s.attached is not None]
  rank, alpha = int(config["rank"]), float(config["alpha"])
  want = list(config["kernel_paths"])
  expected, problems, to_attach = {}, [], []
  if attached and sorted(attached) != sorted(want):
    shown = _examples([sites[p] for p in attached], 3)
    problems.append(f"  the model already has LoRA on other kernels ({shown}); call remove_lora "
                    "first")
  for path in want:
    site = sites.get(path)
    if site is None:
      problems.append(f"  missing kernel {path} in {type(model).__name__}")
      continue
    lora = site.attached
    if lora is None:
      to_attach.append(site)
    elif (lora.rank, lora.alpha) != (rank, alpha):
      problems.append(f"  {path}: attached LoRA has rank {lora.rank}, alpha {lora.alpha}; "
                      f"the adapter has rank {rank}, alpha {alpha}")
    d_in, d_out = site.dims
    prefix = _lora_prefix(path)
    expected[f"{prefix}/a"] = (d_in, rank)
    expected[f"{prefix}/b"] = (rank, d_out)
  return expected, problems, to_attach


def load_adapters(model: nnx.Module, directory: str | os.PathLike) -> dict[str, Any]:
  """Loads a save_adapters directory into `model` (attaching LoRAs it lacks); returns its config.

  Every stored key and shape must fit the model; otherwise one ValueError lists each missing,
  unexpected and mis-shaped entry and the model is left untouched.
  """
  from safetensors.numpy import load_file

  directory = os.fspath(directory)
  config = read_adapter_config(directory)
  tensors = load_file(os.path.join(directory, ADAPTER_FILE))
  expected, problems, to_attach = _expected(model, config)
  for key in sorted(expected):
    if key not in tensors:
      problems.append(f"  missing    {key}: expected {expected[key]}")
    elif tuple(tensors[key].shape) != expected[key]:
      problems.append(f"  mis-shaped {key}: expected {expected[key]}, found "
                      f"{tuple(tensors[key].shape)}")
  # Tensors of kernels the model lacks are already reported as missing kernels.
  absent = ({_lora_prefix(p) for p in config["kernel_paths"]}
            - {k.rpartition("/")[0] for k in expected})
  problems += [f"  unexpected {k}: found {tuple(tensors[k].shape)}"
               for k in sorted(set(tensors) - set(expected)) if k.rpartition("/")[0] not in absent]
  if problems:
    raise ValueError(f"LoRA adapter {directory} does not fit {type(model).__name__} "
                     f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n"
                     + "\n".join(problems))
  if to_attach:
    apply_lora(model, targets=[f"^{re.escape(s.path)}$" for s in to_attach],
               rank=int(config["rank"]), alpha=float(config["alpha"]))
    for site in to_attach:  # keep the original regexes for a later save_adapters
      site.attached.patterns = tuple(p for p in config.get("patterns", ())
                                     if re.search(p, site.path))
  for site in _sites(model):
    lora = site.attached
    if lora is None:
      continue
    prefix = _lora_prefix(site.path)
    for name in ("a", "b"):
      var = getattr(lora, name)
      old = var.get_value()
      var.set_value(_keep_placement(jnp.asarray(tensors[f"{prefix}/{name}"], old.dtype), old))
  return config


@contextlib.contextmanager
def with_adapter(model: nnx.Module, directory: str | os.PathLike) -> Iterator[dict[str, Any]]:
  """Runs a block with the adapter in `directory` in place of the model's own LoRAs (if any).

  On exit the model's original LoRA modules (or their absence) are restored exactly. Yields
  the adapter config (e.g. config["metadata"]["language"]).
  """
  own = [(s.layer, s.lora, s.attached) for s in _sites(model) if s.attached is not None]
  remove_lora(model)
  try:
    yield load_adapters(model, directory)
  finally:
    remove_lora(model)
    for layer, attr, lora in own:
      setattr(layer, attr, lora)
