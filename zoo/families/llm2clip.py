"""The `llm2clip` family: a zoo image tower trained against a frozen LLM text tower (LLM2CLIP,
ProCLIP).

Model (`config.llm2clip`: `Settings`): the image tower of `config.model` (+ `init_from`), an LLM
(`text_model`, `text_checkpoint` (HF dir; its tokenizer.json, `llm2vec_template`) or `text_init`;
frozen, LoRA optional) and LLM2CLIP's adapter. Stages: `caption_contrastive` (text only: the
LLM learns to embed captions, two captions of a sample = positives), `contrastive` (LLM2CLIP:
CLIP loss), `distill_text` (ProCLIP stage 1: text only, the LLM + adapter learn a CLIP text
encoder's embeddings: instance + structure alignment, `loss_form`; image tower frozen),
`self_distill` (ProCLIP stage 2: CLIP loss + alignment to a frozen copy of the initial image
tower). The LLM reads `llm_tokens`: the long caption (`long_captions`) or the drawn one, at
config.context_length (512), over-long captions truncated and counted in the log. `text_cache`:
pooled LLM embeddings from the shards (KEY.llm_text.npy, `python -m zoo.data.embed_cache
--text_model`). Export: no teachers. Notes: docs/families/llm2clip.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from zoo import tokenizers
from zoo.convert import llm as llm_convert, llm2clip as llm2clip_convert
from zoo.data import pipeline, webdataset as wds
from zoo.families import base, clip as clip_family, distill
from zoo.models import clip as clip_lib, llm, llm2clip, lora
from zoo.weights import model_dir

Array = jax.Array
log = logging.getLogger("zoo.families")
STAGES = ("contrastive", "distill_text", "self_distill", "caption_contrastive")
LOSS_FORMS = ("cosine", "released")


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.llm2clip`."""

  text_model: str = "llm-tiny"  # a zoo.models.llm.TEXT_MODELS name (fresh weights)
  text_checkpoint: str = ""  # a Hugging Face Llama / Qwen directory (config.json + safetensors)
  text_init: str = ""  # a zoo.save dir (e.g. a caption_contrastive run): its LLM weights
  # its tokenizer.json (when present) tokenizes the captions, wrapped as LLM2Vec does:
  llm2vec_template: str = "none"  # none | llama3-instruct | qwen2-instruct
  causal: bool = False  # False: bidirectional attention (LLM2Vec, as LLM2CLIP's embedder)
  pool: str = "mean"  # mean | last
  adapter_blocks: int = 4  # LLM2CLIP 4 (expansion 2); ProCLIP 1 (expansion 8)
  adapter_expansion: float = 2.0
  long_captions: bool = True  # the LLM reads the sample's long caption when it has one
  text_cache: bool = False  # pooled LLM embeddings from the shards (KEY.llm_text.npy)
  stage: str = "contrastive"  # contrastive | distill_text | self_distill | caption_contrastive
  # caption_contrastive: the anchor is the caption the LLM reads (above); the positive the
  # sample's `positive` field, else another of its `captions`; in-batch negatives, InfoNCE at
  # `cc_temperature` (LLM2Vec's SimCSE 0.05) on the pooled LLM embeddings; the LLM trains
  # fully (lora_rank 0) or its LoRA only; no image tower, no adapter
  positive: str = "detail_caption"
  cc_temperature: float = 0.05
  teacher: str = ""  # distill_text: the CLIP whose text encoder is distilled (zoo.save dir)
  instance_weight: float = 1.0  # distill_text: mean(1 - cos(student text, teacher text))
  structure_weight: float = 1.0  # distill_text: MSE of the text-text cosine matrices
  # distill_text: a sample field with a second, noisier caption (ProCLIP's `noise_text`): the
  # student and the teacher embed it too and its instance term is added (structure: main only)
  noised_caption: str = ""
  self_distill_weight: float = 1.0  # self_distill: 1 - cos(image, frozen initial image)
  # "cosine": the terms above (batch means); "released": ProCLIP's training/train.py, sums over
  # the batch of the normalized features: MSE (instance) + smooth-L1 of pairwise distances
  # (structure), the same pair for self_distill (x self_distill_weight)
  loss_form: str = "cosine"
  lora_rank: int = 0  # > 0: LoRA on the LLM (trained; the base LLM stays frozen)
  lora_alpha: float = 16.0
  lora_targets: str = r"self_attn/(q|v)_proj/kernel"
  smoothing: clip_family.Settings = dataclasses.field(
      default_factory=clip_family.Settings, metadata={"derived": True})

  def __post_init__(self):
    if self.stage not in STAGES:
      raise ValueError(f"llm2clip.stage={self.stage!r}: expected one of {', '.join(STAGES)}")
    if self.pool not in llm.POOLS:
      raise ValueError(f"llm2clip.pool={self.pool!r}: expected one of {', '.join(llm.POOLS)}")
    if self.llm2vec_template not in llm2clip_convert.TEMPLATES:
      raise ValueError(f"llm2clip.llm2vec_template={self.llm2vec_template!r}: expected one of "
                       f"{', '.join(llm2clip_convert.TEMPLATES)}")
    if self.loss_form not in LOSS_FORMS:
      raise ValueError(f"llm2clip.loss_form={self.loss_form!r}: expected one of "
                       f"{', '.join(LOSS_FORMS)}")
    if self.noised_caption and (self.stage != "distill_text" or self.text_cache):
      raise ValueError("llm2clip.noised_caption is a distill_text term (without text_cache)")
    if self.stage == "distill_text" and not self.teacher:
      raise ValueError("llm2clip.stage=distill_text needs llm2clip.teacher (a zoo.save CLIP)")


