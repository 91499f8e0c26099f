"""LLM2CLIP's caption-contrastive stage (configs/llm2clip_cc_demo.py): text only, the LLM learns
to embed captions (two captions of a sample are positives, in-batch negatives); only the LLM
trains; its output loads as the frozen LLM of the CLIP stage (llm2clip.text_init). The demo's
`detail_caption`, the positive fallbacks and the loss against torch."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from configs import llm2clip_cc_demo, llm2clip_demo
from zoo import families, tokenizers
from zoo.data import demo, pipeline, webdataset as wds
from zoo.families import llm2clip as family_lib
from zoo.models import llm, llm2clip as llm2clip_lib
from zoo.train import loop

torch = pytest.importorskip("torch")

FAM = family_lib.FAMILY


def _params(model, prefix=""):
  return {k: v for k, v in (("/".join(map(str, key)), np.asarray(var[...])) for key, var in
                            nnx.to_flat_state(nnx.state(model, nnx.Param)))
          if k.startswith(prefix)}


def _small(c):
  c.context_length, c.batch_size, c.total_steps, c.warmup_steps = 16, 8, 1, 1
  c.checkpoint_every, c.log_every, c.data.size, c.dtype = 1, 1, 16, "float32"
  c.loss.impl = "xla"
  c.llm2clip.long_captions = False  # the drawn caption is the anchor here (short rows)
  return c


def test_detail_caption_restates_the_long_captions_details():
  for i in range(20):
    s = demo.make_sample(0, i)
    scene = demo.sample_scene(0, i)
    detail, long = s["detail_caption"], s["long_caption"]
    assert detail.startswith("On a") and f" {scene.background} background: " in detail
    for obj in scene.objects:
      pos = demo.position_word(obj)
      assert f"{obj.name} in the {pos}" in detail or f"{obj.name} in the center" in detail
      assert obj.name in long and pos in long
    assert "synthetic" in long and "synthetic" not in detail  # no generic preamble


def test_caption_contrastive_loss_equals_torch():
  rng = np.random.default_rng(0)
  a, p = (rng.normal(size=(6, 16)).astype(np.float32) for _ in range(2))
  a, p = a / np.linalg.norm(a, axis=1, keepdims=True), p / np.linalg.norm(p, axis=1, keepdims=True)
  loss, acc = family_lib.caption_contrastive_loss(jnp.asarray(a), jnp.asarray(p), 0.05)
  logits = torch.from_numpy(a) @ torch.from_numpy(p).T / 0.05
  labels = torch.arange(6)
  ref = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
               + torch.nn.functional.cross_entropy(logits.T, labels))
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  assert float(acc) == float((logits.argmax(1) == labels).float().mean())


def test_positive_field_then_other_caption_else_skipped():
  tok = tokenizers.ClipTokenizer(32)
  hook = family_lib.LLMFields(False, None, 64, positive="detail_caption")
  proc = pipeline.SampleProcessor(fields=("llm_tokens", "llm_positive"), tokenizer=tok,
                                  image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                                  context_length=32, hooks=(hook,))
  s = demo.make_sample(0, 1, 32)
  out = proc(s, np.random.default_rng(0))
  np.testing.assert_array_equal(out["llm_tokens"], tok([s["caption"]])[0])
  np.testing.assert_array_equal(out["llm_positive"], tok([s["detail_caption"]])[0])
  two = {"key": "k", "image": s["image"], "captions": ["a cat on a mat.", "a mat under a cat."]}
  out = proc(two, np.random.default_rng(0))
  texts = {tuple(tok([t])[0]) for t in two["captions"]}
  assert {tuple(out["llm_tokens"]), tuple(out["llm_positive"])} == texts  # the other caption
  with pytest.raises(wds.SkipSample, match="no 'detail_caption' field and no second caption"):
    proc({"key": "k", "image": s["image"], "caption": "alone."}, np.random.default_rng(0))


def test_cc_stage_trains_the_llm_only_then_loads_frozen(tmp_path):
  c = _small(llm2clip_cc_demo.get_config())
  settings = FAM.settings(c)
  assert FAM.batch_fields(settings) == ("llm_tokens", "llm_positive")
  fresh = FAM.build_model(c, settings)
  summary = loop.train(c, str(tmp_path / "cc"))
  trained = summary["trainer"].model()
  before, after = _params(fresh), _params(trained)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(k.startswith("text/") for k in changed)  # full fine-tuning, LLM only
  assert any("layers" in k for k in changed) and "accuracy" in summary["metrics"]
  lora_pred = FAM.trainable(family_lib.Settings(stage="caption_contrastive", lora_rank=4))
  assert lora_pred(("text", "layers", 0, "self_attn", "q_proj", "kernel_lora", "a"))
  assert not lora_pred(("text", "layers", 0, "self_attn", "q_proj", "kernel"))

  # the CLIP stage: the tuned LLM loads (text_init), frozen; image tower + adapter fresh
  cc_dir = os.path.join(tmp_path, "cc", "model")
  c2 = _small(llm2clip_demo.get_config())
  c2.llm2clip.text_init = cc_dir
  s2 = FAM.settings(c2)
  model = FAM.build_model(c2, s2)
  tuned = _params(trained, "text/")
  loaded = _params(model, "text/")
  assert set(loaded) == set(tuned)
  assert all(np.array_equal(loaded[k], tuned[k]) for k in tuned)
  assert model.config.text.context_length == 16 and not model.config.text.causal
  pred = FAM.trainable(s2)
  assert not pred(("text", "norm", "scale")) and pred(("adapter", "proj", "kernel"))


def test_proclip_noised_caption_term_equals_torch():
  """ProCLIP stage 1 (training/train.py): MSE-sum of the caption and of its noised copy against
  the teacher's, smooth-L1-sum of pdist on the caption only."""
  s = family_lib.Settings(stage="distill_text", teacher="unused", loss_form="released",
                          noised_caption="short_caption", long_captions=False)
  assert FAM.batch_fields(s) == ("llm_tokens", "teacher_tokens", "llm_noised", "teacher_noised")
  clip = zoo.create("test-tiny", seed=3)  # its text tower is the teacher
  model = llm2clip_lib.from_clip(clip, llm.text_config("llm-tiny", causal=False,
                                                       context_length=24))
  model.text_teacher = clip.text
  tok = tokenizers.ClipTokenizer(24)
  hook = family_lib.LLMFields(False, tokenizers.ClipTokenizer(16), 64, noised="short_caption")
  proc = pipeline.SampleProcessor(fields=FAM.batch_fields(s), tokenizer=tok, image_size=32,
                                  mean=(0.5,) * 3, std=(0.5,) * 3, context_length=24,
                                  hooks=(hook,))
  rows = [proc(demo.make_sample(1, i, 32), np.random.default_rng(i)) for i in range(3)]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in FAM.batch_fields(s)}
  np.testing.assert_array_equal(batch["teacher_noised"][0],
                                tokenizers.ClipTokenizer(16)([demo.make_sample(1, 0)[
                                    "short_caption"]])[0])
  out = nnx.jit(lambda mdl, b: FAM.forward(mdl, b, None, s))(model, batch)  # cheaper than eager
  total, m = FAM.loss(out, batch, families.LossContext(s, None, "reference"))
  t = {k: torch.from_numpy(np.asarray(out[k])) for k in
       ("text_features", "teacher_text", "text_noised", "teacher_noised")}
  F = torch.nn.functional
  ref = (F.mse_loss(t["text_features"], t["teacher_text"], reduction="sum")
         + F.mse_loss(t["text_noised"], t["teacher_noised"], reduction="sum")
         + F.smooth_l1_loss(F.pdist(t["text_features"]), F.pdist(t["teacher_text"]),
                            reduction="sum"))
  np.testing.assert_allclose(float(total), float(ref), rtol=1e-5)
  assert float(m["noised_instance"]) > 0
  with pytest.raises(ValueError, match="noised_caption is a distill_text term"):
    family_lib.Settings(noised_caption="short_caption")
