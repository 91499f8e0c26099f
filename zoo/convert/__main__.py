"""Command line: PyTorch CLIP weights <-> zoo checkpoints.

  python -m zoo.convert from-open-clip --model ViT-B-32 --input open_clip.safetensors --output DIR
  python -m zoo.convert to-open-clip --input DIR --output open_clip.safetensors
  python -m zoo.convert from-hf --input hf_dir/model.safetensors [--model NAME|config.json] --output DIR
  python -m zoo.convert to-hf --input DIR --output hf_dir/    (model.safetensors + config.json)

Inputs are safetensors, or `.pt` / `.pth` / `.bin` read with `torch.load(weights_only=True)`
(never a full pickle). zoo checkpoints are written with `zoo.checkpoint.save`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_state_dict(path: str) -> dict[str, Any]:
  """key -> array from a safetensors file, or a torch file via torch.load(weights_only=True)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  if path.endswith(".safetensors"):
    from safetensors import safe_open

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
      raise ValueError(f"{path} is not a plain tensor file ({_refusal_reason(e)}); re-save it "
                       "as a plain state dict or safetensors (zoo never unpickles)") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
      obj = obj["state_dict"]  # open_clip training checkpoints wrap the weights
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
      raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj
  raise ValueError(f"{path}: unknown weight file type; expected .safetensors or "
                   f"{'/'.join(TORCH_SUFFIXES)}")


def _refusal_reason(e: Exception) -> str:
  """The one fact in torch's refusal (e.g. the global it would have had to unpickle), without
  its advice to load the file with weights_only=False."""
  text = str(e)
  found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
  if found:
    return f"it pickles the object {found.group(1)}"
  if "TorchScript" in text or "constants.pkl" in text:
    return "it is a TorchScript archive"
  first = text.splitlines()[0] if text else type(e).__name__
  return first if "weights_only" not in first else "torch.load(weights_only=True) refused it"


def write_safetensors(state_dict: dict[str, np.ndarray], path: str,
                      metadata: dict[str, str] | None = None) -> None:
  from safetensors.numpy import save_file

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v) if v.ndim else v for k, v in state_dict.items()}, path,
            metadata=metadata)


def _hf_config_arg(model: str | None, input_path: str) -> Any:
  """--model for from-hf: a zoo name, an HF config.json, or the config.json next to the input."""
  candidate = model
  if candidate is None:
    beside = os.path.join(os.path.dirname(os.path.abspath(input_path)), "config.json")
    if not os.path.isfile(beside):
      raise ValueError("from-hf needs --model NAME or --model config.json (no config.json "
                       f"beside {input_path})")
    candidate = beside
  if candidate.endswith(".json"):
    with open(candidate) as f:
      return json.load(f)
  return candidate


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m zoo.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=["from-open-clip", "to-open-clip", "from-hf", "to-hf"])
  parser.add_argument("--model", help="architecture name (from-*); for from-hf also an HF "
                      "config.json; to-* read it from the zoo checkpoint")
  parser.add_argument("--input", required=True, help="weights file (from-*) or zoo checkpoint "
                      "directory (to-*)")
  parser.add_argument("--output", required=True, help="zoo checkpoint directory (from-*) or "
                      ".safetensors file (to-*; to-hf also accepts a directory)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = parser.parse_args(argv)

  from zoo import checkpoint
  from zoo import convert

  if args.command.startswith("from-"):
    state_dict = read_state_dict(args.input)
    if args.command == "from-open-clip":
      if not args.model:
        parser.error("from-open-clip needs --model (e.g. ViT-B-32, or ViT-B-32-quickgelu for "
                     "OpenAI weights)")
      model = convert.from_open_clip(state_dict, args.model)
    else:
      model = convert.from_hf(state_dict, _hf_config_arg(args.model, args.input))
    out = checkpoint.save(model, args.output, {"converted_from": args.input,
                                               "layout": args.command[5:]},
                          overwrite=args.overwrite)
    print(f"wrote zoo checkpoint {out}")
    return 0

  model, _, _ = checkpoint.load(args.input)
  if args.command == "to-open-clip":
    state_dict, hf_config = convert.to_open_clip(model), None
  else:
    state_dict, hf_config = convert.to_hf(model), convert.config_to_hf(model.config)
  out = args.output
  if hf_config is not None and not out.endswith(".safetensors"):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    out = os.path.join(out, "model.safetensors")
  elif not out.endswith(".safetensors"):
    parser.error(f"--output {out!r} must be a .safetensors file")
  if os.path.exists(out) and not args.overwrite:
    parser.error(f"{out} exists; pass --overwrite")
  write_safetensors(state_dict, out, {"format": "pt"})
  print(f"wrote {len(state_dict)} tensors to {out}")
  return 0


def _cli() -> int:
  """main() with input errors printed as one line (exit 2) instead of a traceback."""
  from zoo import cli

  cli.quiet_logging()
  return cli.run(main, prog="python -m zoo.convert")


if __name__ == "__main__":
  sys.exit(_cli())