class Truncations:
  """Counts captions longer than the LLM's context (logged at 1, 2, 4, 8, ... so far)."""

  def __init__(self):
    self.count, self._lock = 0, threading.Lock()

  def add(self, length: int, context: int) -> None:
    with self._lock:
      self.count += 1
      n = self.count
    if n & (n - 1) == 0:
      log.warning("llm2clip: %d caption(s) so far longer than the %d-token context were "
                  "truncated (this one: %d tokens)", n, context, length)


class LLMFields:
  """Field hook: `llm_tokens` (long or drawn caption at the pipeline's context length),
  `teacher_tokens` (the same text for a CLIP teacher, at its length), `llm_text` (cache)."""

  fields = {
      "llm_tokens": "int32 [b, L], the caption the LLM reads (long caption when present)",
      "teacher_tokens": "int32 [b, Lt], the caption for the CLIP text teacher",
      "llm_text": "float32 [b, W], the cached pooled LLM embedding of the drawn caption",
      "llm_positive": "int32 [b, L], a second caption of the sample (caption_contrastive)",
      "llm_noised": "int32 [b, L], the sample's noised caption (distill_text)",
      "teacher_noised": "int32 [b, Lt], the same for the CLIP text teacher",
  }

  def __init__(self, long_captions: bool, teacher_tokenizer: Any = None, width: int = 0,
               positive: str = "detail_caption", noised: str = ""):
    self.long_captions, self.teacher_tokenizer, self.width = long_captions, teacher_tokenizer, width
    self.positive, self.noised = positive, noised
    self.truncations = Truncations()

  def positive_text(self, sample: Mapping[str, Any], view: Any, anchor: str) -> str:
    """The sample's `positive` field, else another of its `captions` than the anchor."""
    if sample.get(self.positive):
      return str(sample[self.positive])
    captions = [str(c) for c in (sample.get("captions") or []) if str(c) != anchor]
    if not captions:
      raise wds.SkipSample("missing_positive", f"{sample.get('key')}: no {self.positive!r} "
                           "field and no second caption for caption_contrastive")
    return captions[view.caption_index % len(captions)]

  def text(self, sample: Mapping[str, Any], view: Any) -> str:
    if self.long_captions and sample.get("long_caption"):
      return str(sample["long_caption"])
    captions = sample.get("captions") or [sample["caption"]]
    return str(captions[view.caption_index])

  def __call__(self, sample: Mapping[str, Any], view: Any) -> dict[str, np.ndarray]:
    out = {}
    text = self.text(sample, view)
    if "llm_tokens" in view.fields:
      encode = getattr(view.tokenizer, "encode", None)
      if encode is not None and view.context_length:
        n = len(encode(text)) + getattr(view.tokenizer, "wrap_tokens", 2)  # + SOT / EOT
        if n > view.context_length:
          self.truncations.add(n, view.context_length)
      out["llm_tokens"] = view.tokenize([text], "llm_tokens")[0]
    if "llm_positive" in view.fields:
      out["llm_positive"] = view.tokenize([self.positive_text(sample, view, text)],
                                          "llm_positive")[0]
    if "teacher_tokens" in view.fields:
      tok = self.teacher_tokenizer
      out["teacher_tokens"] = pipeline.tokenize(tok, [text], tok.context_length,
                                                "teacher_tokens")[0]
    if "llm_noised" in view.fields:
      if not sample.get(self.noised):
        raise wds.SkipSample("missing_noised_caption", f"{sample.get('key')}: no {self.noised!r}")
      noised, tok = str(sample[self.noised]), self.teacher_tokenizer
      out["llm_noised"] = view.tokenize([noised], "llm_noised")[0]
      out["teacher_noised"] = pipeline.tokenize(tok, [noised], tok.context_length,
                                                "teacher_noised")[0]
    if "llm_text" in view.fields:
      arrays = sample.get("arrays") or {}
      if "llm_text" not in arrays:
        raise wds.SkipSample("missing_llm_features", f"{sample.get('key')}: no KEY.llm_text.npy")
      rows = np.asarray(arrays["llm_text"], np.float32)
      rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
      if rows.shape[1] != self.width:
        raise wds.SkipSample("llm_features_shape", f"{sample.get('key')}: llm_text {rows.shape}"
                             f", expected width {self.width}")
      out["llm_text"] = rows[min(view.caption_index, len(rows) - 1)]
    return out


