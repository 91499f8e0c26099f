"""The `distill` family: a small student CLIP learns from a frozen teacher CLIP (DC-CLIP, TinyCLIP).

The trained model is a `DistillCLIP`: `student` (a CLIP of `config.model`), `teacher` (a zoo.save
directory, `config.distill.teacher`, frozen) and, when their embedding widths differ, linear heads
mapping student features to the teacher's width. Loss (`config.distill`: `Settings`), each term
weighted: feature distillation per tower (cosine or MSE on normalized embeddings), logit
distillation (KL between teacher and student image->text and text->image softmaxes over the
batch, open_clip's DistillClipLoss; blockwise with impl xla / pallas, never B x B) and the
student's own contrastive loss. With `distill.teacher_cache` the teacher's embeddings come
with the batch (shards written by `python -m zoo.data.embed_cache`) and the teacher is neither
loaded nor run. The export is the student alone (a plain CLIP).
Notes: docs/families/distill.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import losses
from zoo.data import webdataset as wds
from zoo.families import base, clip as clip_family
from zoo.models import clip as clip_lib, configs as registry
from zoo.models.layers import param
from zoo.weights import model_dir, pretrained

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.distill`."""

  teacher: str = ""  # the teacher CLIP: a zoo.save directory, 'pretrained:NAME/TAG' or 'hf-hub:...'
  image_feature_weight: float = 1.0  # image tower: student (through its head) vs teacher
  text_feature_weight: float = 1.0  # text tower: the same
  feature_loss: str = "cosine"  # cosine (mean 1 - cos) | mse (mean squared error, normalized)
  logit_weight: float = 1.0  # KL(teacher || student) of the batch softmaxes, both directions
  contrastive_weight: float = 1.0  # the student's own CLIP loss
  block_size: int = 256  # rows per block of the logit distillation (impl xla / pallas)
  # the teacher's embeddings are read from the shards (KEY.teacher_{image,text,scale}.npy,
  # python -m zoo.data.embed_cache); `teacher` then only supplies the teacher's config
  teacher_cache: bool = False
  # config.loss's label smoothing, for the student's contrastive term (not a config.distill key)
  smoothing: clip_family.Settings = dataclasses.field(
      default_factory=clip_family.Settings, metadata={"derived": True})

  def __post_init__(self):
    if self.feature_loss not in ("cosine", "mse"):
      raise ValueError(f"distill.feature_loss={self.feature_loss!r}: expected 'cosine' or 'mse'")
    if self.block_size < 1:
      raise ValueError(f"distill.block_size={self.block_size}: expected >= 1")


class DistillCLIP(nnx.Module):
  """Student CLIP + frozen teacher (None with a teacher cache) + feature heads (student width
  -> teacher width `teacher_dim`, or None when equal).

  Encoding (eval during training) is the student's; `config` is the student's config.
  """

  def __init__(self, student: clip_lib.CLIP, teacher: clip_lib.CLIP | None, *,
               teacher_dim: int | None = None, seed: int = 0):
    self.student, self.teacher = student, teacher
    self.config = student.config
    es = student.config.embed_dim
    et = teacher.config.embed_dim if teacher is not None else int(teacher_dim)
    self.teacher_dim = et
    rngs = nnx.Rngs(seed)
    init = nnx.initializers.normal(es ** -0.5)
    self.image_head = param(rngs, init, (es, et), (None, None)) if es != et else None
    self.text_head = param(rngs, init, (es, et), (None, None)) if es != et else None

  def encode_image(self, images: Array, normalize: bool = False) -> Array:
    return self.student.encode_image(images, normalize=normalize)

  def encode_text(self, tokens: Array, normalize: bool = False, *, trim_padding: bool = False
                  ) -> Array:
    return self.student.encode_text(tokens, normalize=normalize, trim_padding=trim_padding)


