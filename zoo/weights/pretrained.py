"""Pretrained weights by name: `create(name, pretrained=tag)`, `hf-hub:ORG/REPO`, publishing.

The table (`zoo/assets/pretrained.json`) is generated from open_clip's own pretrained table by
`scripts/gen_pretrained_table.py` (open_clip is never imported here): per (name, tag) the hub
repo, weight file names, layout, zoo architecture, preprocessing and tokenizer, plus the
variants' releases (Long-CLIP, CLIP-MoE, M-CLIP). Files come through huggingface_hub (its
cache, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, revisions) and are read without pickle
(`zoo.convert.io`); a file is checked against the table's SHA-256, or else the hub's LFS
object id (the blob's name). The converted model is cached as a `zoo.save` directory beside
the hub cache (`$HF_HOME/zoo/converted/...`, or $ZOO_CACHE), keyed by repo, revision, file,
architecture and zoo version, so a second load is a plain Orbax restore.
`export_pretrained` writes open_clip's hub layout, which open_clip loads as `local-dir:`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Mapping

from flax import nnx

from zoo import convert, errors, tokenizers, transforms
from zoo.convert import clip_moe, hf_siglip, llm2clip, long_clip, mclip, open_clip_config
from zoo.convert.io import write_safetensors
from zoo.models import (
  clip as clip_lib,
  configs,
  multilingual,
)
from zoo.version import __version__
from zoo.weights import hub, layout, model_dir

log = logging.getLogger("zoo.weights.pretrained")

TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                          "pretrained.json")
HF_HUB_PREFIX = "hf-hub:"
INIT_PREFIX = "pretrained:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_REGISTERED: dict[str, dict[str, dict]] = {}


# ----------------------------------------------------------------------------- the table


@functools.lru_cache(maxsize=1)
def table() -> dict[str, Any]:
  """The generated table: {'models': {name: {tag: entry}}, 'unsupported': ..., ...}."""
  with open(TABLE_PATH) as f:
    return json.load(f)


def _models() -> dict[str, dict[str, dict]]:
  merged = {name: dict(tags) for name, tags in table()["models"].items()}
  for name, tags in _REGISTERED.items():
    merged.setdefault(name, {}).update(tags)
  return merged


def clean_tag(tag: str) -> str:
  """Tags are matched as open_clip does: lower case, '-' read as '_'."""
  return tag.lower().replace("-", "_")


def list_models() -> list[str]:
  """Every name `create` takes: the architectures (random init, or `pretrained=` a tag) and the
  pretrained releases whose weights fix their own architecture (`pretrained=` needed)."""
  return sorted(set(configs.list_architectures()) | set(_models()))


def list_pretrained(as_str: bool = False) -> list:
  """Every (name, tag) zoo can load (or 'name:tag' strings)."""
  pairs = [(n, t) for n, tags in _models().items() for t in tags]
  return [f"{n}:{t}" for n, t in pairs] if as_str else pairs


def list_pretrained_tags(name: str) -> list[str]:
  return list(_models().get(name, {}))


def register_pretrained(name: str, tag: str, entry: Mapping[str, Any]) -> None:
  """Adds (or replaces) a table entry at run time (e.g. a private hub repo)."""
  _REGISTERED.setdefault(name, {})[clean_tag(tag)] = dict(entry)


def get_pretrained_cfg(name: str, tag: str) -> dict[str, Any]:
  """The table entry of (name, tag); one-line hub.PretrainedError naming the valid tags."""
  models = _models()
  if name not in models:
    hint = errors.did_you_mean(name, models)
    if name in table().get("unsupported", {}):
      hint = f" (open_clip has weights for it, but {table()['unsupported'][name]['reason']})"
    raise hub.PretrainedError(f"model {name!r} has no pretrained weights in zoo{hint}; "
                          f"see zoo.list_pretrained() ({len(models)} models)")
  tags = models[name]
  entry = tags.get(clean_tag(tag))
  if entry is None:
    raise hub.PretrainedError(f"unknown pretrained tag {tag!r} for model {name!r}; its tags: "
                          f"{', '.join(tags)}")
  return dict(entry)


def parse_ref(ref: str) -> tuple[str, str | None]:
  """'NAME/TAG', 'NAME:TAG' or 'hf-hub:ORG/REPO' -> (name, tag or None)."""
  if ref.startswith(INIT_PREFIX):
    ref = ref[len(INIT_PREFIX):]
  if ref.startswith(HF_HUB_PREFIX):
    return ref, None
  for sep in ("/", ":"):
    if sep in ref:
      name, tag = ref.rsplit(sep, 1)
      return name, tag
  raise hub.PretrainedError(f"pretrained reference {ref!r} must be NAME/TAG (e.g. "
                        "ViT-B-16/laion2b_s34b_b88k) or hf-hub:ORG/REPO")


# ----------------------------------------------------------------------------- conversion


def _layout_model(layout: str, sd: dict[str, Any], architecture: Any) -> nnx.Module:
  try:
    if layout == "open_clip":
      return convert.from_open_clip(sd, architecture)
    if layout == "long_clip":
      return long_clip.from_long_clip(sd, architecture)
    if layout == "clip_moe":
      return clip_moe.from_clip_moe(sd, architecture, top_k=2)
    if layout == "hf":
      return convert.from_hf(sd, architecture)
  except ValueError as e:  # StateDictError and friends: name the architecture
    label = architecture if isinstance(architecture, str) else "the repo's config"
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    raise hub.PretrainedError(f"weights do not fit {label}: {'; '.join(lines[:4])}") from e
  raise hub.PretrainedError(f"unknown weight layout {layout!r} in the pretrained table")


def convert_weights(entry: Mapping[str, Any], paths: Mapping[str, str]) -> nnx.Module:
  """The zoo model of a table entry from its downloaded files (`paths`: role -> local path).

  This is the only place weights are converted; a cached load never calls it.
  """
  layout = entry["layout"]
  if layout == "mclip":
    image = entry["image"]
    clip_model = _layout_model(image["layout"], hub.read_weights(paths["image"], image.get("sha256")),
                               image["architecture"])
    with open(paths["config"]) as f:
      hf_config = json.load(f)
    try:
      tower = mclip.from_hf_text(hub.read_weights(paths["weights"], entry.get("sha256")),
                                        hf_config, embed_dim=clip_model.config.embed_dim)
    except ValueError as e:
      raise hub.PretrainedError(f"M-CLIP text weights do not fit: {str(e).splitlines()[0]}") from e
    return multilingual.from_clip(clip_model, tower, tokenizer=paths.get("tokenizer", ""))
  if layout == "llm2clip":  # image tower + adapter, and the LLM2Vec-tuned LLM's own repo
    hf_config = None  # EVA02 releases: one EVA-CLIP state dict, no config.json
    if "config" in paths:
      with open(paths["config"]) as f:
        hf_config = json.load(f)
    return llm2clip.load_released(hub.read_weights(paths["weights"], entry.get("sha256")),
                                  hf_config, paths["llm"], template=entry["llm"]["template"])
  architecture = entry["architecture"]
  if isinstance(architecture, dict):  # a config resolved from a hub repo
    architecture = architecture["config"]
  if (entry.get("tokenizer") or {}).get("kind") == "hf" and paths.get("tokenizer"):
    # a Hugging Face text tower: the model config names its tokenizer.json
    config = (configs.get_model_config(architecture) if isinstance(architecture, str)
              else architecture)
    architecture = dataclasses.replace(config, tokenizer=paths["tokenizer"])
  return _layout_model(layout, hub.read_weights(paths["weights"], entry.get("sha256")), architecture)


def _fetch(entry: Mapping[str, Any], revision: str | None, tokenizer: bool) -> dict[str, str]:
  """Downloads an entry's files: role -> local path."""
  paths = {"weights": hub.download_first(entry["hf_hub"], hub.weight_names(entry, revision), revision)}
  if entry.get("config_file"):
    paths["config"] = hub.download(entry["hf_hub"], entry["config_file"], revision)
  if entry["layout"] == "mclip":
    image = entry["image"]
    paths["image"] = hub.download_first(image["hf_hub"], image["weights"])
  if entry["layout"] == "llm2clip":
    paths["llm"] = hub.model_directory(entry["llm"]["hf_hub"])
  tok = entry.get("tokenizer") or {}
  if tok.get("file") and (tokenizer or entry["layout"] == "mclip" or tok["kind"] == "hf"):
    paths["tokenizer"] = hub.download(tok.get("hf_hub") or entry["hf_hub"], tok["file"])
  return paths


