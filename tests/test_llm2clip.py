"""The llm2clip family: the demo config through train.py (LLM frozen, adapter + image tower
train), the LLM embedding cache (python -m zoo.data.embed_cache --text_model) equal to the
online tower, ProCLIP stage 1 -> stage 2 with LoRA (teachers frozen, dropped at export), and
long captions through the pipeline with truncations logged."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import zoo
from configs import base, llm2clip_demo
from tests.cli_run import run
from tests.train_utils import tiny_config
from zoo import families, tokenizers
from zoo.data import demo, pipeline, webdataset as wds
from zoo.families import llm2clip as family_lib
from zoo.models import llm2clip
from zoo.train import loop

DEMO_FLAGS = ("--config.total_steps=3", "--config.warmup_steps=1", "--config.batch_size=8",
              "--config.context_length=64", "--config.llm2clip.long_captions=False",
              "--config.data.size=64",
              "--config.eval_every=0", "--config.checkpoint_every=3", "--config.log_every=1")


def _params(model):
  return {"/".join(map(str, k)): np.asarray(v[...])
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  work = tmp_path_factory.mktemp("demo") / "run"
  proc = run("train.py", "--config", "configs/llm2clip_demo.py", "--workdir", str(work),
             *DEMO_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(work)


def test_demo_config_trains_through_the_cli(demo_run):
  model, tok, _ = zoo.load(os.path.join(demo_run, "model"))
  assert isinstance(model, llm2clip.LLM2CLIP) and model.visual_teacher is None
  assert tok.context_length == 64 and model.config.text.context_length == 64
  assert model.config.adapter_blocks == 4 and not model.config.text.causal
  c = llm2clip_demo.get_config()
  c.context_length = 64
  fresh = family_lib.FAMILY.build_model(c, family_lib.FAMILY.settings(c))
  before, after = _params(fresh), _params(model)
  assert set(before) == set(after)
  frozen = [k for k in before if k.startswith("text/")]
  assert frozen and all(np.array_equal(before[k], after[k]) for k in frozen)  # LLM frozen
  for part in ("adapter/", "visual/"):
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith(part))
  emb = model.encode_text(jnp.asarray(tok(["a red circle", "a blue square on the left"])),
                          normalize=True)
  assert emb.shape == (2, model.config.embed_dim) and np.all(np.isfinite(np.asarray(emb)))


def test_text_cache_cli_equals_the_online_tower(demo_run, tmp_path):
  samples = []
  for i in range(5):
    s = demo.make_sample(demo.SPLIT_SEEDS["test"], i, 32)
    samples.append(dict(s, captions=[s["caption"], s["short_caption"]]))
  raw = wds.write_shards(samples, str(tmp_path / "raw"), samples_per_shard=5)
  model_path = os.path.join(demo_run, "model")
  proc = run("-m", "zoo.data.embed_cache", "--text_model", model_path, "--shards", raw[0],
             "--out", str(tmp_path / "cached"), "--batch_size", "4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  model, tok, _ = zoo.load(model_path)
  src = wds.TarShardSource(sorted(str(p) for p in (tmp_path / "cached").glob("*.tar")))
  s = wds.decode_sample(src[3])
  assert set(s["arrays"]) == {"llm_text"}
  want = model.llm_features(jnp.asarray(tok(s["captions"])))
  np.testing.assert_allclose(s["arrays"]["llm_text"], np.asarray(want), atol=1e-5)
  # the family reads the cached row of the drawn caption; adapter output = the online path
  settings = family_lib.Settings(text_cache=True)
  hook = family_lib.LLMFields(False, None, model.config.text.width)
  view = pipeline.SampleView(rng=np.random.default_rng(0), crop=None, image_hw=(32, 32),
                             hflip=False, fields=("llm_text",), tokenizer=tok,
                             context_length=64, caption_index=1)
  row = hook(s, view)["llm_text"]
  batch = {"llm_text": jnp.asarray(row[None]), "image": jnp.zeros((1, 32, 32, 3))}
  out = family_lib.FAMILY.forward(model, batch, jax.random.key(0), settings)
  online = model.encode_text(jnp.asarray(tok([s["captions"][1]])), normalize=True)
  np.testing.assert_allclose(np.asarray(out["text_features"]), np.asarray(online), atol=1e-5)


def _proclip(stage, teacher_dir, init_from=""):
  c = tiny_config(total_steps=3, context_length=16, dtype="float32")
  c.family, c.init_from = "llm2clip", init_from
  c.loss.impl = "xla"
  c.llm2clip = base.llm2clip()
  c.llm2clip = ml_collections.ConfigDict(dict(
      c.llm2clip.to_dict(), stage=stage, teacher=teacher_dir, long_captions=False,
      adapter_blocks=1, adapter_expansion=8.0, lora_rank=2 if stage == "distill_text" else 0))
  return c


def test_proclip_stage1_then_stage2(tmp_path):
  teacher = zoo.create("test-tiny", seed=3)
  teacher_dir = str(zoo.save(teacher, tmp_path / "teacher"))
  c1 = _proclip("distill_text", teacher_dir, init_from=teacher_dir)
  fam, s1 = family_lib.FAMILY, family_lib.FAMILY.settings(_proclip("distill_text", teacher_dir))
  model = fam.build_model(c1, s1)
  # the loss terms by hand on one text batch
  tok = tokenizers.ClipTokenizer(16)
  texts = [demo.make_sample(1, i)["caption"] for i in range(4)]
  batch = {"llm_tokens": jnp.asarray(tok(texts)), "teacher_tokens": jnp.asarray(tok(texts))}
  out = fam.forward(model, batch, jax.random.key(0), s1)
  total, m = fam.loss(out, batch, families.LossContext(s1, None, "reference"))
  st = np.asarray(model.encode_text(batch["llm_tokens"], normalize=True))
  tt = np.asarray(teacher.encode_text(batch["teacher_tokens"], normalize=True))
  np.testing.assert_allclose(float(m["instance"]), np.mean(1 - np.sum(st * tt, 1)), rtol=1e-5)
  np.testing.assert_allclose(float(m["structure"]), np.mean((st @ st.T - tt @ tt.T) ** 2),
                             rtol=1e-4)
  np.testing.assert_allclose(float(total), float(m["instance"]) + float(m["structure"]),
                             rtol=1e-6)
  first = loop.train(c1, str(tmp_path / "s1"))
  trained = first["trainer"].model()
  before, after = _params(model), _params(trained)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed
  assert not [k for k in changed if not (k.startswith("adapter/") or "kernel_lora" in k)]
  assert any("kernel_lora" in k for k in changed)  # LoRA on the LLM trains, its base does not
  exported, _, _ = zoo.load(os.path.join(tmp_path, "s1", "model"))
  assert exported.text_teacher is None and exported.visual_teacher is None
  # stage 2 from the stage-1 model: a frozen copy of the image tower (own buffers: the train
  # step donates the state) regularizes it; the loss = contrastive + self-distillation
  c2 = _proclip("self_distill", "", init_from=os.path.join(tmp_path, "s1", "model"))
  s2 = fam.settings(c2)
  m2 = fam.build_model(c2, s2)
  init = _params(exported)
  for (k, v), (_, t) in zip(nnx.to_flat_state(nnx.state(m2.visual, nnx.Param)),
                            nnx.to_flat_state(nnx.state(m2.visual_teacher, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(t[...]), init["visual/" + "/".join(map(str, k))])
    assert v[...].unsafe_buffer_pointer() != t[...].unsafe_buffer_pointer()
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  out = fam.forward(m2, {"image": images, "llm_tokens": batch["llm_tokens"]},
                    jax.random.key(0), s2)
  total, m = fam.loss(out, {}, families.LossContext(s2, None, "reference"))
  assert float(m["self_distill"]) < 1e-6  # the image tower starts at its frozen copy
  np.testing.assert_allclose(float(total), float(m["contrastive"]) + float(m["self_distill"]),
                             rtol=1e-6)
  train = fam.trainable(s2)
  assert train(("visual", "ln_post", "scale")) and train(("adapter", "proj", "kernel"))
  assert not train(("visual_teacher", "ln_post", "scale")) and not train(("text", "norm"))


def test_long_captions_through_the_pipeline_truncated_and_counted(caplog):
  tok = tokenizers.ClipTokenizer(512)
  hook = family_lib.LLMFields(True, None, 64)
  proc = pipeline.SampleProcessor(fields=("image", "llm_tokens"), tokenizer=tok, image_size=32,
                                  mean=(0.5,) * 3, std=(0.5,) * 3, context_length=512,
                                  hooks=(hook,))
  s = demo.make_sample(1, 0, 32)
  with caplog.at_level(logging.WARNING, "zoo.families"):
    out = proc(s, np.random.default_rng(0))
    n = len(tok.encode(s["long_caption"])) + 2
    assert 150 < n < 512 and out["llm_tokens"].shape == (512,)
    assert (out["llm_tokens"] != 0).sum() == n and not caplog.records
    out = proc(dict(s, long_caption=s["long_caption"] * 4), np.random.default_rng(0))
  assert out["llm_tokens"][-1] == tok.eot_token_id and (out["llm_tokens"] != 0).all()
  assert hook.truncations.count == 1
  assert "1 caption(s) so far longer than the 512-token context were truncated" in caplog.text
  with pytest.raises(ValueError, match="llm2clip.stage='x'"):
    family_lib.Settings(stage="x")
