"""The distill family: losses vs numpy, frozen teacher, student-only export, config sections."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import zoo
from configs import base
from tests.cli_run import run
from tests.train_utils import tiny_config
from zoo import families
from zoo.data import demo, webdataset as wds
from zoo.families import distill
from zoo.models import clip as clip_lib
from zoo.train import loop, trainer as trainer_lib
from zoo.weights import model_dir


def _normed(rng, b, e):
  x = rng.normal(size=(b, e)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_log_softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_logit_kl(si, st, ss, ti, tt, ts):
  """open_clip DistillClipLoss written as KL: mean over rows, both directions, / 2."""
  def kl(ls, lt):
    lps, lpt = np_log_softmax(ls.astype(np.float64)), np_log_softmax(lt.astype(np.float64))
    return (np.exp(lpt) * (lpt - lps)).sum(axis=1).mean()
  return 0.5 * (kl(ss * si @ st.T, ts * ti @ tt.T) + kl(ss * st @ si.T, ts * tt @ ti.T))


@pytest.mark.parametrize("impl,block", [("reference", 256), ("xla", 8), ("xla", 12),
                                        ("xla", 256)])
def test_logit_distillation_matches_numpy_values_and_gradients(impl, block):
  rng = np.random.default_rng(0)
  b = 24
  si, st, ti, tt = _normed(rng, b, 16), _normed(rng, b, 16), _normed(rng, b, 32), _normed(rng, b, 32)
  got = distill.logit_distillation(si, st, 7.0, ti, tt, 20.0, impl=impl, block_size=block)
  np.testing.assert_allclose(float(got), np_logit_kl(si, st, 7.0, ti, tt, 20.0), rtol=1e-5)
  # KL of a distribution with itself is 0; gradients: blockwise == materialized.
  same = distill.logit_distillation(ti, tt, 20.0, ti, tt, 20.0, impl=impl, block_size=block)
  assert abs(float(same)) < 1e-5
  f = lambda a, c, s, kind: distill.logit_distillation(a, c, s, ti, tt, 20.0, impl=kind,
                                                       block_size=block)
  g_ref = jax.grad(f, argnums=(0, 1, 2))(si, st, 7.0, "reference")
  g = jax.grad(f, argnums=(0, 1, 2))(si, st, 7.0, impl)
  for a, r in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)
  # Finite differences on the scale (the loss is smooth in it).
  h = 1e-2
  fd = (float(f(si, st, 7.0 + h, "reference")) - float(f(si, st, 7.0 - h, "reference"))) / (2 * h)
  np.testing.assert_allclose(float(g_ref[2]), fd, rtol=1e-2)


def test_blockwise_logit_distillation_never_builds_b_by_b():
  b, block = 64, 16
  x = jnp.ones((b, 8), jnp.float32) / np.sqrt(8)
  f = lambda a: distill.logit_distillation(a, x, 5.0, x, x, 5.0, impl="xla", block_size=block)
  hlo = jax.jit(jax.grad(f)).lower(x).as_text()
  assert f"{b}x{b}x" not in hlo and f"[{b},{b}]" not in hlo.replace(" ", "")


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_feature_loss_matches_numpy(kind):
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(10, 32)).astype(np.float32), rng.normal(size=(10, 32)).astype(np.float32)
  sn = s / np.linalg.norm(s, axis=1, keepdims=True)
  tn = t / np.linalg.norm(t, axis=1, keepdims=True)
  want = (1 - (sn * tn).sum(1)).mean() if kind == "cosine" else ((sn - tn) ** 2).mean()
  np.testing.assert_allclose(float(distill.feature_loss(s, t, kind)), want, rtol=1e-5)


def test_settings_refuse_bad_values():
  with pytest.raises(ValueError, match="feature_loss"):
    distill.Settings(feature_loss="l1")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("teacher") / "model")
  return model_dir.save(clip_lib.create("test-tiny", seed=3), path)


def distill_config(teacher: str, **overrides):
  c = tiny_config(family="distill", total_steps=3, batch_size=8, **overrides)
  c.data.size = 64
  # Student: half the width, one layer per tower, a 16-d embedding (heads map 16 -> 32).
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=16, vision=dict(width=32, layers=1), text=dict(width=32, layers=1)))
  c.distill = base.distill()
  c.distill.teacher = teacher
  c.distill.block_size = 4
  return c


def test_distill_trains_teacher_frozen_and_exports_student_alone(tmp_path, teacher_dir):
  config = distill_config(teacher_dir)
  config.loss.impl = "xla"
  trainer = trainer_lib.build_trainer(config)
  model0 = trainer.model()
  assert model0.image_head is not None and model0.image_head.shape == (16, 32)
  teacher_before = jax.device_get(nnx.to_flat_state(nnx.state(model0.teacher, nnx.Param)))
  student_before = jax.device_get(nnx.to_flat_state(nnx.state(model0.student, nnx.Param)))
  summary = loop.train(config, str(tmp_path / "run"))
  assert summary["step"] == 3 and np.all(np.isfinite(summary["losses"]))
  m = summary["metrics"]
  for k in ("image_feature", "text_feature", "logit_kl", "contrastive"):
    assert m[k] > 0, (k, m)
  assert m["loss"] == pytest.approx(m["image_feature"] + m["text_feature"] + m["logit_kl"]
                                    + m["contrastive"], rel=1e-5)
  model = summary["trainer"].model()
  after = dict(nnx.to_flat_state(nnx.state(model.teacher, nnx.Param)))
  for k, v in teacher_before:
    np.testing.assert_array_equal(np.asarray(after[k][...]), np.asarray(v[...]), err_msg=str(k))
  s_after = dict(nnx.to_flat_state(nnx.state(model.student, nnx.Param)))
  assert any(not np.array_equal(np.asarray(s_after[k][...]), np.asarray(v[...]))
             for k, v in student_before)
  # The export is the student alone: a plain CLIP with the student's weights, no teacher.
  exported = os.path.join(tmp_path, "run", "model")
  loaded = zoo.load(exported)
  loaded = loaded[0] if isinstance(loaded, tuple) else loaded
  assert type(loaded) is clip_lib.CLIP and loaded.config.embed_dim == 16
  flat = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  assert set(flat) == set(s_after)
  for k in flat:
    np.testing.assert_array_equal(np.asarray(flat[k][...]), np.asarray(s_after[k][...]))
  assert not any("teacher" in k or "head" in k for k in ("/".join(map(str, p)) for p in flat))


def test_distill_loss_matches_terms_computed_by_hand(teacher_dir):
  config = distill_config(teacher_dir)
  config.distill.feature_loss = "mse"
  config.distill.image_feature_weight, config.distill.logit_weight = 0.5, 2.0
  family = distill.FAMILY
  settings = family.settings(config)
  model = family.build_model(config, settings)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
           "tokens": jnp.asarray(np.tile(np.r_[49406, 5, 6, 49407, np.zeros(12)], (8, 1))
                                 + np.eye(8, 16, 1) * np.arange(8)[:, None], jnp.int32)}
  out = family.forward(model, batch, jax.random.key(0), settings)
  total, m = family.loss(out, batch, families.LossContext(settings, None, "reference"))
  t = model.teacher(batch["image"], batch["tokens"])
  si = np.asarray(model.student.encode_image(batch["image"])) @ np.asarray(model.image_head[...])
  sn = si / np.linalg.norm(si, axis=1, keepdims=True)
  np.testing.assert_allclose(float(m["image_feature"]),
                             ((sn - np.asarray(t["image_features"])) ** 2).mean(), rtol=1e-5)
  want_kl = np_logit_kl(np.asarray(out["image_features"]), np.asarray(out["text_features"]),
                        float(out["logit_scale"]), np.asarray(t["image_features"]),
                        np.asarray(t["text_features"]), float(t["logit_scale"]))
  np.testing.assert_allclose(float(m["logit_kl"]), want_kl, rtol=1e-4)
  np.testing.assert_allclose(float(total), 0.5 * float(m["image_feature"]) + float(m["text_feature"])
                             + 2.0 * float(m["logit_kl"]) + float(m["contrastive"]), rtol=1e-5)


# ----------------------------------------------------------------------------- teacher cache


@pytest.fixture(scope="module")
def cached_shards(tmp_path_factory, teacher_dir):
  """Demo samples with two captions each, and the same shards with the teacher's embeddings
  written by `python -m zoo.data.embed_cache` (the CLI, in a subprocess)."""
  root = tmp_path_factory.mktemp("cache")
  samples = []
  for i in range(24):
    s = demo.make_sample(demo.SPLIT_SEEDS["test"], i, 32)
    samples.append(dict(s, captions=[s["caption"], s["short_caption"]]))
  paths = wds.write_shards(samples, str(root / "raw"), samples_per_shard=10)
  proc = run("-m", "zoo.data.embed_cache", "--model", teacher_dir, "--shards",
             str(root / "raw" / "*.tar"), "--out", str(root / "cached"), "--batch_size", "16",
             "--context_length", "16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "24 samples in 3 shards" in proc.stdout
  return paths, sorted(str(p) for p in (root / "cached").glob("*.tar"))


def test_embed_cache_holds_the_teachers_embeddings(cached_shards, teacher_dir):
  raw_paths, cached = cached_shards
  assert [os.path.basename(p) for p in cached] == [os.path.basename(p) for p in raw_paths]
  teacher, _, preprocess = zoo.load(teacher_dir)
  tok = model_dir.load_tokenizer(teacher_dir, context_length=16)
  src = wds.TarShardSource(cached)
  raw_src = wds.TarShardSource(raw_paths)
  assert len(src) == 24
  for i in (0, 13, 23):
    raw = src[i]
    assert all(raw[k] == v for k, v in raw_src[i].items() if k != "__shard__")  # copied as is
    s = wds.decode_sample(raw)
    img = teacher.encode_image(jnp.asarray(preprocess(s["image"])[None]), normalize=True)
    txt = teacher.encode_text(jnp.asarray(tok(s["captions"])), normalize=True)
    np.testing.assert_allclose(s["arrays"]["teacher_image"], np.asarray(img)[0], atol=1e-5)
    np.testing.assert_allclose(s["arrays"]["teacher_text"], np.asarray(txt), atol=1e-5)
    assert s["arrays"]["teacher_text"].shape == (2, 32)
    np.testing.assert_allclose(s["arrays"]["teacher_scale"],
                               np.exp(np.asarray(teacher.logit_scale[...])), rtol=1e-6)


def test_embed_cache_bad_model_is_a_one_line_error(tmp_path, cached_shards):
  proc = run("-m", "zoo.data.embed_cache", "--model", str(tmp_path / "nope"), "--shards",
             cached_shards[0][0], "--out", str(tmp_path / "out"))
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert "nope" in proc.stderr


def test_teacher_cache_trains_like_the_online_teacher(tmp_path, cached_shards, teacher_dir):
  """Cached embeddings (eval preprocess) == the teacher run on the batch when the train crop is
  the whole image: same losses step by step; the teacher is not in the cached model."""
  _, cached = cached_shards
  runs = {}
  for mode in ("online", "cache"):
    c = distill_config(teacher_dir)
    c.context_length = 16
    c.data.name, c.data.shards = "webdataset", ",".join(cached)
    c.data.random_resized_crop_scale, c.data.random_resized_crop_ratio = (1.0, 1.0), (1.0, 1.0)
    c.distill.teacher_cache = mode == "cache"
    runs[mode] = loop.train(c, str(tmp_path / mode))
  np.testing.assert_allclose(runs["cache"]["losses"], runs["online"]["losses"], rtol=1e-5)
  for k in ("image_feature", "text_feature", "logit_kl"):
    assert runs["cache"]["metrics"][k] == pytest.approx(runs["online"]["metrics"][k], rel=1e-4)
  assert runs["cache"]["trainer"].model().teacher is None
  # Shards without the embeddings: every sample is skipped, named in the error.
  c = distill_config(teacher_dir)
  c.total_steps = 1
  c.data.name, c.data.shards = "webdataset", cached_shards[0][0]
  c.distill.teacher_cache = True
  with pytest.raises(RuntimeError, match="missing_teacher_features"):
    loop.train(c, str(tmp_path / "raw"))


def test_two_stage_recipe_configs_run_feature_then_contrastive(tmp_path, cached_shards,
                                                                teacher_dir):
  """configs/dcclip_b16_to_s16_stage{1,2}.py at test size: stage 1 trains on the features
  alone from the cache; stage 2 (a plain CLIP run) starts from the exported stage-1 student."""
  from configs import dcclip_b16_to_s16_stage1 as stage1, dcclip_b16_to_s16_stage2 as stage2

  def shrink(c, workdir_name):
    tiny = distill_config(teacher_dir)
    for key in ("model", "model_overrides", "batch_size", "total_steps", "warmup_steps",
                "checkpoint_every", "eval_every", "log_every"):
      c[key] = tiny[key]
    c.dtype, c.context_length, c.loss.impl = "float32", 16, "xla"
    c.data.shards = ",".join(cached_shards[1])
    return c, str(tmp_path / workdir_name)

  c1, w1 = shrink(stage1.get_config(), "stage1")
  c1.distill.teacher = teacher_dir
  first = loop.train(c1, w1)
  assert set(first["metrics"]) >= {"image_feature", "text_feature"}
  assert not {"logit_kl", "contrastive"} & set(first["metrics"])
  assert first["losses"][-1] < first["losses"][0]
  c2, w2 = shrink(stage2.get_config(), "stage2")
  assert c2.family == "clip" and c2.init_from
  c2.init_from = os.path.join(w1, "model")
  trainer = trainer_lib.build_trainer(c2)
  start = dict(nnx.to_flat_state(nnx.state(trainer.model(), nnx.Param)))
  exported = dict(nnx.to_flat_state(nnx.state(zoo.load(c2.init_from)[0], nnx.Param)))
  assert set(start) == set(exported)
  for k in start:
    np.testing.assert_array_equal(np.asarray(start[k][...]), np.asarray(exported[k][...]))
  second = loop.train(c2, w2)
  assert second["step"] == 3 and np.all(np.isfinite(second["losses"]))


def test_missing_teacher_is_a_one_line_error():
  config = distill_config("")
  with pytest.raises(ValueError, match="config.distill.teacher is empty"):
    trainer_lib.build_trainer(config)


# ----------------------------------------------------------------------------- label smoothing


def np_smoothed_clip_loss(x, y, scale, eps):
  b = x.shape[0]
  target = np.full((b, b), eps / (b - 1)) + np.eye(b) * (1 - eps - eps / (b - 1))
  z = scale * x.astype(np.float64) @ y.T
  return 0.5 * (-(target * np_log_softmax(z)).sum(1).mean()
                - (target * np_log_softmax(z.T)).sum(1).mean())


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_clip_family_label_smoothing_matches_numpy(impl):
  from zoo.families import clip as clip_family

  rng = np.random.default_rng(2)
  x, y = _normed(rng, 12, 16), _normed(rng, 12, 16)
  config = base.base_config()
  config.loss.label_smoothing = 0.2
  fam = clip_family.FAMILY
  settings = fam.settings(config)
  out = {"image_features": jnp.asarray(x), "text_features": jnp.asarray(y),
         "logit_scale": jnp.float32(10.0)}
  loss, m = fam.loss(out, {}, families.LossContext(settings, None, impl))
  np.testing.assert_allclose(float(loss), np_smoothed_clip_loss(x, y, 10.0, 0.2), rtol=1e-5)
  assert float(m["label_smoothing"]) == pytest.approx(0.2)
  plain, _ = fam.loss(out, {}, families.LossContext(fam.settings(base.base_config()), None, impl))
  np.testing.assert_allclose(float(plain), np_smoothed_clip_loss(x, y, 10.0, 0.0), rtol=1e-5)
  with pytest.raises(ValueError, match="softmax"):
    fam.loss({**out, "logit_bias": jnp.float32(-10.0)}, {}, families.LossContext(settings, None,
                                                                                   impl))
  config.loss.label_smoothing = 1.0
  with pytest.raises(ValueError, match="label_smoothing"):
    fam.settings(config)


def test_label_smoothing_trains_through_the_loop(tmp_path):
  config = tiny_config(total_steps=2, batch_size=8)
  config.data.size = 32
  config.loss.label_smoothing = 0.1
  summary = loop.train(config, str(tmp_path / "run"))
  assert summary["step"] == 2 and np.all(np.isfinite(summary["losses"]))
  assert summary["metrics"]["label_smoothing"] == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_label_smoothing_schedule_values(schedule):
  from zoo.families import clip as clip_family

  config = base.base_config()
  config.total_steps = 100
  config.loss.label_smoothing, config.loss.label_smoothing_end = 0.3, 0.1
  config.loss.label_smoothing_schedule = schedule
  s = clip_family.FAMILY.settings(config)
  mid = 0.2  # both schedules are half-way at t = 1/2
  for step, want in ((0, 0.3), (50, mid), (100, 0.1), (250, 0.1)):
    assert float(s.eps(jnp.int32(step))) == pytest.approx(want, abs=1e-6), (schedule, step)
  if schedule == "cosine":  # slower than linear at the start
    assert float(s.eps(jnp.int32(25))) > 0.25
  config.loss.label_smoothing_schedule = "step"
  with pytest.raises(ValueError, match="label_smoothing_schedule"):
    clip_family.FAMILY.settings(config)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_traced_label_smoothing_equals_fixed(impl):
  """eps as a traced scalar (a schedule under jit): values and gradients as the fixed eps, and
  the same over an 8-device mesh through zoo.losses."""
  from jax.sharding import Mesh

  from zoo import losses

  rng = np.random.default_rng(5)
  x, y = jnp.asarray(_normed(rng, 16, 8)), jnp.asarray(_normed(rng, 16, 8))

  def value_and_grads(fn):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(x, y, jnp.float32(7.0))

  fixed = value_and_grads(lambda a, b, s: losses.contrastive_loss(
      a, b, s, kind="softmax", impl="reference", label_smoothing=0.15))
  np.testing.assert_allclose(float(fixed[0]), np_smoothed_clip_loss(
      np.asarray(x), np.asarray(y), 7.0, 0.15), rtol=1e-5)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  for m in (None, mesh):
    got = value_and_grads(lambda a, b, s: losses.contrastive_loss(
        a, b, s, kind="softmax", impl=impl, mesh=m, batch_axes=("data",),
        label_smoothing=jnp.float32(0.1) + 0.05 * jnp.tanh(s * 0 + 100.0)))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(fixed)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_label_smoothing_schedule_trains_through_the_loop(tmp_path):
  config = tiny_config(total_steps=4, batch_size=8)
  config.data.size = 32
  config.log_every = 1
  config.loss.label_smoothing, config.loss.label_smoothing_schedule = 0.2, "linear"
  summary = loop.train(config, str(tmp_path / "run"))
  assert summary["step"] == 4 and np.all(np.isfinite(summary["losses"]))
  # the last logged step is step index 3 of 4: eps = 0.2 * (1 - 3/4)
  assert summary["metrics"]["label_smoothing"] == pytest.approx(0.05, abs=1e-6)


def _num_params(name, overrides):
  model = nnx.eval_shape(lambda: clip_lib.create(name, **overrides))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_distill_configs_student_sizes():
  from configs import (
    dcclip_b16_to_s16_stage1,
    dcclip_b16_to_s16_stage2,
    demo,
    distill_b16_to_s16,
    distill_demo,
  )

  for mod, teacher, ratio in ((distill_demo, demo.get_config().model, 4.0),
                              (distill_b16_to_s16, "ViT-B-16", 2.3),
                              (dcclip_b16_to_s16_stage1, "ViT-B-16", 2.3),
                              (dcclip_b16_to_s16_stage2, "ViT-B-16", 2.3)):
    c = mod.get_config()
    if mod is not dcclip_b16_to_s16_stage2:  # stage 2 is a plain CLIP run
      assert c.family == "distill"
      assert c.distill.to_dict().keys() == base.distill().to_dict().keys()
    student = _num_params(c.model, c.model_overrides.to_dict())
    assert _num_params(teacher, {}) / student >= ratio, (mod.__name__, student)
