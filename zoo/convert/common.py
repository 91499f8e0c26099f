"""Shared machinery for weight conversion: rules, state-dict checks, zoo <-> flat arrays.

A layout (open_clip, HF) is a list of `Rule`s. Each rule ties one zoo parameter (an NNX
path) to one or more PyTorch state-dict keys, with a pure re-layout each way. Re-layouts are
reshapes / transposes / indexing only, so conversions are exact and round trips are bitwise.
The PyTorch-side shapes are derived from the zoo shapes by `jax.eval_shape` over the same
functions, so there is one source of truth per tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from zoo import errors
from zoo.models import clip as clip_lib, configs

Path = tuple[Any, ...]  # an NNX state path, e.g. ('visual', 'transformer', 'resblocks', 0, ...)
ArrayLike = Any


class StateDictError(errors.UserError, ValueError):
  """A state dict does not fit the expected layout; the message counts and lists the bad keys."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """One zoo parameter <-> one or more PyTorch tensors.

  `to_torch(zoo_array) -> tuple of torch-layout arrays` (one per key, same order) must use only
  array methods / indexing so it also runs on abstract values; `to_zoo(*arrays) -> zoo_array`
  is its exact inverse (numpy).
  """

  zoo: Path
  torch: tuple[str, ...]
  to_torch: Callable[[Any], tuple[Any, ...]]
  to_zoo: Callable[..., np.ndarray]


def identity(zoo: Path, key: str) -> Rule:
  return Rule(zoo, (key,), lambda a: (a,), lambda a: a)


def transposed(zoo: Path, key: str) -> Rule:
  """A 2-D kernel stored [in, out] in zoo and [out, in] (nn.Linear.weight) in PyTorch."""
  return Rule(zoo, (key,), lambda a: (a.T,), lambda a: a.T)


def layer_norm(zoo: Path, key: str) -> list[Rule]:
  """LayerNorm: zoo (scale, bias) <-> PyTorch (weight, bias)."""
  return [identity(zoo + ("scale",), f"{key}.weight"), identity(zoo + ("bias",), f"{key}.bias")]


def linear(zoo: Path, key: str, bias: bool = True) -> list[Rule]:
  """Linear: zoo (kernel [in,out], bias) <-> nn.Linear (weight [out,in], bias)."""
  rules = [transposed(zoo + ("kernel",), f"{key}.weight")]
  if bias:
    rules.append(identity(zoo + ("bias",), f"{key}.bias"))
  return rules


def conv_patch(zoo: Path, key: str) -> Rule:
  """Patch embedding: zoo HWIO [p,p,3,W] <-> nn.Conv2d.weight OIHW [W,3,p,p]."""
  return Rule(zoo, (key,), lambda a: (a.transpose(3, 2, 0, 1),),
              lambda a: a.transpose(2, 3, 1, 0))


def split_qkv(zoo: Path, keys: Sequence[str], width: int, heads: int) -> list[Rule]:
  """Separate q/k/v nn.Linear modules (`keys`, in q, k, v order) <-> zoo's fused attention.

  zoo packs them along axis 1 of qkv_kernel [W, 3, H, Dh] and axis 0 of qkv_bias [3, H, Dh].
  """
  dh = width // heads
  return [
      Rule(zoo + ("qkv_kernel",), tuple(f"{k}.weight" for k in keys),
           lambda a: tuple(a[:, t].reshape(width, width).T for t in range(3)),
           lambda *ws: np.stack([w.T.reshape(width, heads, dh) for w in ws], axis=1)),
      Rule(zoo + ("qkv_bias",), tuple(f"{k}.bias" for k in keys),
           lambda a: tuple(a[t].reshape(width) for t in range(3)),
           lambda *bs: np.stack([b.reshape(heads, dh) for b in bs], axis=0)),
  ]


def attn_out(zoo: Path, key: str, heads: int, width: int) -> list[Rule]:
  """Attention output projection: zoo [H, Dh, W] + bias <-> nn.Linear [W, W] + bias."""
  dh = width // heads
  return [
      Rule(zoo + ("out_kernel",), (f"{key}.weight",), lambda a: (a.reshape(width, width).T,),
           lambda a: a.T.reshape(heads, dh, width)),
      identity(zoo + ("out_bias",), f"{key}.bias"),
  ]


# ----------------------------------------------------------------------------- arrays


def to_numpy(x: ArrayLike) -> np.ndarray:
  """A numpy array from numpy / jax / torch values (torch bfloat16 is widened to float32)."""
  if isinstance(x, np.ndarray):
    return x
  module = type(x).__module__
  if module.startswith("torch"):
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def as_float32(x: np.ndarray) -> np.ndarray:
  """zoo parameters are float32; fp16 / bf16 checkpoints (e.g. OpenAI's) are widened exactly."""
  return x if x.dtype == np.float32 else x.astype(np.float32)


def shape_str(shape: Sequence[int]) -> str:
  return str(tuple(int(s) for s in shape))


# ----------------------------------------------------------------------------- zoo side


def resolve_config(name_or_config: str | configs.CLIPConfig, **overrides: Any
                   ) -> configs.CLIPConfig:
  """A CLIPConfig from a registered name (open_clip names) or a config instance."""
  if isinstance(name_or_config, configs.CLIPConfig):
    return configs.apply_overrides(name_or_config, **overrides)
  if isinstance(name_or_config, str):
    return configs.get_model_config(name_or_config, **overrides)
  raise TypeError(f"expected a model name or a zoo CLIPConfig, got {type(name_or_config).__name__}")


Builder = Callable[[Any], nnx.Module]  # config -> module (fresh weights)


def build_clip(config: configs.CLIPConfig) -> nnx.Module:
  return clip_lib.CLIP(config, rngs=nnx.Rngs(0))


def abstract_state(config: Any, build: Builder = build_clip) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and shape-only state of build(config), without allocating weights."""
  abstract = nnx.eval_shape(lambda: build(config))
  return nnx.split(abstract)


def flat_shapes(state: nnx.State) -> dict[Path, tuple[int, ...]]:
  return {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def path_str(path: Path) -> str:
  return ".".join(str(p) for p in path)


def model_from_flat(config: Any, arrays: Mapping[Path, np.ndarray], build: Builder = build_clip
                    ) -> nnx.Module:
  """build(config) (CLIP by default) whose every state entry is taken from `arrays`."""
  graphdef, state = abstract_state(config, build)
  flat = nnx.to_flat_state(state)
  missing = [path_str(p) for p, _ in flat if p not in arrays]
  if missing:  # a bug in a layout's rule table, not a user error
    raise RuntimeError(f"conversion rules do not cover zoo parameters: {', '.join(missing)}")
  for path, var in flat:
    value = arrays[path]
    expected = tuple(var.get_value().shape)
    if tuple(value.shape) != expected:
      raise RuntimeError(f"{path_str(path)}: rule produced {shape_str(value.shape)}, "
                         f"zoo expects {shape_str(expected)}")
    var.set_value(jax.numpy.asarray(value, dtype=var.get_value().dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_to_flat(model: nnx.Module) -> dict[Path, np.ndarray]:
  """Every state entry of `model` as a host numpy array (gathers sharded arrays)."""
  _, state = nnx.split(model)
  return {path: np.array(jax.device_get(var.get_value()))  # a writable host copy
          for path, var in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------- checks


def expected_torch_shapes(rules: Iterable[Rule], zoo_shapes: Mapping[Path, tuple[int, ...]]
                          ) -> dict[str, tuple[int, ...]]:
  """PyTorch key -> shape implied by the zoo shapes and the rules' re-layouts."""
  out: dict[str, tuple[int, ...]] = {}
  for rule in rules:
    abstract = jax.ShapeDtypeStruct(zoo_shapes[rule.zoo], np.float32)
    shapes = jax.eval_shape(rule.to_torch, abstract)
    for key, s in zip(rule.torch, shapes, strict=True):
      out[key] = tuple(s.shape)
  return out


def check_coverage(rules: Sequence[Rule], zoo_shapes: Mapping[Path, Any], layout: str) -> None:
  """Every zoo parameter has exactly one rule (else the layout cannot hold this model)."""
  covered = [r.zoo for r in rules]
  extra = sorted(set(zoo_shapes) - set(covered), key=path_str)
  if extra:
    raise ValueError(f"the {layout} layout has no place for zoo parameters "
                     f"{', '.join(path_str(p) for p in extra)}; this model cannot be exported "
                     f"to {layout} (merge or drop those parameters first)")
  dup = {path_str(p) for p in covered if covered.count(p) > 1}
  if dup or set(covered) - set(zoo_shapes):
    raise RuntimeError(f"bad {layout} rule table: duplicated {sorted(dup)}, unknown "
                       f"{sorted(path_str(p) for p in set(covered) - set(zoo_shapes))}")


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                     *, layout: str, model: str, ignore: Callable[[str], bool] = lambda k: False
                     ) -> None:
  """Raises one StateDictError: a first line with the count of missing, unexpected and
  mis-shaped keys, then the first few of them (zoo.errors.capped)."""
  problems: list[str] = []
  for key, shape in expected.items():
    if key not in state_dict:
      problems.append(f"  missing    {key}: expected {shape_str(shape)}")
  for key, value in state_dict.items():
    if key in expected:
      found = tuple(np.shape(value)) if not hasattr(value, "shape") else tuple(value.shape)
      if found != tuple(expected[key]):
        problems.append(f"  mis-shaped {key}: expected {shape_str(expected[key])}, "
                        f"found {shape_str(found)}")
    elif not ignore(key):
      found = tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))
      problems.append(f"  unexpected {key}: found {shape_str(found)}")
  if problems:
    raise StateDictError(
        f"{layout} state dict does not match zoo model {model!r} ({len(problems)} problem"
        f"{'s' if len(problems) > 1 else ''}; is the model name right?):\n"
        + "\n".join(errors.capped(problems)))