TOKENIZER_FIELDS = ("tokenizer", "tokenizer_format", "tokenizer_clean", "tokenizer_prefix",
                    "tokenizer_suffix")


def init_text(src: str, **fields: Any) -> tuple[llm.LLM, dict]:
  """The LLM (architecture and weights) of the zoo.save dir `src`, e.g. the one a
  caption_contrastive run tuned, `fields` (causal, pool) replacing its config's; and the saved
  tokenizer fields when it read its own tokenizer.json ({} for CLIP BPE)."""
  if not isinstance(getattr(model_dir.load_config(src)[0], "text", None), llm.LLMConfig):
    raise ValueError(f"llm2clip.text_init={src}: the saved model has no LLM text tower")
  saved = model_dir.load(src)[0]
  text = saved.text
  text.config = dataclasses.replace(text.config, **fields)
  tok = {}
  if getattr(saved.config, "tokenizer_format", "") == "hf":
    tok = {k: getattr(saved.config, k) for k in TOKENIZER_FIELDS}
    local = os.path.join(src, model_dir.HF_TOKENIZER_FILE)
    tok["tokenizer"] = local if os.path.isfile(local) else tok["tokenizer"]
  return text, tok


def build_text_tower(settings: Settings) -> tuple[llm.LLM | llm.LLMConfig, dict]:
  """The LLM of `settings` (converted from `text_checkpoint`, else a fresh `text_model` config)
  and the LLM2CLIPConfig tokenizer fields of the checkpoint's tokenizer.json ({} without)."""
  extra = dict(causal=settings.causal, pool=settings.pool)
  if settings.text_init:
    return init_text(settings.text_init, **extra)
  if not settings.text_checkpoint:
    return llm.text_config(settings.text_model, **extra), {}
  tok = {}
  if os.path.isfile(os.path.join(settings.text_checkpoint, "tokenizer.json")):
    tok = llm2clip_convert.llm2vec_tokenizer(settings.text_checkpoint, settings.llm2vec_template)
    extra.update(pool_skip=tok.pop("pool_skip"), pad_token_id=tok.pop("pad_token_id"))
  return llm_convert.load_pretrained(settings.text_checkpoint, **extra), tok


