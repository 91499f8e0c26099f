"""The `multilingual` family: M-CLIP-style text distillation into a multilingual student tower.

The student text tower learns the frozen teacher's embedding of the English caption from the
translated caption (MSE and/or text-text InfoNCE, `config.multilingual`: `Settings`), image
tower, temperature and teacher frozen; the exported model drops the teacher. Batch fields (the
`MultilingualFields` hook): ml_tokens / ml_lang (a caption language drawn per sample),
ml_en_tokens (teacher tokenizer), tokens_<lang>. Eval kind: `babel_zeroshot` (Babel-ImageNet
per-language zero-shot). Notes: docs/families/multilingual.md.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sentencepiece as spm
from flax import nnx

from zoo import losses, tokenizers
from zoo.data import babel, demo, pipeline, webdataset as wds
from zoo.eval import evaluator
from zoo.families import base
from zoo.models import clip as clip_lib
from zoo.models.multilingual import (
  DEMO_TOKENIZER,
  MultilingualCLIP,
  from_clip,
  student_only,
  text_config,
)
from zoo.weights import model_dir

Array = jax.Array
Mesh = jax.sharding.Mesh
Tokenizer = Callable[[list[str]], Any]
FIELDS = ("ml_tokens", "ml_en_tokens", "ml_lang")


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.multilingual`."""

  teacher: str = ""  # zoo.save directory of the English CLIP (required)
  tokenizer: str = ""  # the student's sentencepiece .model (XLM-R ids); "" = the demo vocabulary
  mse_weight: float = 1.0  # M-CLIP: MSE between student and teacher embeddings
  contrastive_weight: float = 0.0  # text-text InfoNCE, student(translation) vs teacher(English)
  contrastive_scale: float = 20.0  # its fixed logit scale (inverse temperature)
  train: str = "text"  # text (the student text tower) | text_projection (projection only)

  def __post_init__(self):
    if self.train not in ("text", "text_projection"):
      raise ValueError(f"multilingual.train={self.train!r}: expected 'text' (whole text tower) "
                       "or 'text_projection' (projection only)")

  @property
  def tokenizer_path(self) -> str:
    return self.tokenizer or DEMO_TOKENIZER


def languages(data_cfg: Any) -> tuple[str, ...]:
  """The caption languages of a data config (`data.languages`; default: the demo's 8)."""
  langs = pipeline.config_value(data_cfg, "languages", demo.LANGUAGES)
  if isinstance(langs, str):
    langs = [x.strip() for x in langs.split(",") if x.strip()]
  return tuple(langs) or demo.LANGUAGES


class MultilingualFields:
  """Field hook: `ml_tokens` + `ml_lang` (a language drawn per sample among `languages` the
  sample has, index into `languages`), `ml_en_tokens` (the English caption), `tokens_<lang>`.
  `tokenizers` maps a field to its own tokenizer (e.g. the teacher's for ml_en_tokens); the
  others use the pipeline's (the student's)."""

  fields = {
      "ml_tokens": "int32 [b, L], the caption in a language drawn per sample",
      "ml_lang": "int32 [b], index of that language in data.languages",
      "ml_en_tokens": "int32 [b, L], the parallel English caption (teacher tokenizer)",
      "tokens_*": "int32 [b, L], the caption in language * (e.g. tokens_de)",
  }

  def __init__(self, langs: Sequence[str], tokenizers: Mapping[str, Any] | None = None):
    self.languages, self.tokenizers = tuple(langs), dict(tokenizers or {})

  def __call__(self, sample: Mapping[str, Any], view: Any) -> dict[str, np.ndarray]:
    fields = view.fields
    ml = dict(sample.get("captions_ml") or {})
    def tok(field: str, text: str) -> np.ndarray:
      own = self.tokenizers.get(field)
      if own is None and field != "ml_en_tokens":  # translations: the student's tokenizer
        own = self.tokenizers.get("ml_tokens")
      if field == "ml_en_tokens" and getattr(own, "context_length", None):  # the teacher's rows
        return pipeline.tokenize(own, [text], own.context_length, field)[0]
      return view.tokenize([text], field, own)[0]

    out: dict[str, np.ndarray] = {}
    if "ml_tokens" in fields:
      avail = [i for i, lang in enumerate(self.languages) if lang in ml]
      if not avail:
        raise wds.SkipSample("missing_language", f"none of {self.languages} in the sample")
      li = avail[int(view.rng.integers(len(avail)))]
      out["ml_tokens"] = tok("ml_tokens", ml[self.languages[li]])
      out["ml_lang"] = np.int32(li)
    if "ml_en_tokens" in fields:
      out["ml_en_tokens"] = tok("ml_en_tokens", ml.get("en") or sample["caption"])
    for f in fields:
      if f.startswith("tokens_"):
        lang = f[len("tokens_"):]
        if lang not in ml:
          raise wds.SkipSample("missing_language", lang)
        out[f] = tok(f, ml[lang])
    return out


