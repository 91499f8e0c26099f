"""LoRA adapter files and `config.peft`: save / load adapters alone, switch one in per block.

`save_adapters` / `load_adapters` store only a model's LoRA parameters (safetensors + JSON,
written atomically); `with_adapter` swaps one in for a block of code, e.g. a language's adapter
of a multilingual text tower during that language's evaluation. `default_settings` is
`config.peft` (LoRA off by default); `apply_settings` attaches or loads what it asks for. The
adapters themselves (attach, merge) are zoo.models.lora.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import load_file, save_file

from zoo import errors
from zoo.models import lora as lora_lib

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



def apply_settings(model: nnx.Module, settings: Mapping[str, Any]) -> list[str]:
  """Applies `config.peft` (see default_settings) to `model`; returns the LoRA kernel paths.

  `adapter_from` loads a saved adapter (its rank / alpha / targets win); else `rank` > 0
  attaches fresh adapters on `targets`; else nothing happens ([]).
  """
  if settings.get("adapter_from", ""):
    load_adapters(model, settings["adapter_from"])
    return lora_lib.lora_paths(model)
  rank = int(settings.get("rank", 0))
  if rank < 0:
    raise ValueError(f"peft.rank must be >= 0 (0 = off); got {rank}")
  if rank == 0:
    return []
  if not settings.get("targets", ""):
    raise ValueError(f"peft.rank={rank} but peft.targets is empty; set comma-separated regexes "
                     r"over kernel paths, e.g. --config.peft.targets='attn/(qkv|out)_kernel$'")
  return lora_lib.apply_lora(model, targets=settings["targets"], rank=rank,
                    alpha=float(settings.get("alpha", 16.0)), seed=int(settings.get("seed", 0)))



# ----------------------------------------------------------------------------- save / load


def _host_array(x: Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def lora_state(model: nnx.Module) -> dict[str, np.ndarray]:
  """Every LoRA parameter as {'<layer path>/<lora attr>/a' | '.../b': host array}."""
  out = {}
  for site in lora_lib.kernel_sites(model):
    lora = site.attached
    if lora is not None:
      prefix = lora_lib.lora_prefix(site.path)
      out[f"{prefix}/a"] = _host_array(lora.a.get_value())
      out[f"{prefix}/b"] = _host_array(lora.b.get_value())
  return out


def _uniform(model: nnx.Module) -> tuple[int, float, list[str], list[str]]:
  """(rank, alpha, kernel paths, patterns) of the model's LoRAs (error if none or mixed)."""
  loras = [(s.path, s.attached) for s in lora_lib.kernel_sites(model) if s.attached is not None]
  if not loras:
    raise ValueError(f"{type(model).__name__} has no LoRA to save; call zoo.models.lora.apply_lora first")
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
  load_adapters applies), the kernel paths, the regexes originally given to lora_lib.apply_lora
  (`patterns`, for the record) and `metadata` (JSON, e.g. {"language": "ar"}). Returns the
  directory path.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise errors.OutputExists(directory)
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
                            "(not written by zoo.weights.adapters.save_adapters?)")
  with open(path) as f:
    config = json.load(f)
  if config.get("format") != FORMAT:
    raise ValueError(f"{path} is not a zoo LoRA adapter config (format {config.get('format')!r})")
  if config.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(f"{path} has format version {config['format_version']}; this zoo reads up to "
                     f"{FORMAT_VERSION}: upgrade zoo")
  return config


def _expected(model: nnx.Module, config: Mapping[str, Any]
              ) -> tuple[dict[str, tuple[int, ...]], list[str], list[lora_lib.Site]]:
  """(key -> shape the model needs, problems, sites to attach) for loading `config`."""
  sites = {s.path: s for s in lora_lib.kernel_sites(model)}
  attached = [p for p, s in sites.items() if s.attached is not None]
  rank, alpha = int(config["rank"]), float(config["alpha"])
  want = list(config["kernel_paths"])
  expected, problems, to_attach = {}, [], []
  if attached and sorted(attached) != sorted(want):
    shown = lora_lib.describe_sites([sites[p] for p in attached], 3)
    problems.append(f"  the model already has LoRA on other kernels ({shown}); call zoo.models.lora.remove_lora "
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
    prefix = lora_lib.lora_prefix(path)
    expected[f"{prefix}/a"] = (d_in, rank)
    expected[f"{prefix}/b"] = (rank, d_out)
  return expected, problems, to_attach


def load_adapters(model: nnx.Module, directory: str | os.PathLike) -> dict[str, Any]:
  """Loads a save_adapters directory into `model` (attaching LoRAs it lacks); returns its config.

  Every stored key and shape must fit the model; otherwise one ValueError counts the missing,
  unexpected and mis-shaped entries (listing the first few) and the model is left untouched.
  """
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
  absent = ({lora_lib.lora_prefix(p) for p in config["kernel_paths"]}
            - {k.rpartition("/")[0] for k in expected})
  problems += [f"  unexpected {k}: found {tuple(tensors[k].shape)}"
               for k in sorted(set(tensors) - set(expected)) if k.rpartition("/")[0] not in absent]
  if problems:
    raise ValueError(f"LoRA adapter {directory} does not fit {type(model).__name__} "
                     f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n"
                     + "\n".join(errors.capped(problems)))
  if to_attach:
    lora_lib.apply_lora(model, targets=[f"^{re.escape(s.path)}$" for s in to_attach],
               rank=int(config["rank"]), alpha=float(config["alpha"]))
    for site in to_attach:  # keep the original regexes for a later save_adapters
      site.attached.patterns = tuple(p for p in config.get("patterns", ())
                                     if re.search(p, site.path))
  for site in lora_lib.kernel_sites(model):
    lora = site.attached
    if lora is None:
      continue
    prefix = lora_lib.lora_prefix(site.path)
    for name in ("a", "b"):
      var = getattr(lora, name)
      old = var.get_value()
      var.set_value(lora_lib.keep_placement(jnp.asarray(tensors[f"{prefix}/{name}"], old.dtype), old))
  return config


@contextlib.contextmanager
def with_adapter(model: nnx.Module, directory: str | os.PathLike) -> Iterator[dict[str, Any]]:
  """Runs a block with the adapter in `directory` in place of the model's own LoRAs (if any).

  On exit the model's original LoRA modules (or their absence) are restored exactly. Yields
  the adapter config (e.g. config["metadata"]["language"]).
  """
  own = [(s.layer, s.lora, s.attached) for s in lora_lib.kernel_sites(model) if s.attached is not None]
  lora_lib.remove_lora(model)
  try:
    yield load_adapters(model, directory)
  finally:
    lora_lib.remove_lora(model)
    for layer, attr, lora in own:
      setattr(layer, attr, lora)