def feature_loss(student: Array, teacher: Array, kind: str) -> Array:
  """Feature distillation on L2-normalized [B, E] embeddings: mean(1 - cos) or mean square."""
  s, t = clip_lib.l2_normalize(student), clip_lib.l2_normalize(teacher)
  if kind == "cosine":
    return jnp.mean(1.0 - jnp.sum(s * t, axis=-1))
  return jnp.mean(jnp.square(s - t))


def _kl_rows(s_rows: Array, s_cols: Array, s_scale: Array, t_rows: Array, t_cols: Array,
             t_scale: Array) -> Array:
  """Sum over rows of KL(softmax(teacher logits) || softmax(student logits)), logits rows x cols."""
  ls = s_scale * (s_rows @ s_cols.T)
  lt = t_scale * (t_rows @ t_cols.T)
  log_ps = jax.nn.log_softmax(ls, axis=-1)
  log_pt = jax.nn.log_softmax(lt, axis=-1)
  return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps))


def _kl_blockwise(s_rows: Array, s_cols: Array, s_scale: Array, t_rows: Array, t_cols: Array,
                  t_scale: Array, block: int) -> Array:
  """`_kl_rows` over row blocks in a lax.scan (rematerialized: only block x B live at once)."""
  b = s_rows.shape[0]
  block = math.gcd(b, min(block, b))
  n = b // block
  body = jax.checkpoint(lambda sr, tr: _kl_rows(sr, s_cols, s_scale, tr, t_cols, t_scale))

  def step(acc, xs):
    return acc + body(*xs), None

  xs = (s_rows.reshape(n, block, -1), t_rows.reshape(n, block, -1))
  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)
  return total


