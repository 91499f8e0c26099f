"""Model-side losses: what the train loop calls with (model outputs, batch).

Contrastive losses dispatch to `zoo.kernels.contrastive.contrastive_loss`: "reference" (plain jnp; under jit with
batch-sharded inputs GSPMD already makes it a global-batch loss), "xla" / "pallas" (fused, never
storing B x B logits; over a mesh they run inside `jax.shard_map` over the batch axes so the loss
is over the GLOBAL batch, not per device), "auto" (pallas where its kernels lower, TPU and
NVIDIA sm_80+, else xla, chosen per platform compiled for; `resolve_impl` says which). Model families add their losses here.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from zoo.kernels import contrastive
from zoo.models import sharding

Array = jax.Array


def _batch_axes(mesh: Mesh | None, batch_axes: Sequence[str]) -> tuple[str, ...]:
  """The batch axes of `mesh` that actually split the batch (size > 1)."""
  if mesh is None:
    return ()
  unknown = [a for a in batch_axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"contrastive_loss: batch_axes {unknown} are not axes of the mesh "
                     f"{dict(mesh.shape)}")
  return tuple(a for a in batch_axes if mesh.shape[a] > 1)


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """The loss impl that `impl` ("auto" | "pallas" | "xla" | "reference") means on `platform`
  (None: this process' default backend): "auto" -> "pallas" on TPU and NVIDIA GPUs of compute
  capability >= 8.0, else "xla". The loss itself picks per platform it is compiled for."""
  return contrastive.resolve_impl(impl, platform)


def contrastive_loss(image_emb: Array, text_emb: Array, logit_scale: Array,
                     logit_bias: Array | None = None, *, kind: str, impl: str,
                     mesh: Mesh | None = None,
                     batch_axes: Sequence[str] = sharding.BATCH_AXES,
                     label_smoothing: float | Array = 0.0) -> Array:
  """Global-batch contrastive loss (see `zoo.kernels.contrastive.contrastive_loss` for kind / impl).

  `logit_scale` is the already-exponentiated multiplier. With impl "xla" / "pallas" and a mesh
  whose `batch_axes` (default: the axes the train loop shards the batch over) split the batch,
  the kernel runs per device inside `jax.shard_map` with `axis_name` = those axes.
  `label_smoothing` (softmax only) as in `zoo.kernels.contrastive.contrastive_loss`, over the global batch; a
  float or a traced scalar (a schedule), passed into the shard_map replicated.
  """
  axes = () if impl == "reference" else _batch_axes(mesh, batch_axes)
  loss_fn = functools.partial(contrastive.contrastive_loss, kind=kind, impl=impl)
  if not axes:
    return loss_fn(image_emb, text_emb, logit_scale, logit_bias, label_smoothing=label_smoothing)
  n = math.prod(mesh.shape[a] for a in axes)
  if image_emb.shape[0] % n:
    raise ValueError(f"contrastive_loss: batch {image_emb.shape[0]} is not divisible by the "
                     f"{n} devices of mesh axes {axes}; use a batch size that is a multiple "
                     f"of {n}")
  rows, rep = P(axes), P()
  # Pallas' CPU interpreter cannot run under check_vma=True (see kernels/_pallas.py); the loss
  # handles both modes, so pallas (and auto, pallas on TPU / GPU) always uses check_vma=False
  # (the path tested on CPU).
  check_vma = impl not in ("pallas", "auto")
  if logit_bias is None:
    if not isinstance(label_smoothing, jax.Array) and not label_smoothing:
      body = lambda x, y, s: loss_fn(x, y, s, axis_name=axes)
      return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rep), out_specs=rep,
                           check_vma=check_vma)(image_emb, text_emb, logit_scale)
    body = lambda x, y, s, e: loss_fn(x, y, s, axis_name=axes, label_smoothing=e)
    eps = jnp.asarray(label_smoothing, jnp.float32)
    return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rep, rep), out_specs=rep,
                         check_vma=check_vma)(image_emb, text_emb, logit_scale, eps)
  if isinstance(label_smoothing, jax.Array) or label_smoothing:
    raise ValueError("contrastive_loss: label_smoothing is only for kind='softmax'")
  body = lambda x, y, s, b: loss_fn(x, y, s, b, axis_name=axes)
  return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rep, rep), out_specs=rep,
                       check_vma=check_vma)(image_emb, text_emb, logit_scale, logit_bias)


def clip_loss(outputs: dict, batch: dict, *, impl: str = "reference",
              mesh: Mesh | None = None) -> tuple[Array, dict]:
  """CLIP (softmax) or SigLIP (sigmoid, when outputs has "logit_bias") loss and metrics.

  `outputs`: "image_features", "text_features" (L2-normalized), "logit_scale" (exp'd and
  clamped), optionally "logit_bias". `batch` is unused (the pairs are row-aligned).
  """
  del batch
  missing = [k for k in ("image_features", "text_features", "logit_scale") if k not in outputs]
  if missing:
    raise ValueError(f"clip_loss: model outputs lack {missing}; got keys {sorted(outputs)}")
  bias = outputs.get("logit_bias")
  loss = contrastive_loss(outputs["image_features"], outputs["text_features"],
                          outputs["logit_scale"], bias,
                          kind="softmax" if bias is None else "sigmoid", impl=impl, mesh=mesh)
  return loss, {"loss": loss, "logit_scale": outputs["logit_scale"]}
