"""Multilingual text towers <-> PyTorch: Hugging Face XLM-R / BERT encoders and M-CLIP's release
(`transformer.*` + `LinearTransformation.*`, mean pooled over the attention mask); the
`build` / `to-mclip` subcommands of `python -m zoo.convert`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
from flax import nnx

from zoo.convert import common
from zoo.convert.common import attn_out, identity, layer_norm, linear, split_qkv
from zoo.convert.io import read_state_dict, write_safetensors
from zoo.models.layers import Linear
from zoo.models.m2m100 import M2M100TextConfig
from zoo.models.multilingual import (
  TEXT_MODELS,
  MultilingualCLIP,
  MultilingualTextConfig,
  MultilingualTextTransformer,
  from_clip,
  list_text_models,
  text_config,
)
from zoo.weights import model_dir


def _read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} {path}: not JSON ({e})") from None


def text_config_from_hf(hf_config: Mapping[str, Any], encoder_config: Mapping[str, Any] | None = None,
                        **overrides: Any) -> tuple[MultilingualTextConfig, int | None]:
  """(text config, projection dim or None) from a transformers config dict.

  Accepts XLM-R / RoBERTa / BERT configs (`model_type`, `hidden_size`, ...) and M-CLIP's
  (`modelBase`, `transformerDimensions`, `numDims`), whose encoder is `modelBase`: a hub name
  zoo knows, a local directory with a config.json, or any name with `encoder_config` (that
  encoder's config.json dict, e.g. LaBSE's or mBERT's).
  """
  hf = dict(hf_config)
  if isinstance(hf.get("encoder"), Mapping):  # written by `to-mclip`: the exact zoo config
    cfg = dataclasses.replace(MultilingualTextConfig(**hf["encoder"]), **overrides)
    return cfg, int(hf["numDims"]) if "numDims" in hf else None
  if "transformerDimensions" in hf or "numDims" in hf:  # M-CLIP's MCLIPConfig
    model_base = str(hf.get("modelBase", ""))
    base = model_base.split("/")[-1]
    local = os.path.join(model_base, "config.json") if model_base else ""
    if encoder_config is None and base not in TEXT_MODELS and local and os.path.isfile(local):
      encoder_config = _read_json(local, "modelBase config")
    if encoder_config is not None:
      cfg, _ = text_config_from_hf(encoder_config, **overrides)
    elif base in TEXT_MODELS:
      cfg = text_config(base, **overrides)
    else:
      raise ValueError(f"M-CLIP config names modelBase {model_base!r}, which zoo does not know "
                       f"({', '.join(list_text_models())}); pass that encoder's config.json with "
                       "--encoder-config")
    if int(hf.get("transformerDimensions", cfg.width)) != cfg.width:
      raise ValueError(f"M-CLIP transformerDimensions={hf['transformerDimensions']} but "
                       f"{base} has width {cfg.width}")
    return cfg, int(hf["numDims"]) if "numDims" in hf else None
  model_type = hf.get("model_type", "xlm-roberta")
  if model_type == "m2m_100":  # NLLB's encoder
    if hf.get("activation_function", "relu") != "relu":
      raise ValueError(f"M2M100 activation_function {hf['activation_function']!r}: zoo's encoder "
                       "uses ReLU")
    return M2M100TextConfig(
        vocab_size=int(hf["vocab_size"]), width=int(hf["d_model"]),
        layers=int(hf["encoder_layers"]), heads=int(hf["encoder_attention_heads"]),
        mlp_dim=int(hf["encoder_ffn_dim"]),
        max_positions=int(hf.get("max_position_embeddings", 1024)),
        pad_token_id=int(hf.get("pad_token_id", 1)),
        scale_embedding=bool(hf.get("scale_embedding", True)), **overrides), None
  if model_type not in ("xlm-roberta", "roberta", "bert"):
    raise ValueError(f"unsupported text encoder model_type {model_type!r}; expected xlm-roberta, "
                     "roberta or bert")
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"hidden_act {act!r} is not supported (zoo's MLP uses exact GELU)")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size") if k not in hf]
  if missing:
    raise ValueError(f"transformers config lacks {missing}")
  fields = dict(
      vocab_size=int(hf["vocab_size"]), width=int(hf["hidden_size"]),
      layers=int(hf["num_hidden_layers"]), heads=int(hf["num_attention_heads"]),
      mlp_dim=int(hf["intermediate_size"]),
      max_positions=int(hf.get("max_position_embeddings", 512)),
      type_vocab_size=int(hf.get("type_vocab_size", 1)),
      pad_token_id=int(hf.get("pad_token_id", 1 if model_type != "bert" else 0)),
      ln_eps=float(hf.get("layer_norm_eps", 1e-12)),
      positions="bert" if model_type == "bert" else "roberta")
  fields.update(overrides)  # context_length: the encoder's limit unless overridden
  return MultilingualTextConfig(**fields), None


_HF_PREFIXES = ("transformer.", "roberta.", "bert.", "")
_HF_IGNORED = ("embeddings.position_ids", "pooler.", "lm_head.", "cls.")


def _hf_prefix(state_dict: Mapping[str, Any]) -> str:
  for prefix in _HF_PREFIXES:
    if f"{prefix}embeddings.word_embeddings.weight" in state_dict:
      return prefix
  raise ValueError("not an XLM-R / BERT state dict: no '[transformer.|roberta.|bert.]embeddings."
                   f"word_embeddings.weight' key (found e.g. {sorted(state_dict)[:5]})")


def text_rules(cfg: MultilingualTextConfig, prefix: str, projection: bool):
  """The encoder's rules (tower-relative zoo paths; `prefix` before transformers' key names),
  with M-CLIP's `LinearTransformation` when `projection`."""
  rules = [
      identity(("token_embedding",), f"{prefix}embeddings.word_embeddings.weight"),
      identity(("positional_embedding",), f"{prefix}embeddings.position_embeddings.weight"),
      identity(("token_type_embedding",), f"{prefix}embeddings.token_type_embeddings.weight"),
      *layer_norm(("ln_embed",), f"{prefix}embeddings.LayerNorm"),
  ]
  for i in range(cfg.layers):
    zoo, key = ("blocks", i), f"{prefix}encoder.layer.{i}"
    rules += split_qkv(zoo + ("attn",), [f"{key}.attention.self.{n}" for n in ("query", "key", "value")],
                       cfg.width, cfg.heads)
    rules += attn_out(zoo + ("attn",), f"{key}.attention.output.dense", cfg.heads, cfg.width)
    rules += layer_norm(zoo + ("ln_1",), f"{key}.attention.output.LayerNorm")
    rules += linear(zoo + ("mlp", "fc1"), f"{key}.intermediate.dense")
    rules += linear(zoo + ("mlp", "fc2"), f"{key}.output.dense")
    rules += layer_norm(zoo + ("ln_2",), f"{key}.output.LayerNorm")
  if projection:
    rules += linear(("proj",), "LinearTransformation", bias=cfg.proj_bias)
  return rules


