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

from zoo import errors

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


class WeightFileError(errors.UserError, ValueError):
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


# How a torch.save file starts: a zip archive (torch >= 1.6), or the legacy pickle of torch's
# magic number (protocol 2: PROTO 2, LONG1 10 bytes).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _torch_reason(e: BaseException) -> str:
  """The one fact in torch.load's failure: for a refused pickle the line after
  "WeightsUnpickler error:" (not the advice to pass weights_only=False), else the first
  sentence of its message (or the exception's name)."""
  text = str(e)
  found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
  if found:
    return found.group(1).strip()
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  return re.split(r"(?<=[.!?])\s", lines[0], maxsplit=1)[0].rstrip(".")


def _torch_load_error(path: str, e: BaseException) -> WeightFileError:
  """The one-line diagnosis of a failed torch.load(weights_only=True) of `path`."""
  text = str(e)
  with open(path, "rb") as f:
    head = f.read(len(_LEGACY_MAGIC))
  refit = "zoo never unpickles: re-save it as a plain state dict (torch.save(model.state_dict()))"
  found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
  if found:
    return WeightFileError(f"{path} is not a plain state dict: it pickles the object "
                           f"{found.group(1)}, which torch.load(weights_only=True) refuses; "
                           f"{refit} or as safetensors")
  if "TorchScript" in text or "constants.pkl" in text:
    return WeightFileError(f"{path} is a TorchScript archive, not a state dict (torch.load("
                           f"weights_only=True) refuses it); {refit} or as safetensors")
  if not head:
    return WeightFileError(f"{path} is empty (0 bytes); delete it and download again")
  if head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC:  # torch's format, damaged
    return WeightFileError(f"{path} is truncated or corrupt (torch.load failed: "
                           f"{_torch_reason(e)}); delete it and download again")
  return WeightFileError(f"{path} is not a PyTorch checkpoint (torch.load with weights_only=True "
                         f"failed: {_torch_reason(e)}); expected a torch.save() state dict or a "
                         f"{SAFETENSORS_SUFFIX} file")


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
    except Exception as e:  # a cut-off file, a pickle of more than tensors, not torch at all
      raise _torch_load_error(path, e) from e
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
