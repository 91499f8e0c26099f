"""The model families, listed once. The train loop imports this list; no family imports the loop.

Adding a family: one module here (its model under zoo/models/) and one line in `FAMILIES`.
`register` adds one at run time (e.g. a family defined in a test or a notebook). The families'
eval kinds are read from this list by zoo.eval.suite (nothing registers them by import).
"""

from __future__ import annotations

from zoo.families import (
    clip,
    coca,
    distill,
    llm2clip,
    long_clip,
    moe,
    multilingual,
    naflex,
    prompt,
    region,
)
from zoo.families.base import Family, LossContext

FAMILIES: tuple[Family, ...] = (
    clip.FAMILY,
    long_clip.FAMILY,
    moe.FAMILY,
    region.FAMILY,
    multilingual.FAMILY,
    distill.FAMILY,
    llm2clip.FAMILY,
    prompt.FAMILY,
    coca.FAMILY,
    naflex.FAMILY,
)

_REGISTRY: dict[str, Family] = {}


def register(family: Family, *, overwrite: bool = False) -> Family:
  """Adds `family` (a `Family` instance) under `family.name`."""
  if not isinstance(family, Family):
    raise TypeError(f"register needs a zoo.families.Family instance, got {type(family).__name__}")
  if family.name in _REGISTRY and _REGISTRY[family.name] is not family and not overwrite:
    raise ValueError(f"family {family.name!r} is already registered (pass overwrite=True)")
  _REGISTRY[family.name] = family
  return family


def get(name: str) -> Family:
  """The family named `name` (config.family)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown config.family {name!r}; known: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


def registered() -> list[Family]:
  """Every family: the list above, then those added with `register`."""
  return list(_REGISTRY.values())


for _family in FAMILIES:
  register(_family)

__all__ = ["FAMILIES", "Family", "LossContext", "get", "names", "register", "registered"]
