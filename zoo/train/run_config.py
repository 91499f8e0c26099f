"""Resuming a workdir: the new config is checked against the one the run was started with.

`workdir/config.json` is written when a run starts (and when a change is accepted), never at
every restart. Keys that change the training trajectory (model, batch size, schedule,
optimizer, seed, data, ...: every key but the few in `FREE_KEYS`) may not change on resume
unless `config.resume_policy` says what to do:

* `"check"` (default): refuse with one line listing each `key: old -> new`;
* `"continue"`: train on with the new values (each change logged); the learning-rate schedule
  keeps its past: steps before the resume point follow the old schedule, later steps the new
  one (`schedule_history` in the stored config records the seams);
* `"restart"`: a new run; the previous run's files move to `workdir/previous/<n>/`.

`check_config`: one-line errors for values the loop cannot run with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils

from zoo import errors as cli
from zoo.models import sharding

log = logging.getLogger("zoo.train")

CONFIG_FILE = "config.json"
POLICIES = ("check", "continue", "restart")
# Keys (or key prefixes) that leave the trajectory alone: logging, checkpoint cadence,
# evaluation, placement, and these bookkeeping keys themselves.
FREE_KEYS = ("checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "mesh",
             "distributed", "resume_policy", "schedule_history", "loss.impl", "data.num_threads",
             "data.worker_processes",
             "data.eval_size", "data.eval_sets", "data.eval_shards", "data.babel_labels",
             "data.babel_prompts", "data.text_lengths", "data.language_adapters", "data.tfds",
             "eval")
SCHEDULE_KEYS = ("lr", "end_lr", "warmup_steps", "total_steps")
# Files and folders of one run inside a workdir (moved aside by resume_policy=restart).
RUN_FILES = ("checkpoints", "diverged", "config.json", "train_log.jsonl", "metrics.json", "tb",
             "model", "adapter", "dmu")


def _plain(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1} (lists stay values)."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _free(key: str) -> bool:
  return any(key == f or key.startswith(f + ".") for f in FREE_KEYS)


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """(key, old, new) for every trajectory key that differs (absent = None), sorted by key."""
  a, b = flatten(_plain(old)), flatten(_plain(new))
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if not _free(k) and a.get(k) != b.get(k)]


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
  show = lambda v: "(absent)" if v is None else json.dumps(v)  # noqa: E731
  return ", ".join(f"{k}: {show(o)} -> {show(n)}" for k, o, n in diffs)


def read_stored(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise cli.UserError(f"{path} is not valid JSON ({e}); move it away to resume unchecked")


def write_stored(workdir: str, config: Any) -> None:
  """config.json, written atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_plain(config), f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def move_run_aside(workdir: str) -> str | None:
  """Moves a previous run's files to workdir/previous/<n>/; returns that folder (or None)."""
  present = [n for n in RUN_FILES if os.path.exists(os.path.join(workdir, n))]
  if not present:
    return None
  root = os.path.join(workdir, "previous")
  n = 1
  while os.path.exists(os.path.join(root, str(n))):
    n += 1
  dest = os.path.join(root, str(n))
  if jax.process_index() == 0:
    os.makedirs(dest)
    for name in present:
      shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("zoo_restart_move")
  return dest