def _cache_key(entry: Mapping[str, Any], paths: Mapping[str, str], label: str) -> str:
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{label}-{os.path.basename(paths['weights'])}")
  rev = hub.revision_of(paths["weights"])
  if "image" in paths:
    rev += "+" + hub.revision_of(paths["image"])[:12]
  if "llm" in paths:
    rev += "+" + hub.revision_of(os.path.join(paths["llm"], HF_CONFIG))[:12]
  return os.path.join(hub.zoo_cache_dir(), "converted", entry["hf_hub"].replace("/", "--"), rev,
                      f"{slug}-zoo{__version__}")


def _load_entry(entry: Mapping[str, Any], label: str, revision: str | None, tokenizer: bool
                ) -> tuple[nnx.Module, dict[str, str], str]:
  """(model, downloaded paths, converted-cache directory): a restore when cached."""
  paths = _fetch(entry, revision, tokenizer)
  cache = _cache_key(entry, paths, label)
  if os.path.isfile(os.path.join(cache, model_dir.CONFIG_FILE)):
    try:
      model, _, _ = model_dir.load(cache)
      log.info("loaded %s from the converted cache %s", label, cache)
      return model, paths, cache
    except (layout.CheckpointError, OSError, ValueError) as e:
      log.warning("converted cache %s is unusable (%s); converting again", cache, e)
  model = convert_weights(entry, paths)
  try:
    model_dir.save(model, cache, {"converted_from": {"repo": entry["hf_hub"],
                                                      "revision": hub.revision_of(paths["weights"]),
                                                      "file": os.path.basename(paths["weights"]),
                                                      "name": label}}, overwrite=True)
  except OSError as e:  # a read-only cache still gives a model
    log.warning("could not cache the converted model at %s (%s)", cache, e)
  return model, paths, cache


