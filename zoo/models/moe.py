"""CLIP-MoE: mixture-of-experts FFNs for both towers, upcycled from a dense CLIP.

CLIP-MoE (Zhang et al. 2024, arXiv 2409.19291; code OpenSparseLLMs/CLIP-MoE) turns a dense
CLIP into a sparse MoE with Diversified Multiplet Upcycling (DMU): several copies of the FFNs
are fine-tuned in stages (multistage contrastive learning, MCL: stage 1 with the plain
contrastive loss, each later stage with negatives drawn mainly from within the k-means
clusters of the earlier stages' features), the stage FFNs become the experts of top-k routed
MoE layers, and the router (optionally everything) is then trained with the contrastive loss
plus a load-balancing loss.

What is here:

* `MoEMLP`, an MoE FFN that replaces `zoo.layers.MLP` inside chosen `ResidualBlock`s. Router:
  a bias-free linear map in float32; softmax over experts; top-k (k = `top_k`); the k gates
  renormalized to sum to 1 (`normalize_gates`, as CLIP-MoE / Mixtral). Expert weights are
  stacked on a leading expert axis (logical axis `expert`, sharded over the `expert` mesh
  axis). Tokens are routed per sequence (group = one image's patches or one caption's tokens),
  so routing never depends on the batch size or on how the batch is sharded.

* GShard-style dispatch with a capacity: each expert takes at most
  C = min(S, ceil(top_k * S * capacity_factor / num_experts)) tokens per sequence of S tokens.
  Priority: all first choices in token order, then all second choices, ... (GShard). A choice
  over capacity is dropped (that expert's contribution is zero; the residual passes the token
  on). `dropless=True` sets C = S, so no choice is ever dropped (each token picks an expert at
  most once); CLIP-MoE's released model routes dropless. Dispatch and combine are einsums over
  a [groups, tokens, experts, capacity] tensor; under the train loop's mesh the expert inputs
  are constrained to [experts over `expert`, groups over the other batch axes], so XLA
  exchanges tokens with an all-to-all when the `expert` axis is larger than 1.

* Auxiliary losses, reported and added to the loss with config weights: the load-balancing
  loss E * sum_e f_e P_e (f_e: fraction of the top-k assignments that go to expert e before
  capacity, P_e: mean router probability; 1 for uniform routing. CLIP-MoE's code uses the
  same with f summed over the k choices, i.e. k times this value) and the router z-loss
  mean(logsumexp(logits)^2) (ST-MoE). Also: fraction of dropped assignments and of tokens that
  lost every choice. Layers report through `collect_aux()` (a trace-local collector), so the
  model's state and `encode_image` / `encode_text` stay exactly as in CLIP.

* `MoECLIPConfig` (a `CLIPConfig` with a `moe` field) and `MoECLIP` (a `zoo.clip.CLIP`
  subclass): `zoo.save` / `zoo.load` store and rebuild the MoE settings like any config.

* `upcycle(model, num_experts, top_k, layers=...)`: every expert starts from the dense FFN (or,
  for DMU, expert e from the FFN of `expert_sources[e]`); with identical experts the MoE
  equals the dense model for any router weights (as long as nothing is dropped).

* The `moe` train family (config.moe), DMU as a recipe of train-loop phases (`run_dmu`), k-means
  in jnp (`kmeans`), the within-cluster contrastive loss (`cluster_contrastive_loss`).

* Conversion of CLIP-MoE's released PyTorch layout (`from_clip_moe` / `to_clip_moe`): OpenAI
  / Long-CLIP keys; an MoE block N has `resblocks.N.gate.weight` [E, W] and
  `resblocks.N.experts.e.{c_fc,c_proj}.{weight,bias}` instead of `resblocks.N.mlp.*`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import threading
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from zoo import clip as clip_lib
from zoo import layers as layers_lib
from zoo import losses, registry, sharding, train_lib

Array = jax.Array
log = logging.getLogger("zoo.moe")

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """MoE settings stored with the model. `vision_layers` / `text_layers`: block indices."""

  num_experts: int = 4
  top_k: int = 2
  capacity_factor: float = 1.25
  dropless: bool = False
  normalize_gates: bool = True
  vision_layers: tuple[int, ...] = ()
  text_layers: tuple[int, ...] = ()

  def __post_init__(self):
    if self.num_experts < 1:
      raise ValueError(f"moe num_experts={self.num_experts} must be >= 1")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"moe top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
    if not self.capacity_factor > 0:
      raise ValueError(f"moe capacity_factor={self.capacity_factor} must be > 0")
    for name in ("vision_layers", "text_layers"):
      value = tuple(int(i) for i in getattr(self, name))
      if len(set(value)) != len(value) or any(i < 0 for i in value):
        raise ValueError(f"moe {name}={value} must be distinct non-negative block indices")
      object.__setattr__(self, name, tuple(sorted(value)))

  def capacity(self, group_size: int) -> int:
    """Slots per expert for a sequence of `group_size` tokens (dropless: all of them)."""
    if self.dropless:
      return group_size
    c = math.ceil(self.top_k * group_size * self.capacity_factor / self.num_experts)
    return max(1, min(group_size, c))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MoEConfig":
    valid = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - valid)
    if bad:
      raise ValueError(f"unknown MoE config key {bad[0]!r}; valid keys: {', '.join(sorted(valid))}")
    return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class MoECLIPConfig(registry.CLIPConfig):
  """A CLIPConfig whose chosen blocks use MoE FFNs (`moe`)."""

  moe: MoEConfig = MoEConfig()

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MoECLIPConfig":
    d = dict(d)
    moe = MoEConfig.from_dict(d.pop("moe", {}) or {})
    return dataclasses.replace(super().from_dict(d), moe=moe)


def resolve_layers(spec: Any, depth: int) -> tuple[int, ...]:
  """Block indices of a tower with `depth` blocks from a layer spec.

  "all"; "every_other" (blocks 1, 3, 5, ...: every second block, as GShard / V-MoE);
  "last:N" (the last N blocks, CLIP-MoE's released layout); "none" / ""; "1,3" or a sequence of
  ints (negative counts from the end).
  """
  if isinstance(spec, str):
    s = spec.strip().lower()
    if s in ("", "none"):
      return ()
    if s == "all":
      return tuple(range(depth))
    if s == "every_other":
      return tuple(range(1, depth, 2))
    if s.startswith("last:"):
      n = int(s[5:])
      if not 0 <= n <= depth:
        raise ValueError(f"moe layers {spec!r}: N must be in [0, {depth}]")
      return tuple(range(depth - n, depth))
    try:
      spec = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
      raise ValueError(f"moe layers {spec!r}: expected 'all', 'every_other', 'last:N', 'none' or "
                       "comma-separated block indices") from None
  out = []
  for i in spec:
    j = int(i) + depth if int(i) < 0 else int(i)
    if not 0 <= j < depth:
      raise ValueError(f"moe layer index {i} is out of range for a tower of {depth} blocks")
    out.append(j)
  return tuple(sorted(set(out)))


# ----------------------------------------------------------------------------- routing


class Routing(NamedTuple):
  """Result of routing groups of tokens [G, S] over E experts with capacity C."""

  combine: Array  # [G, S, E, C] float32: gate weight of token s in slot c of expert e
  dispatch: Array  # [G, S, E, C] bool: token s occupies slot c of expert e
  probs: Array  # [G, S, E] float32 router softmax
  expert_index: Array  # [G, S, k] int32 chosen experts (best first)
  kept: Array  # [G, S, k] bool: the choice got a slot (not dropped)


def route(logits: Array, *, top_k: int, capacity: int, normalize_gates: bool = True) -> Routing:
  """Top-k routing with per-group capacity and GShard priority (choice rank, then position).

  logits [G, S, E] (any float; computed in float32). A token's j-th choice takes the next free
  slot of its expert after all (j-1)-th choices of the group and the j-th choices of earlier
  tokens; choices past `capacity` are dropped.
  """
  if logits.ndim != 3:
    raise ValueError(f"route: expected router logits [groups, tokens, experts], got {logits.shape}")
  g, s, e = logits.shape
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  gates, index = jax.lax.top_k(probs, top_k)  # [G, S, k]
  if normalize_gates:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  choice = jax.nn.one_hot(index, e, dtype=jnp.int32)  # [G, S, k, E]
  ranked = jnp.swapaxes(choice, 1, 2).reshape(g, top_k * s, e)  # choice-rank major
  position = (jnp.cumsum(ranked, axis=1) - 1).reshape(g, top_k, s, e)
  position = jnp.sum(jnp.swapaxes(position, 1, 2) * choice, axis=-1)  # [G, S, k]
  kept = position < capacity
  slot = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity, dtype=jnp.float32)
  choice_f = choice.astype(jnp.float32)
  dispatch = jnp.einsum("gske,gskc->gsec", choice_f, slot)
  combine = jnp.einsum("gske,gskc->gsec", choice_f * gates[..., None], slot)
  return Routing(combine=combine, dispatch=dispatch > 0, probs=probs,
                 expert_index=index.astype(jnp.int32), kept=kept)


def balance_loss(probs: Array, expert_index: Array) -> Array:
  """Switch/GShard load-balancing loss E * sum_e f_e P_e over all tokens (1 when uniform).

  probs [..., E] router softmax; expert_index [..., k] chosen experts. f_e: fraction of the
  top-k assignments made to expert e; P_e: mean router probability of expert e.
  """
  e = probs.shape[-1]
  counts = jax.nn.one_hot(expert_index, e, dtype=jnp.float32).sum(-2)  # [..., E]
  f = counts.reshape(-1, e).mean(0) / expert_index.shape[-1]
  p = probs.reshape(-1, e).astype(jnp.float32).mean(0)
  return e * jnp.sum(f * p)


def z_loss(logits: Array) -> Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


# ----------------------------------------------------------------------------- aux collection

_LOCAL = threading.local()


@contextlib.contextmanager
def collect_aux():
  """Collects the aux dicts of every MoE layer called inside the block (outermost wins).

  Yields a list that each `MoEMLP` call appends {"layer", "balance_loss", "z_loss",
  "dropped_fraction", "dropped_token_fraction", "dropped", "assignments"} to. The values are
  arrays of the trace that made them; use them within the same function (e.g. a forward that
  returns them with its outputs).
  """
  stack = getattr(_LOCAL, "stack", None)
  if stack is None:
    stack = _LOCAL.stack = []
  store: list[dict[str, Any]] = []
  stack.append(store)
  try:
    yield store
  finally:
    stack.pop()


def _record(aux: dict[str, Any]) -> None:
  stack = getattr(_LOCAL, "stack", None)
  if stack:
    stack[-1].append(aux)


def summarize_aux(aux: Sequence[Mapping[str, Any]]) -> dict[str, Array]:
  """Means over MoE layers of the losses and drop fractions, plus total dropped assignments."""
  if not aux:
    return {}
  mean = lambda k: jnp.mean(jnp.stack([a[k] for a in aux]))
  return {
      "moe_balance_loss": mean("balance_loss"),
      "moe_z_loss": mean("z_loss"),
      "moe_dropped_fraction": mean("dropped_fraction"),
      "moe_dropped_token_fraction": mean("dropped_token_fraction"),
      "moe_dropped": jnp.sum(jnp.stack([a["dropped"] for a in aux])).astype(jnp.float32),
  }


# ----------------------------------------------------------------------------- layer


def _expert_axis_constraints() -> tuple[P, P] | None:
  """(expert-major spec, batch spec) when tracing under a mesh with an `expert` axis > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
    return None
  others = tuple(a for a in sharding.BATCH_AXES if a != "expert" and a in mesh.axis_names)
  return P("expert", others or None), P(tuple(a for a in sharding.BATCH_AXES
                                              if a in mesh.axis_names))


class MoEMLP(nnx.Module):
  """Top-k routed mixture of `num_experts` FFNs (fc1 -> activation -> fc2 each).

  Parameters: `router.kernel` [W, E] (float32 compute, no bias), `fc1_kernel` [E, W, H],
  `fc1_bias` [E, H], `fc2_kernel` [E, H, W], `fc2_bias` [E, W]. Input [..., S, W]: every
  leading index is one routing group of S tokens.
  """

  def __init__(self, width: int, hidden: int, moe: MoEConfig, *, quick_gelu: bool = False,
               dtype=jnp.float32, router_init_std: float = 0.02, name: str = "",
               rngs: nnx.Rngs, out_std: float | None = None):
    e = moe.num_experts
    self.moe, self.dtype, self.quick_gelu, self.layer_name = moe, dtype, quick_gelu, name
    self.router = layers_lib.Linear(width, e, axes=("embed", None), use_bias=False,
                                    std=router_init_std, dtype=jnp.float32, rngs=rngs)
    self.fc1_kernel = layers_lib.param(rngs, nnx.initializers.normal((2 * width) ** -0.5),
                                       (e, width, hidden), ("expert", "embed", "mlp"))
    self.fc1_bias = nnx.Param(jnp.zeros((e, hidden), jnp.float32), eager_sharding=False,
                              out_sharding=("expert", "mlp"))
    self.fc2_kernel = layers_lib.param(rngs, nnx.initializers.normal(out_std or hidden ** -0.5),
                                       (e, hidden, width), ("expert", "mlp", "embed"))
    self.fc2_bias = nnx.Param(jnp.zeros((e, width), jnp.float32), eager_sharding=False,
                              out_sharding=("expert", "embed"))

  def experts(self, x: Array) -> Array:
    """Every expert on every row: x [E, ..., W] -> [E, ..., W] (expert e applied to x[e])."""
    dt = self.dtype
    h = jnp.einsum("e...w,ewh->e...h", x.astype(dt), self.fc1_kernel[...].astype(dt))
    bias1 = self.fc1_bias[...].astype(dt).reshape((h.shape[0],) + (1,) * (h.ndim - 2) + (-1,))
    h = layers_lib.get_activation(self.quick_gelu)(h + bias1)
    y = jnp.einsum("e...h,ehw->e...w", h, self.fc2_kernel[...].astype(dt))
    bias2 = self.fc2_bias[...].astype(dt).reshape((y.shape[0],) + (1,) * (y.ndim - 2) + (-1,))
    return y + bias2

  def __call__(self, x: Array) -> Array:
    if x.ndim < 2:
      raise ValueError(f"MoEMLP expects [..., tokens, width], got shape {x.shape}")
    shape = x.shape
    xg = x.reshape((-1,) + shape[-2:])  # [G, S, W]
    s = xg.shape[1]
    moe = self.moe
    logits = self.router(xg.astype(jnp.float32))  # [G, S, E] float32
    r = route(logits, top_k=moe.top_k, capacity=moe.capacity(s),
              normalize_gates=moe.normalize_gates)
    specs = _expert_axis_constraints()
    expert_major, batch_major = specs if specs else (None, None)

    def constrain(v: Array, spec: P | None) -> Array:
      return v if spec is None else jax.lax.with_sharding_constraint(v, spec)

    dispatch = r.dispatch.astype(self.dtype)
    expert_in = jnp.einsum("gsec,gsw->egcw", dispatch, xg.astype(self.dtype))
    expert_in = constrain(expert_in, expert_major)  # tokens travel to their experts' devices
    expert_out = constrain(self.experts(expert_in), expert_major)
    y = jnp.einsum("gsec,egcw->gsw", r.combine.astype(self.dtype), expert_out)
    y = constrain(y, batch_major)  # and back to the batch layout
    dropped = jnp.logical_not(r.kept)
    _record({
        "layer": self.layer_name,
        "balance_loss": balance_loss(r.probs, r.expert_index),
        "z_loss": z_loss(logits),
        "dropped": jnp.sum(dropped.astype(jnp.int32)),
        "assignments": dropped.size,
        "dropped_fraction": jnp.mean(dropped.astype(jnp.float32)),
        "dropped_token_fraction": jnp.mean(jnp.all(dropped, axis=-1).astype(jnp.float32)),
    })
    return y.reshape(shape).astype(x.dtype)


# ----------------------------------------------------------------------------- model


def _towers(model: clip_lib.CLIP) -> dict[str, nnx.Module]:
  return {"visual": model.visual, "text": model.text}


def _tower_layers(moe: MoEConfig) -> dict[str, tuple[int, ...]]:
  return {"visual": moe.vision_layers, "text": moe.text_layers}


class MoECLIP(clip_lib.CLIP):
  """A CLIP whose blocks listed in `config.moe` have `MoEMLP` FFNs (same API as CLIP)."""

  def __init__(self, config: MoECLIPConfig, *, rngs: nnx.Rngs, router_init_std: float = 0.02):
    if not isinstance(config, MoECLIPConfig):
      raise TypeError(f"MoECLIP needs a MoECLIPConfig, got {type(config).__name__}; "
                      "build one with zoo.moe.moe_config(...) or zoo.moe.upcycle(model, ...)")
    super().__init__(config, rngs=rngs)
    dtype = clip_lib._dtype(config.dtype)
    for tower_name, tower in _towers(self).items():
      blocks = tower.transformer.resblocks
      for i in _tower_layers(config.moe)[tower_name]:
        if i >= len(blocks):
          raise ValueError(f"moe {tower_name} layer {i} is out of range: the tower has "
                           f"{len(blocks)} blocks")
        width, hidden = blocks[i].mlp.fc1.kernel.shape
        out_std = (width ** -0.5) * ((2 * len(blocks)) ** -0.5)  # as ResidualBlock's fc2
        blocks[i].mlp = MoEMLP(width, hidden, config.moe, quick_gelu=config.quick_gelu,
                               dtype=dtype, router_init_std=router_init_std,
                               name=f"{tower_name}.{i}", rngs=rngs, out_std=out_std)

  def moe_layers(self) -> dict[str, MoEMLP]:
    """{'visual.3': layer, 'text.1': layer, ...}."""
    out = {}
    for tower_name, tower in _towers(self).items():
      for i in _tower_layers(self.config.moe)[tower_name]:
        out[f"{tower_name}.{i}"] = tower.transformer.resblocks[i].mlp
    return out


def moe_config(base: registry.CLIPConfig | str, *, num_experts: int = 4, top_k: int = 2,
               layers: Any = "every_other", capacity_factor: float = 1.25,
               dropless: bool = False, normalize_gates: bool = True) -> MoECLIPConfig:
  """A MoECLIPConfig over a dense architecture (a name or CLIPConfig).

  `layers`: one spec for both towers (see `resolve_layers`) or {"vision": spec, "text": spec}.
  """
  if isinstance(base, str):
    base = registry.get_model_config(base)
  if isinstance(layers, Mapping):
    unknown = sorted(set(layers) - {"vision", "text"})
    if unknown:
      raise ValueError(f"moe layers dict key {unknown[0]!r}; expected 'vision' and/or 'text'")
    v_spec, t_spec = layers.get("vision", "none"), layers.get("text", "none")
  else:
    v_spec = t_spec = layers
  moe = MoEConfig(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                  dropless=dropless, normalize_gates=normalize_gates,
                  vision_layers=resolve_layers(v_spec, base.vision.layers),
                  text_layers=resolve_layers(t_spec, base.text.layers))
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(registry.CLIPConfig)}
  return MoECLIPConfig(moe=moe, **fields)


