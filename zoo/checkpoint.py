"""Checkpoints on Orbax: model directories (`save` / `load`) and the train-loop manager.

Model directory (`zoo.save`), written atomically (a temporary sibling renamed into place):

    DIR/zoo_config.json   format version, model/config classes, the model config, the user
                          (train) config; written last, so its presence marks a complete save
    DIR/weights/          Orbax StandardCheckpointer: flat {'visual.transformer...': array}
    DIR/tokenizer.model   a copy of the sentencepiece model, when the config names one

`TrainCheckpointer` wraps `ocp.CheckpointManager` for the train loop: every `save_every`
steps, keep `keep`, async; a step is the state pytree (params, optimizer state, rng; restored
directly into the caller's shardings) plus a JSON `extra` (data iterator state, ...). Only
complete steps are ever listed or restored: Orbax writes into `<step>.orbax-checkpoint-tmp-*`
and renames after writing `commit_success.txt`; we also require that marker and the commit
timestamp in `_CHECKPOINT_METADATA`, so a half-written or tampered step is never resumed.
"""

from __future__ import annotations

import base64
import dataclasses
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

log = logging.getLogger("zoo.checkpoint")

FORMAT_VERSION = 1
CONFIG_FILE = "zoo_config.json"
WEIGHTS_DIR = "weights"
TOKENIZER_FILE = "tokenizer.model"
COMMIT_FILE = "commit_success.txt"  # orbax's finalize marker
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_TMP_SUFFIX = ".zoo-tmp"
_OLD_SUFFIX = ".zoo-old"


class CheckpointError(ValueError):
  """A checkpoint directory is missing, incomplete, corrupt or for another architecture."""


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


def _import_zoo(qualname: str) -> Any:
  """A class named in a checkpoint; only zoo's own modules are importable (no code injection)."""
  module, _, name = qualname.rpartition(".")
  if not (module == "zoo" or module.startswith("zoo.")):
    raise CheckpointError(f"checkpoint names class {qualname!r} outside the zoo package; refusing "
                          "to import it")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise CheckpointError(f"checkpoint needs {qualname!r}, which this zoo version lacks: {e}") from e


