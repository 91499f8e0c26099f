"""Config files and command-line overrides with one-line errors for unknown keys."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Mapping, Sequence

import ml_collections
from absl import flags

from zoo import errors


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a configs/*.py file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:  # configs import their shared `configs.base`
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location("_zoo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str],
                    flag: str = "config") -> None:
  """Raises a one-line ValueError for `--config.KEY=...` where KEY is not in the config."""
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix):].split("=", 1)[0]
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
      where = ".".join([flag, *parts[:i]])
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        raise ValueError(f"--{flag}.{key}: {where} is a value ({type(node).__name__}), not a "
                         f"section with keys; set it with --{where}=VALUE")
      if part not in node:
        raise errors.unknown_key(part, node.keys(), where)
      node = node[part]


def _config_path(argv: Sequence[str], flag: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg == f"--{flag}" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(f"--{flag}="):
      return arg.split("=", 1)[1]
  return None


def parse_flags(argv: list[str], flag: str = "config") -> list[str]:
  """absl flag parsing for app.run(flags_parser=...) that turns a bad --config.KEY into one
  clear line (the key, where it is missing, the valid keys) instead of a traceback."""
  path = _config_path(argv, flag)
  if path is not None:
    try:
      check_overrides(load_config_file(path), argv, flag)
    except (ValueError, FileNotFoundError) as e:
      _usage_error(e)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _usage_error(e)


def _usage_error(e: Exception) -> None:
  """`PROG: error: ...`, one line on stderr, exit code 2 (as every zoo command's user errors)."""
  if errors.debug():
    raise e
  sys.exit(errors.report(errors.UserError(str(e)), os.path.basename(sys.argv[0])))


def section(config: ml_collections.ConfigDict, name: str, defaults: Mapping[str, Any]
            ) -> dict[str, Any]:
  """`config.<name>` over `defaults` as a plain dict; an unknown key is a one-line error
  naming it and listing the valid ones (a family's settings, e.g. config.long_clip)."""
  given = config.get(name, None) or {}
  given = dict(given.to_dict() if hasattr(given, "to_dict") else given)
  errors.check_keys(given, defaults, f"config.{name}")
  return {**defaults, **given}
