"""Hugging Face Llama / Qwen2 / Qwen3 checkpoints <-> zoo's LLM text tower (zoo.models.llm).

`from_hf(state_dict, config_dict)` (keys of `LlamaModel` or, with the `model.` prefix, of
`*ForCausalLM`; `lm_head.weight` and rotary buffers are ignored), `to_hf(tower)` (the
`*Model` keys, bitwise), `config_from_hf` / `config_to_hf`, and `load_pretrained(directory)`:
config.json + model.safetensors or sharded `model-0000x-of-0000n.safetensors` with
`model.safetensors.index.json`, read one shard at a time.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from zoo.convert import common
from zoo.convert.common import Rule, identity, transposed
from zoo.convert.io import WeightFileError
from zoo.models import llm as llm_lib, sharding

MODEL_TYPES = ("llama", "qwen2", "qwen3")
INDEX_FILE = "model.safetensors.index.json"


def _rope(hf: Mapping[str, Any]) -> tuple[float, tuple | None]:
  """(theta, llama3 scaling) from transformers v5 `rope_parameters` or v4 rope_theta/scaling."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or params)
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in ("default", None):
    return theta, None
  if kind != "llama3":
    raise ValueError(f"rope_type {kind!r} is not supported; zoo's LLM tower implements "
                     "'default' and 'llama3'")
  return theta, (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                 float(scaling["high_freq_factor"]),
                 int(scaling["original_max_position_embeddings"]))


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> llm_lib.LLMConfig:
  """An LLMConfig from a transformers Llama / Qwen2 / Qwen3 config (dict or object)."""
  if hasattr(hf, "to_dict"):
    hf = hf.to_dict()
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise ValueError(f"HF config model_type {kind!r} is not an LLM zoo converts; supported: "
                     f"{', '.join(MODEL_TYPES)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r}: zoo's LLM tower implements SwiGLU (silu)")
  if kind == "qwen2" and hf.get("use_sliding_window"):
    raise ValueError("Qwen2 use_sliding_window=True is not supported (full attention only)")
  width, heads = hf["hidden_size"], hf["num_attention_heads"]
  theta, scaling = _rope(hf)
  bias = bool(hf.get("attention_bias", False))
  pad = hf.get("pad_token_id")
  fields = dict(
      model_type=kind, vocab_size=hf["vocab_size"], width=width, layers=hf["num_hidden_layers"],
      heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or width // heads, mlp_dim=hf["intermediate_size"],
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
      max_positions=hf.get("max_position_embeddings", 8192),
      qkv_bias=True if kind == "qwen2" else bias, o_bias=bias if kind != "qwen2" else False,
      mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=kind == "qwen3",
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      pad_token_id=0 if pad is None else int(pad))
  fields.update(overrides)
  return llm_lib.LLMConfig(**fields)


def config_to_hf(config: llm_lib.LLMConfig) -> dict[str, Any]:
  """A transformers config dict (`AutoConfig.for_model(**d)`) of `config`."""
  c = config
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    f, low, high, old = c.rope_scaling
    rope.update(rope_type="llama3", factor=f, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=old)
  d = {"model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.width,
       "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
       "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
       "intermediate_size": c.mlp_dim, "rms_norm_eps": c.rms_eps, "hidden_act": "silu",
       "max_position_embeddings": c.max_positions, "rope_parameters": rope,
       "tie_word_embeddings": c.tie_word_embeddings, "pad_token_id": c.pad_token_id}
  if c.model_type == "llama":
    d.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
  return d


def rules_for(config: llm_lib.LLMConfig, prefix: str = "") -> list[Rule]:
  """The `*Model` layout (keys under `prefix`, e.g. 'model.' for `*ForCausalLM`)."""
  c = config
  rules = [identity(("embed_tokens",), f"{prefix}embed_tokens.weight"),
           identity(("norm", "weight"), f"{prefix}norm.weight")]
  for i in range(c.layers):
    z, k = ("layers", i), f"{prefix}layers.{i}"
    for name, bias in (("q", c.qkv_bias), ("k", c.qkv_bias), ("v", c.qkv_bias), ("o", c.o_bias)):
      rules.append(transposed(z + ("self_attn", f"{name}_proj", "kernel"),
                              f"{k}.self_attn.{name}_proj.weight"))
      if bias:
        rules.append(identity(z + ("self_attn", f"{name}_proj", "bias"),
                              f"{k}.self_attn.{name}_proj.bias"))
    if c.qk_norm:
      rules += [identity(z + ("self_attn", "q_norm", "weight"), f"{k}.self_attn.q_norm.weight"),
                identity(z + ("self_attn", "k_norm", "weight"), f"{k}.self_attn.k_norm.weight")]
    for name in ("gate", "up", "down"):
      rules.append(transposed(z + ("mlp", f"{name}_proj", "kernel"), f"{k}.mlp.{name}_proj.weight"))
      if c.mlp_bias:
        rules.append(identity(z + ("mlp", f"{name}_proj", "bias"), f"{k}.mlp.{name}_proj.bias"))
    rules += [identity(z + ("input_layernorm", "weight"), f"{k}.input_layernorm.weight"),
              identity(z + ("post_attention_layernorm", "weight"),
                       f"{k}.post_attention_layernorm.weight")]
  return rules