def create(name: str | registry.CLIPConfig, *, seed: int = 0, router_init_std: float = 0.02,
           **kwargs: Any) -> MoECLIP:
  """A freshly initialised MoECLIP over architecture `name` (kwargs: see `moe_config`)."""
  return MoECLIP(moe_config(name, **kwargs), rngs=nnx.Rngs(seed), router_init_std=router_init_std)


def _dense_ffn(model: clip_lib.CLIP, tower: str, index: int) -> dict[str, np.ndarray]:
  mlp = _towers(model)[tower].transformer.resblocks[index].mlp
  if not isinstance(mlp, layers_lib.MLP):
    raise TypeError(f"{tower} block {index} of the source model has a {type(mlp).__name__} FFN; "
                    "upcycling needs dense MLP blocks")
  get = lambda v: np.asarray(jax.device_get(v[...]))
  return {"fc1_kernel": get(mlp.fc1.kernel), "fc1_bias": get(mlp.fc1.bias),
          "fc2_kernel": get(mlp.fc2.kernel), "fc2_bias": get(mlp.fc2.bias)}


def upcycle(model: clip_lib.CLIP, num_experts: int = 4, top_k: int = 2,
            layers: Any = "every_other", *, capacity_factor: float = 1.25,
            dropless: bool = False, normalize_gates: bool = True,
            expert_sources: Sequence[clip_lib.CLIP] | None = None,
            router_init_std: float = 0.02, seed: int = 0) -> MoECLIP:
  """A MoECLIP built from the dense `model`; the input is not modified.

  Every non-FFN weight is copied. In each MoE block, expert e starts from the dense FFN of
  that block, or, with `expert_sources` (DMU: one fine-tuned copy per expert, same
  architecture), from `expert_sources[e]`'s FFN. The router is drawn from N(0, std^2) (seeded).
  With identical experts and normalized gates the output equals the dense model's for any
  router weights, as long as no choice is dropped (dropless, or capacity_factor >= E / k).
  """
  if not isinstance(model, clip_lib.CLIP) or isinstance(model, MoECLIP):
    raise TypeError(f"upcycle needs a dense zoo CLIP model, got {type(model).__name__}")
  sources = list(expert_sources) if expert_sources is not None else [model] * num_experts
  if len(sources) != num_experts:
    raise ValueError(f"upcycle: {len(sources)} expert_sources for num_experts={num_experts}; "
                     "give one dense model per expert")
  for m in sources:
    if dataclasses.replace(m.config, dtype=model.config.dtype) != model.config:
      raise ValueError("upcycle: every expert source must have the dense model's architecture")
  config = moe_config(model.config, num_experts=num_experts, top_k=top_k, layers=layers,
                      capacity_factor=capacity_factor, dropless=dropless,
                      normalize_gates=normalize_gates)
  out = nnx.eval_shape(lambda: MoECLIP(config, rngs=nnx.Rngs(0)))
  src = dict(nnx.to_flat_state(nnx.state(model)))
  flat = dict(nnx.to_flat_state(nnx.state(out)))
  key = jax.random.key(seed)
  for path, var in flat.items():
    if path in src and tuple(src[path].shape) == tuple(var.shape):
      var.set_value(src[path].get_value())
  for name in out.moe_layers():
    tower, index = name.split(".")
    prefix = (tower, "transformer", "resblocks", int(index), "mlp")
    ffns = [_dense_ffn(m, tower, int(index)) for m in sources]
    for leaf in ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias"):
      flat[prefix + (leaf,)].set_value(jnp.asarray(np.stack([f[leaf] for f in ffns])))
    router = flat[prefix + ("router", "kernel")]
    key, sub = jax.random.split(key)
    router.set_value(router_init_std * jax.random.normal(sub, router.shape, jnp.float32))
  missing = [p for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"upcycle: no source for {['.'.join(map(str, p)) for p in missing[:3]]}")
  nnx.update(out, nnx.from_flat_state(flat))
  return out


