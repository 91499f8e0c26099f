"""The one sharded train loop every model family plugs into.

A family (`zoo.families.Family`) supplies its settings, model, batch-field hook, forward, loss,
trainable predicate, eval kinds and export form (and optionally a driver of phase configs).
The loop owns everything else: mesh, shardings, optimizer, the jitted train step (pure
function of (state, batch), explicit in/out shardings, donated state), data, checkpoints with
exact resume, evaluation, logging.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from zoo import config_utils, families, layers, pretrained, sharding
from zoo.families import base as family_base

Array = jax.Array
PyTree = Any
log = logging.getLogger("zoo.train")


# ----------------------------------------------------------------------------- families

# The family seam lives in zoo.families; these names stay importable from here.
Family = families.Family
LossContext = families.LossContext
register_family = families.register
get_family = families.get
model_overrides = family_base.model_overrides
build_clip_model = family_base.build_clip_model
init_params_from = family_base.init_params_from


def peft_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.peft` over zoo.peft's defaults; {"rank": 0} when LoRA is off."""
  given = dict(config.get("peft", None) or {})
  if not (given.get("rank", 0) or given.get("adapter_from", "")):
    return {"rank": 0}
  from zoo import peft

  return config_utils.section(config, "peft", dict(peft.default_settings()))


def apply_peft(config: ml_collections.ConfigDict, model: nnx.Module) -> bool:
  """Attaches `config.peft`'s LoRA adapters (fresh, or `peft.adapter_from`); True if any."""
  lora = peft_settings(config)
  if not (lora["rank"] or lora.get("adapter_from", "")):
    return False
  from zoo import peft

  return bool(peft.apply_settings(model, {**lora, "seed": int(config.seed)}))


def model_builder(config: ml_collections.ConfigDict, family: Family) -> Callable[[], nnx.Module]:
  """The family's model of `config` (its settings parsed here), weights from init_from."""
  settings = family.settings(config)
  return lambda: family.build_model(config, settings)


# ----------------------------------------------------------------------------- optimizer

_NO_DECAY_NAMES = {"token_embedding", "positional_embedding", "class_embedding", "latent",
                   "logit_scale", "logit_bias"}


path_names = sharding.path_names


