"""Babel-ImageNet's file formats: per-language class labels and translated prompts, unchanged;
English as the paper evaluates it (`openai_imagenet`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def _read_json(path_or_obj: Any, what: str) -> Any:
  if not isinstance(path_or_obj, (str, os.PathLike)):
    return path_or_obj
  try:
    with open(path_or_obj, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{what} file {os.fspath(path_or_obj)!r} does not exist") from None
  except ValueError as e:
    raise ValueError(f"{what} file {os.fspath(path_or_obj)!r} is not valid JSON: {e}") from None


def load_babel_labels(path_or_obj: Any) -> dict[str, tuple[list[int], list[str]]]:
  """Babel-ImageNet's label file, unchanged: `{"DE": [[class indices, ascending], [names, same
  order]], ...}` (a path or the parsed object) -> {language: (indices, names)}."""
  raw = _read_json(path_or_obj, "Babel label")
  where = os.fspath(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) else "labels"
  if not isinstance(raw, Mapping) or not raw:
    raise ValueError(f"{where}: expected a non-empty JSON object {{language: [[indices], [names]]}}")
  out = {}
  for lang, entry in raw.items():
    if (not isinstance(entry, (list, tuple)) or len(entry) != 2
        or not all(isinstance(x, (list, tuple)) for x in entry)):
      raise ValueError(f"{where}[{lang!r}]: expected [[class indices], [class names]]")
    idx, names = list(entry[0]), list(entry[1])
    if len(idx) != len(names) or not idx:
      raise ValueError(f"{where}[{lang!r}]: {len(idx)} indices but {len(names)} names (need equal, > 0)")
    if not all(isinstance(i, int) and i >= 0 for i in idx) or any(a >= b for a, b in zip(idx, idx[1:])):
      raise ValueError(f"{where}[{lang!r}]: class indices must be non-negative integers in strictly "
                       "ascending order")
    if not all(isinstance(n, str) and n for n in names):
      raise ValueError(f"{where}[{lang!r}]: class names must be non-empty strings")
    out[str(lang)] = (idx, names)
  return out


def load_babel_prompts(path_or_obj: Any) -> dict[str, list[str]]:
  """Babel-ImageNet's translated prompts: `{"DE": ["... {} ...", ...], ...}` -> same dict."""
  raw = _read_json(path_or_obj, "Babel prompt")
  where = os.fspath(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) else "prompts"
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: expected a JSON object {{language: [prompt, ...]}}")
  out = {}
  for lang, prompts in raw.items():
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(
        isinstance(p, str) and "{}" in p for p in prompts):
      raise ValueError(f"{where}[{lang!r}]: expected a non-empty list of prompts with a '{{}}' "
                       "placeholder")
    out[str(lang)] = list(prompts)
  return out


def openai_imagenet() -> tuple[list[str], list[str]]:
  """(1000 class names, 80 templates with '{}'): OpenAI's ImageNet zero-shot protocol, which
  Babel-ImageNet uses for English. Read from open_clip (an optional dependency)."""
  try:
    from open_clip import zero_shot_metadata as meta
  except ImportError:
    raise ValueError("Babel's English protocol (OpenAI class names and templates) needs "
                     "open_clip_torch installed; or set data.babel_en=file") from None
  names = [str(n) for n in meta.IMAGENET_CLASSNAMES]
  templates = [t("{}") if callable(t) else str(t) for t in meta.OPENAI_IMAGENET_TEMPLATES]
  return names, templates
