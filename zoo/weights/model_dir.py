"""Checkpoints on Orbax: model directories (`save` / `load`).

Model directory (`zoo.save`), written atomically (a temporary sibling renamed into place):
    DIR/zoo_config.json   format version, model/config classes, the model config, the user
                          (train) config; written last, so its presence marks a complete save
    DIR/weights/          Orbax StandardCheckpointer: flat {'visual.transformer...': array}
    DIR/tokenizer.model   a copy of the sentencepiece model, when the config names one
    DIR/tokenizer.json    a copy of a Hugging Face tokenizer.json, when the config names one

The train loop's checkpoints (resume state, optimizer) are zoo.train.checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from zoo import errors, tokenizers, transforms
from zoo.models import configs
from zoo.weights import layout

log = logging.getLogger("zoo.weights.model_dir")

FORMAT_VERSION = 1
CONFIG_FILE = "zoo_config.json"
WEIGHTS_DIR = "weights"
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
_TMP_SUFFIX = ".zoo-tmp"
_OLD_SUFFIX = ".zoo-old"


# ----------------------------------------------------------------------------- helpers


def _path_key(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _flat_state(model: nnx.Module) -> dict[str, jax.Array]:
  """All of the model's state (parameters and any other variables) as {'a.b.0.c': array}."""
  _, state = nnx.split(model)
  return {_path_key(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def _qualname(obj: Any) -> str:
  cls = obj if isinstance(obj, type) else type(obj)
  return f"{cls.__module__}.{cls.__qualname__}"


# Modules whose classes moved (0.1.0 layout -> today's): class names recorded by directories
# written before the move are read through this table.
MOVED_MODULES = {
    "zoo.registry": "zoo.models.configs",
    "zoo.clip": "zoo.models.clip",
    "zoo.moe": "zoo.models.moe",
    "zoo.region": "zoo.models.region",
    "zoo.long_clip": "zoo.models.long_clip",
    "zoo.multilingual": "zoo.models.multilingual",
}


def current_qualname(qualname: str) -> str:
  """`qualname` with a moved module replaced by where its classes live now."""
  module, _, name = qualname.rpartition(".")
  return f"{MOVED_MODULES.get(module, module)}.{name}"


def _import_zoo(qualname: str) -> Any:
  """A class named in a checkpoint; only zoo's own modules are importable (no code injection)."""
  module, _, name = current_qualname(qualname).rpartition(".")
  if not (module == "zoo" or module.startswith("zoo.")):
    raise layout.CheckpointError(f"checkpoint names class {qualname!r} outside the zoo package; refusing "
                          "to import it")
  try:
    found = importlib.import_module(module)
  except ImportError as e:
    raise layout.CheckpointError(f"checkpoint needs {qualname!r}, which this zoo version lacks: {e}") from e
  if not isinstance(getattr(found, name, None), type):
    known = [k for k, v in vars(found).items() if isinstance(v, type) and v.__module__ == module]
    raise layout.CheckpointError(f"checkpoint needs architecture class {qualname!r}, which this zoo "
                                 f"version lacks{errors.did_you_mean(name, known)}")
  return getattr(found, name)


def _shape_problems(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> list[str]:
  """One line per key missing from `found`, unexpected in it, or of another shape/dtype."""
  out = []
  for k in sorted(expected):
    if k not in found:
      out.append(f"  missing    {k}: expected {tuple(expected[k][0])}")
    elif tuple(found[k][0]) != tuple(expected[k][0]):
      out.append(f"  mis-shaped {k}: expected {tuple(expected[k][0])}, found {tuple(found[k][0])}")
  out += [f"  unexpected {k}: found {tuple(found[k][0])}" for k in sorted(set(found) - set(expected))]
  return out


def _stored_shapes(checkpointer: ocp.StandardCheckpointer, path: str) -> dict[str, tuple]:
  meta = checkpointer.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if tree is None:
    raise ValueError("Orbax found no weight metadata")
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in tree.items()}


def _file_manifest(root: str) -> dict[str, dict[str, Any]]:
  """relative path -> size and sha256 of every file under `root` (the integrity record)."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in sorted(files):
      path = os.path.join(dirpath, name)
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
          digest.update(chunk)
      out[os.path.relpath(path, root)] = {"size": os.path.getsize(path),
                                          "sha256": digest.hexdigest()}
  return out


def verify_files(directory: str | os.PathLike) -> None:
  """Checks every weight file against the manifest written by `save` (layout.CheckpointError if not)."""
  directory = os.fspath(directory)
  expected = read_record(directory).get("files")
  if expected is None:
    return
  found = _file_manifest(os.path.join(directory, WEIGHTS_DIR))
  bad = []
  for rel, info in sorted(expected.items()):
    if rel not in found:
      bad.append(f"  missing   {WEIGHTS_DIR}/{rel}")
    elif found[rel]["size"] != info["size"]:
      bad.append(f"  truncated {WEIGHTS_DIR}/{rel}: {found[rel]['size']} bytes, expected {info['size']}")
    elif found[rel]["sha256"] != info["sha256"]:
      bad.append(f"  modified  {WEIGHTS_DIR}/{rel}: checksum differs from the one saved")
  if bad:
    raise layout.CheckpointError(f"{directory} is corrupt or incomplete ({len(bad)} damaged file"
                          f"{'s' if len(bad) > 1 else ''}):\n" + "\n".join(bad))


# ----------------------------------------------------------------------------- model save / load


def save(model: nnx.Module, directory: str | os.PathLike, config: Any = None, *,
         overwrite: bool = False, step: int | None = None) -> str:
  """Writes `model` (weights + its config) and an optional user/train `config` to `directory`
  (and the train `step` it was exported at, when given).

  The write is atomic: everything goes to `<directory>.zoo-tmp` and is renamed into place, so
  an interrupted save never leaves a loadable half-checkpoint. Returns the directory path.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
    raise TypeError(f"zoo.save needs a zoo model with a .config (got {type(model).__name__})")
  if os.path.exists(directory) and not overwrite:
    raise errors.OutputExists(directory)
  _check_rebuildable(model)
  tmp = directory + _TMP_SUFFIX
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
    os.makedirs(tmp)
  layout.sync_processes("zoo_save_tmp")
  model_config = model.config.to_dict()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(tmp, WEIGHTS_DIR), _flat_state(model))
  checkpointer.wait_until_finished()
  checkpointer.close()
  if primary:
    tok = model_config.get("tokenizer", "")
    if isinstance(tok, str) and tok.endswith(".model") and os.path.isfile(tok):
      shutil.copyfile(tok, os.path.join(tmp, TOKENIZER_FILE))
    elif isinstance(tok, str) and tok.endswith(".json") and os.path.isfile(tok):
      shutil.copyfile(tok, os.path.join(tmp, HF_TOKENIZER_FILE))
    record = {
        "format_version": FORMAT_VERSION,
        "model_class": _qualname(model),
        "config_class": _qualname(model.config),
        "model_config": layout.to_jsonable(model_config),
        "config": layout.to_jsonable(config) if config is not None else None,
        "files": _file_manifest(os.path.join(tmp, WEIGHTS_DIR)),
    }
    if step is not None:
      record["step"] = int(step)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(record, f, indent=2)
    if os.path.exists(directory):
      os.rename(directory, directory + _OLD_SUFFIX)
      os.rename(tmp, directory)
      shutil.rmtree(directory + _OLD_SUFFIX)
    else:
      os.rename(tmp, directory)
  layout.sync_processes("zoo_save_done")
  return directory


def _check_rebuildable(model: nnx.Module) -> None:
  """zoo.load rebuilds `type(model)(model.config)`; state it would not have cannot be saved."""
  fresh = nnx.eval_shape(lambda: type(model)(model.config, rngs=nnx.Rngs(0)))
  want = {_path_key(p) for p, _ in nnx.to_flat_state(nnx.split(fresh)[1])}
  have = {_path_key(p) for p, _ in nnx.to_flat_state(nnx.split(model)[1])}
  extra, missing = sorted(have - want), sorted(want - have)
  if extra or missing:
    raise ValueError(
        f"zoo.save: this {type(model).__name__} has state its config does not rebuild "
        f"(extra: {extra[:3]}{'...' if len(extra) > 3 else ''}; missing: {missing[:3]}); "
        "merge LoRA adapters first (zoo.models.lora.merge_lora, or save them alone with "
        "zoo.weights.adapters.save_adapters) and drop a distillation teacher (zoo.models.multilingual.student_only)")


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
  """The parsed `zoo_config.json` of a zoo.save directory (clear errors if absent/corrupt)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    if os.path.isdir(directory + _TMP_SUFFIX):
      raise layout.CheckpointError(f"{directory} was never completed (only {directory + _TMP_SUFFIX} "
                            "exists: the save was interrupted); save again")
    raise FileNotFoundError(f"no checkpoint directory at {directory}")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise layout.CheckpointError(f"{directory} is not a complete zoo checkpoint: {CONFIG_FILE} is missing "
                          "(not written by zoo.save, or the save was interrupted)")
  try:
    with open(path) as f:
      record = json.load(f)
  except ValueError as e:
    raise layout.CheckpointError(f"{path} is corrupt (not valid JSON: {e})") from None
  for key in ("format_version", "model_class", "config_class", "model_config"):
    if key not in record:
      raise layout.CheckpointError(f"{path} is corrupt: it lacks {key!r}")
  if record["format_version"] > FORMAT_VERSION:
    raise layout.CheckpointError(f"{directory} has format {record['format_version']}; this zoo reads up "
                          f"to {FORMAT_VERSION}: upgrade zoo")
  return record


def load_config(directory: str | os.PathLike) -> tuple[Any, Any]:
  """(model config object, user config dict or None) stored in a zoo.save directory."""
  record = read_record(directory)
  config_cls = _import_zoo(record["config_class"])
  try:
    model_config = config_cls.from_dict(record["model_config"])
  except (TypeError, ValueError, KeyError) as e:
    raise layout.CheckpointError(f"{directory}: stored model config does not parse as "
                          f"{record['config_class']}: {e}") from e
  return model_config, record.get("config")


def restore_weights(model: nnx.Module, directory: str | os.PathLike, *, verify: bool = True
                    ) -> nnx.Module:
  """Fills `model` (any architecture object) with the weights in `directory`, in place.

  Every key and shape must match; otherwise one layout.CheckpointError counts the missing,
  unexpected and mis-shaped entries and lists the first few. Arrays land on each variable's current sharding.
  `verify` first checks the weight files against the sizes and checksums recorded at save.
  """
  directory = os.fspath(directory)
  if verify:
    verify_files(directory)
  weights = os.path.join(os.path.abspath(directory), WEIGHTS_DIR)
  if not os.path.isdir(weights) or not layout.is_complete_orbax_dir(weights):
    raise layout.CheckpointError(f"{directory} is incomplete or corrupt: {WEIGHTS_DIR}/ is missing or was "
                          "not finalized by Orbax")
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  target = {_path_key(p): v.get_value() for p, v in flat}
  expected = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in target.items()}
  checkpointer = ocp.StandardCheckpointer()
  try:
    try:
      found = _stored_shapes(checkpointer, weights)
    except Exception as e:  # tensorstore / msgpack errors on damaged metadata
      raise layout.CheckpointError(f"{directory} is corrupt: cannot read its weight metadata "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    problems = _shape_problems(expected, found)
    if problems:
      raise layout.CheckpointError(
          f"weights in {directory} do not fit this architecture ({len(problems)} problem"
          f"{'s' if len(problems) > 1 else ''}; was it saved from another model?):\n"
          + "\n".join(errors.capped(problems)))
    abstract = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_sharding_of(a))
                for k, a in target.items()}
    try:
      restored = checkpointer.restore(weights, abstract)
    except Exception as e:  # missing / truncated chunk files surface as tensorstore errors
      raise layout.CheckpointError(f"{directory} is corrupt: reading its weights failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
  finally:
    checkpointer.close()
  for path, var in flat:
    var.set_value(restored[_path_key(path)])
  nnx.update(model, nnx.from_flat_state(flat))
  del graphdef
  return model


def _sharding_of(x: Any) -> jax.sharding.Sharding:
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.Sharding):
    return sharding
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load(directory: str | os.PathLike, *, config: Any = None, verify: bool = True):
  """(model, tokenizer, preprocess) from a directory written by `save`.

  `config` (a registered name or a config object) loads the weights into that architecture
  instead of the stored one; a mismatch is a layout.CheckpointError naming the keys and shapes.
  The tokenizer is None for a sentencepiece model whose .model file is unavailable.
  """
  directory = os.fspath(directory)
  record = read_record(directory)
  stored_config, _ = load_config(directory)
  model_cls = _import_zoo(record["model_class"])
  if config is None:
    model_config = stored_config
  elif isinstance(config, str):
    model_config = configs.get_model_config(config)
  else:
    model_config = config
  model = nnx.eval_shape(lambda: model_cls(model_config, rngs=nnx.Rngs(0)))
  # eval_shape leaves ShapeDtypeStructs in the variables; restore_weights fills them.
  model = restore_weights(model, directory, verify=verify)
  return model, _tokenizer(model_config, directory, tokenizers), _preprocess(model_config, transforms)


def load_tokenizer(directory: str | os.PathLike, *, context_length: int | None = None):
  """The tokenizer of the model saved in `directory` (without loading its weights)."""
  model_config, _ = load_config(directory)
  return _tokenizer(model_config, os.fspath(directory), tokenizers, context_length)


def _tokenizer(model_config: Any, directory: str, tokenizers: Any,
               context_length: int | None = None):
  kind = getattr(model_config, "tokenizer", "clip")
  length = context_length or model_config.text.context_length
  if getattr(model_config, "tokenizer_format", "") == "hf":  # a Hugging Face tokenizer.json
    local = os.path.join(directory, HF_TOKENIZER_FILE)
    path = local if os.path.isfile(local) else kind
    if os.path.isfile(path):
      return tokenizers.for_config(model_config, path, length)
    log.warning("no tokenizer.json for tokenizer %r; load returns tokenizer=None", kind)
    return None
  if getattr(model_config, "tokenizer_format", "") == "xlmr":
    local = os.path.join(directory, TOKENIZER_FILE)
    path = local if os.path.isfile(local) else kind
    if os.path.isfile(path):
      return tokenizers.XLMRobertaTokenizer(path, length)
    log.warning("no sentencepiece .model for tokenizer %r; load returns tokenizer=None", kind)
    return None
  if kind == "clip":
    return tokenizers.ClipTokenizer(length)
  local = os.path.join(directory, TOKENIZER_FILE)
  path = local if os.path.isfile(local) else kind
  if isinstance(path, str) and path.endswith(".model") and os.path.isfile(path):
    return tokenizers.SentencePieceTokenizer(path, length)
  log.warning("no sentencepiece .model for tokenizer %r; load returns tokenizer=None", kind)
  return None


def _preprocess(model_config: Any, transforms: Any):
  return transforms.make_preprocess(model_config.vision.image_size, model_config.image_mean,
                                    model_config.image_std)
