"""CLIP-MoE's model side: top-k routed mixture-of-experts FFNs for both towers, upcycled from a
dense CLIP.

`MoEMLP` replaces `zoo.models.layers.MLP` in chosen blocks: a float32 bias-free router, softmax, top-k
with renormalized gates, dropless by default (GShard capacity and priority only for training with
`dropless=False`, inside `capacity_routing()`), experts stacked on an `expert` axis (sharded over the `expert` mesh axis, all-to-all dispatch). Each call sows
its aux losses (load balance, router z-loss, drop fractions) as `nnx.Intermediate`; collect
them with `capture_aux`. `MoECLIP` is a CLIP with those blocks (same API); `upcycle` builds one
from a dense model (expert e from `expert_sources[e]`'s FFN: DMU). Notes: docs/families/moe.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from zoo.models import clip as clip_lib, configs, layers as layers_lib, sharding

Array = jax.Array

# ----------------------------------------------------------------------------- config


_CAPACITY_ROUTING = contextvars.ContextVar("zoo_moe_capacity_routing", default=False)


@contextlib.contextmanager
def capacity_routing(enabled: bool = True) -> Iterator[None]:
  """Calls traced inside route with each model's capacity (when its config has dropless=False).

  Outside (the default: inference, evaluation, conversion) every token reaches its top-k experts.
  """
  token = _CAPACITY_ROUTING.set(enabled)
  try:
    yield
  finally:
    _CAPACITY_ROUTING.reset(token)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """MoE settings stored with the model. `vision_layers` / `text_layers`: block indices.

  `dropless=False` routes with a capacity (`capacity_factor`) only inside `capacity_routing()`
  (the train family's forward); inference and evaluation always route dropless.
  """

  num_experts: int = 4
  top_k: int = 2
  capacity_factor: float = 1.25
  dropless: bool = True
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
    """Slots per expert for a sequence of `group_size` tokens (dropless or outside
    `capacity_routing()`: all of them)."""
    if self.dropless or not _CAPACITY_ROUTING.get():
      return group_size
    c = math.ceil(self.top_k * group_size * self.capacity_factor / self.num_experts)
    return max(1, min(group_size, c))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MoEConfig":
    return configs.checked_config(cls, d, "MoE")


@dataclasses.dataclass(frozen=True)
class MoECLIPConfig(configs.CLIPConfig):
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


def capture_aux(fn: Callable[..., Any], model: nnx.Module, *args: Any, **kwargs: Any
                ) -> tuple[Any, list[dict[str, Array]]]:
  """`fn(model, *args, **kwargs)` and the aux dicts its MoE layers sowed (one per layer call):
  layer, assignments, balance_loss, z_loss, dropped, dropped_fraction, dropped_token_fraction."""
  out, sowed = nnx.capture(fn, nnx.Intermediate)(model, *args, **kwargs)
  aux = [a for _, v in nnx.to_flat_state(sowed) for a in v.get_value()]
  return out, aux


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
    if hasattr(self, "__captures__"):  # only under nnx.capture (sow outside it is deprecated)
      self.sow(nnx.Intermediate, "moe_aux", {
          "layer": self.layer_name,
          "assignments": dropped.size,
          "balance_loss": balance_loss(r.probs, r.expert_index),
          "z_loss": z_loss(logits),
          "dropped": jnp.sum(dropped.astype(jnp.int32)),
          "dropped_fraction": jnp.mean(dropped.astype(jnp.float32)),
          "dropped_token_fraction": jnp.mean(jnp.all(dropped, axis=-1).astype(jnp.float32)),
      })
    return y.reshape(shape).astype(x.dtype)


# ----------------------------------------------------------------------------- model


def _towers(model: clip_lib.CLIP) -> dict[str, nnx.Module]:
  return {"visual": model.visual, "text": model.text}


def tower_layers(moe: MoEConfig) -> dict[str, tuple[int, ...]]:
  return {"visual": moe.vision_layers, "text": moe.text_layers}


class MoECLIP(clip_lib.CLIP):
  """A CLIP whose blocks listed in `config.moe` have `MoEMLP` FFNs (same API as CLIP)."""

  def __init__(self, config: MoECLIPConfig, *, rngs: nnx.Rngs, router_init_std: float = 0.02):
    if not isinstance(config, MoECLIPConfig):
      raise TypeError(f"MoECLIP needs a MoECLIPConfig, got {type(config).__name__}; "
                      "build one with zoo.models.moe.moe_config(...) or zoo.models.moe.upcycle(model, ...)")
    super().__init__(config, rngs=rngs)
    dtype = jnp.dtype(config.dtype)
    for tower_name, tower in _towers(self).items():
      blocks = tower.transformer.resblocks
      for i in tower_layers(config.moe)[tower_name]:
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
      for i in tower_layers(self.config.moe)[tower_name]:
        out[f"{tower_name}.{i}"] = tower.transformer.resblocks[i].mlp
    return out


def moe_config(base: configs.CLIPConfig | str, *, num_experts: int = 4, top_k: int = 2,
               layers: Any = "every_other", capacity_factor: float = 1.25,
               dropless: bool = True, normalize_gates: bool = True) -> MoECLIPConfig:
  """A MoECLIPConfig over a dense architecture (a name or CLIPConfig).

  `layers`: one spec for both towers (see `resolve_layers`) or {"vision": spec, "text": spec}.
  """
  if isinstance(base, str):
    base = configs.get_model_config(base)
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
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(configs.CLIPConfig)}
  return MoECLIPConfig(moe=moe, **fields)


def create(name: str | configs.CLIPConfig, *, seed: int = 0, router_init_std: float = 0.02,
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
            dropless: bool = True, normalize_gates: bool = True,
            expert_sources: Sequence[clip_lib.CLIP] | None = None,
            router_init_std: float = 0.02, seed: int = 0) -> MoECLIP:
  """A MoECLIP built from the dense `model`; the input is not modified.

  Every non-FFN weight is copied. In each MoE block, expert e starts from the dense FFN of
  that block, or, with `expert_sources` (DMU: one fine-tuned copy per expert, same
  architecture), from `expert_sources[e]`'s FFN. The router is drawn from N(0, std^2) (seeded).
  With identical experts and normalized gates the output equals the dense model's for any
  router weights: routing is dropless by default; `dropless=False` (capacity_factor) drops
  only in training, inside `capacity_routing()`.
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


def dense_view(model: MoECLIP, expert: int = 0) -> clip_lib.CLIP:
  """A dense CLIP with every non-MoE weight of `model` and expert `expert`'s FFN in MoE blocks."""
  fields = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(configs.CLIPConfig)}
  dense = nnx.eval_shape(lambda: clip_lib.CLIP(configs.CLIPConfig(**fields), rngs=nnx.Rngs(0)))
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