class LLM2CLIPFamily(base.Family):
  """LLM2CLIP / ProCLIP on the train loop."""

  name = "llm2clip"

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return dataclasses.replace(base.parse_section(config, "llm2clip", Settings),
                               smoothing=clip_family.smoothing_settings(config))

  def build_model(self, config: ml_collections.ConfigDict, settings: Settings
                  ) -> llm2clip.LLM2CLIP:
    clip_model = base.build_clip_model(config)
    text, tok_fields = build_text_tower(settings)
    text_cfg = text.config if isinstance(text, llm.LLM) else text
    length = int(config.get("context_length", 0) or text_cfg.context_length)
    text_cfg = dataclasses.replace(text_cfg, context_length=length)
    if isinstance(text, llm.LLM):
      text.config = text_cfg
    else:
      text = text_cfg
    model = llm2clip.from_clip(clip_model, text, adapter_blocks=settings.adapter_blocks,
                               adapter_expansion=settings.adapter_expansion, seed=config.seed,
                               remat=config.get("remat", "none"))
    if tok_fields:  # the LLM's own tokenizer.json (train loop, eval, zoo.save, embed_cache)
      model.config = dataclasses.replace(model.config, **tok_fields)
    base.init_params_from(config, model)
    if settings.lora_rank > 0:
      lora.apply_lora(model.text, targets=settings.lora_targets, rank=settings.lora_rank,
                      alpha=settings.lora_alpha, seed=config.seed)
    if settings.stage == "distill_text":
      teacher = distill.load_teacher(settings.teacher)
      if teacher.config.embed_dim != model.config.embed_dim:
        raise ValueError(f"llm2clip.teacher embeds in {teacher.config.embed_dim} dims; the "
                         f"model's embedding has {model.config.embed_dim}")
      model.text_teacher = teacher.text
    if settings.stage == "self_distill":
      frozen = nnx.clone(model.visual)
      for _, var in nnx.iter_graph(frozen):  # own buffers: the train step donates the state
        if isinstance(var, nnx.Variable):
          var.set_value(jnp.array(var.get_value(), copy=True))
      model.visual_teacher = frozen
    return model

  def batch_fields(self, settings: Settings) -> tuple[str, ...]:
    if settings.stage == "caption_contrastive":
      return ("llm_tokens", "llm_positive")
    text = ("llm_text",) if settings.text_cache else ("llm_tokens",)
    if settings.stage == "distill_text":
      noised = ("llm_noised", "teacher_noised") if settings.noised_caption else ()
      return text + ("teacher_tokens",) + noised
    return ("image",) + text

  def field_hook(self, config: ml_collections.ConfigDict, settings: Settings,
                 model: nnx.Module) -> LLMFields:
    teacher_tok = None
    if settings.stage == "distill_text":
      tc = distill.teacher_config(settings.teacher)
      teacher_tok = tokenizers.ClipTokenizer(tc.text.context_length)
    return LLMFields(settings.long_captions, teacher_tok, model.config.text.width,
                     settings.positive, settings.noised_caption)

  def _text(self, model: llm2clip.LLM2CLIP, batch: dict, settings: Settings) -> Array:
    if settings.text_cache:
      pooled = batch["llm_text"]
    else:
      pooled = model.llm_features(batch["llm_tokens"])
      if settings.lora_rank <= 0:
        pooled = jax.lax.stop_gradient(pooled)
    return model.encode_text_features(pooled)

  def forward(self, model: llm2clip.LLM2CLIP, batch: dict, rng: Array, settings: Settings
              ) -> dict:
    del rng
    if settings.stage == "caption_contrastive":  # text only: the pooled LLM embeddings
      return {"anchor": clip_lib.l2_normalize(model.llm_features(batch["llm_tokens"])),
              "positive": clip_lib.l2_normalize(model.llm_features(batch["llm_positive"]))}
    out = {"text_raw": self._text(model, batch, settings),
           "logit_scale": jnp.exp(model.logit_scale[...])}
    out["text_features"] = clip_lib.l2_normalize(out["text_raw"])
    if settings.stage == "distill_text":
      teacher = jax.lax.stop_gradient(model.text_teacher(batch["teacher_tokens"]))
      out["teacher_text"] = clip_lib.l2_normalize(teacher.astype(jnp.float32))
      if "llm_noised" in batch:  # ProCLIP's noised caption: its own instance term
        noised_batch = {"llm_tokens": batch["llm_noised"]}
        out["text_noised"] = clip_lib.l2_normalize(self._text(model, noised_batch, settings))
        noised = jax.lax.stop_gradient(model.text_teacher(batch["teacher_noised"]))
        out["teacher_noised"] = clip_lib.l2_normalize(noised.astype(jnp.float32))
      return out
    out["image_features"] = model.encode_image(batch["image"], normalize=True)
    if model.logit_bias is not None:
      out["logit_bias"] = model.logit_bias[...]
    if settings.stage == "self_distill":
      frozen = jax.lax.stop_gradient(model.visual_teacher(batch["image"]).astype(jnp.float32))
      out["image_teacher"] = clip_lib.l2_normalize(frozen)
    return out

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[Array, dict]:
    s: Settings = ctx.settings
    o = outputs
    if s.stage == "caption_contrastive":
      loss, acc = caption_contrastive_loss(o["anchor"], o["positive"], s.cc_temperature)
      return loss, {"caption_contrastive": loss, "accuracy": acc}
    metrics = {"logit_scale": o["logit_scale"]}
    if s.stage == "distill_text":
      inst, struct = alignment_losses(o["text_features"], o["teacher_text"], s.loss_form)
      metrics.update(instance=inst, structure=struct)
      if "text_noised" in o:
        metrics["noised_instance"] = alignment_losses(o["text_noised"], o["teacher_noised"],
                                                      s.loss_form)[0]
        inst = inst + metrics["noised_instance"]
      return s.instance_weight * inst + s.structure_weight * struct, metrics
    clip_outputs = {k: o[k] for k in ("image_features", "text_features", "logit_scale",
                                      "logit_bias") if k in o}
    total, clip_metrics = clip_family.clip_loss(clip_outputs, ctx, s.smoothing)
    metrics["contrastive"] = total
    if s.stage == "self_distill":
      if s.loss_form == "released":
        metrics["self_distill"] = sum(alignment_losses(o["image_features"], o["image_teacher"],
                                                       s.loss_form))
      else:
        metrics["self_distill"] = distill.feature_loss(o["image_features"], o["image_teacher"],
                                                       "cosine")
      total = total + s.self_distill_weight * metrics["self_distill"]
    if "label_smoothing" in clip_metrics:
      metrics["label_smoothing"] = clip_metrics["label_smoothing"]
    return total, metrics

  def trainable(self, settings: Settings) -> Callable[[tuple[str, ...]], bool]:
    """Adapter (+ LoRA) always; image tower and temperature unless distill_text; never the
    base LLM or the teachers. caption_contrastive: the LLM only (its LoRA with lora_rank)."""
    def pred(path: tuple[str, ...]) -> bool:
      if not path or path[0] in ("text_teacher", "visual_teacher"):
        return False
      if lora.is_lora_path(path):
        return True
      if settings.stage == "caption_contrastive":
        return path[0] == "text" and settings.lora_rank <= 0
      if path[0] == "text":
        return False
      return path[0] == "adapter" or settings.stage != "distill_text"
    return pred

  def export(self, model: nnx.Module) -> nnx.Module:
    """Without the teachers, LoRA merged into the LLM (a copy: the trainer's model is kept)."""
    model = llm2clip.without_teacher(model)
    if lora.lora_paths(model):
      model = lora.merge_lora(nnx.clone(model))  # a deep copy: the variables are not shared
    return model