def m2m100_rules(cfg: M2M100TextConfig, prefix: str):
  """transformers M2M100Encoder keys (`prefix` before them) <-> zoo's M2M100TextTransformer
  (tower-relative paths; the projection is the caller's)."""
  rules = [identity(("token_embedding",), f"{prefix}embed_tokens.weight"),
           *layer_norm(("ln_final",), f"{prefix}layer_norm")]
  for i in range(cfg.layers):
    zoo, key = ("blocks", i), f"{prefix}layers.{i}"
    rules += split_qkv(zoo + ("attn",), [f"{key}.self_attn.{n}_proj" for n in "qkv"],
                       cfg.width, cfg.heads)
    rules += attn_out(zoo + ("attn",), f"{key}.self_attn.out_proj", cfg.heads, cfg.width)
    rules += layer_norm(zoo + ("ln_1",), f"{key}.self_attn_layer_norm")
    rules += linear(zoo + ("fc1",), f"{key}.fc1")
    rules += linear(zoo + ("fc2",), f"{key}.fc2")
    rules += layer_norm(zoo + ("ln_2",), f"{key}.final_layer_norm")
  return rules


def _build_tower(spec: tuple[MultilingualTextConfig, int | None]) -> MultilingualTextTransformer:
  cfg, embed_dim = spec
  return MultilingualTextTransformer(cfg, embed_dim, rngs=nnx.Rngs(0))


def from_hf_text(state_dict: Mapping[str, Any], config: MultilingualTextConfig | Mapping[str, Any],
                 *, embed_dim: int | None = None, seed: int = 0, **overrides: Any
                 ) -> MultilingualTextTransformer:
  """A MultilingualTextTransformer from PyTorch weights (exact re-layout, every key checked).

  `state_dict`: a transformers XLMRobertaModel / BertModel (keys `embeddings.*`, `encoder.*`,
  optionally prefixed `roberta.` / `bert.`), or M-CLIP's released model (`transformer.*` +
  `LinearTransformation.{weight,bias}`). `config`: a MultilingualTextConfig, the encoder's
  config.json dict, or M-CLIP's (modelBase / transformerDimensions / numDims). Without a
  `LinearTransformation` the tower gets a fresh projection to `embed_dim` (seeded; to be
  trained, e.g. by distillation) or, with embed_dim None, none (pooled hidden states).
  """
  if isinstance(config, MultilingualTextConfig):
    cfg, proj_dim = dataclasses.replace(config, **overrides), None
  else:
    cfg, proj_dim = text_config_from_hf(config, **overrides)
  prefix = _hf_prefix(state_dict)
  has_proj = "LinearTransformation.weight" in state_dict
  if has_proj:
    found = int(np.shape(state_dict["LinearTransformation.weight"])[0])
    if proj_dim is not None and proj_dim != found:
      raise ValueError(f"M-CLIP config numDims={proj_dim} but LinearTransformation.weight has {found} rows")
    if embed_dim is not None and embed_dim != found:
      raise ValueError(f"embed_dim={embed_dim} but LinearTransformation.weight projects to {found}")
    cfg = dataclasses.replace(cfg, proj_bias="LinearTransformation.bias" in state_dict)
    embed_dim = found
  ignore = lambda k: any(k.startswith(prefix + s) or k.startswith(s) for s in _HF_IGNORED)  # noqa: E731
  tower = common.convert_from_torch(
      state_dict, text_rules(cfg, prefix, has_proj), (cfg, embed_dim if has_proj else None),
      layout="M-CLIP" if has_proj else "HF text encoder", model=f"{cfg.layers}-layer text tower",
      ignore=ignore, build=_build_tower)
  if not has_proj and embed_dim is not None:
    tower.proj = nnx.data(Linear(cfg.width, embed_dim, axes=("embed", None),
                                 use_bias=cfg.proj_bias, rngs=nnx.Rngs(seed)))
  return tower


