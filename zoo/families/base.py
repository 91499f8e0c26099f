"""The family seam: everything that differs between CLIP, Long-CLIP, MoE, region, multilingual.

A family is a `Family` subclass: its settings (one config section parsed once into a frozen
dataclass), how to build the model, the batch fields it adds (a hook the data pipeline calls),
forward, loss, its eval kinds, its trainable predicate, its export form, and optionally a
driver that runs several phase configs through the train loop (CLIP-MoE's DMU). The defaults
are plain CLIP's. The loop imports the family list (zoo.families); families never import it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import jax
import ml_collections
from flax import nnx

from zoo import errors, losses
from zoo.models import clip as clip_lib
from zoo.weights import model_dir

Array = jax.Array
Predicate = Callable[[tuple[str, ...]], bool]
log = logging.getLogger("zoo.families")


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a family loss may need besides (outputs, batch): its parsed settings, the mesh, the
  contrastive implementation (`config.loss.impl`, "auto" resolved by zoo.losses) and the
  optimizer step being taken (a traced int32 in the train step, for loss schedules; None
  outside training)."""

  settings: Any
  mesh: jax.sharding.Mesh | None
  impl: str
  step: Array | None = None


def parse_section(config: ml_collections.ConfigDict, name: str, cls: type) -> Any:
  """`config.<name>` as the frozen dataclass `cls` (its field defaults fill missing keys); an
  unknown key is a one-line error naming it and listing the valid ones."""
  given = config.get(name, None) or {}
  given = dict(given.to_dict() if hasattr(given, "to_dict") else given)
  valid = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
  errors.check_keys(given, valid, f"config.{name}")
  return cls(**given)


def resolve_dtype(name: str) -> str:
  """Compute dtype of a config: "auto" = float32 on CPU, bfloat16 on accelerators."""
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return name


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.model_overrides` as plain python (nested ConfigDicts become dicts)."""
  overrides = config.get("model_overrides", None) or {}
  return dict(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)


def build_clip_model(config: ml_collections.ConfigDict) -> clip_lib.CLIP:
  """`config.model` with `config.model_overrides`, compute dtype from `config.dtype`."""
  return clip_lib.create(config.model, seed=config.seed, dtype=resolve_dtype(config.dtype),
                         **model_overrides(config))


def init_params_from(config: ml_collections.ConfigDict, model: nnx.Module) -> None:
  """Fine-tuning: copy weights from `config.init_from` (a zoo.save directory) into `model`
  where names and shapes match."""
  src = config.get("init_from", "")
  if not src:
    return
  loaded, _, _ = model_dir.load(src)
  flat_t = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  flat_s = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  for key, var in flat_t.items():
    if key in flat_s and flat_s[key].shape == var.shape:
      var[...] = flat_s[key][...]
  missing = [k for k in flat_t if k not in flat_s or flat_s[k].shape != flat_t[k].shape]
  if missing:
    log.info("init_from %s: %d parameters kept their fresh init (e.g. %s)", src, len(missing),
             "/".join(map(str, missing[0])))


class Family:
  """A model family on the one train loop; subclass and override. Defaults: plain CLIP.

  `fields`: the batch fields the train step consumes. `eval_kinds`: eval-set kind ->
  `fn(model, spec, tokenizer, *, mesh, batch_size)` (registered with zoo.eval.evaluator).
  """

  name: str = "clip"
  fields: tuple[str, ...] = ("image", "tokens")
  eval_kinds: Mapping[str, Callable[..., dict[str, float]]] = {}

  def settings(self, config: ml_collections.ConfigDict) -> Any:
    """The family's config section parsed once (a frozen dataclass); None when it has none."""
    del config
    return None

  def build_model(self, config: ml_collections.ConfigDict, settings: Any) -> nnx.Module:
    """The model to train (weights from `config.init_from` where they fit)."""
    del settings
    model = build_clip_model(config)
    init_params_from(config, model)
    return model

  def field_hook(self, config: ml_collections.ConfigDict, settings: Any, model: nnx.Module
                 ) -> Any:
    """A `zoo.data.FieldHook` adding this family's batch fields, or None (image, tokens)."""
    del config, settings, model
    return None

  def batch_fields(self, settings: Any) -> tuple[str, ...]:
    """The batch fields the train step reads under `settings` (default: `fields`)."""
    del settings
    return self.fields

  def forward(self, model: nnx.Module, batch: dict, rng: Array, settings: Any) -> dict:
    del rng, settings
    return model(batch["image"], batch["tokens"])

  def loss(self, outputs: dict, batch: dict, ctx: LossContext) -> tuple[Array, dict]:
    return losses.clip_loss(outputs, batch, impl=ctx.impl, mesh=ctx.mesh)

  def trainable(self, settings: Any) -> Predicate | None:
    """Parameter path -> whether it trains; None = every parameter."""
    del settings
    return None

  def evaluate(self, model: nnx.Module, config: ml_collections.ConfigDict, settings: Any,
               tokenizer: Any, mesh: jax.sharding.Mesh | None) -> dict[str, float]:
    """Extra eval metrics beyond the configured eval sets (default: none)."""
    del model, config, settings, tokenizer, mesh
    return {}

  def export(self, model: nnx.Module) -> nnx.Module:
    """The model a finished run saves (e.g. without a distillation teacher)."""
    return model

  def driver(self, settings: Any) -> Callable[..., dict[str, Any]] | None:
    """None (one run of the loop), or `fn(config, workdir, run_phase, sample_batches)` that
    runs a sequence of phase configs through `run_phase(config, workdir, batch_fn=None)`."""
    del settings
    return None
