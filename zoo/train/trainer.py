"""The trainer: everything a run builds once from its config, before the first step.

`build_trainer(config)`: the family's model (with LoRA adapters and remat as configured),
sharded over the mesh; the optimizer and its state; the jitted train step (a pure function of
(state, batch) with explicit in/out shardings and the state donated). `restore_model` builds
the model of a train checkpoint without an optimizer (evaluation).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from zoo import families
from zoo.models import layers, lora as peft, sharding
from zoo.train import checkpoints as train_checkpoint, config_files, step as train_step
from zoo.weights import adapters


def peft_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.peft` over zoo.models.lora's defaults; {"rank": 0} when LoRA is off."""
  given = dict(config.get("peft", None) or {})
  if not (given.get("rank", 0) or given.get("adapter_from", "")):
    return {"rank": 0}
  return config_files.section(config, "peft", dict(adapters.default_settings()))


def apply_peft(config: ml_collections.ConfigDict, model: nnx.Module) -> bool:
  """Attaches `config.peft`'s LoRA adapters (fresh, or `peft.adapter_from`); True if any."""
  lora = peft_settings(config)
  if not (lora["rank"] or lora.get("adapter_from", "")):
    return False
  return bool(adapters.apply_settings(model, {**lora, "seed": int(config.seed)}))


def model_builder(config: ml_collections.ConfigDict, family: families.Family) -> Callable[[], nnx.Module]:
  """The family's model of `config` (its settings parsed here), weights from init_from."""
  settings = family.settings(config)
  return lambda: family.build_model(config, settings)


@dataclasses.dataclass
class Trainer:
  """Everything built once: mesh, family, graphdef, shardings, jitted step, initial state."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  family: families.Family
  graphdef: nnx.GraphDef
  rest: nnx.State
  state: dict
  state_shardings: dict
  step_fn: Callable
  tx: optax.GradientTransformation
  settings: Any = None  # the family's parsed settings

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state["step"]))

  def model(self, state: dict | None = None) -> nnx.Module:
    """The current model (a fresh NNX module over the state's parameters and, with
    config.batch_norm="update", its batch-norm statistics; the norms in frozen mode)."""
    state = state or self.state
    stats = [state["batch_stats"]] if "batch_stats" in state else []
    return nnx.merge(self.graphdef, state["params"], self.rest, *stats)


def step_compiler_options() -> dict[str, Any] | None:
  """XLA options for the train step on this backend.

  CPU: XLA's default scheduler orders the step for concurrency, so independent thunks (the
  image and text towers' matmuls) run at once, each with a full thread pool; on a few cores
  they contend for the same cores and caches. Profiled on ViT-B-32 batch 32 (2 cores) the
  sequential schedule takes the step from 13.7 s to 11.1 s (bench/train_throughput.py).
  """
  if jax.default_backend() == "cpu":
    return {"xla_cpu_enable_concurrency_optimized_scheduler": False}
  return None


def _concrete(leaf):
  """A small non-parameter leaf of an abstract model made real (zeros; key data 0)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(jnp.zeros((*leaf.shape, 2), jnp.uint32))
  return jnp.zeros(leaf.shape, leaf.dtype)