def logit_distillation(s_img: Array, s_txt: Array, s_scale: Array, t_img: Array, t_txt: Array,
                       t_scale: Array, *, impl: str = "reference", block_size: int = 256) -> Array:
  """Mean over rows and both directions of KL(teacher || student) batch softmaxes.

  Inputs: normalized student [B, Es] and teacher [B, Et] features and their (exp'd) logit
  scales. open_clip's DistillClipLoss is the cross-entropy; this differs by the teacher's
  entropy (a constant: the same gradients). impl "reference" builds B x B; others are blockwise.
  """
  s_img, s_txt = s_img.astype(jnp.float32), s_txt.astype(jnp.float32)
  t_img, t_txt = t_img.astype(jnp.float32), t_txt.astype(jnp.float32)
  s_scale, t_scale = jnp.asarray(s_scale, jnp.float32), jnp.asarray(t_scale, jnp.float32)
  if losses.resolve_impl(impl) == "reference":
    i2t = _kl_rows(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
    t2i = _kl_rows(s_txt, s_img, s_scale, t_txt, t_img, t_scale)
  else:
    i2t = _kl_blockwise(s_img, s_txt, s_scale, t_img, t_txt, t_scale, block_size)
    t2i = _kl_blockwise(s_txt, s_img, s_scale, t_txt, t_img, t_scale, block_size)
  return (i2t + t2i) / (2.0 * s_img.shape[0])


def _teacher_dir(path: str) -> str:
  if not path:
    raise ValueError("config.distill.teacher is empty: set it to the zoo.save directory of the "
                     "teacher CLIP, or to 'pretrained:NAME/TAG'")
  return pretrained.checkpoint_dir(path) if pretrained.is_ref(path) else path


def load_teacher(path: str) -> clip_lib.CLIP:
  """The teacher CLIP from a zoo.save directory or a 'pretrained:NAME/TAG' / 'hf-hub:...' name
  (converted once into zoo's cache); one-line error when missing or not a CLIP."""
  path = _teacher_dir(path)
  try:
    teacher, _, _ = model_dir.load(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.distill.teacher {path!r}: {e}") from None
  if not isinstance(teacher, clip_lib.CLIP):
    raise ValueError(f"distill.teacher {path} holds a {type(teacher).__name__}; expected a CLIP")
  return teacher


def teacher_config(path: str) -> registry.CLIPConfig:
  """The teacher's model config alone (no weights): what a teacher-cache run needs."""
  path = _teacher_dir(path)
  try:
    config, _ = model_dir.load_config(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.distill.teacher {path!r}: {e}") from None
  if not isinstance(config, registry.CLIPConfig):
    raise ValueError(f"distill.teacher {path} holds a {type(config).__name__}; expected a CLIP")
  return config


CACHE_FIELDS = {
    "teacher_image": "float32 [b, Et], the teacher's normalized image embedding (cached)",
    "teacher_text": "float32 [b, Et], the teacher's normalized embedding of the drawn caption",
    "teacher_scale": "float32 [b], the teacher's exp(logit_scale)",
}


class TeacherCacheFields:
  """Field hook: the teacher's cached embeddings of a sample (`KEY.teacher_*.npy`); the text
  row is the one of the caption the pipeline drew (`view.caption_index`)."""

  fields = CACHE_FIELDS

  def __init__(self, teacher_dim: int):
    self.teacher_dim = int(teacher_dim)

  def __call__(self, sample: Mapping[str, Any], view: Any) -> dict[str, np.ndarray]:
    arrays = sample.get("arrays") or {}
    missing = [k for k in CACHE_FIELDS if k not in arrays]
    if missing:
      raise wds.SkipSample("missing_teacher_features", f"{sample.get('key')}: no "
                           f"{', '.join(f'KEY.{k}.npy' for k in missing)}")
    image = np.asarray(arrays["teacher_image"], np.float32).reshape(-1)
    text = np.asarray(arrays["teacher_text"], np.float32)
    text = text.reshape(1, -1) if text.ndim == 1 else text
    n = len(sample.get("captions") or [None])
    if text.shape != (n, self.teacher_dim) or image.shape != (self.teacher_dim,):
      raise wds.SkipSample("teacher_features_shape", f"{sample.get('key')}: teacher_image "
                           f"{image.shape}, teacher_text {text.shape}; expected "
                           f"({self.teacher_dim},) and ({n}, {self.teacher_dim}) for {n} captions")
    return {"teacher_image": image, "teacher_text": text[view.caption_index],
            "teacher_scale": np.float32(np.asarray(arrays["teacher_scale"]).reshape(()))}


class DistillFamily(base.Family):
  """Teacher-student CLIP distillation on the train loop."""

  name = "distill"

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return dataclasses.replace(base.parse_section(config, "distill", Settings),
                               smoothing=clip_family.smoothing_settings(config))

  def build_model(self, config: ml_collections.ConfigDict, settings: Settings) -> DistillCLIP:
    """Student `config.model` (+ overrides, `config.init_from`), teacher `distill.teacher`
    (only its config with a teacher cache)."""
    teacher = None if settings.teacher_cache else load_teacher(settings.teacher)
    tc = teacher_config(settings.teacher) if teacher is None else teacher.config
    student = base.build_clip_model(config)
    base.init_params_from(config, student)
    sc = student.config
    if sc.text.vocab_size != tc.text.vocab_size:
      raise ValueError(f"distill: student vocab {sc.text.vocab_size} != teacher vocab "
                       f"{tc.text.vocab_size}; they read the same tokens")
    if tuple(sc.image_mean) != tuple(tc.image_mean) or tuple(sc.image_std) != tuple(tc.image_std):
      raise ValueError("distill: student and teacher image normalization (mean/std) differ")
    return DistillCLIP(student, teacher, teacher_dim=tc.embed_dim, seed=config.seed)

  def batch_fields(self, settings: Settings) -> tuple[str, ...]:
    return self.fields + (tuple(CACHE_FIELDS) if settings.teacher_cache else ())

  def field_hook(self, config: ml_collections.ConfigDict, settings: Settings, model: nnx.Module
                 ) -> TeacherCacheFields | None:
    del config
    if not settings.teacher_cache:
      return None
    return TeacherCacheFields(model.teacher_dim)

  def forward(self, model: DistillCLIP, batch: dict, rng: Array, settings: Settings) -> dict:
    """Student outputs, its raw features through the heads, teacher outputs (no gradient;
    from the batch with a teacher cache)."""
    del rng
    images, tokens = batch["image"], batch["tokens"]
    s_img = model.student.encode_image(images)
    s_txt = model.student.encode_text(tokens)
    if settings.teacher_cache:
      teacher = {"image_features": clip_lib.l2_normalize(batch["teacher_image"]),
                 "text_features": clip_lib.l2_normalize(batch["teacher_text"]),
                 "logit_scale": jnp.mean(batch["teacher_scale"])}
    else:
      teacher = jax.lax.stop_gradient(self._run_teacher(model.teacher, images, tokens))
    head = lambda h, x: x if h is None else x @ h[...]
    return {
        "image_features": clip_lib.l2_normalize(s_img),
        "text_features": clip_lib.l2_normalize(s_txt),
        "logit_scale": jnp.exp(model.student.logit_scale[...]),
        "image_projected": head(model.image_head, s_img),
        "text_projected": head(model.text_head, s_txt),
        "teacher_image": teacher["image_features"],
        "teacher_text": teacher["text_features"],
        "teacher_scale": teacher["logit_scale"],
    }

  @staticmethod
  def _run_teacher(teacher: clip_lib.CLIP, images: Array, tokens: Array) -> dict:
    """The teacher on the student's batch (images resized to its size when they differ)."""
    size = teacher.config.vision.image_size
    if images.shape[1] != size or images.shape[2] != size:
      images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]),
                                "bilinear")
    return teacher(images, tokens)

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[Array, dict]:
    ds: Settings = ctx.settings
    o = outputs
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    if ds.image_feature_weight:
      metrics["image_feature"] = feature_loss(o["image_projected"], o["teacher_image"],
                                              ds.feature_loss)
      total = total + ds.image_feature_weight * metrics["image_feature"]
    if ds.text_feature_weight:
      metrics["text_feature"] = feature_loss(o["text_projected"], o["teacher_text"],
                                             ds.feature_loss)
      total = total + ds.text_feature_weight * metrics["text_feature"]
    if ds.logit_weight:
      metrics["logit_kl"] = logit_distillation(
          o["image_features"], o["text_features"], o["logit_scale"], o["teacher_image"],
          o["teacher_text"], o["teacher_scale"], impl=ctx.impl, block_size=ds.block_size)
      total = total + ds.logit_weight * metrics["logit_kl"]
    if ds.contrastive_weight:
      student = {k: o[k] for k in ("image_features", "text_features", "logit_scale")}
      clip, clip_metrics = clip_family.clip_loss(student, ctx, ds.smoothing)
      metrics["contrastive"] = clip
      if "label_smoothing" in clip_metrics:
        metrics["label_smoothing"] = clip_metrics["label_smoothing"]
      total = total + ds.contrastive_weight * clip
    metrics["logit_scale"] = o["logit_scale"]
    return total, metrics

  def trainable(self, settings: Settings) -> Callable[[tuple[str, ...]], bool]:
    """Everything but the teacher."""
    del settings
    return lambda path: not path or path[0] != "teacher"

  def export(self, model: nnx.Module) -> nnx.Module:
    """The student alone (a plain CLIP: zoo.load gives it back, no teacher weights)."""
    return model.student if isinstance(model, DistillCLIP) else model


FAMILY = DistillFamily()


def default_settings() -> ml_collections.ConfigDict:
  """`config.distill` with the defaults (configs.base.distill() returns it)."""
  return ml_collections.ConfigDict(config_keys(Settings()))


def config_keys(settings: Settings) -> dict:
  """The `config.distill` keys of `settings` (without the derived label-smoothing settings)."""
  return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
          if not f.metadata.get("derived")}
