"""zoo: a JAX-native model zoo for CLIP and its variants.

Public API: `list_models`, `create`, `get_tokenizer`, `save`, `load`, and the
`zoo.convert` subpackage for PyTorch weights.
"""

import sys

from zoo.models import clip
from zoo.models.clip import CLIP, from_config, l2_normalize
from zoo.pretrained import create, create_model_and_transforms, export_pretrained, list_pretrained
from zoo.registry import (
  CLIPConfig,
  TextConfig,
  VisionConfig,
  get_model_config,
  list_models,
  register,
)
from zoo.version import __version__

# Old import path `zoo.clip` (the module moved to zoo.models.clip), kept for one release.
sys.modules.setdefault("zoo.clip", clip)


def get_tokenizer(name: str, context_length: int | None = None, **kwargs):
  """The tokenizer of model `name` (CLIP BPE ids equal open_clip's); see zoo.tokenizers."""
  from zoo import tokenizers

  return tokenizers.get_tokenizer(name, context_length=context_length, **kwargs)


def save(model, directory, config=None, *, overwrite: bool = False) -> str:
  """Writes `model`'s weights and config atomically with Orbax; see zoo.checkpoint.save."""
  from zoo import checkpoint

  return checkpoint.save(model, directory, config, overwrite=overwrite)


def load(directory, *, config=None, verify: bool = True):
  """(model, tokenizer, preprocess) from a directory written by `save` or a training workdir's
  `model/`; `verify` checks file hashes; see zoo.checkpoint.load."""
  from zoo import checkpoint

  return checkpoint.load(directory, config=config, verify=verify)


def __getattr__(name):
  if name == "convert":  # imported lazily: conversion pulls in safetensors / optional torch
    import importlib

    return importlib.import_module("zoo.convert")
  raise AttributeError(f"module 'zoo' has no attribute {name!r}")