def decay_mask(params: PyTree) -> PyTree:
  """Weight decay on weight matrices only: none on biases (of any rank: the fused qkv bias
  [3, H, Dh], MoE expert biases [E, d]), norms, embeddings, logit scale/bias."""
  def decays(path, x) -> bool:
    names = path_names(path)
    return (x.ndim >= 2 and not set(names) & _NO_DECAY_NAMES
            and not any(n.endswith("bias") for n in names))

  return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  warmup = min(config.warmup_steps, max(config.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup,
                                            max(config.total_steps, warmup + 1),
                                            end_value=config.get("end_lr", 0.0))


def make_optimizer(config: ml_collections.ConfigDict, params: PyTree,
                   trainable: Callable[[tuple[str, ...]], bool] | None) -> optax.GradientTransformation:
  """AdamW with decay mask, global-norm clipping, warmup+cosine; frozen params get no update."""
  parts = []
  if config.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(make_schedule(config), b1=config.get("b1", 0.9),
                           b2=config.get("b2", 0.98), eps=config.get("eps", 1e-6),
                           weight_decay=config.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if trainable is None:
    return tx
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "train" if trainable(path_names(p)) else "freeze", params)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------- train step


def clamp_logit_scale(params: PyTree, max_scale: float) -> PyTree:
  """Clamps the learned log temperature at log(max_scale) (CLIP's 100)."""
  limit = float(np.log(max_scale))

  def clamp(path, x):
    names = path_names(path)
    return jnp.clip(x, 0.0, limit) if names and names[-1] == "logit_scale" else x

  return jax.tree_util.tree_map_with_path(clamp, params)


def split_microbatches(batch: dict, num: int) -> dict:
  """[B, ...] -> [num, B/num, ...] with microbatch a = rows a, a+num, ... so each device's
  contiguous shard contributes equally to every microbatch (no resharding)."""
  def split(x):
    b = x.shape[0]
    if b % num:
      raise ValueError(f"batch of {b} is not divisible by grad_accum={num}")
    return jnp.swapaxes(x.reshape(b // num, num, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def trainable_value_and_grad(loss_fn: Callable, trainable: Callable[[tuple[str, ...]], bool] | None
                             ) -> Callable:
  """value_and_grad of `loss_fn(params, *args)` (has_aux) w.r.t. the trainable leaves only.

  Frozen leaves are not differentiated (XLA computes no gradient for them) and get zero
  gradients, so the result has the full parameter structure the optimizer expects.
  """
  grad_all = jax.value_and_grad(loss_fn, has_aux=True)
  if trainable is None:
    return grad_all

  def grad_fn(params, *args):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    mask = [bool(trainable(path_names(p))) for p, _ in flat]
    leaves = [x for _, x in flat]
    if all(mask):
      return grad_all(params, *args)

    def partial_loss(train_leaves):
      it = iter(train_leaves)
      full = [next(it) if m else jax.lax.stop_gradient(x) for x, m in zip(leaves, mask)]
      return loss_fn(jax.tree_util.tree_unflatten(treedef, full), *args)

    value, grads = jax.value_and_grad(partial_loss, has_aux=True)(
        [x for x, m in zip(leaves, mask) if m])
    it = iter(grads)
    full = [next(it) if m else jnp.zeros_like(x) for x, m in zip(leaves, mask)]
    return value, jax.tree_util.tree_unflatten(treedef, full)

  return grad_fn


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, family: Family,
                    tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh,
                    trainable: Callable[[tuple[str, ...]], bool] | None = None,
                    settings: Any = None) -> Callable:
  """The pure train step (state, batch) -> (state, metrics); jitted by the caller.

  Only `trainable` parameters (all when None) are differentiated; `grad_norm` is theirs.
  `settings`: the family's parsed settings (parsed from `config` when None).
  """
  if settings is None:
    settings = family.settings(config)
  ctx = LossContext(settings=settings, mesh=mesh, impl=config.loss.impl)
  accum = int(config.get("grad_accum", 1))

  def loss_fn(params, batch, rng):
    model = nnx.merge(graphdef, params, rest)
    outputs = family.forward(model, batch, rng, settings)
    return family.loss(outputs, batch, ctx)

  grad_fn = trainable_value_and_grad(loss_fn, trainable)

  def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
    rng = jax.random.fold_in(state["rng"], state["step"])
    params = state["params"]
    if accum == 1:
      (loss, metrics), grads = grad_fn(params, batch, rng)
    else:
      micro = split_microbatches(batch, accum)

      def body(carry, xs):
        i, mb = xs
        (l, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        acc_g, acc_l, acc_m = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + l,
                jax.tree.map(jnp.add, acc_m, m)), None

      zero_m = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)[0][1])
      init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_m))
      (grads, loss, metrics), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      metrics = jax.tree.map(lambda m: m / accum, metrics)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    params = clamp_logit_scale(params, config.get("max_logit_scale", 100.0))
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = make_schedule(config)(state["step"])
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": state["rng"]}
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Trainer:
  """Everything built once: mesh, family, graphdef, shardings, jitted step, initial state."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  family: Family
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


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                  model: nnx.Module | None = None) -> Trainer:
  """Builds the model sharded over the mesh, the optimizer state, and the jitted step."""
  mesh = mesh or sharding.mesh_from_config(config.mesh)
  family = get_family(config.get("family", "clip"))
  settings = family.settings(config)
  if model is None:
    model = family.build_model(config, settings)
  trainable = family.trainable(settings)
  if apply_peft(config, model):
    from zoo import peft

    trainable = peft.is_lora_path  # LoRA: only the adapters train
  layers.set_remat(model, config.get("remat", "none"))  # gradient checkpointing per block
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  param_sh = sharding.state_shardings(params, mesh)
  params = sharding.shard_state(params, param_sh)
  tx = make_optimizer(config, params, trainable)
  # Optimizer state shardings follow the parameters (Adam moments mirror them).
  opt_sh = sharding.follow_param_shardings(jax.eval_shape(tx.init, params), params, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  repl = sharding.replicated(mesh)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), repl), "params": params,
           "opt_state": opt_state,
           "rng": jax.device_put(jax.random.key_data(jax.random.key(config.seed)), repl)}
  state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}

  raw_step = make_train_step(graphdef, rest, family, tx, config, mesh, trainable, settings)

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
                    out_shardings=(state_sh, repl), donate_argnums=(0,))
  return Trainer(config=config, mesh=mesh, family=family, graphdef=graphdef, rest=rest,
                 state=state, state_shardings=state_sh, step_fn=step_fn, tx=tx,
                 settings=settings)


# ----------------------------------------------------------------------------- data / eval


def context_length(config: ml_collections.ConfigDict, model: nnx.Module) -> int:
  return int(config.get("context_length", 0) or model.config.text.context_length)


def make_tokenizer(config: ml_collections.ConfigDict, model: nnx.Module):
  from zoo import tokenizers

  if getattr(model.config, "tokenizer_format", "") == "xlmr" and not config.get("tokenizer", ""):
    return tokenizers.XLMRobertaTokenizer(model.config.tokenizer, context_length(config, model))
  name = config.get("tokenizer", "") or config.model
  return tokenizers.get_tokenizer(name, context_length=context_length(config, model))


def build_data(config: ml_collections.ConfigDict, model: nnx.Module, family: Family, tokenizer,
               settings: Any = None):
  """The train pipeline of `config.data` with the family's fields (and its field hook)."""
  from zoo import data

  mc = model.config
  hook = family.field_hook(config, family.settings(config) if settings is None else settings,
                           model)
  return data.build_train_pipeline(
      config.data, tokenizer=tokenizer, image_size=mc.vision.image_size, mean=mc.image_mean,
      std=mc.image_std, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      fields=family.fields, context_length=context_length(config, model),
      field_hooks=() if hook is None else (hook,))