def _ignored(key: str) -> bool:
  return key == "lm_head.weight" or key.endswith("rotary_emb.inv_freq")


def _prefix(keys) -> str:
  return "model." if any(k.startswith("model.") for k in keys) else ""


def _builder(dtype):
  return lambda cfg: llm_lib.LLM(cfg, dtype=dtype, rngs=nnx.Rngs(0))


def from_hf(state_dict: Mapping[str, Any], config: Mapping[str, Any] | llm_lib.LLMConfig, *,
            dtype=jnp.float32, **overrides: Any) -> llm_lib.LLM:
  """The zoo LLM tower holding a transformers Llama / Qwen2 / Qwen3 state dict's weights.

  `overrides`: LLMConfig fields the HF config does not hold (causal, pool, param_dtype)."""
  cfg = config if isinstance(config, llm_lib.LLMConfig) else config_from_hf(config, **overrides)
  rules = rules_for(cfg, _prefix(state_dict))
  return common.convert_from_torch(state_dict, rules, cfg, layout=f"HF {cfg.model_type}",
                                   model=cfg.model_type, ignore=_ignored, build=_builder(dtype))


def to_hf(tower: llm_lib.LLM) -> dict[str, np.ndarray]:
  """The `*Model` state dict (keys without `model.`) of `tower`."""
  return common.convert_to_torch(tower, rules_for(tower.config), layout=f"HF {tower.config.model_type}")


def _shard_files(directory: str) -> list[str]:
  index = os.path.join(directory, INDEX_FILE)
  if not os.path.exists(index):
    single = os.path.join(directory, "model.safetensors")
    if not os.path.exists(single):
      raise WeightFileError(f"{directory} holds neither {INDEX_FILE} nor model.safetensors")
    return [single]
  with open(index) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise WeightFileError(f"{index} has no weight_map")
  files = sorted(set(weight_map.values()))
  missing = [name for name in files if not os.path.exists(os.path.join(directory, name))]
  if missing:
    raise WeightFileError(f"{directory}: shard {missing[0]} named in {INDEX_FILE} is missing"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
  return [os.path.join(directory, name) for name in files]


def load_pretrained(directory: str, *, dtype=jnp.float32, **overrides: Any) -> llm_lib.LLM:
  """The tower of a Hugging Face model directory (config.json + safetensors), each shard read
  and converted on its own (at most one shard's tensors on the host besides the model)."""
  with open(os.path.join(directory, "config.json")) as f:
    cfg = config_from_hf(json.load(f), **overrides)
  files = _shard_files(directory)
  graphdef, state = common.abstract_state(cfg, _builder(dtype))
  flat = dict(nnx.to_flat_state(state))
  keys = []
  for path in files:
    with safe_open(path, framework="numpy") as f:
      keys += list(f.keys())
  rules = rules_for(cfg, _prefix(keys))
  expected = common.expected_torch_shapes(rules, common.flat_shapes(state))
  by_key = {r.torch[0]: r for r in rules}
  done = set()
  for path in files:
    with safe_open(path, framework="numpy") as f:
      shard = {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}
      common.check_state_dict(shard, {k: s for k, s in expected.items() if k in shard},
                              layout=f"HF {cfg.model_type} ({os.path.basename(path)})",
                              model=cfg.model_type, ignore=_ignored)
      for key in shard:
        rule = by_key.get(key)
        if rule is None:
          continue
        value = rule.to_zoo(common.as_float32(_tensor(f, path, key)))
        var = flat[rule.zoo]
        var.set_value(jnp.asarray(value, var.get_value().dtype))
        done.add(key)
  missing = sorted(set(expected) - done)
  if missing:
    raise common.StateDictError(f"{directory}: {len(missing)} tensors of the {cfg.model_type} "
                                f"layout are in no shard, e.g. {missing[0]}")
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def _tensor(f: Any, path: str, key: str) -> np.ndarray:
  """One tensor of an open shard as numpy (bfloat16, which numpy lacks, through torch)."""
  try:
    return f.get_tensor(key)
  except TypeError:
    import torch  # noqa: F401  (safetensors' pt framework needs it)

    with safe_open(path, framework="pt") as g:
      return common.to_numpy(g.get_tensor(key))


class _Shape:
  """A stand-in with `.shape` for a lazily read tensor (shape checks before reading)."""

  def __init__(self, shape):
    self.shape = tuple(shape)


def param_bytes(config: llm_lib.LLMConfig, mesh: jax.sharding.Mesh | Any = None) -> dict:
  """Parameter bytes of `config` (jax.eval_shape; `param_dtype`) in total and per device on `mesh` (logical
  axes -> mesh axes as zoo.models.sharding)."""
  _, state = common.abstract_state(config, _builder(jnp.float32))
  total = per_device = 0
  for _, var in nnx.to_flat_state(state):
    v = var.get_value()
    n = int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize
    total += n
    if mesh is not None:
      spec = sharding.logical_to_spec(var.get_metadata().get("out_sharding"), v.shape, mesh)
      split = int(np.prod([mesh.shape[a] for a in spec if a is not None] or [1]))
      per_device += n // split
  return {"total": total, "per_device": per_device}