def parameter_counts(model: clip_lib.CLIP) -> dict[str, int]:
  """Parameters: `total`, `active` (per token: k of E experts in each MoE layer), by tower."""
  total = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  inactive = 0
  if isinstance(model, MoECLIP):
    moe = model.config.moe
    for layer in model.moe_layers().values():
      per_expert = sum(int(np.prod(p.shape[1:])) for p in (
          layer.fc1_kernel, layer.fc1_bias, layer.fc2_kernel, layer.fc2_bias))
      inactive += (moe.num_experts - moe.top_k) * per_expert
  return {"total": total, "active": total - inactive}


def flops_per_token(model: clip_lib.CLIP, tower: str) -> dict[str, float]:
  """Analytic forward FLOPs per token of one tower's transformer blocks (2 per multiply-add).

  `dense`: attention projections + FFN as if dense; `active`: with k experts per token in MoE
  layers plus the router (what an ideal sparse kernel does). Attention scores (which grow with
  sequence length) are excluded; see the bench for whole-encoder XLA counts.
  """
  cfg = {"visual": model.config.vision, "text": model.config.text}[tower]
  w, h = cfg.width, int(cfg.width * cfg.mlp_ratio)
  attn = 2 * (4 * w * w)
  ffn = 2 * (2 * w * h)
  dense = cfg.layers * (attn + ffn)
  active = dense
  if isinstance(model, MoECLIP):
    moe = model.config.moe
    n = len(_tower_layers(moe)[tower])
    active = dense + n * ((moe.top_k - 1) * ffn + 2 * w * moe.num_experts)
  return {"dense": float(dense), "active": float(active)}