def sample_batches(config: ml_collections.ConfigDict, model: nnx.Module, n: int) -> list[dict]:
  """About `n` samples (image, tokens) of `config`'s training data for `model`, in host
  batches (e.g. what DMU clusters)."""
  clip_family = get_family("clip")
  it = build_data(config, model, clip_family, make_tokenizer(config, model))
  out, got = [], 0
  while got < n:
    b = next(it)
    out.append({"image": b["image"], "tokens": b["tokens"]})
    got += len(b["image"])
  return out


def build_eval_sets(config: ml_collections.ConfigDict, model: nnx.Module, tokenizer) -> dict:
  from zoo import data

  mc = model.config
  return data.build_eval_sets(config.data, tokenizer=tokenizer, image_size=mc.vision.image_size,
                              mean=mc.image_mean, std=mc.image_std)


def run_eval(trainer_or_model, config: ml_collections.ConfigDict, tokenizer, eval_sets: dict,
             mesh: jax.sharding.Mesh | None, family: Family) -> dict[str, float]:
  """Standard eval sets plus the family's own evaluator (if any)."""
  from zoo import eval_lib

  model = trainer_or_model
  metrics = eval_lib.evaluate(model, eval_sets, tokenizer, mesh=mesh)
  metrics.update(family.evaluate(model, config, family.settings(config), tokenizer, mesh))
  return {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- the loop


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize from config.distributed or the environment (multi-host)."""
  dist = config.get("distributed", None)
  coordinator = (dist.get("coordinator_address", "") if dist else "") or os.environ.get(
      "ZOO_COORDINATOR_ADDRESS", "")
  if not coordinator:
    return
  num = int((dist.get("num_processes", 0) if dist else 0) or os.environ["ZOO_NUM_PROCESSES"])
  pid = int(dist.get("process_id", -1) if dist else -1)
  if pid < 0:
    pid = int(os.environ["ZOO_PROCESS_ID"])
  if jax.default_backend() == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)


class _Logger:
  """Progress bar, TensorBoard scalars and a JSONL log of train metrics (process 0 only)."""

  def __init__(self, workdir: str, total: int, start: int, enabled: bool):
    self.enabled = enabled
    self.bar = None
    self.tb = None
    self.jsonl = None
    if not enabled:
      return
    from tqdm.auto import tqdm

    self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                    mininterval=1.0)
    try:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:  # tensorboard is optional for logging
      self.tb = None
    self.jsonl = open(os.path.join(workdir, "train_log.jsonl"), "a")

  def scalars(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
    if not self.enabled:
      return
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f"{prefix}/{k}", v, step)
    self.jsonl.write(json.dumps({"step": step, "prefix": prefix, **metrics}) + "\n")
    self.jsonl.flush()

  def progress(self, n: int, postfix: Mapping[str, Any]) -> None:
    if self.bar is not None:
      self.bar.update(n)
      self.bar.set_postfix(postfix, refresh=False)

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)
    elif self.enabled:
      print(text)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None,
          on_step_end: Callable[[int], None] | None = None,
          batch_fn: Callable[[dict], dict] | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (see `train_loop`); a family with a driver (CLIP-MoE's DMU)
  instead runs its sequence of phase configs, each through `train_loop`."""
  pretrained.resolve_init_from(config)  # init_from 'pretrained:NAME/TAG' / 'hf-hub:...' -> dir
  family = get_family(config.get("family", "clip"))
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

  `stop_after` ends the run after that many steps of this process; `on_step_end(step)` runs
  after each step (tests use both to interrupt a run). `batch_fn` maps each host-local batch
  (numpy, the family's fields) before it is sharded, e.g. to add derived fields; it must be a
  deterministic function of the batch so resumed runs stay exact.
  """
  from zoo import checkpoint, eval_lib

  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  trainer = build_trainer(config)
  model0 = trainer.model()
  tokenizer = make_tokenizer(config, model0)
  data_iter = build_data(config, model0, trainer.family, tokenizer, trainer.settings)
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                                      save_every=config.checkpoint_every,
                                      keep=config.get("keep_checkpoints", 2))
  latest = ckpt.latest_step()
  if latest is not None:
    trainer.state, extra = ckpt.restore(latest, abstract_state(trainer))
    if extra.get("data_state") is not None:
      data_iter.set_state(extra["data_state"])
    log.info("resumed from step %d", latest)
  eval_sets = build_eval_sets(config, model0, tokenizer) if config.eval_every else {}
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  start = trainer.step
  total = config.total_steps
  logger = _Logger(workdir, total, start, is_main)
  losses: list[float] = []
  metrics_last: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  t_last, n_last = time.perf_counter(), 0
  log_every = max(1, int(config.get("log_every", 10)))
  steps_run = 0
  try:
    for step in range(start, total):
      host_batch = next(data_iter)
      host_batch = {k: v for k, v in host_batch.items() if k in trainer.family.fields}
      if batch_fn is not None:
        host_batch = batch_fn(host_batch)
      batch = sharding.host_to_global(host_batch, trainer.mesh)
      trainer.state, metrics = trainer.step_fn(trainer.state, batch)
      steps_run += 1
      n_last += 1
      done = step + 1
      if done % log_every == 0 or done == total:
        metrics_last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - t_last
        metrics_last["samples_per_sec"] = n_last * config.batch_size / max(dt, 1e-9)
        skipped = getattr(data_iter, "skipped", None)
        if skipped is not None:
          metrics_last["skipped_samples"] = float(skipped)
        logger.scalars(done, metrics_last)
        logger.progress(n_last, {"loss": f"{metrics_last['loss']:.4f}",
                                 "samples/s": f"{metrics_last['samples_per_sec']:.1f}"})
        t_last, n_last = time.perf_counter(), 0
      losses.append(metrics["loss"])
      if done % config.checkpoint_every == 0 or done == total:
        ckpt.save(done, trainer.state, {"data_state": data_iter.get_state()},
                  force=(done == total))
      if config.eval_every and (done % config.eval_every == 0 or done == total):
        eval_metrics = run_eval(trainer.model(), config, tokenizer, eval_sets, trainer.mesh,
                                trainer.family)
        if is_main:
          eval_lib.append_metrics(workdir, done, eval_metrics)
          logger.scalars(done, eval_metrics, prefix="eval")
          logger.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in
                                                      sorted(eval_metrics.items())))
      if on_step_end is not None:
        on_step_end(done)
      if stop_after is not None and steps_run >= stop_after:
        break
  finally:
    ckpt.wait()
    ckpt.close()
    logger.close()
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
  from zoo import checkpoint

  model = trainer.family.export(trainer.model())
  lora = peft_settings(trainer.config)
  if lora["rank"] or lora.get("adapter_from", ""):
    from zoo import peft

    peft.save_adapters(model, os.path.join(workdir, "adapter"), overwrite=True,
                       metadata={"language": lora.get("language", "")})
    # merge_lora works in place and the trainer's model shares its Variables: merge a copy.
    model = peft.merge_lora(nnx.clone(model))
  return checkpoint.save(model, os.path.join(workdir, "model"), trainer.config, overwrite=True)


def abstract_state(trainer: Trainer) -> dict:
  """Shape/dtype/sharding of the train state: the restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      trainer.state, trainer.state_shardings)


def restore_latest(trainer: Trainer, workdir: str) -> int | None:
  """Restores the trainer's state from the latest complete checkpoint in `workdir`."""
  from zoo import checkpoint

  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"),
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


def load_for_eval(config: ml_collections.ConfigDict, *, workdir: str | None = None,
                  checkpoint: str | None = None) -> tuple[nnx.Module, int, str]:
  """(model, step, where to write metrics) from a training workdir or a zoo.save directory."""
  if checkpoint:
    from zoo import checkpoint as ckpt_lib

    model, _, _ = ckpt_lib.load(checkpoint)
    return model, 0, workdir or checkpoint
  trainer = build_trainer(config)
  step = restore_latest(trainer, workdir)
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint under {os.path.join(workdir, 'checkpoints')}"
                            "; train first or pass --checkpoint DIR")
  return trainer.model(), step, workdir
