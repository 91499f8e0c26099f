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
import math
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from zoo import cli, config_utils, families, layers, pretrained, run_config, sharding
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
  """Warmup + cosine; a resumed run with a changed schedule keeps its past (run_config)."""
  return run_config.schedule(config)


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


def cluster_environment() -> str | None:
  """The multi-process launcher `jax.distributed.initialize()` detects by itself (SLURM with
  several tasks, Open MPI's mpirun, a TPU pod), or None for a single process."""
  env = os.environ

  def count(name: str) -> int:
    value = env.get(name, "")
    return int(value) if value.isdigit() else 1

  if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID",
                            "SLURM_LOCALID")) and count("SLURM_NTASKS") > 1:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  hosts = env.get("TPU_PROCESS_ADDRESSES", "") or env.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU pod"
  return None


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize from config.distributed, the ZOO_* variables, or (no
  arguments: JAX's own detection) under SLURM / Open MPI / a TPU pod; coordinator "auto"
  forces the latter. Call before anything touches a JAX backend."""
  dist = config.get("distributed", None) or {}
  coordinator = dist.get("coordinator_address", "") or os.environ.get("ZOO_COORDINATOR_ADDRESS",
                                                                      "")
  launcher = cluster_environment() if coordinator in ("", "auto") else None
  if coordinator == "" and launcher is None:
    return  # a single process
  kwargs = {}
  if coordinator not in ("", "auto"):
    num = int(dist.get("num_processes", 0) or os.environ.get("ZOO_NUM_PROCESSES", 0) or 0)
    pid = int(dist.get("process_id", -1))
    if pid < 0:
      pid = int(os.environ.get("ZOO_PROCESS_ID", -1) or -1)
    if num < 1 or not 0 <= pid < num:
      raise cli.UserError(f"multi-process run with coordinator {coordinator}: set "
                          "distributed.num_processes (ZOO_NUM_PROCESSES) >= 1 and "
                          "distributed.process_id (ZOO_PROCESS_ID) in [0, num_processes); got "
                          f"num_processes={num}, process_id={pid}")
    kwargs = dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
  else:
    log.info("multi-process run (%s): jax.distributed.initialize() reads the cluster's settings",
             launcher or "coordinator_address=auto")
  # Set before the CPU backend exists (a no-op for accelerators): CPU collectives across
  # processes go through gloo. Nothing here may initialize a backend (jax.default_backend()
  # would, and jax.distributed.initialize must come first).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


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


def _finite_json(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Metrics with non-finite floats as None (strict JSON), and the names of those."""
  out, bad = {}, []
  for k, v in metrics.items():
    if isinstance(v, float) and not math.isfinite(v):
      out[k] = None
      bad.append(k)
    else:
      out[k] = v
  return out, bad


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
                    mininterval=0.5)
    try:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:  # tensorboard is optional for logging
      self.tb = None
    self.jsonl = open(os.path.join(workdir, "train_log.jsonl"), "a")

  def scalars(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
    """TensorBoard scalars and one strict-JSON line (non-finite values: null, listed under
    "nonfinite")."""
    if not self.enabled:
      return
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
          continue  # in the JSONL log as null (tensorboardX would warn about each)
        # TensorBoard tag characters; tensorboardX would rename (and log each rename) itself.
        self.tb.add_scalar(re.sub(r"[^\w./-]", "_", f"{prefix}/{k}"), v, step)
    values, bad = _finite_json(metrics)
    record = {"step": step, "prefix": prefix, **values, **({"nonfinite": bad} if bad else {})}
    self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self.jsonl.flush()

  def progress(self, n: int, postfix: Mapping[str, Any] | None = None) -> None:
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
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


class _CtrlC:
  """Ctrl-C during a run: KeyboardInterrupt at once, except inside `deferred()` (checkpoint
  writes), where the first Ctrl-C waits for the write to finish; a later one abandons it (an
  unfinished step is never listed or restored). Installed only in the main thread, over
  Python's default handler."""

  def __init__(self):
    self.presses = 0
    self.depth = 0
    self.pending = False
    self.previous = None
    self.silenced = False

  def __enter__(self) -> "_CtrlC":
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
      self.previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGINT, self.previous)
    if self.silenced:
      logging.disable(logging.NOTSET)

  def _handle(self, signum, frame) -> None:
    self.presses += 1
    if self.depth and self.presses == 1:
      self.pending = True
      return
    if self.depth:  # abandoning a write: its library's error report is not news
      logging.disable(logging.CRITICAL)
      self.silenced = True
    raise KeyboardInterrupt

  def deferred(self):
    ctrl_c = self

    class _Deferred:
      def __enter__(self):
        ctrl_c.depth += 1

      def __exit__(self, *exc):
        ctrl_c.depth -= 1
        if not ctrl_c.depth and ctrl_c.pending and exc[0] is None:
          ctrl_c.pending = False
          raise KeyboardInterrupt

    return _Deferred()