def _to_jsonable(obj: Any) -> Any:
  """A JSON-ready copy: ConfigDicts, dataclasses, tuples, numpy values and bytes are converted."""
  if hasattr(obj, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(obj.to_json_best_effort())
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return _to_jsonable(dataclasses.asdict(obj))
  if isinstance(obj, Mapping):
    return {str(k): _to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_to_jsonable(v) for v in obj]
  if isinstance(obj, (bytes, bytearray)):
    return {"__bytes_b64__": base64.b64encode(bytes(obj)).decode("ascii")}
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if obj is None or isinstance(obj, (str, int, float, bool)):
    return obj
  raise TypeError(f"cannot store {type(obj).__name__} value {obj!r} as JSON in a checkpoint")


def _from_jsonable(obj: Any) -> Any:
  """Inverse of `_to_jsonable` for bytes (everything else stays JSON types)."""
  if isinstance(obj, dict):
    if set(obj) == {"__bytes_b64__"}:
      return base64.b64decode(obj["__bytes_b64__"])
    return {k: _from_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_from_jsonable(v) for v in obj]
  return obj


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


def _is_complete_orbax_dir(path: str) -> bool:
  """Orbax finished this directory: its commit marker and committed metadata are present."""
  if not os.path.isfile(os.path.join(path, COMMIT_FILE)):
    return False
  try:
    with open(os.path.join(path, STEP_METADATA_FILE)) as f:
      return json.load(f).get("commit_timestamp_nsecs") is not None
  except (OSError, ValueError):
    return False


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


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
  """Checks every weight file against the manifest written by `save` (CheckpointError if not)."""
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
    raise CheckpointError(f"{directory} is corrupt or incomplete ({len(bad)} damaged file"
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
    raise FileExistsError(f"{directory} already exists; pass overwrite=True or pick a new directory")
  _check_rebuildable(model)
  tmp = directory + _TMP_SUFFIX
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
    os.makedirs(tmp)
  _sync("zoo_save_tmp")
  model_config = model.config.to_dict()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(tmp, WEIGHTS_DIR), _flat_state(model))
  checkpointer.wait_until_finished()
  checkpointer.close()
  if primary:
    tok = model_config.get("tokenizer", "")
    if isinstance(tok, str) and tok.endswith(".model") and os.path.isfile(tok):
      shutil.copyfile(tok, os.path.join(tmp, TOKENIZER_FILE))
    record = {
        "format_version": FORMAT_VERSION,
        "model_class": _qualname(model),
        "config_class": _qualname(model.config),
        "model_config": _to_jsonable(model_config),
        "config": _to_jsonable(config) if config is not None else None,
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
  _sync("zoo_save_done")
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
        "merge LoRA adapters first (zoo.peft.merge_lora, or save them alone with "
        "zoo.peft.save_adapters) and drop a distillation teacher (zoo.multilingual.student_only)")


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
  """The parsed `zoo_config.json` of a zoo.save directory (clear errors if absent/corrupt)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    if os.path.isdir(directory + _TMP_SUFFIX):
      raise CheckpointError(f"{directory} was never completed (only {directory + _TMP_SUFFIX} "
                            "exists: the save was interrupted); save again")
    raise FileNotFoundError(f"no checkpoint directory at {directory}")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory} is not a complete zoo checkpoint: {CONFIG_FILE} is missing "
                          "(not written by zoo.save, or the save was interrupted)")
  try:
    with open(path) as f:
      record = json.load(f)
  except ValueError as e:
    raise CheckpointError(f"{path} is corrupt (not valid JSON: {e})") from None
  for key in ("format_version", "model_class", "config_class", "model_config"):
    if key not in record:
      raise CheckpointError(f"{path} is corrupt: it lacks {key!r}")
  if record["format_version"] > FORMAT_VERSION:
    raise CheckpointError(f"{directory} has format {record['format_version']}; this zoo reads up "
                          f"to {FORMAT_VERSION}: upgrade zoo")
  return record


def load_config(directory: str | os.PathLike) -> tuple[Any, Any]:
  """(model config object, user config dict or None) stored in a zoo.save directory."""
  record = read_record(directory)
  config_cls = _import_zoo(record["config_class"])
  try:
    model_config = config_cls.from_dict(record["model_config"])
  except (TypeError, ValueError, KeyError) as e:
    raise CheckpointError(f"{directory}: stored model config does not parse as "
                          f"{record['config_class']}: {e}") from e
  return model_config, record.get("config")


def restore_weights(model: nnx.Module, directory: str | os.PathLike, *, verify: bool = True
                    ) -> nnx.Module:
  """Fills `model` (any architecture object) with the weights in `directory`, in place.

  Every key and shape must match; otherwise one CheckpointError lists each missing,
  unexpected and mis-shaped entry. Arrays land on each variable's current sharding.
  `verify` first checks the weight files against the sizes and checksums recorded at save.
  """
  directory = os.fspath(directory)
  if verify:
    verify_files(directory)
  weights = os.path.join(os.path.abspath(directory), WEIGHTS_DIR)
  if not os.path.isdir(weights) or not _is_complete_orbax_dir(weights):
    raise CheckpointError(f"{directory} is incomplete or corrupt: {WEIGHTS_DIR}/ is missing or was "
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
      raise CheckpointError(f"{directory} is corrupt: cannot read its weight metadata "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    problems = _shape_problems(expected, found)
    if problems:
      raise CheckpointError(
          f"weights in {directory} do not fit this architecture ({len(problems)} problem"
          f"{'s' if len(problems) > 1 else ''}; was it saved from another model?):\n"
          + "\n".join(problems))
    abstract = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_sharding_of(a))
                for k, a in target.items()}
    try:
      restored = checkpointer.restore(weights, abstract)
    except Exception as e:  # missing / truncated chunk files surface as tensorstore errors
      raise CheckpointError(f"{directory} is corrupt: reading its weights failed "
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
  instead of the stored one; a mismatch is a CheckpointError naming the keys and shapes.
  The tokenizer is None for a sentencepiece model whose .model file is unavailable.
  """
  from zoo import registry, tokenizers, transforms

  directory = os.fspath(directory)
  record = read_record(directory)
  stored_config, _ = load_config(directory)
  model_cls = _import_zoo(record["model_class"])
  if config is None:
    model_config = stored_config
  elif isinstance(config, str):
    model_config = registry.get_model_config(config)
  else:
    model_config = config
  model = nnx.eval_shape(lambda: model_cls(model_config, rngs=nnx.Rngs(0)))
  # eval_shape leaves ShapeDtypeStructs in the variables; restore_weights fills them.
  model = restore_weights(model, directory, verify=verify)
  return model, _tokenizer(model_config, directory, tokenizers), _preprocess(model_config, transforms)


def load_tokenizer(directory: str | os.PathLike, *, context_length: int | None = None):
  """The tokenizer of the model saved in `directory` (without loading its weights)."""
  from zoo import tokenizers

  model_config, _ = load_config(directory)
  return _tokenizer(model_config, os.fspath(directory), tokenizers, context_length)


def _tokenizer(model_config: Any, directory: str, tokenizers: Any,
               context_length: int | None = None):
  kind = getattr(model_config, "tokenizer", "clip")
  length = context_length or model_config.text.context_length
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


# ----------------------------------------------------------------------------- training


def is_complete_step(step_dir: str | os.PathLike) -> bool:
  """A train-checkpoint step directory was fully written and finalized."""
  path = os.fspath(step_dir)
  return (_is_complete_orbax_dir(path)
          and all(os.path.isdir(os.path.join(path, item)) for item in ("state", "extra")))


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """Complete steps of a train-checkpoint directory, ascending ([] when it does not exist)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  return sorted(s for s in steps if is_complete_step(os.path.join(directory, str(s))))


def restore_params(directory: str | os.PathLike, step: int, abstract_params: Any) -> Any:
  """Only the parameters of train-checkpoint `step` under `directory` (what
  `TrainCheckpointer` wrote), read into `abstract_params`' shapes and shardings (a pytree of
  `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, e.g. an `nnx.State`). The optimizer
  state is not read, so no optimizer or train state has to be built."""
  step_dir = os.path.join(os.path.abspath(os.fspath(directory)), str(int(step)))
  if not is_complete_step(step_dir):
    raise CheckpointError(f"step {step} under {directory} is missing or incomplete; complete "
                          f"steps: {complete_steps(directory) or 'none'}")
  item = {"params": abstract_params}
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:
    raise CheckpointError(f"restoring the parameters of step {step} from {step_dir} failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "the model config differs from the one trained, or the files are "
                          "damaged") from e
  finally:
    checkpointer.close()
  return restored["params"]


class TrainCheckpointer:
  """Orbax CheckpointManager for the train loop: state pytree + JSON extra per step.

  `save(step, state, extra)` writes when `step % save_every == 0` (or `force=True`), keeping the
  newest `keep` steps; with `async_` the write finishes in the background (arrays are copied
  to host before `save` returns, so the caller may donate/overwrite its state).
  `restore(step, abstract_state)` reads straight into the shardings of `abstract_state`
  (a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 2,
               async_: bool = True):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extra"))

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def is_complete(self, step: int) -> bool:
    """Step `step` was fully written and finalized (never true for a half-written step)."""
    return is_complete_step(self.step_dir(step))

  def all_steps(self) -> list[int]:
    """Complete steps on disk, ascending (temporary / uncommitted directories are skipped)."""
    return complete_steps(self.directory)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Saves if `step` is due (or forced) and not already on disk; returns whether it did."""
    step = int(step)
    if not force and step % self.save_every:
      return False
    if os.path.exists(self.step_dir(step)) and not self.is_complete(step):
      # Debris of a write that never finished (never restorable); replace it.
      self._manager.wait_until_finished()
      log.warning("removing incomplete checkpoint directory %s", self.step_dir(step))
      if jax.process_index() == 0:
        shutil.rmtree(self.step_dir(step))
      _sync(f"zoo_ckpt_rm_{step}")
      self._manager.reload()
    if self.is_complete(step):
      log.info("checkpoint for step %d already exists; not overwriting", step)
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              extra=ocp.args.JsonSave(_to_jsonable(dict(extra or {}))))
    return bool(self._manager.save(step, args=args, force=True))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, extra) of a complete `step`, arrays placed on `abstract_state`'s shardings."""
    step = int(step)
    self._manager.wait_until_finished()
    if not self.is_complete(step):
      raise CheckpointError(f"step {step} under {self.directory} is missing or incomplete; "
                            f"complete steps: {self.all_steps() or 'none'}")
    self._manager.reload()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"restoring step {step} from {self.step_dir(step)} failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "the state structure or shapes differ from what was saved, or the "
                            "files are damaged") from e
    return restored["state"], _from_jsonable(restored["extra"] or {})

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
