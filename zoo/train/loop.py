"""The one sharded train loop every model family plugs into.

A family (`zoo.families.Family`) supplies its settings, model, batch-field hook, forward, loss,
trainable predicate, eval kinds and export form (and optionally a driver of phase configs).
The loop owns everything else: mesh, shardings, optimizer, the jitted train step (pure
function of (state, batch), explicit in/out shardings, donated state), data, checkpoints with
exact resume, evaluation, logging.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from zoo import data, errors, families, tokenizers
from zoo.eval import report, suite
from zoo.models import layers, lora as peft, sharding
from zoo.train import (
  checkpoints as train_checkpoint,
  config_files,
  run_config,
  run_log,
  step as train_step,
)
from zoo.weights import adapters, model_dir, pretrained

Array = jax.Array
PyTree = Any
log = logging.getLogger("zoo.train")


# ----------------------------------------------------------------------------- families


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


# ----------------------------------------------------------------------------- setup


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
    """The current model (a fresh NNX module over the state's parameters)."""
    return nnx.merge(self.graphdef, (state or self.state)["params"], self.rest)


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


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                  model: nnx.Module | None = None) -> Trainer:
  """Builds the model sharded over the mesh, the optimizer state, and the jitted step."""
  mesh = mesh or sharding.mesh_from_config(config.mesh)
  family = families.get(config.get("family", "clip"))
  settings = family.settings(config)
  if model is None:
    model = family.build_model(config, settings)
  trainable = family.trainable(settings)
  if apply_peft(config, model):
    trainable = peft.is_lora_path  # LoRA: only the adapters train
  layers.set_remat(model, config.get("remat", "none"))  # gradient checkpointing per block
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  param_sh = sharding.state_shardings(params, mesh)
  params = sharding.shard_state(params, param_sh)
  tx = train_step.make_optimizer(config, params, trainable)
  # Optimizer state shardings follow the parameters (Adam moments mirror them).
  opt_sh = sharding.follow_param_shardings(jax.eval_shape(tx.init, params), params, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  repl = sharding.replicated(mesh)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), repl), "params": params,
           "opt_state": opt_state,
           "rng": jax.device_put(jax.random.key_data(jax.random.key(config.seed)), repl)}
  state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}

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


# ----------------------------------------------------------------------------- data / eval


def context_length(config: ml_collections.ConfigDict, model: nnx.Module) -> int:
  return int(config.get("context_length", 0) or model.config.text.context_length)


def make_tokenizer(config: ml_collections.ConfigDict, model: nnx.Module):
  if getattr(model.config, "tokenizer_format", "") == "xlmr" and not config.get("tokenizer", ""):
    return tokenizers.XLMRobertaTokenizer(model.config.tokenizer, context_length(config, model))
  name = config.get("tokenizer", "") or config.model
  return tokenizers.get_tokenizer(name, context_length=context_length(config, model))


def build_data(config: ml_collections.ConfigDict, model: nnx.Module, family: families.Family, tokenizer,
               settings: Any = None):
  """The train pipeline of `config.data` with the family's fields (and its field hook)."""
  mc = model.config
  settings = family.settings(config) if settings is None else settings
  hook = family.field_hook(config, settings, model)
  return data.build_train_pipeline(
      config.data, tokenizer=tokenizer, image_size=mc.vision.image_size, mean=mc.image_mean,
      std=mc.image_std, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      fields=family.batch_fields(settings), context_length=context_length(config, model),
      field_hooks=() if hook is None else (hook,))


def sample_batches(config: ml_collections.ConfigDict, model: nnx.Module, n: int) -> list[dict]:
  """About `n` samples (image, tokens) of `config`'s training data for `model`, in host
  batches (e.g. what DMU clusters)."""
  clip_family = families.get("clip")
  it = build_data(config, model, clip_family, make_tokenizer(config, model))
  out, got = [], 0
  while got < n:
    b = next(it)
    out.append({"image": b["image"], "tokens": b["tokens"]})
    got += len(b["image"])
  return out


def build_eval_sets(config: ml_collections.ConfigDict, model: nnx.Module, tokenizer) -> dict:
  mc = model.config
  return data.build_eval_sets(config.data, tokenizer=tokenizer, image_size=mc.vision.image_size,
                              mean=mc.image_mean, std=mc.image_std)