class _NonFinite(Exception):
  def __init__(self, step: int, what: str):
    super().__init__(what)
    self.step, self.what = step, what


def _check_finite(step: int, metrics: Mapping[str, Any], logger: "_Logger") -> None:
  """Raises _NonFinite naming the step and metric when the loss or grad norm is not finite
  (after logging that step's metrics, non-finite ones as null)."""
  values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
  bad = [f"{k} = {values[k]}" for k in ("loss", "grad_norm")
         if k in values and not math.isfinite(values[k])]
  if bad:
    logger.scalars(step, values)
    raise _NonFinite(step, ", ".join(bad))


@jax.jit
def _all_finite(tree: PyTree) -> Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _finished_summary(config: ml_collections.ConfigDict, workdir: str, step: int
                      ) -> dict[str, Any]:
  """A finished workdir: its final eval record (from metrics.json), nothing retrained."""
  from zoo import eval_lib

  records = [r for r in eval_lib.read_metrics(workdir) if int(r["step"]) == step]
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
  Resuming checks the config against the stored one (`zoo.run_config`). A non-finite loss or
  gradient norm stops the run (`zoo.cli.Diverged`) before anything is saved from that state;
  Ctrl-C waits for the in-flight checkpoint and raises `zoo.cli.Interrupted`.

  `stop_after` ends the run after that many steps of this process; `on_step_end(step)` runs
  after each step (tests use both to interrupt a run). `batch_fn` maps each host-local batch
  (numpy, the family's fields) before it is sharded, e.g. to add derived fields; it must be a
  deterministic function of the batch so resumed runs stay exact.
  """
  from zoo import checkpoint, eval_lib

  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps_on_disk = checkpoint.complete_steps(ckpt_dir)
  config, latest = run_config.prepare(config, workdir,
                                      steps_on_disk[-1] if steps_on_disk else None)
  check_config(config)
  total = config.total_steps
  if (latest is not None and latest >= total
      and os.path.isfile(os.path.join(workdir, "model", checkpoint.CONFIG_FILE))):
    return _finished_summary(config, workdir, latest)
  trainer = build_trainer(config)
  model0 = trainer.model()
  tokenizer = make_tokenizer(config, model0)
  data_iter = build_data(config, model0, trainer.family, tokenizer, trainer.settings)
  ckpt = checkpoint.TrainCheckpointer(ckpt_dir, save_every=config.checkpoint_every,
                                      keep=config.get("keep_checkpoints", 2))
  if latest is not None:
    trainer.state, extra = ckpt.restore(latest, abstract_state(trainer))
    if extra.get("data_state") is not None:
      data_iter.set_state(extra["data_state"])
    log.info("resumed from step %d (%s)", latest, ckpt.step_dir(latest))
  eval_sets = build_eval_sets(config, model0, tokenizer) if config.eval_every else {}

  start = trainer.step
  logger = _Logger(workdir, total, start, is_main)
  losses: list[float] = []
  metrics_last: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  t_last, n_last = time.perf_counter(), 0
  log_every = max(1, int(config.get("log_every", 10)))
  steps_run = 0
  done = start
  pending = None  # the previous step's metrics, checked once the next step is dispatched
  ctrl_c = _CtrlC()
  try:
    with ctrl_c:
      try:
        for step in range(start, total):
          host_batch = next(data_iter)
          host_batch = {k: v for k, v in host_batch.items() if k in trainer.family.fields}
          if batch_fn is not None:
            host_batch = batch_fn(host_batch)
          batch = sharding.host_to_global(host_batch, trainer.mesh)
          trainer.state, metrics = trainer.step_fn(trainer.state, batch)
          if pending is not None:
            _check_finite(*pending, logger)
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
            _check_finite(*pending, logger)
            pending = None
            if not bool(_all_finite(trainer.state["params"])):
              raise _NonFinite(done, "parameters are not finite")
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
              eval_lib.append_metrics(workdir, done, eval_metrics)
              logger.scalars(done, eval_metrics, prefix="eval")
              logger.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in
                                                          sorted(eval_metrics.items())))
          if on_step_end is not None:
            on_step_end(done)
          if stop_after is not None and steps_run >= stop_after:
            break
        if pending is not None:
          _check_finite(*pending, logger)
      finally:
        with ctrl_c.deferred():  # the in-flight checkpoint completes (a second Ctrl-C abandons it)
          ckpt.wait()
          ckpt.close()
        logger.close()
  except _NonFinite as e:
    kept = checkpoint.complete_steps(ckpt_dir)
    raise cli.Diverged(
        f"training diverged at step {e.step}: {e.what}; stopped without saving that state "
        f"(latest good checkpoint: {f'step {kept[-1]}' if kept else 'none'}); lower config.lr"
        ) from None
  except KeyboardInterrupt:
    kept = checkpoint.complete_steps(ckpt_dir)
    raise cli.Interrupted(
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
  from zoo import checkpoint

  model = trainer.family.export(trainer.model())
  lora = peft_settings(trainer.config)
  if lora["rank"] or lora.get("adapter_from", ""):
    from zoo import peft

    peft.save_adapters(model, os.path.join(workdir, "adapter"), overwrite=True,
                       metadata={"language": lora.get("language", "")})
    # merge_lora works in place and the trainer's model shares its Variables: merge a copy.
    model = peft.merge_lora(nnx.clone(model))
  return checkpoint.save(model, os.path.join(workdir, "model"), trainer.config, overwrite=True,
                         step=trainer.step)


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


def restore_model(config: ml_collections.ConfigDict, workdir: str, step: int,
                  mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """The model of train checkpoint `step` in `workdir`: built from `config` (with its LoRA
  adapters), only the parameters read from disk, sharded over `mesh` (no optimizer built)."""
  from zoo import checkpoint

  mesh = mesh or sharding.mesh_from_config(config.mesh)
  model = model_builder(config, get_family(config.get("family", "clip")))()
  apply_peft(config, model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, sharding.state_shardings(params, mesh))
  params = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), step, abstract)
  return nnx.merge(graphdef, params, rest)


def load_for_eval(config: ml_collections.ConfigDict, *, workdir: str | None = None,
                  checkpoint: str | None = None) -> tuple[nnx.Module, int, str]:
  """(model, step, where to write metrics) from a training workdir's latest checkpoint or a
  zoo.save directory (its step: the one it was exported at, 0 when unknown)."""
  from zoo import checkpoint as ckpt_lib

  if checkpoint:
    model, _, _ = ckpt_lib.load(checkpoint)
    return model, int(ckpt_lib.read_record(checkpoint).get("step") or 0), workdir or checkpoint
  steps = ckpt_lib.complete_steps(os.path.join(workdir, "checkpoints"))
  if not steps:
    raise cli.UserError(f"no complete checkpoint under {os.path.join(workdir, 'checkpoints')}; "
                        "train first, or pass --checkpoint DIR")
  return restore_model(config, workdir, steps[-1]), steps[-1], workdir