def caption_contrastive_loss(anchor: Array, positive: Array, temperature: float
                             ) -> tuple[Array, Array]:
  """Symmetric InfoNCE of normalized [B, W] caption embeddings (row i's positive is row i, the
  other rows are negatives) at `temperature`; and the anchor->positive top-1 accuracy."""
  logits = anchor.astype(jnp.float32) @ positive.astype(jnp.float32).T / temperature
  labels = jnp.arange(logits.shape[0])
  loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
  return loss, jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))


def structure_loss(student: Array, teacher: Array) -> Array:
  """Embedding-structure alignment: MSE between the batch cosine-similarity matrices of two
  normalized [B, E] sets (B x B; text-only stage-1 batches)."""
  s = student.astype(jnp.float32)
  t = teacher.astype(jnp.float32)
  return jnp.mean(jnp.square(s @ s.T - t @ t.T))


def pairwise_distances(x: Array) -> Array:
  """torch.nn.functional.pdist: the Euclidean distances of the rows, i < j (upper triangle)."""
  i, j = np.triu_indices(x.shape[0], k=1)
  d = x[i] - x[j]
  return jnp.sqrt(jnp.sum(d * d, axis=-1))


def alignment_losses(student: Array, teacher: Array, form: str) -> tuple[Array, Array]:
  """(instance, structure) alignment of normalized [B, E] features. 'released': ProCLIP's
  F.mse_loss(reduction='sum') and F.smooth_l1_loss(pdist(s), pdist(t), reduction='sum');
  'cosine': mean(1 - cos) and the MSE of the cosine-similarity matrices."""
  s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
  if form == "released":
    diff = jnp.abs(pairwise_distances(s) - pairwise_distances(t))
    smooth_l1 = jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5)  # beta = 1
    return jnp.sum(jnp.square(s - t)), jnp.sum(smooth_l1)
  return distill.feature_loss(s, t, "cosine"), structure_loss(s, t)


FAMILY = LLM2CLIPFamily()


def default_settings() -> ml_collections.ConfigDict:
  """`config.llm2clip` with the defaults (configs.base.llm2clip() returns it)."""
  return ml_collections.ConfigDict({f.name: getattr(Settings(), f.name)
                                    for f in dataclasses.fields(Settings)
                                    if not f.metadata.get("derived")})
