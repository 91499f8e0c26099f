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
import ml_collections
from flax import nnx

from zoo import data, errors, families, tokenizers
from zoo.data import eval_sets as eval_data, pipeline
from zoo.eval import evaluator, report, suite
from zoo.models import lora as peft, sharding
from zoo.train import (
  checkpoints as train_checkpoint,
  run_config,
  run_log,
  text_lengths,
)
from zoo.train.trainer import Trainer, abstract_state, build_trainer, peft_settings
from zoo.weights import adapters, model_dir, pretrained

Array = jax.Array
PyTree = Any
log = logging.getLogger("zoo.train")


# ----------------------------------------------------------------------------- families


# ----------------------------------------------------------------------------- setup


# ----------------------------------------------------------------------------- data / eval


def context_length(config: ml_collections.ConfigDict, model: nnx.Module) -> int:
  return int(config.get("context_length", 0) or model.config.text.context_length)


def make_tokenizer(config: ml_collections.ConfigDict, model: nnx.Module):
  if getattr(model.config, "tokenizer_format", "") == "xlmr" and not config.get("tokenizer", ""):
    return tokenizers.XLMRobertaTokenizer(model.config.tokenizer, context_length(config, model))
  if getattr(model.config, "tokenizer_format", "") == "hf" and not config.get("tokenizer", ""):
    return tokenizers.for_config(model.config, context_length=context_length(config, model))
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
  """The data config's eval sets, then the benchmarks of `config.eval.datasets` (by name)."""
  mc = model.config
  sets = data.build_eval_sets(config.data, tokenizer=tokenizer, image_size=mc.vision.image_size,
                              mean=mc.image_mean, std=mc.image_std)
  ev = config.get("eval") or {}
  if ev.get("datasets"):
    sets.update(eval_data.benchmark_eval_sets(
        ev["datasets"], data_root=ev.get("data_root", ""), split=ev.get("split", "test") or "test",
        size=int(ev.get("size", 0) or 0), image_size=mc.vision.image_size, mean=mc.image_mean,
        std=mc.image_std))
  return sets


