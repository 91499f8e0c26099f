"""Weight files: safetensors in and out, and torch files read with weights_only=True (never a
full pickle)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_state_dict(path: str) -> dict[str, Any]:
  """key -> array from a safetensors file, or a torch file via torch.load(weights_only=True)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  if path.endswith(".safetensors"):
    try:
      with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
    except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy lacks: read via torch
      try:
        import torch  # noqa: F401
      except ImportError:
        raise ValueError(f"{path}: {e}; install torch to read this dtype") from e
      with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
  if path.endswith(TORCH_SUFFIXES):
    import torch

    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # TorchScript archives (OpenAI .pt) and pickled objects land here
      raise ValueError(f"{path} cannot be read with torch.load(weights_only=True) ({e}); "
                       "re-save it as a plain state dict or safetensors (zoo never unpickles)"
                       ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
      obj = obj["state_dict"]  # open_clip training checkpoints wrap the weights
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
      raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj
  raise ValueError(f"{path}: unknown weight file type; expected .safetensors or "
                   f"{'/'.join(TORCH_SUFFIXES)}")


def write_safetensors(state_dict: dict[str, np.ndarray], path: str,
                      metadata: dict[str, str] | None = None) -> None:
  """Writes `state_dict` (numpy arrays) as a safetensors file, creating its directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v) if v.ndim else v for k, v in state_dict.items()}, path,
            metadata=metadata)