DEFAULT_TEMPLATES = ("a photo of a {}.",)


def babel_zeroshot_language(image_features: np.ndarray, labels: np.ndarray,
                            class_indices: Sequence[int], classifier: np.ndarray
                            ) -> tuple[float, int]:
  """(top-1, images scored) of one language: only images of its K named classes count, and
  the argmax runs over those K classes (`classifier` [E, K], column k = class_indices[k])."""
  idx = np.asarray(class_indices, np.int64)
  keep = np.isin(labels, idx)
  n = int(keep.sum())
  if n == 0:
    return float("nan"), 0
  target = np.searchsorted(idx, labels[keep])
  scores = np.asarray(image_features, np.float32)[keep] @ classifier
  return float((evaluator.stable_ranks(scores, target) == 0).mean()), n  # NaN scores rank last


def eval_babel_zeroshot(model: nnx.Module, spec: Mapping[str, Any], tokenizer: Tokenizer, *,
                        mesh: Mesh | None = None, batch_size: int = 256) -> dict[str, float]:
  """Babel-ImageNet-style zero-shot per language over one class-indexed image set.

  spec: `images`, `labels` (class indices into the set's classes, e.g. ImageNet-1k),
  `class_labels` (a Babel label file path or its parsed object), optional `prompts` (a Babel
  prompt file / object; languages without prompts use `templates`, English, default
  "a photo of a {}."), `languages` (subset, default all in the label file), `adapters`
  ({language: zoo.models.lora adapter directory} used for that language's prompts).
  Metrics per language L: `L/top1`, `L/num_classes`, `L/num_images`, `L/translated_prompts`
  (1 = its own prompts, 0 = English fallback), `L/adapter` (1 = scored with its adapter);
  plus `mean_top1` over the scored languages. A tokenizer with source-language tokens (NLLB)
  tokenizes each language's prompts with that language's token, as Babel-ImageNet's and
  CLIP_benchmark's NLLB-CLIP evaluations do (`L/language_token`: 1 = set, 0 = a language the
  map lacks, left at the file's default, e.g. eng_Latn).
  """
  missing = [k for k in ("images", "labels", "class_labels") if k not in spec]
  if missing:
    raise ValueError(f"eval set 'babel_zeroshot' misses keys {missing}; it has {sorted(spec)}")
  by_lang = babel.load_babel_labels(spec["class_labels"])
  prompts = babel.load_babel_prompts(spec["prompts"]) if spec.get("prompts") is not None else {}
  english = list(spec.get("templates") or DEFAULT_TEMPLATES)
  languages = list(spec.get("languages") or by_lang)
  unknown = [lang for lang in languages if lang not in by_lang]
  if unknown:
    raise ValueError(f"babel_zeroshot: languages {unknown} are not in the label file "
                     f"(it has {sorted(by_lang)})")
  adapters = dict(spec.get("adapters") or {})
  labels = np.asarray(spec["labels"]).astype(np.int64)
  feats = evaluator.encode_images(model, spec["images"], batch_size=batch_size, mesh=mesh)
  out: dict[str, float] = {}
  scored = []
  tagged = isinstance(tokenizer, tokenizers.HFTokenizer) and tokenizer.language_token() is not None
  for lang in languages:
    idx, names = by_lang[lang]
    templates = prompts.get(lang, english)
    lang_tokenizer = tokenizer
    if tagged:
      try:
        lang_tokenizer = tokenizer.for_language(lang)
      except ValueError:
        pass
      out[f"{lang}/language_token"] = float(lang_tokenizer is not tokenizer)

    def classifier():
      return evaluator.zero_shot_classifier(model, lang_tokenizer, names, templates,
                                            batch_size=max(batch_size, 1024), mesh=mesh)

    if lang in adapters:
      with adapters.with_adapter(model, adapters[lang]):
        weights = classifier()
    else:
      weights = classifier()
    top1, n = babel_zeroshot_language(feats, labels, idx, weights)
    out.update({f"{lang}/num_classes": float(len(idx)), f"{lang}/num_images": float(n),
                f"{lang}/translated_prompts": float(lang in prompts),
                f"{lang}/adapter": float(lang in adapters)})
    if n:
      out[f"{lang}/top1"] = top1
      scored.append(top1)
  if scored:
    out["mean_top1"] = float(np.mean(scored))
  return out


