"""CLIP-MoE size figures: parameters (total / active per token) and analytic FLOPs per token."""

from __future__ import annotations

import numpy as np
from flax import nnx

from zoo.models import clip as clip_lib, moe as moe_lib


def parameter_counts(model: clip_lib.CLIP) -> dict[str, int]:
  """Parameters: `total`, `active` (per token: k of E experts in each MoE layer), by tower."""
  total = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  inactive = 0
  if isinstance(model, moe_lib.MoECLIP):
    moe = model.config.moe
    for layer in model.moe_layers().values():
      per_expert = sum(int(np.prod(p.shape[1:])) for p in (
          layer.fc1_kernel, layer.fc1_bias, layer.fc2_kernel, layer.fc2_bias))
      inactive += (moe.num_experts - moe.top_k) * per_expert
  return {"total": total, "active": total - inactive}


def flops_per_token(model: clip_lib.CLIP, tower: str) -> dict[str, float]:
  """Analytic forward FLOPs per token of one tower's transformer blocks (2 per multiply-add).

  `dense`: attention projections + FFN as if dense; `active`: with k experts per token in MoE
  layers plus the router (what an ideal sparse kernel does). Attention scores (which grow with
  sequence length) are excluded; see the bench for whole-encoder XLA counts.
  """
  cfg = {"visual": model.config.vision, "text": model.config.text}[tower]
  w, h = cfg.width, int(cfg.width * cfg.mlp_ratio)
  attn = 2 * (4 * w * w)
  ffn = 2 * (2 * w * h)
  dense = cfg.layers * (attn + ffn)
  active = dense
  if isinstance(model, moe_lib.MoECLIP):
    moe = model.config.moe
    n = len(moe_lib.tower_layers(moe)[tower])
    active = dense + n * ((moe.top_k - 1) * ffn + 2 * w * moe.num_experts)
  return {"dense": float(dense), "active": float(active)}
