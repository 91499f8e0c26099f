"""zoo: a JAX-native model zoo for CLIP and its variants.

Public API: `list_models`, `list_pretrained`, `create`, `create_model_and_transforms`,
`get_tokenizer`, `save`, `load`, `export_pretrained`, and the `zoo.convert` subpackage for
PyTorch weights. Everything else lives in one module each (zoo.models, zoo.train, zoo.eval,
zoo.weights, zoo.data, zoo.families, zoo.kernels).
"""

from zoo.version import __version__
from zoo.weights.pretrained import (
  create,
  create_model_and_transforms,
  export_pretrained,
  list_models,
  list_pretrained,
)


def get_tokenizer(name: str, context_length: int | None = None, **kwargs):
  """The tokenizer of model `name` (CLIP BPE ids equal open_clip's); see zoo.tokenizers."""
  from zoo import tokenizers

  return tokenizers.get_tokenizer(name, context_length=context_length, **kwargs)


def save(model, directory, config=None, *, overwrite: bool = False) -> str:
  """Writes `model`'s weights and config atomically with Orbax; see zoo.weights.model_dir."""
  from zoo.weights import model_dir

  return model_dir.save(model, directory, config, overwrite=overwrite)


def load(directory, *, config=None, verify: bool = True):
  """(model, tokenizer, preprocess) from a directory written by `save` or a training workdir's
  `model/`; `verify` checks file hashes; see zoo.weights.model_dir.load."""
  from zoo.weights import model_dir

  return model_dir.load(directory, config=config, verify=verify)


def __getattr__(name):
  if name == "convert":  # imported lazily: conversion pulls in safetensors / optional torch
    import zoo.convert

    return zoo.convert
  raise AttributeError(f"module 'zoo' has no attribute {name!r}")