def run_eval(trainer_or_model, config: ml_collections.ConfigDict, tokenizer, eval_sets: dict,
             mesh: jax.sharding.Mesh | None, family: families.Family) -> dict[str, float]:
  """Standard eval sets plus the family's own evaluator (if any)."""
  model = trainer_or_model
  metrics = suite.evaluate(model, eval_sets, tokenizer, mesh=mesh)
  metrics.update(family.evaluate(model, config, family.settings(config), tokenizer, mesh))
  return {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- the loop



def _finished_summary(config: ml_collections.ConfigDict, workdir: str, step: int
                      ) -> dict[str, Any]:
  """A finished workdir: its final eval record (from metrics.json), nothing retrained."""
  records = [r for r in report.read_metrics(workdir) if int(r["step"]) == step]
  final = {k: v for k, v in (records[0] if records else {}).items()
           if k != "step" and isinstance(v, (int, float))}
  log.info("%s already finished at step %d (model: %s); raise config.total_steps with "
           "--config.resume_policy=continue to train on", workdir, step,
           os.path.join(workdir, "model"))
  return {"losses": [], "metrics": {}, "eval": final, "step": step, "trainer": None,
          "skipped": None, "finished": True}


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None,
          on_step_end: Callable[[int], None] | None = None,
          batch_fn: Callable[[dict], dict] | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (see `train_loop`); a family with a driver (CLIP-MoE's DMU)
  instead runs its sequence of phase configs, each through `train_loop`."""
  pretrained.resolve_init_from(config)  # init_from 'pretrained:NAME/TAG' / 'hf-hub:...' -> dir
  family = families.get(config.get("family", "clip"))
  driver = family.driver(family.settings(config))
  if driver is not None:
    return driver(config, workdir, train_loop, sample_batches)
  return train_loop(config, workdir, stop_after=stop_after, on_step_end=on_step_end,
                    batch_fn=batch_fn)


def train_loop(config: ml_collections.ConfigDict, workdir: str, *,
               stop_after: int | None = None,
               on_step_end: Callable[[int], None] | None = None,
               batch_fn: Callable[[dict], dict] | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints); returns a summary dict.

  A finished run also exports the final model to `workdir/model` (a zoo.save directory).
  Resuming checks the config against the stored one (`zoo.train.run_config`). A non-finite loss or
  gradient norm stops the run (`zoo.errors.Diverged`) before anything is saved from that state;
  Ctrl-C waits for the in-flight checkpoint and raises `zoo.errors.Interrupted`.

  `stop_after` ends the run after that many steps of this process; `on_step_end(step)` runs
  after each step (tests use both to interrupt a run). `batch_fn` maps each host-local batch
  (numpy, the family's fields) before it is sharded, e.g. to add derived fields; it must be a
  deterministic function of the batch so resumed runs stay exact.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps_on_disk = train_checkpoint.complete_steps(ckpt_dir)
  config, latest = run_config.prepare(config, workdir,
                                      steps_on_disk[-1] if steps_on_disk else None)
  run_config.check_config(config)
  total = config.total_steps
  if (latest is not None and latest >= total
      and os.path.isfile(os.path.join(workdir, "model", model_dir.CONFIG_FILE))):
    return _finished_summary(config, workdir, latest)
  trainer = build_trainer(config)
  model0 = trainer.model()
  tokenizer = make_tokenizer(config, model0)
  data_iter = build_data(config, model0, trainer.family, tokenizer, trainer.settings)
  fields = trainer.family.batch_fields(trainer.settings)
  ckpt = train_checkpoint.TrainCheckpointer(ckpt_dir, save_every=config.checkpoint_every,
                                            keep=config.get("keep_checkpoints", 2))
  if latest is not None:
    trainer.state, extra = ckpt.restore(latest, abstract_state(trainer))
    if extra.get("data_state") is not None:
      data_iter.set_state(extra["data_state"])
    log.info("resumed from step %d (%s)", latest, ckpt.step_dir(latest))
  eval_sets = build_eval_sets(config, model0, tokenizer) if config.eval_every else {}

  start = trainer.step
  logger = run_log.RunLogger(workdir, total, start, is_main)
  losses: list[float] = []
  metrics_last: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  t_last, n_last = time.perf_counter(), 0
  log_every = max(1, int(config.get("log_every", 10)))
  steps_run = 0
  done = start
  pending = None  # the previous step's metrics, checked once the next step is dispatched
  ctrl_c = run_log.CtrlC()
  try:
    with ctrl_c:
      try:
        for step in range(start, total):
          host_batch = next(data_iter)
          host_batch = {k: v for k, v in host_batch.items() if k in fields}
          if batch_fn is not None:
            host_batch = batch_fn(host_batch)
          batch = sharding.host_to_global(host_batch, trainer.mesh)
          trainer.state, metrics = trainer.step_fn(trainer.state, batch)
          if pending is not None:
            run_log.check_finite(*pending, logger)
          steps_run += 1
          n_last += 1
          done = step + 1
          pending = (done, metrics)
          postfix = None
          if done % log_every == 0 or done == total:
            metrics_last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t_last
            metrics_last["samples_per_sec"] = n_last * config.batch_size / max(dt, 1e-9)
            skipped = getattr(data_iter, "skipped", None)
            if skipped is not None:
              metrics_last["skipped_samples"] = float(skipped)
            logger.scalars(done, metrics_last)
            postfix = {"loss": f"{metrics_last['loss']:.4f}",
                       "samples/s": f"{metrics_last['samples_per_sec']:.1f}"}
            t_last, n_last = time.perf_counter(), 0
          logger.progress(1, postfix)
          losses.append(metrics["loss"])
          save_due = done % config.checkpoint_every == 0 or done == total
          eval_due = bool(config.eval_every) and (done % config.eval_every == 0 or done == total)
          if save_due or eval_due or done == total:
            run_log.check_finite(*pending, logger)
            pending = None
            if not bool(run_log.all_finite(trainer.state["params"])):
              raise run_log.NonFinite(done, "parameters are not finite")
          if save_due:
            with ctrl_c.deferred():  # Ctrl-C waits for this write (a second one abandons it)
              saved = ckpt.save(done, trainer.state, {"data_state": data_iter.get_state()},
                                force=(done == total))
            if saved:
              log.info("step %d: saving checkpoint %s", done, ckpt.step_dir(done))
          if eval_due:
            eval_metrics = run_eval(trainer.model(), config, tokenizer, eval_sets, trainer.mesh,
                                    trainer.family)
            if is_main:
              report.append_metrics(workdir, done, eval_metrics)
              logger.scalars(done, eval_metrics, prefix="eval")
              logger.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in
                                                          sorted(eval_metrics.items())))
          if on_step_end is not None:
            on_step_end(done)
          if stop_after is not None and steps_run >= stop_after:
            break
        if pending is not None:
          run_log.check_finite(*pending, logger)
      finally:
        with ctrl_c.deferred():  # the in-flight checkpoint completes (a second Ctrl-C abandons it)
          ckpt.wait()
          ckpt.close()
        logger.close()
  except run_log.NonFinite as e:
    kept = train_checkpoint.complete_steps(ckpt_dir)
    raise errors.Diverged(
        f"training diverged at step {e.step}: {e.what}; stopped without saving that state "
        f"(latest good checkpoint: {f'step {kept[-1]}' if kept else 'none'}); lower config.lr"
        ) from None
  except KeyboardInterrupt:
    kept = train_checkpoint.complete_steps(ckpt_dir)
    raise errors.Interrupted(
        f"interrupted after step {done}; latest complete checkpoint: "
        f"{f'step {kept[-1]}' if kept else 'none'} (run the same command to resume)") from None
  if trainer.step >= total:
    export_model(trainer, workdir)
  loss_values = [float(x) for x in jax.device_get(losses)]
  return {"losses": loss_values, "metrics": metrics_last, "eval": eval_metrics,
          "step": trainer.step, "trainer": trainer,
          "skipped": getattr(data_iter, "skipped", None)}


def export_model(trainer: Trainer, workdir: str) -> str:
  """Writes the finished model to `workdir/model` (a zoo.save directory: what zoo.load and
  eval.py --checkpoint read): the family's export form, LoRA merged into the base weights
  (the adapters alone also go to `workdir/adapter`)."""
  model = trainer.family.export(trainer.model())
  lora = peft_settings(trainer.config)
  if lora["rank"] or lora.get("adapter_from", ""):
    adapters.save_adapters(model, os.path.join(workdir, "adapter"), overwrite=True,
                       metadata={"language": lora.get("language", "")})
    # merge_lora works in place and the trainer's model shares its Variables: merge a copy.
    model = peft.merge_lora(nnx.clone(model))
  return model_dir.save(model, os.path.join(workdir, "model"), trainer.config, overwrite=True,
                         step=trainer.step)


def abstract_state(trainer: Trainer) -> dict:
  """Shape/dtype/sharding of the train state: the restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      trainer.state, trainer.state_shardings)


def restore_latest(trainer: Trainer, workdir: str) -> int | None:
  """Restores the trainer's state from the latest complete checkpoint in `workdir`."""
  ckpt = train_checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                                            save_every=trainer.config.checkpoint_every,
                                            keep=trainer.config.get("keep_checkpoints", 2))
  try:
    latest = ckpt.latest_step()
    if latest is None:
      return None
    trainer.state, _ = ckpt.restore(latest, abstract_state(trainer))
    return latest
  finally:
    ckpt.close()


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
  params = train_checkpoint.restore_params(os.path.join(workdir, "checkpoints"), step, abstract)
  return nnx.merge(graphdef, params, rest)
