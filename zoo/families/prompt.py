"""The `prompt` family: CoOp, CoCoOp and MaPLe prompt learning on a frozen CLIP, few-shot.

Settings: `config.prompt` (`Settings`); the data: `data.name="fewshot"` with `data.dataset`,
`data.shots`, `data.shots_policy`, `data.subsample` (zoo.data.fewshot). The model is a
`zoo.models.prompt.PromptCLIP` over `config.model` (weights from `config.init_from`, e.g.
'pretrained:ViT-B-16/openai'), built for the trained classes; only its `prompt` parameters
train. Batch fields: image, label. Loss: cross-entropy of the class logits (the frozen CLIP's
logit scale). Eval (`evaluate`): the base-to-novel protocol on the test split — accuracy on
the base classes (scored among them), on the novel classes (among them, prompts never trained
on them) and their harmonic mean; with `data.subsample=all`, accuracy over all classes.
The export is the PromptCLIP (prompts and class names saved with the CLIP).
Notes: docs/families/prompt.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import tokenizers, transforms
from zoo.data import fewshot
from zoo.families import base
from zoo.models import configs as registry, prompt as prompt_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.prompt` (see zoo.models.prompt.PromptConfig for the method fields)."""

  method: str = "coop"  # coop | cocoop | maple
  n_ctx: int = 4
  ctx_init: str = "a photo of a"  # "" = random context
  class_specific: bool = False  # CoOp: one context per class (no novel classes then)
  class_token_position: str = "end"  # end | middle | front
  depth: int = 9  # MaPLe: prompts in the first `depth` layers of both towers (0 = CoOp)
  meta_ratio: int = 16  # CoCoOp: meta-net hidden width = embed_dim / meta_ratio
  eval_batch_size: int = 64  # test images per eval batch (CoCoOp: x classes text passes)

  def __post_init__(self):
    prompt_lib.check_settings(self.method, self.n_ctx, self.class_specific,
                              self.class_token_position, self.depth, self.meta_ratio)
    if self.eval_batch_size < 1:
      raise ValueError(f"prompt.eval_batch_size={self.eval_batch_size}: expected >= 1")

  def prompt_kwargs(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in ("method", "n_ctx", "ctx_init", "class_specific",
                                          "class_token_position", "depth", "meta_ratio")}


def data_value(config: ml_collections.ConfigDict, key: str) -> Any:
  data = config.get("data", None) or {}
  return data.get(key, fewshot.DEFAULTS[key])


def tokenizer_of(config: ml_collections.ConfigDict, clip_config: registry.CLIPConfig):
  name = config.get("tokenizer", "") or config.model
  return tokenizers.get_tokenizer(name, context_length=clip_config.text.context_length)


def trained_classes(config: ml_collections.ConfigDict) -> list[str]:
  """The class names the prompts train on: `data.subsample`'s classes of `data.dataset`."""
  names = fewshot.class_names(config.data)
  return [names[c] for c in fewshot.classes_of(str(data_value(config, "subsample")), len(names))]


def cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
  """(mean cross-entropy, accuracy) of logits [B, C] against int labels [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = labels.astype(jnp.int32)
  loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
  return loss, jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def harmonic_mean(a: float, b: float) -> float:
  return 2 * a * b / (a + b) if a + b > 0 else 0.0


def accuracy(model: prompt_lib.PromptCLIP, images: np.ndarray, labels: np.ndarray,
             token_ids: np.ndarray, positions: np.ndarray, batch_size: int) -> float:
  """Top-1 accuracy of `model.class_logits` on preprocessed images (fixed-size, padded batches)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, x, ids, pos):
    return jnp.argmax(nnx.merge(graphdef, state).class_logits(x, ids, pos), axis=-1)

  n, bs = len(images), min(batch_size, len(images))
  preds = []
  for start in range(0, n, bs):
    chunk = images[start:start + bs]
    pad = bs - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    preds.append(np.asarray(predict(state, chunk, token_ids, positions))[:bs - pad])
  return float(np.mean(np.concatenate(preds) == labels)) if n else float("nan")


