"""Reading released weight files without pickle, and checking them.

`read_state_dict(path)`: safetensors (numpy; bf16 via torch when installed), or `.pt` / `.pth` /
`.bin` through `torch.load(weights_only=True)` — never a full unpickle. A truncated or damaged
file is one `WeightFileError` naming the file. `sha256_file` / `check_sha256` verify a file
against an expected digest (the pretrained table's, or the hub's LFS object id).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


class WeightFileError(ValueError):
  """A weight file is missing, truncated, corrupt, or not a plain state dict."""


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  """Hex SHA-256 of the file's bytes (streamed)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def check_sha256(path: str, expected: str, *, label: str | None = None) -> None:
  """Raises WeightFileError when the file's SHA-256 does not start with `expected`.

  A prefix is accepted because some releases publish only the first hex digits.
  """
  expected = expected.lower()
  found = sha256_file(path)
  if not found.startswith(expected):
    raise WeightFileError(
        f"{label or path} is truncated or corrupt: SHA-256 {found[:16]}... != expected "
        f"{expected[:16]}... ({os.path.getsize(path)} bytes); delete it and download again")


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _refusal_reason(e: BaseException) -> str:
  """The one fact in torch's refusal (e.g. the global it would have had to unpickle), without
  its advice to load the file with weights_only=False."""
  text = str(e)
  found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
  if found:
    return f"it pickles the object {found.group(1)}"
  if "TorchScript" in text or "constants.pkl" in text:
    return "it is a TorchScript archive"
  first = _first_line(e)
  return first if "weights_only" not in first else "torch.load(weights_only=True) refused it"


def read_state_dict(path: str) -> dict[str, Any]:
  """key -> array of a safetensors file, or of a torch file read with weights_only=True."""
  if not os.path.isfile(path):
    raise WeightFileError(f"no such weight file: {path}")
  if path.endswith(SAFETENSORS_SUFFIX):
    try:
      try:
        with safe_open(path, framework="numpy") as f:
          return {k: f.get_tensor(k) for k in f.keys()}
      except TypeError:  # bfloat16, which numpy lacks: read through torch
        import torch  # noqa: F401  (safetensors' pt framework needs it)

        with safe_open(path, framework="pt") as f:
          return {k: f.get_tensor(k) for k in f.keys()}
    except ImportError as e:
      raise WeightFileError(f"{path} holds a dtype numpy cannot read; install torch") from e
    except Exception as e:  # SafetensorError on a short header or a cut-off tensor
      raise WeightFileError(f"{path} is truncated or corrupt ({_first_line(e)}); delete it and "
                            "download again") from e
  if path.endswith(TORCH_SUFFIXES):
    try:
      import torch
    except ImportError as e:
      raise WeightFileError(f"{path} is a PyTorch file; install torch to read it (zoo reads it "
                            "with torch.load(weights_only=True), never a full unpickle)") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a cut-off zip, or a pickle that holds more than tensors
      kind = ("truncated or corrupt" if "zip" in str(e).lower() or "EOF" in str(e)
              else "not a plain state dict (weights_only=True refused it)")
      raise WeightFileError(f"{path} is {kind} ({_refusal_reason(e)}); zoo never unpickles: "
                            "re-save it as a plain state dict or safetensors") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
      obj = obj["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
      raise WeightFileError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj
  raise WeightFileError(f"{path}: unknown weight file type; expected {SAFETENSORS_SUFFIX} or "
                        f"{'/'.join(TORCH_SUFFIXES)}")


def write_safetensors(state_dict: dict[str, Any], path: str,
                      metadata: dict[str, str] | None = None) -> None:
  """Writes `state_dict` (numpy arrays) as a safetensors file, creating its directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v) if v.ndim else v for k, v in state_dict.items()}, path,
            metadata=metadata)
