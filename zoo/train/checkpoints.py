"""Train-loop checkpoints on an Orbax CheckpointManager: per step the state pytree (params,
optimizer state, rng; restored directly into the caller's shardings) plus a JSON `extra`.

Only complete steps are ever listed or restored: Orbax writes into
`<step>.orbax-checkpoint-tmp-*` and renames after writing `commit_success.txt`; we also require
that marker and the commit timestamp in `_CHECKPOINT_METADATA`. `move_aside` takes steps out
of that list for good (a diverged run's checkpoints whose loss was not finite).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from zoo.weights import layout

log = logging.getLogger("zoo.weights.model_dir")
CheckpointError = layout.CheckpointError


def is_complete_step(step_dir: str | os.PathLike) -> bool:
  """A train-checkpoint step directory was fully written and finalized."""
  path = os.fspath(step_dir)
  return (layout.is_complete_orbax_dir(path)
          and all(os.path.isdir(os.path.join(path, item)) for item in ("state", "extra")))


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """Complete steps of a train-checkpoint directory, ascending ([] when it does not exist)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  return sorted(s for s in steps if is_complete_step(os.path.join(directory, str(s))))


def move_aside(directory: str | os.PathLike, first_step: int,
               destination: str | os.PathLike) -> list[tuple[int, str]]:
  """Moves the complete steps >= `first_step` of a train-checkpoint directory to
  `destination/<step>` (`<step>-<n>` when taken), where they are never listed, resumed or
  evaluated again (e.g. the parameters of a diverged run). Returns (step, new path) pairs;
  process 0 moves, every process returns the same list. Call with no write in flight."""
  directory, destination = os.fspath(directory), os.fspath(destination)
  moves = []
  for step in complete_steps(directory):
    if step < first_step:
      continue
    dest, n = os.path.join(destination, str(step)), 0
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(destination, f"{step}-{n}")
    moves.append((step, dest))
  layout.sync_processes(f"zoo_ckpt_aside_{first_step}")  # every process planned the same names
  if moves and jax.process_index() == 0:
    os.makedirs(destination, exist_ok=True)
    for step, dest in moves:
      shutil.move(os.path.join(directory, str(step)), dest)
  layout.sync_processes(f"zoo_ckpt_aside_{first_step}_done")
  return moves


def restore_params(directory: str | os.PathLike, step: int, abstract_params: Any,
                   key: str = "params") -> Any:
  """Only the parameters of train-checkpoint `step` under `directory` (what
  `TrainCheckpointer` wrote), read into `abstract_params`' shapes and shardings (a pytree of
  `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, e.g. an `nnx.State`). The optimizer
  state is not read, so no optimizer or train state has to be built. `key`: another entry of
  the state (e.g. "batch_stats")."""
  step_dir = os.path.join(os.path.abspath(os.fspath(directory)), str(int(step)))
  if not is_complete_step(step_dir):
    raise CheckpointError(f"step {step} under {directory} is missing or incomplete; complete "
                          f"steps: {complete_steps(directory) or 'none'}")
  item = {key: abstract_params}
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
  return restored[key]


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
      layout.sync_processes(f"zoo_ckpt_rm_{step}")
      self._manager.reload()
    if self.is_complete(step):
      log.info("checkpoint for step %d already exists; not overwriting", step)
      return False
    extra = layout.to_jsonable(dict(extra or {}))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
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
    return restored["state"], layout.from_jsonable(restored["extra"] or {})

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
