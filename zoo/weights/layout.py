"""What both checkpoint kinds share (`zoo.weights.model_dir`, `zoo.train.checkpoints`): the error,
Orbax's completion markers, JSON-safe conversion of configs and extras, a multi-process sync."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from zoo import errors

COMMIT_FILE = "commit_success.txt"  # orbax's finalize marker
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint directory is missing, incomplete, corrupt or for another architecture."""

def to_jsonable(obj: Any) -> Any:
  """A JSON-ready copy: ConfigDicts, dataclasses, tuples, numpy values and bytes are converted."""
  if hasattr(obj, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(obj.to_json_best_effort())
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return to_jsonable(dataclasses.asdict(obj))
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, (bytes, bytearray)):
    return {"__bytes_b64__": base64.b64encode(bytes(obj)).decode("ascii")}
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if obj is None or isinstance(obj, (str, int, float, bool)):
    return obj
  raise TypeError(f"cannot store {type(obj).__name__} value {obj!r} as JSON in a checkpoint")


def from_jsonable(obj: Any) -> Any:
  """Inverse of `to_jsonable` for bytes (everything else stays JSON types)."""
  if isinstance(obj, dict):
    if set(obj) == {"__bytes_b64__"}:
      return base64.b64decode(obj["__bytes_b64__"])
    return {k: from_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [from_jsonable(v) for v in obj]
  return obj


def is_complete_orbax_dir(path: str) -> bool:
  """Orbax finished this directory: its commit marker and committed metadata are present."""
  if not os.path.isfile(os.path.join(path, COMMIT_FILE)):
    return False
  try:
    with open(os.path.join(path, STEP_METADATA_FILE)) as f:
      return json.load(f).get("commit_timestamp_nsecs") is not None
  except (OSError, ValueError):
    return False


def sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