def run_eval(model: nnx.Module, config: ml_collections.ConfigDict, tokenizer, eval_sets: dict,
             mesh: jax.sharding.Mesh | None, family: families.Family,
             settings: Any = None) -> dict[str, float]:
  """Standard eval sets plus the family's own evaluator (if any); `settings`: the family's
  parsed settings (parsed from `config` when not given)."""
  metrics = suite.evaluate(model, eval_sets, tokenizer, mesh=mesh)
  settings = family.settings(config) if settings is None else settings
  metrics.update(family.evaluate(model, config, settings, tokenizer, mesh))
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


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When things happen, parsed once from the config: steps, logging, checkpoints, evals."""

  total: int
  batch_size: int
  log_every: int
  checkpoint_every: int
  eval_every: int  # 0 = never
  keep_checkpoints: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Cadence:
    return cls(total=int(config.total_steps), batch_size=int(config.batch_size),
               log_every=max(1, int(config.get("log_every", 10))),
               checkpoint_every=int(config.checkpoint_every), eval_every=int(config.eval_every),
               keep_checkpoints=int(config.get("keep_checkpoints", 2)))

  def log_due(self, done: int) -> bool:
    return done % self.log_every == 0 or done == self.total

  def save_due(self, done: int) -> bool:
    return done % self.checkpoint_every == 0 or done == self.total

  def eval_due(self, done: int) -> bool:
    return bool(self.eval_every) and (done % self.eval_every == 0 or done == self.total)


@dataclasses.dataclass
class Run:
  """One `train_loop` run: what it built once, and what each step moves on."""

  trainer: Trainer
  workdir: str
  cadence: Cadence
  data_iter: Any
  fields: tuple[str, ...]
  tokenizer: Any
  eval_sets: dict
  ckpt: train_checkpoint.TrainCheckpointer
  logger: run_log.RunLogger
  done: int  # steps completed (the step the state is at)
  steps_run: int = 0  # steps this process ran
  losses: list = dataclasses.field(default_factory=list)  # device scalars, fetched at the end
  metrics_last: dict = dataclasses.field(default_factory=dict)
  eval_metrics: dict = dataclasses.field(default_factory=dict)
  pending: tuple | None = None  # (step, metrics) of the last step, checked after the next one
  t_last: float = dataclasses.field(default_factory=time.perf_counter)
  n_last: int = 0  # steps since the last throughput figure
  trim: Any = None  # text_lengths.Trim of data.text_lengths (None: off)


def open_run(config: ml_collections.ConfigDict, workdir: str, latest: int | None) -> Run:
  """Builds the trainer, tokenizer, data, eval sets and checkpointer; resumes from `latest`."""
  cadence = Cadence.from_config(config)
  trainer = build_trainer(config)
  model0 = trainer.model()
  tokenizer = make_tokenizer(config, model0)
  data_iter = build_data(config, model0, trainer.family, tokenizer, trainer.settings)
  ckpt = train_checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                                            save_every=cadence.checkpoint_every,
                                            keep=cadence.keep_checkpoints)
  if latest is not None:
    trainer.state, extra = ckpt.restore(latest, abstract_state(trainer))
    if extra.get("data_state") is not None:
      data_iter.set_state(extra["data_state"])
    log.info("resumed from step %d (%s)", latest, ckpt.step_dir(latest))
  eval_sets = build_eval_sets(config, model0, tokenizer) if cadence.eval_every else {}
  if cadence.eval_every and not eval_sets and \
      type(trainer.family).evaluate is families.Family.evaluate:
    log.warning("eval_every=%d but nothing to evaluate: name benchmarks with "
                "--config.eval.datasets=imagenet1k,... or give --config.data.eval_shards "
                "(or set --config.eval_every=0)", cadence.eval_every)
  start = trainer.step
  fields = pipeline.with_crop_field(trainer.family.batch_fields(trainer.settings), config.data)
  trim = text_lengths.build(config.data.get("text_lengths", ""), model0, fields,
                            context_length(config, model0))
  return Run(trainer=trainer, workdir=workdir, cadence=cadence, data_iter=data_iter,
             fields=fields, tokenizer=tokenizer, eval_sets=eval_sets, ckpt=ckpt, done=start,
             logger=run_log.RunLogger(workdir, cadence.total, start, jax.process_index() == 0),
             trim=trim)


def take_step(run: Run, batch_fn: Callable[[dict], dict] | None) -> None:
  """One train step; the step before it is checked for non-finite values only now, so the host
  never waits for the device between steps."""
  host_batch = {k: v for k, v in next(run.data_iter).items() if k in run.fields}
  if batch_fn is not None:
    host_batch = batch_fn(host_batch)
  if run.trim is not None:  # data.text_lengths: tokens cut to the bucket of the longest caption
    host_batch = run.trim(host_batch)
  batch = sharding.host_to_global(host_batch, run.trainer.mesh)
  run.trainer.state, metrics = run.trainer.step_fn(run.trainer.state, batch)
  if run.pending is not None:
    run_log.check_finite(*run.pending, run.logger)
  run.steps_run += 1
  run.n_last += 1
  run.done += 1
  run.pending = (run.done, metrics)
  run.losses.append(metrics["loss"])


def log_step(run: Run) -> None:
  """The progress bar, and every `log_every` steps the metrics and throughput."""
  postfix = None
  if run.cadence.log_due(run.done):
    metrics = {k: float(v) for k, v in jax.device_get(run.pending[1]).items()}
    dt = time.perf_counter() - run.t_last
    metrics["samples_per_sec"] = run.n_last * run.cadence.batch_size / max(dt, 1e-9)
    skipped = getattr(run.data_iter, "skipped", None)
    if skipped is not None:
      metrics["skipped_samples"] = float(skipped)
    run.logger.scalars(run.done, metrics)
    postfix = {"loss": f"{metrics['loss']:.4f}", "samples/s": f"{metrics['samples_per_sec']:.1f}"}
    run.metrics_last, run.t_last, run.n_last = metrics, time.perf_counter(), 0
  run.logger.progress(1, postfix)


def check_state(run: Run) -> None:
  """Before anything is written or evaluated: the last step's metrics and the parameters are
  finite (run_log.NonFinite otherwise)."""
  if run.pending is not None:
    run_log.check_finite(*run.pending, run.logger)
    run.pending = None
  if not bool(run_log.all_finite(run.trainer.state["params"])):
    raise run_log.NonFinite(run.done, "parameters are not finite", params_step=run.done)


def save_checkpoint(run: Run, ctrl_c: run_log.CtrlC) -> None:
  with ctrl_c.deferred():  # Ctrl-C waits for this write (a second one abandons it)
    saved = run.ckpt.save(run.done, run.trainer.state,
                          {"data_state": run.data_iter.get_state()},
                          force=(run.done == run.cadence.total))
  if saved:
    log.info("step %d: saving checkpoint %s", run.done, run.ckpt.step_dir(run.done))


def evaluate_step(run: Run) -> None:
  """The eval sets and the family's evals on the current parameters, logged and recorded."""
  trainer = run.trainer
  try:
    run.eval_metrics = run_eval(trainer.model(), trainer.config, run.tokenizer, run.eval_sets,
                                trainer.mesh, trainer.family, trainer.settings)
  except evaluator.NonFiniteError:
    raise run_log.NonFinite(run.done, "eval features are not finite",
                            params_step=run.done) from None
  if jax.process_index() == 0:
    report.append_metrics(run.workdir, run.done, run.eval_metrics)
    run.logger.scalars(run.done, run.eval_metrics, prefix="eval")
    run.logger.write(f"step {run.done}: " + ", ".join(
        f"{k}={v:.4f}" for k, v in sorted(run.eval_metrics.items())))