# ----------------------------------------------------------------------------- losses


def cluster_contrastive_loss(image_features: Array, text_features: Array, logit_scale: Array,
                             clusters: Array, *, cross_cluster_weight: float = 0.0) -> Array:
  """CLIP's symmetric softmax loss with negatives mainly from the sample's own cluster (MCL).

  Pairs (i, j) from different clusters have their exp(logit) multiplied by
  `cross_cluster_weight` (0: only same-cluster negatives; 1: the plain CLIP loss). Features are
  L2-normalized [B, E]; clusters int [B]. Plain jnp: under jit over a mesh it is the
  global-batch loss.
  """
  if not 0.0 <= cross_cluster_weight <= 1.0:
    raise ValueError(f"cross_cluster_weight={cross_cluster_weight} must be in [0, 1]")
  if clusters.shape != image_features.shape[:1]:
    raise ValueError(f"clusters shape {clusters.shape} must be [batch]={image_features.shape[:1]}")
  logits = logit_scale * jnp.einsum("ie,je->ij", image_features.astype(jnp.float32),
                                    text_features.astype(jnp.float32))
  same = clusters[:, None] == clusters[None, :]
  if cross_cluster_weight == 0.0:
    logits = jnp.where(same, logits, -jnp.inf)
  elif cross_cluster_weight < 1.0:
    logits = jnp.where(same, logits, logits + math.log(cross_cluster_weight))
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - diag
  t2i = jax.nn.logsumexp(logits, axis=0) - diag
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