# ----------------------------------------------------------------------------- hf-hub repos


def _hf_text_config(text_cfg: Mapping[str, Any]) -> dict[str, Any] | None:
  """The config.json of an open_clip text_cfg's `hf_model_name` (what open_clip's AutoConfig
  reads), or None without one."""
  name = text_cfg.get("hf_model_name")
  if not name:
    return None
  with open(hub.download(name, HF_CONFIG)) as f:
    return json.load(f)


def hub_entry(repo: str, revision: str | None = None) -> dict[str, Any]:
  """A table-style entry for an open_clip-format or transformers-CLIP hub repo."""
  try:
    path = hub.download(repo, OPEN_CLIP_CONFIG, revision)
  except (FileNotFoundError, hub.PretrainedError):  # hub.offline, a file not cached reads the same
    path = None
  if path is not None:
    with open(path) as f:
      oc = json.load(f)
    if "model_cfg" not in oc:
      raise hub.PretrainedError(f"{repo}/{OPEN_CLIP_CONFIG} has no 'model_cfg'")
    config = open_clip_config.config_from_open_clip_cfg(
        oc["model_cfg"], _hf_text_config(oc["model_cfg"].get("text_cfg", {})))
    pp = oc.get("preprocess_cfg", {})
    tok = open_clip_config.tokenizer_entry(oc["model_cfg"])
    return {"hf_hub": repo, "weights": list(OPEN_CLIP_WEIGHTS), "layout": "open_clip",
            "architecture": {"config": config}, "tokenizer": tok,
            "preprocess": {"mean": pp.get("mean", config.image_mean),
                           "std": pp.get("std", config.image_std),
                           "interpolation": pp.get("interpolation", "bicubic"),
                           "resize_mode": pp.get("resize_mode", "shortest")}}
  try:
    path = hub.download(repo, HF_CONFIG, revision)
  except FileNotFoundError:
    raise hub.PretrainedError(f"hf-hub:{repo} has neither {OPEN_CLIP_CONFIG} (open_clip) nor "
                          f"{HF_CONFIG} (transformers)") from None
  except hub.PretrainedError as e:
    raise hub.PretrainedError(f"hf-hub:{repo}: neither {OPEN_CLIP_CONFIG} nor {HF_CONFIG} could be "
                          f"read ({e})") from None
  with open(path) as f:
    hf = json.load(f)
  if hf.get("model_type") not in ("clip", *hf_siglip.MODEL_TYPES):
    raise hub.PretrainedError(f"hf-hub:{repo} is a {hf.get('model_type')!r} model; zoo reads "
                          "open_clip repos and transformers CLIPModel, SiglipModel and "
                          "Siglip2Model repos (model_type 'clip', 'siglip', 'siglip2')")
  try:
    config = convert.config_from_hf(hf)
  except ValueError as e:
    raise hub.PretrainedError(f"hf-hub:{repo}: {e}") from None
  tok, resize = {"kind": "clip"}, "shortest"
  if config.kind == "siglip":  # the repo's sentencepiece file: T5 (spiece) or Gemma (256k)
    tok = {"kind": "sentencepiece", "file": "spiece.model", "clean": "canonicalize"}
    if config.vision.naflex or config.text.vocab_size == 256000:  # SigLIP 2
      tok.update(file="tokenizer.model", pad_id=0)
    resize = "squash"  # SiglipImageProcessor resizes to (size, size)
  return {"hf_hub": repo, "weights": list(HF_WEIGHTS), "layout": "hf",
          "architecture": {"config": config}, "tokenizer": tok,
          "preprocess": {"mean": list(config.image_mean), "std": list(config.image_std),
                         "interpolation": "bicubic", "resize_mode": resize}}