def train_loop(config: ml_collections.ConfigDict, workdir: str, *,
               stop_after: int | None = None,
               on_step_end: Callable[[int], None] | None = None,
               batch_fn: Callable[[dict], dict] | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints); returns a summary dict.

  A finished run also exports the final model to `workdir/model` (a zoo.save directory).
  Resuming checks the config against the stored one (`zoo.train.run_config`). A non-finite loss,
  gradient norm, parameter or eval feature stops the run (`zoo.errors.Diverged`) before anything
  is saved from that state; the checkpoints whose parameters gave it move to
  `workdir/diverged/<step>`, so the latest one left (what a restart resumes and eval.py
  evaluates) had a finite loss. Ctrl-C waits for the in-flight checkpoint and raises
  `zoo.errors.Interrupted`.

  `stop_after` ends the run after that many steps of this process; `on_step_end(step)` runs
  after each step (tests use both to interrupt a run). `batch_fn` maps each host-local batch
  (numpy, the family's fields) before it is sharded, e.g. to add derived fields; it must be a
  deterministic function of the batch so resumed runs stay exact.
  """
  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps_on_disk = train_checkpoint.complete_steps(ckpt_dir)
  config, latest = run_config.prepare(config, workdir,
                                      steps_on_disk[-1] if steps_on_disk else None)
  run_config.check_config(config)
  if (latest is not None and latest >= config.total_steps
      and os.path.isfile(os.path.join(workdir, "model", model_dir.CONFIG_FILE))):
    return _finished_summary(config, workdir, latest)
  run = open_run(config, workdir, latest)
  ctrl_c = run_log.CtrlC()
  try:
    with ctrl_c:
      try:
        while run.done < run.cadence.total:
          take_step(run, batch_fn)
          log_step(run)
          save_due, eval_due = run.cadence.save_due(run.done), run.cadence.eval_due(run.done)
          if save_due or eval_due or run.done == run.cadence.total:
            check_state(run)
          if save_due:
            save_checkpoint(run, ctrl_c)
          if eval_due:
            evaluate_step(run)
          if on_step_end is not None:
            on_step_end(run.done)
          if stop_after is not None and run.steps_run >= stop_after:
            break
        if run.pending is not None:
          run_log.check_finite(*run.pending, run.logger)
      finally:
        with ctrl_c.deferred():  # the in-flight checkpoint completes (a second Ctrl-C abandons it)
          run.ckpt.wait()
          run.ckpt.close()
        run.logger.close()
  except run_log.NonFinite as e:
    raise errors.Diverged(set_aside_diverged(workdir, e)) from None
  except KeyboardInterrupt:
    kept = train_checkpoint.complete_steps(ckpt_dir)
    raise errors.Interrupted(
        f"interrupted after step {run.done}; latest complete checkpoint: "
        f"{f'step {kept[-1]}' if kept else 'none'} (run the same command to resume)") from None
  if run.trainer.step >= run.cadence.total:
    export_model(run.trainer, workdir)
  return {"losses": [float(x) for x in jax.device_get(run.losses)], "metrics": run.metrics_last,
          "eval": run.eval_metrics, "step": run.trainer.step, "trainer": run.trainer,
          "skipped": getattr(run.data_iter, "skipped", None)}


def set_aside_diverged(workdir: str, e: run_log.NonFinite) -> str:
  """Moves the checkpoints of `workdir` whose parameters gave `e`'s non-finite values (steps
  >= e.params_step) to `workdir/diverged/`; returns the one line that says so and names the
  latest checkpoint left (its loss was finite: a restart resumes from it)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  moved = train_checkpoint.move_aside(ckpt_dir, e.params_step, os.path.join(workdir, "diverged"))
  kept = train_checkpoint.complete_steps(ckpt_dir)
  source = f" (from the parameters of step {e.params_step})" if e.params_step < e.step else ""
  aside = "".join(f"; checkpoint {step} moved to {path}" for step, path in moved)
  good = (f"latest good checkpoint: step {kept[-1]}, whose loss was finite (a restart resumes "
          "from it)" if kept else "no good checkpoint is left (a restart starts over)")
  return f"training diverged at step {e.step}: {e.what}{source}{aside}; {good}; lower config.lr"


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