def tokenizer_for(model_config: Any, context_length: int | None = None,
                  directory: str | None = None):
  """The XLM-R tokenizer of a MultilingualCLIPConfig (its `.model`, or the copy in a
  zoo.save `directory`)."""
  path = model_config.tokenizer
  if directory and os.path.isfile(os.path.join(directory, model_dir.TOKENIZER_FILE)):
    path = os.path.join(directory, model_dir.TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the multilingual model's sentencepiece file {path!r} does not exist")
  return tokenizers.XLMRobertaTokenizer(path, context_length or model_config.text.context_length)


def demo_corpus(scenes: int = 3000) -> list[str]:
  """Demo captions and prompts in every demo language (the demo tokenizer's training text)."""
  texts = []
  for lang in demo.LANGUAGES:
    names = demo.class_names(lang)
    texts += [t.format(n) for t in demo.templates(lang) for n in names] + names
  for i in range(scenes):
    scene = demo.sample_scene(0, i)
    texts += list(demo.captions_ml(scene, i).values())
  return texts


def train_sentencepiece(texts: Sequence[str], model_path: str, vocab_size: int) -> str:
  """Trains a unigram sentencepiece model on `texts` (character coverage 1.0, no special
  pieces beyond unk/bos/eos) and writes `model_path`; returns it."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2,
      hard_vocab_limit=False)
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  with open(model_path, "wb") as f:
    f.write(model.getvalue())
  return model_path


def build_demo_tokenizer(model_path: str = DEMO_TOKENIZER, vocab_size: int = 1000) -> str:
  """(Re)builds the shipped demo vocabulary from `demo_corpus()` (the small corpus caps it
  below `vocab_size`: 345 pieces)."""
  return train_sentencepiece(demo_corpus(), model_path, vocab_size)


class MultilingualFamily(base.Family):
  """Teacher-student text distillation on the train loop."""

  name = "multilingual"
  fields = FIELDS
  eval_kinds = {"babel_zeroshot": eval_babel_zeroshot}

  def settings(self, config: ml_collections.ConfigDict) -> Settings:
    return base.parse_section(config, "multilingual", Settings)

  def build_model(self, config: ml_collections.ConfigDict, settings: Settings
                  ) -> MultilingualCLIP:
    """Student over the teacher's image tower: text architecture `config.model` (see
    `list_text_models()`, + `model_overrides`), tokenizer `multilingual.tokenizer`, teacher text
    tower from `multilingual.teacher` kept as `teacher_text`; then `config.init_from` (a
    MultilingualCLIP save, e.g. a distilled student) where names match."""
    ms = settings
    if not ms.teacher:
      raise ValueError("config.multilingual.teacher is empty: set it to the zoo.save directory "
                       "of the English CLIP to distill from")
    teacher, _, _ = model_dir.load(ms.teacher)
    if not isinstance(teacher, clip_lib.CLIP) or isinstance(teacher, MultilingualCLIP):
      raise ValueError(f"multilingual.teacher {ms.teacher} holds a {type(teacher).__name__}; "
                       "expected an English zoo CLIP")
    overrides = base.model_overrides(config)
    text = text_config(config.model, **overrides)
    tok = ms.tokenizer_path
    if not os.path.isfile(tok):
      raise FileNotFoundError(f"multilingual.tokenizer {tok!r} does not exist")
    vocab = tokenizers.XLMRobertaTokenizer(tok).vocab_size
    if vocab > text.vocab_size:
      raise ValueError(f"tokenizer {tok} has {vocab} ids but text model {config.model!r} embeds "
                       f"{text.vocab_size}; set model_overrides.vocab_size={vocab}")
    model = from_clip(teacher, text, tokenizer=tok, seed=config.seed,
                      dtype=base.resolve_dtype(config.dtype), keep_teacher=True)
    base.init_params_from(config, model)
    return model

  def field_hook(self, config: ml_collections.ConfigDict, settings: Settings,
                 model: nnx.Module) -> MultilingualFields:
    length = int(config.get("context_length", 0) or model.config.text.context_length)
    own = model_dir.load_config(settings.teacher)[0].text.context_length
    teacher = model_dir.load_tokenizer(settings.teacher, context_length=min(length, own))
    return MultilingualFields(languages(config.data), {"ml_en_tokens": teacher})

  def forward(self, model: MultilingualCLIP, batch: dict, rng: Array, settings: Settings) -> dict:
    """Student embedding of the translated caption, teacher embedding of the English one."""
    del rng, settings
    if getattr(model, "teacher_text", None) is None:
      raise ValueError("the multilingual family needs a model with a teacher_text tower "
                       "(built from config.multilingual.teacher)")
    missing = [k for k in ("ml_tokens", "ml_en_tokens") if k not in batch]
    if missing:
      raise ValueError(f"multilingual batch lacks {missing}; it has {sorted(batch)}")
    student = model.text(batch["ml_tokens"]).astype(jnp.float32)
    teacher = jax.lax.stop_gradient(model.teacher_text(batch["ml_en_tokens"]).astype(jnp.float32))
    return {"student": student, "teacher": teacher}

  def loss(self, outputs: dict, batch: dict, ctx: base.LossContext) -> tuple[Array, dict]:
    """`mse_weight` * MSE(student, teacher) + `contrastive_weight` * InfoNCE over the batch."""
    ms = ctx.settings
    s, t = outputs["student"], outputs["teacher"]
    mse = jnp.mean(jnp.square(s - t))
    sn, tn = clip_lib.l2_normalize(s), clip_lib.l2_normalize(t)
    metrics = {"mse": mse, "cosine": jnp.mean(jnp.sum(sn * tn, axis=-1))}
    loss = ms.mse_weight * mse
    if ms.contrastive_weight:
      nce = losses.contrastive_loss(sn, tn, jnp.asarray(ms.contrastive_scale, jnp.float32),
                                    kind="softmax", impl=ctx.impl, mesh=ctx.mesh)
      metrics["contrastive"] = nce
      loss = loss + ms.contrastive_weight * nce
    return loss, metrics

  def trainable(self, settings: Settings) -> Callable[[tuple[str, ...]], bool]:
    """Only the student text tower (or its projection) trains; never the teacher or images."""
    projection_only = settings.train == "text_projection"

    def trainable(path: tuple[str, ...]) -> bool:
      if not path or path[0] != "text":
        return False
      return not projection_only or (len(path) > 1 and path[1] == "proj")

    return trainable

  def export(self, model: nnx.Module) -> nnx.Module:
    return student_only(model)


FAMILY = MultilingualFamily()


def default_settings() -> ml_collections.ConfigDict:
  """`config.multilingual` with the defaults (configs.base.multilingual() returns it)."""
  return ml_collections.ConfigDict(dataclasses.asdict(Settings()))