# ----------------------------------------------------------------------------- public


def _entry_for(name: str, pretrained: str | None) -> tuple[dict[str, Any], str, str | None]:
  revision = None
  if name.startswith(HF_HUB_PREFIX):
    repo = name[len(HF_HUB_PREFIX):]
    if "@" in repo:
      repo, revision = repo.split("@", 1)
    if repo.count("/") != 1:
      raise hub.PretrainedError(f"{name!r}: expected hf-hub:ORG/REPO")
    return hub_entry(repo, revision), repo.replace("/", "--"), revision
  return get_pretrained_cfg(name, pretrained), f"{name}-{clean_tag(pretrained)}", None


def preprocess_for(entry: Mapping[str, Any], image_size: int) -> transforms.Preprocess:
  pp = entry["preprocess"]
  return transforms.make_preprocess(image_size, pp["mean"], pp["std"], pp["resize_mode"],
                                    interpolation=pp["interpolation"])


def get_preprocess(name: str, pretrained: str) -> transforms.Preprocess:
  """The eval preprocessing of (name, tag), without loading weights."""
  entry = get_pretrained_cfg(name, pretrained)
  arch = entry["image"]["architecture"] if entry["layout"] == "mclip" else entry["architecture"]
  return preprocess_for(entry, configs.get_model_config(arch).vision.image_size)


def tokenizer_for(entry: Mapping[str, Any], model_config: Any, paths: Mapping[str, str]):
  tok = entry.get("tokenizer") or {"kind": "clip"}
  length = model_config.text.context_length
  if tok["kind"] == "clip":
    return tokenizers.ClipTokenizer(length)
  if tok["kind"] == "model":  # the model config names its tokenizer.json (LLM2CLIP)
    return tokenizers.for_config(model_config)
  if tok["kind"] == "sentencepiece":
    return tokenizers.SentencePieceTokenizer(paths["tokenizer"], length,
                                             clean=tok.get("clean", "canonicalize"),
                                             pad_id=tok.get("pad_id"))
  if tok["kind"] == "xlmr":
    return tokenizers.XLMRobertaTokenizer(paths["tokenizer"], length)
  if tok["kind"] == "hf":
    return tokenizers.HFTokenizer(paths["tokenizer"], length, clean=tok.get("clean", "whitespace"),
                                  pad_id=model_config.text.pad_token_id)
  if tok["kind"] == "hf_tokenizers":  # a tokenizer.json (CLIPA's BERT)
    return tokenizers.HFTokenizer(paths["tokenizer"], length,
                                  clean=tok.get("clean", "whitespace"),
                                  strip_sep_token=tok.get("strip_sep_token", False))
  raise hub.PretrainedError(f"unknown tokenizer kind {tok['kind']!r} in the pretrained table")


def _resolve(name: str, pretrained: str | None, revision: str | None, tokenizer: bool):
  if pretrained is not None and not name.startswith(HF_HUB_PREFIX) and os.path.isfile(pretrained):
    model = _layout_model("open_clip", hub.read_weights(pretrained), name)  # a local open_clip file
    entry = {"preprocess": {"mean": model.config.image_mean, "std": model.config.image_std,
                            "interpolation": "bicubic", "resize_mode": "shortest"}}
    return model, entry, {}
  entry, label, hub_revision = _entry_for(name, pretrained)
  model, paths, _ = _load_entry(entry, label, revision or hub_revision, tokenizer)
  return model, entry, paths