# ----------------------------------------------------------------------------- k-means


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding (D^2 sampling)."""
  centroids = [x[rng.integers(len(x))]]
  d2 = np.sum((x - centroids[0]) ** 2, axis=1)
  for _ in range(1, k):
    total = d2.sum()
    i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
    centroids.append(x[i])
    d2 = np.minimum(d2, np.sum((x - x[i]) ** 2, axis=1))
  return np.stack(centroids)


def assign_clusters(x: Array, centroids: Array) -> Array:
  """Index of the nearest centroid (squared Euclidean) for each row of x [N, D]."""
  x = jnp.asarray(x, jnp.float32)
  c = jnp.asarray(centroids, jnp.float32)
  d = jnp.sum(x * x, 1, keepdims=True) - 2 * x @ c.T + jnp.sum(c * c, 1)[None]
  return jnp.argmin(d, axis=1).astype(jnp.int32)


@jax.jit
def _lloyd_step(x: Array, centroids: Array) -> tuple[Array, Array]:
  labels = assign_clusters(x, centroids)
  onehot = jax.nn.one_hot(labels, centroids.shape[0], dtype=jnp.float32)
  counts = onehot.sum(0)
  sums = onehot.T @ x
  new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids)
  return new, labels


def kmeans(x: Any, k: int, *, iters: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means with k-means++ seeding: (centroids [k, D], labels [N]).

  Empty clusters keep their centroid. Stops early when the assignment no longer changes.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or not 1 <= k <= x.shape[0]:
    raise ValueError(f"kmeans: need features [N, D] with N >= k={k}, got shape {x.shape}")
  centroids = jnp.asarray(_kmeans_pp(x, k, np.random.default_rng(seed)))
  xj = jnp.asarray(x)
  labels = None
  for _ in range(iters):
    centroids, new_labels = _lloyd_step(xj, centroids)
    new_labels = np.asarray(new_labels)
    if labels is not None and np.array_equal(labels, new_labels):
      break
    labels = new_labels
  return np.asarray(centroids), np.asarray(assign_clusters(xj, centroids))


# ----------------------------------------------------------------------------- family

DMU_DEFAULTS = {
    "stages": 0,  # FFN copies fine-tuned by the recipe (= experts); 0 = no DMU, plain MoE run
    "steps_per_stage": 1000,
    "lr": 1e-5,  # stage fine-tuning learning rate
    "clusters": 4,  # k-means clusters per stage (stage s >= 2 uses the joint labels so far)
    "kmeans_samples": 4096,  # samples whose features are clustered at each stage
    "kmeans_iters": 50,
    "cluster_on": "both",  # image | text | both (concatenated normalized features)
    "cross_cluster_weight": 0.0,  # weight of cross-cluster negatives in stage losses
    "init": "base",  # each stage starts from: base (the dense model) | previous (stage s-1)
}

DEFAULTS = {
    "num_experts": 4,
    "top_k": 2,
    "capacity_factor": 1.25,
    "dropless": False,
    "normalize_gates": True,
    "layers": "every_other",  # see resolve_layers; or "vision:SPEC;text:SPEC"
    "router_init_std": 0.02,
    "balance_weight": 0.01,  # load-balancing loss weight
    "z_weight": 0.001,  # router z-loss weight
    "mode": "moe",  # moe | dense_ffn (a DMU stage: dense model, FFNs trained)
    "trainable": "all",  # all | router | moe (router + experts) | ffn (every FFN, dense or MoE)
    "expert_checkpoints": "",  # comma-separated zoo.save dirs, one dense model per expert (DMU)
    "cross_cluster_weight": 0.0,  # for batches with a `cluster` field (DMU stages)
}


def default_settings() -> ml_collections.ConfigDict:
  """`config.moe` with the defaults (and `config.moe.dmu`)."""
  c = ml_collections.ConfigDict(dict(DEFAULTS))
  c.dmu = ml_collections.ConfigDict(dict(DMU_DEFAULTS))
  return c


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.moe` over the defaults; unknown keys are errors listing the valid ones."""
  given = dict(config.get("moe", {}) or {})
  dmu = dict(given.pop("dmu", {}) or {})
  for where, keys, valid in (("config.moe", given, DEFAULTS), ("config.moe.dmu", dmu, DMU_DEFAULTS)):
    unknown = sorted(set(keys) - set(valid))
    if unknown:
      raise ValueError(f"unknown {where} key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
  out = {**DEFAULTS, **given}
  out["dmu"] = {**DMU_DEFAULTS, **dmu}
  if out["mode"] not in ("moe", "dense_ffn"):
    raise ValueError(f"config.moe.mode={out['mode']!r}; expected 'moe' or 'dense_ffn'")
  if out["trainable"] not in ("all", "router", "moe", "ffn"):
    raise ValueError(f"config.moe.trainable={out['trainable']!r}; expected all | router | moe | ffn")
  if out["dmu"]["cluster_on"] not in ("image", "text", "both"):
    raise ValueError(f"config.moe.dmu.cluster_on={out['dmu']['cluster_on']!r}; expected "
                     "image | text | both")
  if out["dmu"]["init"] not in ("base", "previous"):
    raise ValueError(f"config.moe.dmu.init={out['dmu']['init']!r}; expected base | previous")
  return out


def _layer_spec(spec: str) -> Any:
  """'every_other' or 'vision:all;text:last:2' -> a spec for moe_config."""
  if ";" not in spec and not spec.strip().startswith(("vision:", "text:")):
    return spec
  out = {}
  for part in spec.split(";"):
    tower, _, value = part.strip().partition(":")
    out[tower.strip()] = value.strip()
  return out


def _is_ffn(path: tuple[str, ...]) -> bool:
  return "resblocks" in path and "mlp" in path


def trainable_for(config: ml_collections.ConfigDict) -> Callable[[tuple[str, ...]], bool] | None:
  """The optimizer mask of `config.moe.trainable` (None = everything)."""
  which = settings(config)["trainable"]
  if which == "all":
    return None
  if which == "router":
    return lambda path: _is_ffn(path) and "router" in path
  if which == "moe":
    return lambda path: _is_ffn(path) and any(n.startswith(("fc1_", "fc2_")) or n == "router"
                                              for n in path)
  return _is_ffn


def _split_dirs(value: str) -> list[str]:
  return [p.strip() for p in str(value or "").split(",") if p.strip()]


def build_model(config: ml_collections.ConfigDict) -> clip_lib.CLIP:
  """The model of a `moe` run.

  mode dense_ffn: the dense `config.model` (weights from `init_from`), for DMU stages.
  mode moe: `init_from` an MoE checkpoint -> loaded as is; otherwise the dense model (with
  `init_from`'s weights) upcycled, experts from `expert_checkpoints` when given.
  """
  from zoo import checkpoint

  ms = settings(config)
  if ms["mode"] == "dense_ffn":
    model = train_lib.build_clip_model(config)
    train_lib.init_params_from(config, model)
    return model
  src = config.get("init_from", "")
  if src and isinstance(checkpoint.load_config(src)[0], MoECLIPConfig):
    model, _, _ = checkpoint.load(src)
    return model
  dense = train_lib.build_clip_model(config)
  train_lib.init_params_from(config, dense)
  sources = None
  dirs = _split_dirs(ms["expert_checkpoints"])
  if dirs:
    sources = [checkpoint.load(d)[0] for d in dirs]
    if len(sources) != ms["num_experts"]:
      raise ValueError(f"config.moe.expert_checkpoints names {len(sources)} models but "
                       f"num_experts={ms['num_experts']}")
  return upcycle(dense, ms["num_experts"], ms["top_k"], _layer_spec(ms["layers"]),
                 capacity_factor=ms["capacity_factor"], dropless=ms["dropless"],
                 normalize_gates=ms["normalize_gates"], expert_sources=sources,
                 router_init_std=ms["router_init_std"], seed=config.seed)


def moe_forward(model: clip_lib.CLIP, batch: Mapping[str, Array], rng: Array) -> dict:
  """CLIP outputs plus `moe_aux` (summarized aux losses of every MoE layer called)."""
  del rng
  with collect_aux() as aux:
    out = dict(model(batch["image"], batch["tokens"]))
  out["moe_aux"] = summarize_aux(aux)
  return out


def moe_loss(outputs: dict, batch: dict, ctx: train_lib.LossContext) -> tuple[Array, dict]:
  """Contrastive loss (within clusters when the batch has `cluster`) + weighted aux losses."""
  ms = settings(ctx.config)
  aux = outputs.get("moe_aux", {})
  if "cluster" in batch:
    if "logit_bias" in outputs:
      raise ValueError("within-cluster (DMU stage) training is implemented for the softmax CLIP "
                       "loss only; this model has a SigLIP logit_bias")
    contrastive = cluster_contrastive_loss(
        outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
        batch["cluster"], cross_cluster_weight=ms["cross_cluster_weight"])
    metrics = {"logit_scale": outputs["logit_scale"]}
  else:
    contrastive, metrics = losses.clip_loss(outputs, batch, impl=ctx.impl, mesh=ctx.mesh)
    metrics = dict(metrics)
  total = contrastive
  if aux:
    total = (total + ms["balance_weight"] * aux["moe_balance_loss"]
             + ms["z_weight"] * aux["moe_z_loss"])
  metrics.update(aux)
  metrics["contrastive_loss"] = contrastive
  metrics["loss"] = total
  return total, metrics


# ----------------------------------------------------------------------------- DMU recipe


def _stage_config(config: ml_collections.ConfigDict, stage: int, init_from: str
                  ) -> ml_collections.ConfigDict:
  ms = settings(config)
  c = copy.deepcopy(config)
  with c.unlocked():
    c.init_from = init_from
    c.total_steps = int(ms["dmu"]["steps_per_stage"])
    c.warmup_steps = min(config.warmup_steps, max(1, c.total_steps // 10))
    c.lr = float(ms["dmu"]["lr"])
    c.seed = config.seed + 1000 * stage
    c.moe.mode = "dense_ffn"
    c.moe.trainable = "ffn"
    c.moe.cross_cluster_weight = ms["dmu"]["cross_cluster_weight"]
    c.moe.dmu.stages = 0
  return c


def _features_for_clustering(model: clip_lib.CLIP, batch: Mapping[str, np.ndarray], on: str
                             ) -> np.ndarray:
  from zoo import eval_lib

  parts = []
  if on in ("image", "both"):
    parts.append(np.asarray(eval_lib.encode_images(model, batch["image"])))
  if on in ("text", "both"):
    parts.append(np.asarray(eval_lib.encode_texts(model, batch["tokens"])))
  return np.concatenate(parts, axis=1) / math.sqrt(len(parts))


class ClusterLabeler:
  """Adds `cluster` to host batches: joint k-means labels of earlier stages' features.

  `stages` is a list of (model, centroids); the label is the mixed-radix number of the
  per-stage nearest centroids, so stage s contrasts within the intersection of all earlier
  clusterings (MCL's accumulated clusters). Deterministic in the batch (exact resume).
  """

  def __init__(self, stages: Sequence[tuple[clip_lib.CLIP, np.ndarray]], on: str):
    self.stages, self.on = list(stages), on

  def labels(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    label = np.zeros((len(batch["image"]),), np.int64)
    for model, centroids in self.stages:
      feats = _features_for_clustering(model, batch, self.on)
      label = label * len(centroids) + np.asarray(assign_clusters(feats, centroids))
    return label.astype(np.int32)

  def __call__(self, batch: dict) -> dict:
    return dict(batch, cluster=self.labels(batch))


def _clustering_batches(config: ml_collections.ConfigDict, model: clip_lib.CLIP, n: int
                        ) -> list[dict]:
  """About `n` samples from the training pipeline (its own seed) to fit k-means on."""
  family = train_lib.get_family("clip")
  c = copy.deepcopy(config)
  with c.unlocked():
    c.seed = config.seed + 77
  tokenizer = train_lib.make_tokenizer(c, model)
  it = train_lib.build_data(c, model, family, tokenizer)
  out, got = [], 0
  while got < n:
    b = next(it)
    out.append({"image": b["image"], "tokens": b["tokens"]})
    got += len(b["image"])
  return out


def run_dmu(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Diversified Multiplet Upcycling as train-loop phases (the `moe` family's recipe).

  With `config.moe.dmu.stages` = N > 0 (and mode moe): stage 1 fine-tunes the FFNs of the dense
  `init_from` model with the plain contrastive loss (workdir/dmu/stage_1); stage s = 2..N first
  clusters `kmeans_samples` samples by stage s-1's features (k-means, `clusters`), then
  fine-tunes a fresh FFN copy with negatives within the joint clusters of stages 1..s-1. The N
  stage FFNs become the experts (`expert_checkpoints`) of the MoE trained in `workdir` for
  `total_steps` with `config.moe.trainable` (e.g. router). Every phase is `train_lib.train`
  (checkpoints, resume, eval); finished stages are skipped on restart. Returns None (plain
  loop) when there are no DMU stages.
  """
  from zoo import checkpoint

  ms = settings(config)
  stages = int(ms["dmu"]["stages"])
  if stages <= 0 or ms["mode"] != "moe":
    return None
  if stages != ms["num_experts"]:
    raise ValueError(f"config.moe.dmu.stages={stages} must equal num_experts="
                     f"{ms['num_experts']} (one fine-tuned FFN copy per expert)")
  base = config.get("init_from", "")
  if not base:
    log.warning("DMU without config.init_from: the stages fine-tune a randomly initialised CLIP")
  dmu = ms["dmu"]
  stage_dirs, labelers = [], []
  summaries = {}
  for s in range(1, stages + 1):
    stage_workdir = os.path.join(workdir, "dmu", f"stage_{s}")
    model_dir = os.path.join(stage_workdir, "model")
    start = base if (dmu["init"] == "base" or s == 1) else stage_dirs[-1]
    stage_cfg = _stage_config(config, s, start)
    batch_fn = None
    if s > 1:
      prev, _, _ = checkpoint.load(stage_dirs[-1])
      feats = np.concatenate([_features_for_clustering(prev, b, dmu["cluster_on"])
                              for b in _clustering_batches(stage_cfg, prev,
                                                           int(dmu["kmeans_samples"]))])
      centroids, labels = kmeans(feats, int(dmu["clusters"]), iters=int(dmu["kmeans_iters"]),
                                 seed=config.seed + s)
      log.info("DMU stage %d: k-means on %d samples, cluster sizes %s", s, len(feats),
               np.bincount(labels, minlength=int(dmu["clusters"])).tolist())
      labelers.append((prev, centroids))
      batch_fn = ClusterLabeler(labelers, dmu["cluster_on"])
    if not os.path.isdir(model_dir):
      result = train_lib.train(stage_cfg, stage_workdir, batch_fn=batch_fn)
      summaries[f"stage_{s}"] = {"losses": result["losses"][-1:], "eval": result["eval"]}
    stage_dirs.append(model_dir)
  final = copy.deepcopy(config)
  with final.unlocked():
    final.moe.expert_checkpoints = ",".join(stage_dirs)
    final.moe.dmu.stages = 0
  result = train_lib.train(final, workdir)
  result["dmu"] = {"stage_dirs": stage_dirs, "stages": summaries}
  return result


# ----------------------------------------------------------------------------- conversion

_MOE_BLOCK = __import__("re").compile(r"^((?:visual\.)?transformer\.resblocks\.(\d+))\.gate\.weight$")


def _np(x: Any) -> np.ndarray:
  from zoo.convert import common

  return common.as_float32(common.to_numpy(x))


def from_clip_moe(state_dict: Mapping[str, Any], name: str | registry.CLIPConfig = "ViT-L-14-quickgelu",
                  *, top_k: int = 2, keep: int = 20, **overrides: Any) -> MoECLIP:
  """A MoECLIP from a CLIP-MoE PyTorch state dict (OpenSparseLLMs/CLIP-MoE layout).

  Layout: OpenAI CLIP keys (text positions as Long-CLIP's `positional_embedding` +
  `positional_embedding_res` when present, see `zoo.long_clip.from_long_clip`); a block N of
  either tower that is an MoE block has `...resblocks.N.gate.weight` [E, W] (router, no bias)
  and `...resblocks.N.experts.e.c_fc.{weight,bias}`, `...experts.e.c_proj.{weight,bias}`
  instead of `...resblocks.N.mlp.*`. CLIP-MoE routes dropless with renormalized top-k gates,
  so the model gets dropless=True; `top_k` is not stored in the weights (CLIP-MoE: 2).
  """
  from zoo import long_clip
  from zoo.convert import common
  from zoo.convert import open_clip as oc

  sd = oc._strip_prefix(state_dict)
  blocks: dict[str, list[int]] = {"visual": [], "text": []}
  num_experts = None
  dense_sd = {k: v for k, v in sd.items() if ".experts." not in k and not k.endswith(".gate.weight")}
  for key in sd:
    m = _MOE_BLOCK.match(key)
    if not m:
      continue
    prefix, index = m.group(1), int(m.group(2))
    e = int(np.shape(sd[key])[0])
    if num_experts not in (None, e):
      raise common.StateDictError(f"{key}: {e} experts but other MoE blocks have {num_experts}")
    num_experts = e
    blocks["visual" if prefix.startswith("visual.") else "text"].append(index)
    for part in ("c_fc", "c_proj"):
      for leaf in ("weight", "bias"):
        src = f"{prefix}.experts.0.{part}.{leaf}"
        if src not in sd:
          raise common.StateDictError(f"CLIP-MoE state dict lacks {src!r} for MoE block {prefix}")
        dense_sd[f"{prefix}.mlp.{part}.{leaf}"] = sd[src]
  if num_experts is None:
    raise common.StateDictError("no `...resblocks.N.gate.weight` keys: not a CLIP-MoE state dict "
                                "(use zoo.convert.from_open_clip for a dense CLIP)")
  if "positional_embedding_res" in dense_sd:
    dense = long_clip.from_long_clip(dense_sd, name, keep=keep, **overrides)
  else:
    dense = oc.from_open_clip(dense_sd, name, **overrides)
  model = upcycle(dense, num_experts, top_k, {"vision": blocks["visual"], "text": blocks["text"]},
                  dropless=True)
  for layer_name, layer in model.moe_layers().items():
    tower, index = layer_name.split(".")
    prefix = f"{'visual.' if tower == 'visual' else ''}transformer.resblocks.{index}"
    gate = _np(sd[f"{prefix}.gate.weight"])
    if gate.shape != (num_experts, layer.router.kernel.shape[0]):
      raise common.StateDictError(f"{prefix}.gate.weight has shape {gate.shape}, expected "
                                  f"{(num_experts, layer.router.kernel.shape[0])}")
    layer.router.kernel.set_value(jnp.asarray(gate.T))
    for zoo_leaf, key, transpose in (("fc1_kernel", "c_fc.weight", True),
                                     ("fc1_bias", "c_fc.bias", False),
                                     ("fc2_kernel", "c_proj.weight", True),
                                     ("fc2_bias", "c_proj.bias", False)):
      var = getattr(layer, zoo_leaf)
      arrays = []
      for e in range(num_experts):
        k = f"{prefix}.experts.{e}.{key}"
        if k not in sd:
          raise common.StateDictError(f"CLIP-MoE state dict lacks {k!r}")
        a = _np(sd[k])
        arrays.append(a.T if transpose else a)
      stacked = np.stack(arrays)
      if stacked.shape != tuple(var.shape):
        raise common.StateDictError(f"{prefix}.experts.*.{key}: stacked shape {stacked.shape}, "
                                    f"expected {tuple(var.shape)}")
      var.set_value(jnp.asarray(stacked))
  return model


def dense_view(model: MoECLIP, expert: int = 0) -> clip_lib.CLIP:
  """A dense CLIP with every non-MoE weight of `model` and expert `expert`'s FFN in MoE blocks."""
  fields = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(registry.CLIPConfig)}
  dense = nnx.eval_shape(lambda: clip_lib.CLIP(registry.CLIPConfig(**fields), rngs=nnx.Rngs(0)))
  src = dict(nnx.to_flat_state(nnx.state(model)))
  flat = dict(nnx.to_flat_state(nnx.state(dense)))
  moe_names = {(n.split(".")[0], int(n.split(".")[1])) for n in model.moe_layers()}
  for path, var in flat.items():
    if len(path) > 4 and path[1:3] == ("transformer", "resblocks") and (path[0], path[3]) in moe_names:
      if path[4] == "mlp":
        leaf = {("fc1", "kernel"): "fc1_kernel", ("fc1", "bias"): "fc1_bias",
                ("fc2", "kernel"): "fc2_kernel", ("fc2", "bias"): "fc2_bias"}[path[5:7]]
        var.set_value(src[path[:5] + (leaf,)].get_value()[expert])
        continue
    var.set_value(src[path].get_value())
  nnx.update(dense, nnx.from_flat_state(flat))
  return dense


def to_clip_moe(model: MoECLIP) -> dict[str, np.ndarray]:
  """CLIP-MoE's PyTorch state-dict layout of `model` (inverse of `from_clip_moe`).

  Text positions: Long-CLIP's pair (`positional_embedding` and `positional_embedding_res`, both
  the full table) when the text context is 248, as CLIP-MoE's released models; otherwise
  OpenAI's single `positional_embedding`.
  """
  from zoo import long_clip
  from zoo.convert import open_clip as oc

  if not isinstance(model, MoECLIP):
    raise TypeError(f"to_clip_moe needs a MoECLIP, got {type(model).__name__}")
  dense = dense_view(model)
  long = model.config.text.context_length == long_clip.LONG_CLIP_CONTEXT_LENGTH
  sd = long_clip.to_long_clip(dense) if long else oc.to_open_clip(dense)
  for layer_name, layer in model.moe_layers().items():
    tower, index = layer_name.split(".")
    prefix = f"{'visual.' if tower == 'visual' else ''}transformer.resblocks.{index}"
    for part in ("c_fc", "c_proj"):
      for leaf in ("weight", "bias"):
        sd.pop(f"{prefix}.mlp.{part}.{leaf}")
    sd[f"{prefix}.gate.weight"] = np.asarray(layer.router.kernel[...]).T.copy()
    get = lambda v: np.asarray(jax.device_get(v[...]))
    w1, b1, w2, b2 = (get(layer.fc1_kernel), get(layer.fc1_bias), get(layer.fc2_kernel),
                      get(layer.fc2_bias))
    for e in range(model.config.moe.num_experts):
      sd[f"{prefix}.experts.{e}.c_fc.weight"] = w1[e].T.copy()
      sd[f"{prefix}.experts.{e}.c_fc.bias"] = b1[e].copy()
      sd[f"{prefix}.experts.{e}.c_proj.weight"] = w2[e].T.copy()
      sd[f"{prefix}.experts.{e}.c_proj.bias"] = b2[e].copy()
  return sd


def export_safetensors(model: MoECLIP, path: str) -> None:
  """`to_clip_moe(model)` written as safetensors, with the MoE settings in its metadata."""
  import json

  from zoo.convert.__main__ import write_safetensors

  write_safetensors(to_clip_moe(model), path, {"format": "pt", "layout": "clip_moe",
                                               "moe": json.dumps(dataclasses.asdict(model.config.moe))})


train_lib.register_family(train_lib.Family(
    "moe", forward=moe_forward, loss=moe_loss, fields=("image", "tokens"),
    build_model=build_model, make_trainable=trainable_for, recipe=run_dmu))