def prepare(config: ml_collections.ConfigDict, workdir: str, latest_step: int | None
            ) -> tuple[ml_collections.ConfigDict, int | None]:
  """The config to train with and the step to resume from (None = a fresh run).

  Compares `config` with `workdir/config.json` when the workdir holds a checkpoint; applies
  `config.resume_policy`; writes config.json for a new run or an accepted change.
  """
  policy = config.get("resume_policy", "check")
  if policy not in POLICIES:
    raise cli.UserError(f"config.resume_policy={policy!r}; expected one of {', '.join(POLICIES)}")
  if policy == "restart" and (latest_step is not None
                              or os.path.exists(os.path.join(workdir, CONFIG_FILE))):
    dest = move_run_aside(workdir)
    if dest:
      log.info("resume_policy=restart: previous run moved to %s; starting a new run", dest)
    latest_step = None
  stored = read_stored(workdir)
  if latest_step is None:
    write_stored(workdir, config)
    return config, None
  if stored is None:
    log.warning("%s has no %s: resuming step %d without checking the config", workdir,
                CONFIG_FILE, latest_step)
    write_stored(workdir, config)
    return config, latest_step
  diffs = changes(stored, config)
  if not diffs:
    history = stored.get("schedule_history")
    if history and not config.get("schedule_history", None):
      config = _with_history(config, history)
    return config, latest_step
  if policy == "check":
    raise cli.UserError(
        f"{workdir} holds a run (step {latest_step}) with another config: {describe(diffs)}; "
        "pass --config.resume_policy=continue to train on with the new values, or "
        "--config.resume_policy=restart to start a new run (the old one is moved aside)")
  history = list(stored.get("schedule_history") or [])
  if any(k in SCHEDULE_KEYS for k, _, _ in diffs):
    old_lr = float(schedule(stored)(latest_step))
    history.append({"until": int(latest_step), **{k: stored[k] for k in SCHEDULE_KEYS}})
    new = _with_history(config, history)
    log.info("resume_policy=continue at step %d: %s (lr at step %d: %.3g -> %.3g; earlier steps "
             "keep the old schedule)", latest_step, describe(diffs), latest_step, old_lr,
             float(schedule(new)(latest_step)))
  else:
    new = _with_history(config, history) if history else config
    log.info("resume_policy=continue at step %d: %s", latest_step, describe(diffs))
  write_stored(workdir, new)
  return new, latest_step


def _with_history(config: ml_collections.ConfigDict, history: list[dict[str, Any]]
                  ) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.schedule_history = [dict(h) for h in history]
  return config


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0
                  ) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, cosine decay to `end_lr` at `total_steps`."""
  warmup = min(int(warmup_steps), max(int(total_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(int(total_steps), warmup + 1),
                                            end_value=end_lr)


def schedule(config: Mapping[str, Any]) -> optax.Schedule:
  """The config's warmup+cosine schedule; earlier segments of `schedule_history` (each the
  schedule keys and `until`, the step where it stopped applying) for the steps before them."""
  get = config.get
  current = warmup_cosine(get("lr"), get("warmup_steps"), get("total_steps"), get("end_lr", 0.0))
  history = list(get("schedule_history", None) or [])
  if not history:
    return current
  segments = [(int(h["until"]), warmup_cosine(h["lr"], h["warmup_steps"], h["total_steps"],
                                              h.get("end_lr", 0.0))) for h in history]

  def piecewise(step):
    value = current(step)
    for until, seg in reversed(segments):
      value = jnp.where(step < until, seg(step), value)
    return value

  return piecewise


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line UserErrors for values the loop cannot run with (before anything is built)."""
  def positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
      raise cli.UserError(f"config.{key} must be a positive integer, got {value!r}")

  for key in ("batch_size", "checkpoint_every", "log_every", "grad_accum"):
    positive(key, config.get(key, 1))
  if config.total_steps < 0:
    raise cli.UserError(f"config.total_steps must be >= 0, got {config.total_steps}")
  if config.batch_size % config.get("grad_accum", 1):
    raise cli.UserError(f"config.batch_size={config.batch_size} is not divisible by "
                        f"config.grad_accum={config.get('grad_accum', 1)}")
  mesh = config.mesh.to_dict() if hasattr(config.mesh, 'to_dict') else dict(config.mesh)
  fixed = math.prod(v for v in mesh.values() if v != -1)
  n = jax.device_count()
  if (-1 in mesh.values() and n % fixed) or (-1 not in mesh.values() and fixed != n):
    raise cli.UserError(f"config.mesh {mesh} does not fit the {n} device"
                        f"{'s' if n != 1 else ''} of this job (the product of the axes must be "
                        "the device count; one axis may be -1 = the rest)")
  shards = math.prod(v for k, v in mesh.items() if k in sharding.BATCH_AXES and v != -1)
  if -1 in [v for k, v in mesh.items() if k in sharding.BATCH_AXES]:
    shards *= n // fixed
  per_step = config.batch_size // config.get("grad_accum", 1)
  if per_step % shards:
    raise cli.UserError(f"config.batch_size={config.batch_size} (per micro-batch {per_step}) is "
                        f"not divisible by the {shards} batch shards of mesh {mesh}")