def create(name: str, *, pretrained: str | None = None, seed: int = 0, revision: str | None = None,
           **overrides: Any) -> nnx.Module:
  """A zoo model by name: random init, or `pretrained` weights (a tag, or a local file).

  `name` may be 'hf-hub:ORG/REPO' (open_clip or transformers CLIP repo). `revision` pins a
  hub revision (branch, tag or commit). Overrides apply only without pretrained weights.
  """
  if pretrained is None and not name.startswith(HF_HUB_PREFIX):
    if name not in configs.list_architectures() and name in _models():
      raise hub.PretrainedError(f"{name!r} is a pretrained release; pass pretrained="
                            f"{list_pretrained_tags(name)[0]!r} (tags: "
                            f"{', '.join(list_pretrained_tags(name))})")
    config = configs.get_model_config(name, **overrides)
    return clip_lib.from_config(config, seed=seed)
  if overrides:
    raise hub.PretrainedError(f"overrides {sorted(overrides)} cannot change a pretrained model's "
                          "architecture; build it with zoo.create(name, **overrides) and copy "
                          "weights instead")
  return _resolve(name, pretrained, revision, tokenizer=False)[0]


def create_model_and_transforms(name: str, pretrained: str | None = None, *,
                                revision: str | None = None, **kwargs: Any):
  """(model, tokenizer, preprocess) with the tag's preprocessing (mean/std, resize mode,
  interpolation) and tokenizer."""
  if pretrained is None and not name.startswith(HF_HUB_PREFIX):
    model = create(name, **kwargs)
    return (model, tokenizers.get_tokenizer(name) if model.config.tokenizer == "clip" else None,
            transforms.get_preprocess(model.config))
  model, entry, paths = _resolve(name, pretrained, revision, tokenizer=True)
  tok = (tokenizer_for(entry, model.config, paths) if paths
         else tokenizers.ClipTokenizer(model.config.text.context_length))
  return model, tok, preprocess_for(entry, model.config.vision.image_size)


def checkpoint_dir(ref: str) -> str:
  """The converted-cache zoo.save directory of 'NAME/TAG' or 'hf-hub:ORG/REPO' (converting on
  first use): what train.py's init_from and eval.py's --pretrained load."""
  name, tag = parse_ref(ref)
  entry, label, revision = _entry_for(name, tag)
  paths = _fetch(entry, revision, tokenizer=False)
  cache = _cache_key(entry, paths, label)
  if not os.path.isfile(os.path.join(cache, model_dir.CONFIG_FILE)):
    cache = _load_entry(entry, label, revision, tokenizer=False)[2]
  return cache


def is_ref(value: str) -> bool:
  return isinstance(value, str) and value.startswith((INIT_PREFIX, HF_HUB_PREFIX))


def resolve_init_from(config: Any) -> Any:
  """Replaces a config's `init_from` = 'pretrained:NAME/TAG' / 'hf-hub:...' by its converted
  zoo.save directory (in place; returns the config)."""
  value = config.get("init_from", "") if hasattr(config, "get") else ""
  if is_ref(value):
    config.init_from = checkpoint_dir(value)
  return config


def export_pretrained(model: nnx.Module, directory: str, *,
                      preprocess: transforms.Preprocess | None = None,
                      overwrite: bool = False) -> str:
  """Writes open_clip's hub layout: open_clip_config.json (model_cfg + preprocess_cfg) and
  open_clip_model.safetensors, loadable by open_clip as 'local-dir:DIR' or 'hf-hub:' after
  upload (python -m zoo.convert push)."""
  directory = os.path.abspath(directory)
  weights = os.path.join(directory, OPEN_CLIP_WEIGHTS[0])
  if os.path.exists(weights) and not overwrite:
    raise errors.OutputExists(weights, what="directory")
  model_cfg = open_clip_config.open_clip_model_cfg(model.config)
  pp = preprocess or transforms.get_preprocess(model.config)
  preprocess_cfg = {"size": model.config.vision.image_size, "mode": "RGB", "mean": list(pp.mean),
                    "std": list(pp.std), "interpolation": pp.interpolation,
                    "resize_mode": pp.resize_mode, "fill_color": pp.fill_color}
  state_dict = convert.to_open_clip(model)
  os.makedirs(directory, exist_ok=True)
  write_safetensors(state_dict, weights, {"format": "pt"})
  with open(os.path.join(directory, OPEN_CLIP_CONFIG), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
  return directory

