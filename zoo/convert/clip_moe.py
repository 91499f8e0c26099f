"""CLIP-MoE's released PyTorch layout (OpenSparseLLMs/CLIP-MoE) <-> zoo MoECLIP.

OpenAI / Long-CLIP keys; an MoE block N has `resblocks.N.gate.weight` [E, W] (router, no bias)
and `resblocks.N.experts.e.{c_fc,c_proj}.{weight,bias}` instead of `resblocks.N.mlp.*`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from zoo.convert import common, long_clip, open_clip as oc
from zoo.convert.io import read_state_dict, write_safetensors
from zoo.models import configs
from zoo.models.long_clip import LONG_CLIP_CONTEXT_LENGTH
from zoo.models.moe import MoECLIP, dense_view, upcycle
from zoo.weights import model_dir

_MOE_BLOCK = re.compile(r"^((?:visual\.)?transformer\.resblocks\.(\d+))\.gate\.weight$")


def _np(x: Any) -> np.ndarray:
  return common.as_float32(common.to_numpy(x))


def from_clip_moe(state_dict: Mapping[str, Any], name: str | configs.CLIPConfig = "ViT-L-14-quickgelu",
                  *, top_k: int = 2, keep: int = 20, **overrides: Any) -> MoECLIP:
  """A MoECLIP from a CLIP-MoE PyTorch state dict (OpenSparseLLMs/CLIP-MoE layout).

  Layout: OpenAI CLIP keys (text positions as Long-CLIP's `positional_embedding` +
  `positional_embedding_res` when present, see `zoo.convert.long_clip.from_long_clip`); a block N of
  either tower that is an MoE block has `...resblocks.N.gate.weight` [E, W] (router, no bias)
  and `...resblocks.N.experts.e.c_fc.{weight,bias}`, `...experts.e.c_proj.{weight,bias}`
  instead of `...resblocks.N.mlp.*`. CLIP-MoE routes dropless with renormalized top-k gates,
  so the model gets dropless=True; `top_k` is not stored in the weights (CLIP-MoE: 2).
  """
  sd = oc.strip_prefix(state_dict)
  blocks: dict[str, list[int]] = {"visual": [], "text": []}
  num_experts = None
  dense_sd = {k: v for k, v in sd.items() if ".experts." not in k and not k.endswith(".gate.weight")}
  for key in sd:
    m = _MOE_BLOCK.match(key)
    if not m:
      continue
    prefix, index = m.group(1), int(m.group(2))
    e = int(np.shape(sd[key])[0])
    if num_experts not in (None, e):
      raise common.StateDictError(f"{key}: {e} experts but other MoE blocks have {num_experts}")
    num_experts = e
    blocks["visual" if prefix.startswith("visual.") else "text"].append(index)
    for part in ("c_fc", "c_proj"):
      for leaf in ("weight", "bias"):
        src = f"{prefix}.experts.0.{part}.{leaf}"
        if src not in sd:
          raise common.StateDictError(f"CLIP-MoE state dict lacks {src!r} for MoE block {prefix}")
        dense_sd[f"{prefix}.mlp.{part}.{leaf}"] = sd[src]
  if num_experts is None:
    raise common.StateDictError("no `...resblocks.N.gate.weight` keys: not a CLIP-MoE state dict "
                                "(use zoo.convert.from_open_clip for a dense CLIP)")
  if "positional_embedding_res" in dense_sd:
    dense = long_clip.from_long_clip(dense_sd, name, keep=keep, **overrides)
  else:
    dense = oc.from_open_clip(dense_sd, name, **overrides)
  model = upcycle(dense, num_experts, top_k, {"vision": blocks["visual"], "text": blocks["text"]},
                  dropless=True)
  for layer_name, layer in model.moe_layers().items():
    tower, index = layer_name.split(".")
    prefix = f"{'visual.' if tower == 'visual' else ''}transformer.resblocks.{index}"
    gate = _np(sd[f"{prefix}.gate.weight"])
    if gate.shape != (num_experts, layer.router.kernel.shape[0]):
      raise common.StateDictError(f"{prefix}.gate.weight has shape {gate.shape}, expected "
                                  f"{(num_experts, layer.router.kernel.shape[0])}")
    layer.router.kernel.set_value(jnp.asarray(gate.T))
    for zoo_leaf, key, transpose in (("fc1_kernel", "c_fc.weight", True),
                                     ("fc1_bias", "c_fc.bias", False),
                                     ("fc2_kernel", "c_proj.weight", True),
                                     ("fc2_bias", "c_proj.bias", False)):
      var = getattr(layer, zoo_leaf)
      arrays = []
      for e in range(num_experts):
        k = f"{prefix}.experts.{e}.{key}"
        if k not in sd:
          raise common.StateDictError(f"CLIP-MoE state dict lacks {k!r}")
        a = _np(sd[k])
        arrays.append(a.T if transpose else a)
      stacked = np.stack(arrays)
      if stacked.shape != tuple(var.shape):
        raise common.StateDictError(f"{prefix}.experts.*.{key}: stacked shape {stacked.shape}, "
                                    f"expected {tuple(var.shape)}")
      var.set_value(jnp.asarray(stacked))
  return model


def to_clip_moe(model: MoECLIP) -> dict[str, np.ndarray]:
  """CLIP-MoE's PyTorch state-dict layout of `model` (inverse of `from_clip_moe`).

  Text positions: Long-CLIP's pair (`positional_embedding` and `positional_embedding_res`, both
  the full table) when the text context is 248, as CLIP-MoE's released models; otherwise
  OpenAI's single `positional_embedding`.
  """
  if not isinstance(model, MoECLIP):
    raise TypeError(f"to_clip_moe needs a MoECLIP, got {type(model).__name__}")
  dense = dense_view(model)
  long = model.config.text.context_length == LONG_CLIP_CONTEXT_LENGTH
  sd = long_clip.to_long_clip(dense) if long else oc.to_open_clip(dense)
  for layer_name, layer in model.moe_layers().items():
    tower, index = layer_name.split(".")
    prefix = f"{'visual.' if tower == 'visual' else ''}transformer.resblocks.{index}"
    for part in ("c_fc", "c_proj"):
      for leaf in ("weight", "bias"):
        sd.pop(f"{prefix}.mlp.{part}.{leaf}")
    sd[f"{prefix}.gate.weight"] = np.asarray(layer.router.kernel[...]).T.copy()
    get = lambda v: np.asarray(jax.device_get(v[...]))
    w1, b1, w2, b2 = (get(layer.fc1_kernel), get(layer.fc1_bias), get(layer.fc2_kernel),
                      get(layer.fc2_bias))
    for e in range(model.config.moe.num_experts):
      sd[f"{prefix}.experts.{e}.c_fc.weight"] = w1[e].T.copy()
      sd[f"{prefix}.experts.{e}.c_fc.bias"] = b1[e].copy()
      sd[f"{prefix}.experts.{e}.c_proj.weight"] = w2[e].T.copy()
      sd[f"{prefix}.experts.{e}.c_proj.bias"] = b2[e].copy()
  return sd


def export_safetensors(model: MoECLIP, path: str) -> None:
  """`to_clip_moe(model)` written as safetensors, with the MoE settings in its metadata."""
  write_safetensors(to_clip_moe(model), path, {"format": "pt", "layout": "clip_moe",
                                               "moe": json.dumps(dataclasses.asdict(model.config.moe))})


def run_from_clip_moe(args: argparse.Namespace) -> int:
  model = from_clip_moe(read_state_dict(args.input), args.model or "ViT-L-14-quickgelu")
  out = model_dir.save(model, args.output, {"converted_from": args.input, "layout": "clip_moe"},
                        overwrite=args.overwrite)
  print(f"wrote zoo checkpoint {out}")
  return 0


def run_to_clip_moe(args: argparse.Namespace) -> int:
  model, _, _ = model_dir.load(args.input)
  if not args.output.endswith(".safetensors"):
    raise ValueError(f"--output {args.output!r} must be a .safetensors file")
  if os.path.exists(args.output) and not args.overwrite:
    raise FileExistsError(f"{args.output} exists; pass --overwrite")
  export_safetensors(model, args.output)
  print(f"wrote {args.output}")
  return 0