def to_hf_text(tower: MultilingualTextTransformer, *, prefix: str = "transformer."
               ) -> dict[str, np.ndarray]:
  """The tower in M-CLIP's layout (`transformer.*` + `LinearTransformation.*`); prefix ""
  gives a bare XLMRobertaModel state dict (projection, if any, still LinearTransformation)."""
  return common.convert_to_torch(tower, text_rules(tower.cfg, prefix, tower.proj is not None),
                                 layout="M-CLIP")


def _weights_in(path: str) -> str:
  """The weight file of a HF model directory (or `path` itself when it is a file)."""
  if os.path.isfile(path):
    return path
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def to_hf_config(cfg: MultilingualTextConfig) -> dict[str, Any]:
  """The transformers XLMRobertaConfig / BertConfig dict of a text tower's encoder."""
  return {"model_type": "xlm-roberta" if cfg.positions == "roberta" else "bert",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "num_hidden_layers": cfg.layers,
          "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim, "hidden_act": "gelu",
          "max_position_embeddings": cfg.max_positions, "type_vocab_size": cfg.type_vocab_size,
          "pad_token_id": cfg.pad_token_id, "layer_norm_eps": cfg.ln_eps}


def model_base(cfg: MultilingualTextConfig, output: str) -> str:
  """M-CLIP's `modelBase` for a tower: the hub name of a known encoder (e.g. xlm-roberta-large),
  else the absolute path of `output/encoder`, where its transformers config.json is written."""
  arch = dataclasses.replace(cfg, context_length=None)
  for name in ("xlm-roberta-base", "xlm-roberta-large"):
    if dataclasses.replace(TEXT_MODELS[name], proj_bias=cfg.proj_bias, pool=cfg.pool) == arch:
      return name
  path = os.path.abspath(os.path.join(output, "encoder"))
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(to_hf_config(cfg), f, indent=2)
  return path


def run_build(args: argparse.Namespace) -> int:
  """A MultilingualCLIP from a zoo CLIP (image tower, temperature, teacher) and a HF XLM-R /
  BERT encoder or an M-CLIP release (text tower)."""
  missing = [f"--{k}" for k in ("teacher", "text", "tokenizer") if not getattr(args, k)]
  if missing:
    raise ValueError(f"build-mclip needs {' '.join(missing)}")
  teacher, _, _ = model_dir.load(args.teacher)
  config_path = os.path.join(args.text if os.path.isdir(args.text) else
                             os.path.dirname(args.text), "config.json")
  hf_config = _read_json(config_path, "--text config")
  encoder = getattr(args, "encoder_config", None)
  cfg, _ = text_config_from_hf(hf_config, _read_json(encoder, "--encoder-config") if encoder
                               else None)
  tower = from_hf_text(read_state_dict(_weights_in(args.text)), cfg,
                       embed_dim=teacher.config.embed_dim, seed=args.seed)
  model = from_clip(teacher, tower, tokenizer=os.path.abspath(args.tokenizer))
  out = model_dir.save(model, args.output, {"built_from": {"teacher": args.teacher,
                                                            "text": args.text}},
                        overwrite=args.overwrite)
  print(f"wrote zoo checkpoint {out}")
  return 0


def run_to_mclip(args: argparse.Namespace) -> int:
  """A MultilingualCLIP's text tower in M-CLIP's layout (model.safetensors + config.json)."""
  model, _, _ = model_dir.load(args.input)
  if not isinstance(model, MultilingualCLIP):
    raise ValueError(f"{args.input} holds a {type(model).__name__}, not a MultilingualCLIP")
  if os.path.exists(args.output) and not args.overwrite:
    raise FileExistsError(f"{args.output} exists; pass --overwrite")
  os.makedirs(args.output, exist_ok=True)
  write_safetensors(to_hf_text(model.text), os.path.join(args.output, "model.safetensors"),
                    {"format": "pt"})
  cfg = model.config.text
  with open(os.path.join(args.output, "config.json"), "w") as f:
    json.dump({"model_type": "M-CLIP", "modelBase": model_base(cfg, args.output),
               "transformerDimensions": cfg.width, "numDims": model.config.embed_dim,
               "encoder": dataclasses.asdict(cfg)}, f, indent=2)
  print(f"wrote {args.output}/model.safetensors and config.json")
  return 0