def _placed(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def updated_batch_stats(config: ml_collections.ConfigDict, model: nnx.Module) -> nnx.State | None:
  """The model's batch-norm statistics when `config.batch_norm` is "update" (they then live in
  the train state, are updated by the step and checkpointed); None when "frozen" (the default)
  or the model has none."""
  mode = config.get("batch_norm", "frozen")
  if mode not in ("frozen", "update"):
    raise ValueError(f"config.batch_norm={mode!r}: expected 'frozen' or 'update'")
  stats = nnx.state(model, nnx.BatchStat)
  return stats if mode == "update" and jax.tree.leaves(stats) else None


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                  model: nnx.Module | None = None, abstract: bool = False) -> Trainer:
  """Builds the model sharded over the mesh, the optimizer state, and the jitted step.
  `abstract`: the state as shape / dtype / sharding only, nothing allocated (the model traced
  with nnx.eval_shape, no init_from read): `step_fn.lower(state, batch)` compiles the step for
  the mesh's devices (python -m zoo.plan)."""
  mesh = mesh or sharding.mesh_from_config(config.mesh)
  family = families.get(config.get("family", "clip"))
  settings = family.settings(config)
  if model is None and abstract:
    fresh = config.copy_and_resolve_references()
    with fresh.unlocked():
      fresh.init_from = ""  # shapes only: no weights read
    model = nnx.eval_shape(lambda: family.build_model(fresh, settings))
  elif model is None:
    model = family.build_model(config, settings)
  trainable = family.trainable(settings)
  if apply_peft(config, model):
    trainable = peft.is_lora_path  # LoRA: only the adapters train
  layers.set_remat(model, config.get("remat", "none"))  # gradient checkpointing per block
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  stats = updated_batch_stats(config, model)
  if stats is not None:  # the statistics live in the train state, not among the step's constants
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  param_sh = sharding.state_shardings(params, mesh)
  repl = sharding.replicated(mesh)
  stats_sh = None if stats is None else jax.tree.map(lambda _: repl, stats)
  if abstract:
    rest = jax.tree.map(_concrete, rest)
    params = _placed(params, param_sh)
  else:
    params = sharding.shard_state(params, param_sh)
  tx = train_step.make_optimizer(config, params, trainable)
  # Optimizer state shardings follow the parameters (Adam moments mirror them).
  opt_shape = jax.eval_shape(tx.init, params)
  opt_sh = sharding.follow_param_shardings(opt_shape, params, mesh)
  state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}
  if abstract:
    state = _placed({"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                     "opt_state": opt_shape,
                     "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))},
                    state_sh)
  else:
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), repl), "params": params,
             "opt_state": opt_state,
             "rng": jax.device_put(jax.random.key_data(jax.random.key(config.seed)), repl)}
  if stats is not None:  # a copy: the state is donated
    state_sh["batch_stats"] = stats_sh
    state["batch_stats"] = (_placed(stats, stats_sh) if abstract else
                            jax.device_put(jax.tree.map(jnp.copy, stats), stats_sh))

  raw_step = train_step.make_train_step(graphdef, rest, family, tx, config, mesh, trainable, settings)

  def step_with_key(state, batch):
    # RNG is stored as raw key data so it checkpoints as a plain uint32 array.
    st = dict(state, rng=jax.random.wrap_key_data(state["rng"]))
    # The mesh is visible to model code while tracing (jax.sharding.get_abstract_mesh()), so
    # layers may add sharding constraints (e.g. MoE dispatch over the `expert` axis).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      new, metrics = raw_step(st, batch)
    new["rng"] = jax.random.key_data(new["rng"])
    return new, metrics

  batch_sh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(step_with_key, in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, repl), donate_argnums=(0,),
                    compiler_options=step_compiler_options())
  return Trainer(config=config, mesh=mesh, family=family, graphdef=graphdef, rest=rest,
                 state=state, state_shardings=state_sh, step_fn=step_fn, tx=tx,
                 settings=settings)


def abstract_state(trainer: Trainer) -> dict:
  """Shape/dtype/sharding of the train state: the restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      trainer.state, trainer.state_shardings)


def restore_model(config: ml_collections.ConfigDict, workdir: str, step: int,
                  mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """The model of train checkpoint `step` in `workdir`: built from `config` (with its LoRA
  adapters), only the parameters read from disk, sharded over `mesh` (no optimizer built)."""
  mesh = mesh or sharding.mesh_from_config(config.mesh)
  model = model_builder(config, families.get(config.get("family", "clip")))()
  apply_peft(config, model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, sharding.state_shardings(params, mesh))
  directory = os.path.join(workdir, "checkpoints")
  params = train_checkpoint.restore_params(directory, step, abstract)
  if updated_batch_stats(config, model) is None:
    return nnx.merge(graphdef, params, rest)
  graphdef, _, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  repl = sharding.replicated(mesh)
  stats = train_checkpoint.restore_params(directory, step, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), stats), "batch_stats")
  return nnx.merge(graphdef, params, rest, stats)