def evaluate_protocol(model: prompt_lib.PromptCLIP, config: ml_collections.ConfigDict,
                      tokenizer: Any, batch_size: int = 64) -> dict[str, float]:
  """{DATASET/base_accuracy, DATASET/novel_accuracy, DATASET/hm} on the test split (classes
  scored within their half); with `data.subsample=all`: {DATASET/accuracy}."""
  mc = model.config
  pc = mc.prompt
  test = fewshot.open_set(config.data, "test", mc.vision.image_size)
  pre = transforms.make_preprocess(mc.vision.image_size, mc.image_mean, mc.image_std)
  name = str(data_value(config, "dataset"))
  subsample = str(data_value(config, "subsample"))
  halves = ({"accuracy": list(range(len(test.classnames)))} if subsample == "all" else
            dict(zip(("base_accuracy", "novel_accuracy"), fewshot.base_novel(len(test.classnames)))))
  out = {}
  for key, classes in halves.items():
    names = [test.classnames[c] for c in classes]
    if key != "novel_accuracy" and tuple(names) == tuple(pc.classnames):
      ids, pos = np.asarray(pc.token_ids, np.int32), np.asarray(pc.ctx_positions, np.int32)
    elif pc.class_specific:
      raise ValueError("prompt.class_specific=True learns no context for unseen classes; use "
                       "data.subsample=all or a shared context")
    else:
      ids, pos, _ = prompt_lib.build_prompts(
          tokenizer, names, n_ctx=pc.n_ctx, ctx_init=pc.ctx_init,
          position=pc.class_token_position, context_length=mc.text.context_length)
    idx, labels = fewshot.test_images(test, classes)
    images = pre.batch([test.load(i) for i in idx])
    out[f"{name}/{key}"] = accuracy(model, images, labels, ids, pos, batch_size)
  if subsample != "all":
    out[f"{name}/hm"] = harmonic_mean(out[f"{name}/base_accuracy"], out[f"{name}/novel_accuracy"])
  return out


class PromptFamily(base.Family):
  """Prompt learning (CoOp / CoCoOp / MaPLe) on the train loop: a frozen CLIP, the prompts train."""

  name = "prompt"
  fields = ("image", "label")

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return base.parse_section(config, "prompt", Settings)

  def build_model(self, config: ml_collections.ConfigDict, settings: Settings
                  ) -> prompt_lib.PromptCLIP:
    """A PromptCLIP of `config.model` for the trained classes, CLIP weights from `init_from`,
    the context initialised from `prompt.ctx_init`."""
    clip_config = registry.get_model_config(
        config.model, dtype=base.resolve_dtype(config.dtype), **base.model_overrides(config))
    cfg = prompt_lib.prompt_config(clip_config, tokenizer_of(config, clip_config),
                                   trained_classes(config), **settings.prompt_kwargs())
    model = prompt_lib.PromptCLIP(cfg, rngs=nnx.Rngs(config.seed))
    base.init_params_from(config, model)
    model.init_context()
    return model

  def forward(self, model: prompt_lib.PromptCLIP, batch: dict, rng: Array, settings: Settings
              ) -> dict:
    del rng, settings
    return {"logits": model.class_logits(batch["image"])}

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[Array, dict]:
    loss, acc = cross_entropy(outputs["logits"], batch["label"])
    return loss, {"loss": loss, "train_accuracy": acc}

  def trainable(self, settings: Settings) -> Callable[[tuple[str, ...]], bool]:
    """The prompt learner only (the CLIP towers and logit scale stay frozen)."""
    del settings
    return lambda path: bool(path) and path[0] == "prompt"

  def evaluate(self, model: nnx.Module, config: ml_collections.ConfigDict, settings: Settings,
               tokenizer: Any, mesh: jax.sharding.Mesh | None) -> dict[str, float]:
    del mesh
    return evaluate_protocol(model, config, tokenizer, settings.eval_batch_size)


FAMILY = PromptFamily()


def default_settings() -> ml_collections.ConfigDict:
  """`config.prompt` with the defaults (configs.base.prompt() returns it)."""
  return ml_collections.ConfigDict(dataclasses.asdict(Settings()))


def data_defaults() -> dict:
  """The `config.data` keys of few-shot data (configs.base.fewshot_data() returns them)."""
  return dict(fewshot.DEFAULTS, name="fewshot")
