"""Microsoft's released LLM2CLIP checkpoints -> zoo's LLM2CLIP (zoo.models.llm2clip).

A release is two Hugging Face repos. The image side (LLM2CLIP-Openai-B-16 / -L-14-224 /
-L-14-336) holds transformers' CLIP vision layout (`vision_model.*`, bias-free
`visual_projection`), the text adapter (`text_adapter.*`) and `logit_scale`, with a config.json
whose `vision_config` / `projection_dim` are CLIPConfig's. The adapter is LLM2CLIP's TextProj
(microsoft/LLM2CLIP llm2clip/eva_clip/model.py): an nn.Sequential of N LinearBlocks
(`{i}.ln`, `{i}.fn.0`, `{i}.fn.3`: x + fc2(gelu(fc1(LN x)))), then LayerNorm (`{N}`) and Linear
(`{N+1}`), reading the L2-normalized LLM embedding. The text side (LLM2CLIP-Llama-3-8B-
Instruct-CC-Finetuned) is a Llama directory (zoo.convert.llm.load_pretrained) run as LLM2Vec
does (llm2clip/llm2vec/llm2vec.py): bidirectional attention, the caption wrapped in the
Instruct chat template (`TEMPLATES`), mean over the caption's tokens (the template's prefix and
the BOS attend but are not pooled), 512 tokens.

The EVA02 releases (LLM2CLIP-EVA02-B-16 / -L-14-336) are one `.pt` file: the state dict of
EVA-CLIP's CustomCLIP (llm2clip/eva_clip: `visual.*` EVAVisionTransformer with sub-LN q/k/v_proj,
SwiGLU w1/w2/w3 + ffn_ln, fixed `rope.freqs_*` buffers; `text.text_adaptor.*` TextProj;
logit_scale) and no config. It is read by zoo.convert.open_clip's timm-Eva rules with their key
names mapped to EVA-CLIP's (`eva_key`: the inverse of timm's eva.checkpoint_filter_fn); the fixed
rotary buffers must equal the tables zoo computes. The tower's sizes
come from the weights, its head width (64) and rotary reference grid (16) from EVA-CLIP's
EVA02 model configs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.convert import common, hf, llm as llm_convert, open_clip
from zoo.convert.common import Rule, identity, layer_norm, linear
from zoo.models import configs as registry, eva, llm as llm_lib, llm2clip as llm2clip_lib

# LLM2Vec's prepare_for_tokenization (prefix, suffix) by model family, mean pooling.
TEMPLATES = {
    "llama3-instruct": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "qwen2-instruct": ("<|im_start|>user\n", "<|im_end|>"),
    "none": ("", ""),
}
_PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>",
                   "<|end_of_text|>", "<|endoftext|>")
_ADAPTER = re.compile(r"^((?:text_adapter|text\.text_adaptor)\.(?:.*\.)?)(\d+)\.fn\.0\.weight$")
# EVA-CLIP's fixed rotary tables (recomputed by zoo's tower), and its names -> timm's Eva names.
_EVA_ROPE = re.compile(r"^visual\.(?:blocks\.\d+\.attn\.)?rope\.freqs_(?:cos|sin)$")
_EVA_RENAMES = ((".mlp.ffn_ln.", ".mlp.norm."), (".attn.inner_attn_ln.", ".attn.norm."),
                (".mlp.w1.", ".mlp.fc1_g."), (".mlp.w2.", ".mlp.fc1_x."), (".mlp.w3.", ".mlp.fc2."))
EVA_HEAD_WIDTH, EVA_ROPE_REF = 64, 16  # EVA-CLIP model_configs EVA02-CLIP-*: head_width, pt_hw_seq_len


def adapter_prefix(keys) -> tuple[str, int]:
  """(Sequential prefix, number of LinearBlocks) of the `text_adapter.*` (HF releases) or
  `text.text_adaptor.*` (EVA-CLIP's TextProj) keys."""
  found = {}
  for key in keys:
    m = _ADAPTER.match(key)
    if m:
      found.setdefault(m.group(1), set()).add(int(m.group(2)))
  if len(found) != 1:
    raise common.StateDictError("not an LLM2CLIP image+adapter checkpoint: no (or several) "
                                "text_adapter.*.N.fn.0.weight LinearBlock keys")
  prefix, blocks = next(iter(found.items()))
  if blocks != set(range(len(blocks))):
    raise common.StateDictError(f"{prefix}: LinearBlocks {sorted(blocks)} are not 0..N-1")
  return prefix, len(blocks)


def rules_for(config: llm2clip_lib.LLM2CLIPConfig, prefix: str) -> list[Rule]:
  """Image tower (HF CLIPVisionModel + visual_projection, or open_clip's timm Eva trunk at
  `visual.trunk.*`), adapter and logit_scale."""
  if isinstance(config.vision, eva.EvaVisionConfig):  # open_clip's Eva rules, EVA-CLIP's names
    image = [dataclasses.replace(r, torch=tuple(map(eva_key, r.torch))) for r in open_clip.rules_for(
        eva.EvaCLIPConfig(embed_dim=config.embed_dim, vision=config.vision))]
  else:
    image = hf.rules_for(_clip_config(config))
  rules = [r for r in image if r.zoo[0] == "visual"]
  n = config.adapter_blocks
  for i in range(n):
    z = ("adapter", "blocks", i)
    rules += [*layer_norm(z + ("ln",), f"{prefix}{i}.ln"),
              *linear(z + ("fc1",), f"{prefix}{i}.fn.0"), *linear(z + ("fc2",), f"{prefix}{i}.fn.3")]
  rules += [*layer_norm(("adapter", "ln"), f"{prefix}{n}"),
            *linear(("adapter", "proj"), f"{prefix}{n + 1}"),
            identity(("logit_scale",), "logit_scale")]
  return rules


def _clip_config(config: llm2clip_lib.LLM2CLIPConfig) -> registry.CLIPConfig:
  return registry.CLIPConfig(embed_dim=config.embed_dim, vision=config.vision,
                             quick_gelu=config.quick_gelu)


def config_from_hf(hf_config: Mapping[str, Any], state_dict: Mapping[str, Any],
                   text: llm_lib.LLMConfig, **fields: Any) -> llm2clip_lib.LLM2CLIPConfig:
  """The zoo config of a release: vision from config.json, adapter sizes from the weights."""
  vc = dict(hf_config.get("vision_config") or {})
  if not vc:
    raise ValueError("LLM2CLIP config.json has no vision_config (EVA02 releases are not read)")
  act = vc.get("hidden_act", "quick_gelu")
  clip = hf.config_from_hf({"model_type": "clip", "vision_config": vc,
                            "text_config": {"hidden_act": act},
                            "projection_dim": hf_config.get("projection_dim", 1280)})
  prefix, blocks = adapter_prefix(state_dict)
  fc1 = np.shape(state_dict[f"{prefix}0.fn.0.weight"])
  proj = np.shape(state_dict[f"{prefix}{blocks + 1}.weight"])
  if fc1[1] != text.width:
    raise ValueError(f"the adapter reads {fc1[1]}-d LLM embeddings; the LLM gives {text.width}")
  return llm2clip_lib.LLM2CLIPConfig(
      embed_dim=proj[0], vision=clip.vision, text=text, adapter_blocks=blocks,
      adapter_expansion=fc1[0] / fc1[1], quick_gelu=clip.quick_gelu,
      init_logit_scale=clip.init_logit_scale, adapter_l2_input=True, **fields)


def from_llm2clip(state_dict: Mapping[str, Any], hf_config: Mapping[str, Any],
                  tower: llm_lib.LLM, **fields: Any) -> llm2clip_lib.LLM2CLIP:
  """The zoo LLM2CLIP of an image+adapter state dict and its (converted) LLM tower."""
  sd = dict(state_dict)
  config = config_from_hf(hf_config, sd, tower.config, **fields)
  return _convert(sd, config, tower)


def eva_key(open_clip_key: str) -> str:
  """EVA-CLIP's name of an open_clip timm-Eva key (`visual.trunk.*` -> `visual.*`, timm's
  module names -> EVA's, the inverse of timm's eva.checkpoint_filter_fn); others unchanged."""
  if not open_clip_key.startswith("visual.trunk."):
    return open_clip_key
  key = "visual." + open_clip_key[len("visual.trunk."):]
  for eva_name, timm_name in _EVA_RENAMES:
    key = key.replace(timm_name, eva_name)
  return key


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
  if key not in sd:
    raise common.StateDictError(f"not an LLM2CLIP EVA02 checkpoint: no key {key!r}")
  return tuple(np.shape(sd[key]))


def eva_config(state_dict: Mapping[str, Any], text: llm_lib.LLMConfig,
               **fields: Any) -> llm2clip_lib.LLM2CLIPConfig:
  """The zoo config of an EVA02 release's state dict (EVA-CLIP key names)."""
  width = _shape(state_dict, "visual.cls_token")[-1]
  patch = _shape(state_dict, "visual.patch_embed.proj.weight")[-1]
  grid = int(round((_shape(state_dict, "visual.pos_embed")[1] - 1) ** 0.5))
  layers = len({k.split(".")[2] for k in state_dict if k.startswith("visual.blocks.")})
  vision = eva.EvaVisionConfig(
      image_size=grid * patch, patch_size=patch, width=width, layers=layers,
      heads=max(1, width // EVA_HEAD_WIDTH), mlp_dim=_shape(state_dict, "visual.blocks.0.mlp.w1.weight")[0],
      mlp="swiglu", scale_mlp=True, scale_attn=True, qkv="separate", rope=True,
      rope_ref=EVA_ROPE_REF)
  prefix, blocks = adapter_prefix(state_dict)
  fc1 = _shape(state_dict, f"{prefix}0.fn.0.weight")
  if fc1[1] != text.width:
    raise ValueError(f"the adapter reads {fc1[1]}-d LLM embeddings; the LLM gives {text.width}")
  return llm2clip_lib.LLM2CLIPConfig(
      embed_dim=_shape(state_dict, "visual.head.weight")[0], vision=vision, text=text,
      adapter_blocks=blocks, adapter_expansion=fc1[0] / fc1[1], adapter_l2_input=True, **fields)


def from_llm2clip_eva(state_dict: Mapping[str, Any], tower: llm_lib.LLM,
                      **fields: Any) -> llm2clip_lib.LLM2CLIP:
  """The zoo LLM2CLIP of an EVA02 release's state dict (EVA-CLIP's CustomCLIP) and its LLM."""
  config = eva_config(state_dict, tower.config, **fields)
  _check_rope(state_dict, config.vision)
  return _convert(dict(state_dict), config, tower, ignore=_EVA_ROPE.match)


def _check_rope(state_dict: Mapping[str, Any], vision: eva.EvaVisionConfig) -> None:
  """The release's fixed rotary tables must be the ones zoo's tower computes (this checks the
  head width and reference grid, which the weights do not otherwise carry)."""
  g = vision.grid_size
  sin, cos = eva.rope_tables(vision, g, g)
  for key in filter(_EVA_ROPE.match, state_dict):
    want = cos if key.endswith("cos") else sin
    got = common.as_float32(common.to_numpy(state_dict[key]))
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-2):
      raise common.StateDictError(
          f"{key}: the rotary table {got.shape} is not EVA02's at head width {EVA_HEAD_WIDTH}, "
          f"reference grid {EVA_ROPE_REF} (expected {want.shape})")


def _convert(sd: dict[str, Any], config: llm2clip_lib.LLM2CLIPConfig, tower: llm_lib.LLM,
             ignore=lambda k: k.endswith("position_ids")) -> llm2clip_lib.LLM2CLIP:
  if "logit_scale" not in sd:
    sd["logit_scale"] = np.float32(config.init_logit_scale)
  prefix, _ = adapter_prefix(sd)
  rules = rules_for(config, prefix)
  build = lambda c: llm2clip_lib.LLM2CLIP(c, rngs=nnx.Rngs(0))  # noqa: E731
  _, state = common.abstract_state(config, build)
  shapes = {p: s for p, s in common.flat_shapes(state).items() if p[0] != "text"}
  common.check_coverage(rules, shapes, "LLM2CLIP")
  common.check_state_dict(sd, common.expected_torch_shapes(rules, shapes), layout="LLM2CLIP",
                          model="LLM2CLIP", ignore=ignore)
  arrays = {r.zoo: np.asarray(r.to_zoo(*[common.as_float32(common.to_numpy(sd[k]))
                                         for k in r.torch]), order="C") for r in rules}
  for path, var in nnx.to_flat_state(nnx.state(tower)):
    arrays[("text",) + tuple(path)] = var.get_value()
  return common.model_from_flat(config, arrays, build)


def llm2vec_tokenizer(directory: str, template: str = "llama3-instruct") -> dict[str, Any]:
  """LLM2Vec's text settings for a directory's tokenizer.json: LLM2CLIPConfig fields
  (tokenizer, format, prefix, suffix) and LLMConfig fields (pad_token_id, pool_skip)."""
  import tokenizers  # noqa: PLC0415 (an optional dependency)

  if template not in TEMPLATES:
    raise ValueError(f"LLM2Vec template {template!r}: expected one of {', '.join(TEMPLATES)}")
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} has no tokenizer.json")
  tok = tokenizers.Tokenizer.from_file(path)
  prefix, suffix = TEMPLATES[template]
  probe = "a"
  full = tok.encode(prefix + probe + suffix).ids
  text = tok.encode(probe + suffix, add_special_tokens=False).ids
  used = set(full)
  pad = None
  cfg_path = os.path.join(directory, "tokenizer_config.json")
  names = list(_PAD_CANDIDATES)
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      tc = json.load(f)
    for key in ("eos_token", "pad_token"):  # pad first: inserted at 0 last
      value = tc.get(key)
      value = value.get("content") if isinstance(value, dict) else value
      if isinstance(value, str):
        names.insert(0, value)
  for name in names:
    i = tok.token_to_id(name)
    if i is not None and i not in used:
      pad = i
      break
  if pad is None:
    raise ValueError(f"{path}: no padding token outside the template ({', '.join(names)})")
  return {"tokenizer": path, "tokenizer_format": "hf", "tokenizer_clean": "none",
          "tokenizer_prefix": prefix, "tokenizer_suffix": suffix,
          "pad_token_id": pad, "pool_skip": len(full) - len(text)}


def load_released(weights: Mapping[str, Any], hf_config: Mapping[str, Any] | None, llm_dir: str,
                  *, template: str = "llama3-instruct", context_length: int = 512,
                  dtype=jnp.float32) -> llm2clip_lib.LLM2CLIP:
  """A release: the image+adapter state dict and config.json (None: an EVA02 release), and the
  LLM's directory."""
  tok = llm2vec_tokenizer(llm_dir, template)
  with open(os.path.join(llm_dir, "config.json")) as f:
    positions = json.load(f).get("max_position_embeddings", context_length)
  tower = llm_convert.load_pretrained(
      llm_dir, dtype=dtype, causal=False, pool="mean", pool_skip=tok.pop("pool_skip"),
      pad_token_id=tok.pop("pad_token_id"), context_length=min(context_length, positions))
  if hf_config is None:
    return from_llm2clip_eva(weights, tower, **tok)
  return from_llm2clip(weights, hf_config, tower, **tok)