def convert_from_torch(state_dict: Mapping[str, Any], rules: Sequence[Rule],
                       config: Any, *, layout: str, model: str,
                       ignore: Callable[[str], bool] = lambda k: False,
                       build: Builder = build_clip) -> nnx.Module:
  """Checks `state_dict` against the rules for `config`, then builds the zoo model
  (`build(config)`, CLIP by default)."""
  _, state = abstract_state(config, build)
  zoo_shapes = flat_shapes(state)
  check_coverage(rules, zoo_shapes, layout)
  check_state_dict(state_dict, expected_torch_shapes(rules, zoo_shapes), layout=layout,
                   model=model, ignore=ignore)
  arrays = {}
  for rule in rules:
    parts = [as_float32(to_numpy(state_dict[k])) for k in rule.torch]
    arrays[rule.zoo] = np.asarray(rule.to_zoo(*parts), order="C")
  return model_from_flat(config, arrays, build)


def convert_to_torch(model: nnx.Module, rules: Sequence[Rule], *, layout: str
                     ) -> dict[str, np.ndarray]:
  """The model's parameters in a PyTorch layout: key -> contiguous numpy array."""
  flat = model_to_flat(model)
  check_coverage(rules, {p: v.shape for p, v in flat.items()}, layout)
  out: dict[str, np.ndarray] = {}
  for rule in rules:
    for key, value in zip(rule.torch, rule.to_torch(flat[rule.zoo]), strict=True):
      out[key] = np.asarray(value, order="C")
  return out
