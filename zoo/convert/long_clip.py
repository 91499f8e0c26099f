"""Long-CLIP's released PyTorch layout <-> zoo (`from-long-clip` / `to-long-clip` subcommands).

OpenAI keys with a 248-row text `positional_embedding` plus `positional_embedding_res`; the
text tower adds `positional_embedding * mask1 + positional_embedding_res * mask2` (mask1 =
rows [0, 20), mask2 = rows [20, 248)), which is one table for zoo.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

import numpy as np

from zoo.convert import common, open_clip as oc
from zoo.convert.io import read_state_dict, write_safetensors
from zoo.models import clip as clip_lib, configs
from zoo.models.long_clip import LONG_CLIP_KEEP
from zoo.weights import model_dir


def from_long_clip(state_dict: Mapping[str, Any], name: str | configs.CLIPConfig = "ViT-B-16-quickgelu",
                   keep: int = LONG_CLIP_KEEP, **overrides: Any) -> clip_lib.CLIP:
  """A zoo CLIP from a Long-CLIP PyTorch state dict (LongCLIP-B: 'ViT-B-16-quickgelu',
  LongCLIP-L: 'ViT-L-14-quickgelu').

  Long-CLIP's text positions are `positional_embedding` rows [0, keep) and
  `positional_embedding_res` rows [keep, L) (its mask1 / mask2); both tables must be [L, W].
  Everything else goes through `zoo.convert.from_open_clip` with text.context_length = L.
  """
  sd = oc.strip_prefix(state_dict)
  for key in ("positional_embedding", "positional_embedding_res"):
    if key not in sd:
      raise common.StateDictError(f"Long-CLIP state dict lacks {key!r}; got e.g. "
                                  f"{sorted(sd)[:5]} (is this a plain CLIP? use from_open_clip)")
  pos = common.as_float32(common.to_numpy(sd.pop("positional_embedding")))
  res = common.as_float32(common.to_numpy(sd.pop("positional_embedding_res")))
  if pos.ndim != 2 or pos.shape != res.shape or not 0 <= keep < pos.shape[0]:
    raise common.StateDictError(f"Long-CLIP positional_embedding {pos.shape} and "
                                f"positional_embedding_res {res.shape} must be equal [L, W] "
                                f"tables with L > keep={keep}")
  sd["positional_embedding"] = np.concatenate([pos[:keep], res[keep:]], axis=0)
  text = dict(overrides.pop("text", {}) or {})
  text["context_length"] = pos.shape[0]
  return oc.from_open_clip(sd, name, text=text, **overrides)


def to_long_clip(model: clip_lib.CLIP) -> dict[str, np.ndarray]:
  """Long-CLIP's state-dict layout of `model`: the open_clip/OpenAI keys plus
  `positional_embedding_res` (both tables hold the full table, so any mask split reads it)."""
  sd = oc.to_open_clip(model)
  sd["positional_embedding_res"] = np.array(sd["positional_embedding"], copy=True)
  return sd


def run_from_long_clip(args: argparse.Namespace) -> int:
  model = from_long_clip(read_state_dict(args.input), args.model or "ViT-B-16-quickgelu")
  out = model_dir.save(model, args.output, {"converted_from": args.input, "layout": "long_clip"},
                        overwrite=args.overwrite)
  print(f"wrote zoo checkpoint {out}")
  return 0


def run_to_long_clip(args: argparse.Namespace) -> int:
  """A .pt (torch.save, what Long-CLIP's longclip.load reads) or .safetensors file."""
  model, _, _ = model_dir.load(args.input)
  state_dict = to_long_clip(model)
  if os.path.exists(args.output) and not args.overwrite:
    raise FileExistsError(f"{args.output} exists; pass --overwrite")
  if args.output.endswith(".safetensors"):
    write_safetensors(state_dict, args.output, {"format": "pt"})
  elif args.output.endswith((".pt", ".pth")):
    import torch  # optional dependency

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
               args.output)
  else:
    raise ValueError(f"--output {args.output!r} must end with .pt, .pth or .safetensors")
  print(f"wrote {len(state_dict)} tensors to {args.output}")
  return 0
