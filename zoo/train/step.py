"""The optimizer and the pure, jittable train step of the train loop (`zoo.train.loop`).

AdamW with a decay mask, global-norm clipping and warmup + cosine (frozen parameters get no
update); the step differentiates only the trainable leaves, accumulates micro-batches with
`lax.scan` and clamps the logit scale. A state with `batch_stats` (config.batch_norm="update")
trains its batch norms in torch's train mode and carries the updated statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import PIL
from flax import nnx

from zoo import families
from zoo.models import resnet, sharding
from zoo.train import run_config

PyTree = Any
Family = families.Family
LossContext = families.LossContext


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
  kind = config.get("optimizer", "adamw")
  if kind == "sgd":  # SGD with momentum 0.9 and L2 weight decay (CoOp / MaPLe's recipe)
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(make_schedule(config), momentum=config.get("momentum", 0.9)))
  elif kind == "adamw":
    parts.append(optax.adamw(make_schedule(config), b1=config.get("b1", 0.9),
                             b2=config.get("b2", 0.98), eps=config.get("eps", 1e-6),
                             weight_decay=config.weight_decay, mask=decay_mask))
  else:
    raise ValueError(f"config.optimizer={kind!r}: expected 'adamw' or 'sgd'")
  tx = optax.chain(*parts)
  if trainable is None:
    return tx
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "train" if trainable(path_names(p)) else "freeze", params)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------- train step


def normalize_on_device(image: jax.Array, mean, std) -> jax.Array:
  """zoo.transforms.normalize for a uint8 batch (data.image_dtype='uint8'), inside the step; a
  float batch (normalized on the host) passes through."""
  if image.dtype != jnp.uint8:
    return image
  x = image.astype(jnp.float32) / jnp.float32(255.0)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# Pillow 13 chose the order of its two resize passes by the shape (Resample.c); before, width first.
_PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def _bicubic(x: jax.Array) -> jax.Array:
  """PIL's bicubic kernel (Keys, a = -0.5)."""
  a, x = -0.5, jnp.abs(x)
  return jnp.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                   jnp.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def pil_resize_weights(in_size: jax.Array, out_size: int, length: int) -> jax.Array:
  """[out_size, length] weights of PIL's antialiased bicubic resize of `in_size` (a traced int)
  pixels to `out_size`, as Pillow computes them (support widened by the scale, each row
  normalized, then rounded to its 22-bit fixed point); zero from `in_size` on.

  Pillow works in float64; here the kernel's argument (x + 0.5 - center) / max(scale, 1) and
  the window's ends are ratios of exact integers, so float32 rounds once per weight."""
  n = jnp.asarray(in_size, jnp.int32)
  wide = jnp.maximum(n, out_size)  # out_size * max(scale, 1)
  twice_center = (2 * jnp.arange(out_size, dtype=jnp.int32) + 1) * n  # / out_size
  # window [first, last): floor(center -/+ 2 max(scale, 1) + 0.5), within [0, in_size)
  first = jnp.maximum((twice_center - 4 * wide + out_size) // (2 * out_size), 0)[:, None]
  last = jnp.minimum((twice_center + 4 * wide + out_size) // (2 * out_size), n)[:, None]
  x = jnp.arange(length, dtype=jnp.int32)[None]
  arg = ((2 * x + 1) * out_size - twice_center[:, None]).astype(jnp.float32) / (
      2 * wide).astype(jnp.float32)
  w = jnp.where((x >= first) & (x < last), _bicubic(arg), 0.0)
  w = w / jnp.sum(w, axis=1, keepdims=True)
  one = jnp.float32(1 << 22)
  return jnp.sign(w) * jnp.floor(jnp.abs(w) * one + 0.5) / one


def resize_on_device(canvas: jax.Array, crop: jax.Array, size: int) -> jax.Array:
  """uint8 [B, size, size, 3] from uint8 canvases [B, C, C, 3] holding each crop at the top-left
  (crop: int32 [B, 3] = height, width, flipped; data.resize='device'): PIL's bicubic resize as
  zoo.transforms.apply_crop_resize does it on the host, then the flip.

  Two passes, each rounded and clipped to uint8 as Pillow does; Pillow >= 13 runs the vertical
  pass first when the height shrinks by more than twice what the width does (done here by
  transposing the canvas). float32 sums at HIGHEST precision: Pillow's integer sums round a
  pixel the other way now and then (docs/data.md: how often)."""
  hi = jax.lax.Precision.HIGHEST

  def one(image, c):
    height, width = c[0], c[1]
    transpose = (height > size) & (height - size > 2 * (width - size)) if _PILLOW_13 else False
    x = jnp.where(transpose, jnp.swapaxes(image, 0, 1), image).astype(jnp.float32)
    across = pil_resize_weights(jnp.where(transpose, height, width), size, x.shape[1])
    down = pil_resize_weights(jnp.where(transpose, width, height), size, x.shape[0])
    x = jnp.clip(jnp.floor(jnp.einsum("ow,hwc->hoc", across, x, precision=hi) + 0.5), 0, 255)
    x = jnp.clip(jnp.floor(jnp.einsum("oh,hwc->owc", down, x, precision=hi) + 0.5), 0, 255)
    x = jnp.where(transpose, jnp.swapaxes(x, 0, 1), x)
    return jnp.where(c[2] > 0, x[:, ::-1], x).astype(jnp.uint8)

  return jax.vmap(one)(canvas, crop)


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

  def loss_fn(params, batch, rng, step, stats=None):
    # stats: the batch-norm statistics of config.batch_norm="update" (None: frozen, in `rest`);
    # the forward then normalises with the batch's statistics and returns the updated ones.
    # (copied Variables: the statistics are then written at this trace's level)
    model = nnx.merge(graphdef, params, rest, *([] if stats is None else [stats]),
                      copy=stats is not None)
    if stats is not None:
      resnet.set_batch_norm(model, True)
    if "image" in batch:  # data.image_dtype='uint8': pixels normalized here, on the device
      mc, image = model.config, batch["image"]
      if "image_crop" in batch:  # data.resize='device': crops resized here
        image = resize_on_device(image, batch["image_crop"], mc.vision.image_size)
      batch = dict(batch, image=normalize_on_device(image, mc.image_mean, mc.image_std))
    outputs = family.forward(model, batch, rng, settings)
    loss, metrics = family.loss(outputs, batch, dataclasses.replace(ctx, step=step))
    return loss, (metrics, None if stats is None else nnx.state(model, nnx.BatchStat))

  grad_fn = trainable_value_and_grad(loss_fn, trainable)

  def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
    rng = jax.random.fold_in(state["rng"], state["step"])
    params, step = state["params"], state["step"]
    stats = state.get("batch_stats")
    if accum == 1:
      (loss, (metrics, stats)), grads = grad_fn(params, batch, rng, step, stats)
    else:
      micro = split_microbatches(batch, accum)

      def body(carry, xs):  # batch-norm statistics move once per micro-batch, as in torch
        i, mb = xs
        acc_g, acc_l, acc_m, st = carry
        (l, (m, st)), g = grad_fn(params, mb, jax.random.fold_in(rng, i), step, st)
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + l,
                jax.tree.map(jnp.add, acc_m, m), st), None

      zero_m = jax.eval_shape(
          lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng, step, stats)[0][1][0])
      init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_m), stats)
      (grads, loss, metrics, stats), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
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
    if stats is not None:
      new_state["batch_stats"] = stats
    return new_state, metrics

  return train_step
