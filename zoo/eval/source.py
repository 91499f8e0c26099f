"""The model to evaluate, from one of three places, for eval.py and the tests alike.

`open_model(workdir=...)`: a training workdir's latest complete checkpoint, with the workdir's
config; `open_model(checkpoint=...)`: a zoo.save directory, with the config saved in it;
`open_model(pretrained="NAME/TAG" | "hf-hub:ORG/REPO", config=...)`: released weights
(downloaded and converted once, cached), evaluated on `config`'s data. A `config` given
with the first two replaces the stored one (e.g. other eval data).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from zoo import errors
from zoo.models import sharding
from zoo.train import checkpoints, distributed, run_config, trainer as trainer_lib
from zoo.weights import model_dir, pretrained as pretrained_lib


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A model ready to evaluate and what to say about it."""

  model: nnx.Module
  config: ml_collections.ConfigDict
  mesh: Mesh
  step: int  # the training step of its weights (0 when unknown)
  label: str  # "step 300", "model DIR, trained 300 steps", "pretrained NAME/TAG"
  model_dir: str | None  # the zoo.save directory read (None for a workdir)


def stored_config(source: str, *, workdir: bool) -> ml_collections.ConfigDict:
  """The training config stored with the model in `source` (a workdir or a model directory)."""
  if workdir:
    stored = run_config.read_stored(source)
    where = os.path.join(source, run_config.CONFIG_FILE)
  else:
    stored = model_dir.read_record(source).get("config")
    where = os.path.join(source, model_dir.CONFIG_FILE)
  if not isinstance(stored, dict) or "data" not in stored or "model" not in stored:
    raise errors.UserError(f"{where} holds no training config (a converted or hand-saved model?); "
                           "pass --config configs/FILE.py to say which data to evaluate on")
  config = ml_collections.ConfigDict(stored)
  if "distributed" in config:
    config.distributed.coordinator_address = ""  # the training job's; ZOO_* still apply
  return config


def eval_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The config's mesh, or all devices on `fsdp` when it does not fit this job's devices."""
  try:
    return sharding.mesh_from_config(config.mesh)
  except ValueError:
    return sharding.make_mesh(data=1, fsdp=-1, tensor=1, expert=1)


def open_model(*, workdir: str | None = None, checkpoint: str | None = None,
               pretrained: str | None = None,
               config: ml_collections.ConfigDict | None = None) -> EvalModel:
  """The model of exactly one of `workdir`, `checkpoint`, `pretrained` (see the module doc)."""
  if sum(bool(s) for s in (workdir, checkpoint, pretrained)) != 1:
    raise errors.UserError("pass one of --workdir DIR (its latest training checkpoint), "
                           "--checkpoint DIR (a zoo.save directory) or --pretrained NAME/TAG")
  if pretrained:
    if config is None:
      raise errors.UserError("--pretrained needs --config configs/FILE.py (the eval data; "
                             "released weights carry no training config) or --datasets NAME,...")
    distributed.maybe_initialize_distributed(config)  # before the conversion touches JAX
    checkpoint = pretrained_lib.checkpoint_dir(pretrained)  # download + convert once, cached
  source = workdir or checkpoint
  if not os.path.isdir(source):
    raise errors.UserError(f"{'--workdir' if workdir else '--checkpoint'} {source}: "
                           + ("is a file, not a directory" if os.path.exists(source)
                              else "no such directory"))
  if workdir:
    steps = checkpoints.complete_steps(os.path.join(workdir, "checkpoints"))
    if not steps:
      aside = os.path.join(workdir, "diverged")
      raise errors.UserError(f"--workdir {workdir} holds no complete checkpoint (under "
                             f"{os.path.join(workdir, 'checkpoints')}); train first"
                             + (f" (a diverged run's checkpoints are in {aside})"
                                if os.path.isdir(aside) else ""))
  else:
    record = model_dir.read_record(source)  # one-line error for an empty / incomplete directory
  config = config if config is not None else stored_config(source, workdir=bool(workdir))
  if not pretrained:
    distributed.maybe_initialize_distributed(config)  # before anything touches a JAX backend
  mesh = eval_mesh(config)
  if workdir:
    step = steps[-1]
    return EvalModel(trainer_lib.restore_model(config, workdir, step, mesh), config, mesh, step,
                     f"step {step}", None)
  model, _, _ = model_dir.load(source)
  step = int(record.get("step") or 0)
  label = (f"pretrained {pretrained}" if pretrained
           else f"model {source}" + (f", trained {step} steps" if step else ""))
  return EvalModel(model, config, mesh, step, label, source)
