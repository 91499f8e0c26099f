"""Prompt learning (CoOp, CoCoOp, MaPLe): the invariants, few-shot data, the family on the loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import zoo
from tests import cli_run
from zoo import errors, families, tokenizers
from zoo.data import demo, fewshot
from zoo.eval import base_to_novel
from zoo.families import prompt as prompt_family
from zoo.models import prompt

NAMES = tuple(demo.class_names()[:5]) + ("golden_retriever",)
SP_MODEL = os.path.join(os.path.dirname(zoo.__file__), "assets", "demo_multilingual.model")


@pytest.fixture(scope="module")
def tok():
  return tokenizers.ClipTokenizer(77)


@pytest.fixture(scope="module")
def coop(tok):
  """CoOp, n_ctx=4 from "a photo of a", class token at the end (shared by the invariants)."""
  return build(tok, n_ctx=4, ctx_init="a photo of a")


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), jnp.float32)


def build(tok, method="coop", seed=0, base="test-tiny", names=NAMES, **kw):
  cfg = prompt.prompt_config(base, tok, names, method=method, **kw)
  model = prompt.PromptCLIP(cfg, rngs=nnx.Rngs(seed))
  model.init_context()
  return model


def handwritten(model, tok, texts):
  return np.asarray(model.encode_text(jnp.asarray(tok(texts)), normalize=True))


# ----------------------------------------------------------------------------- invariants


def test_coop_from_phrase_equals_handwritten_prompts(tok, coop):
  """n_ctx=4 from "a photo of a", class token at the end: "a photo of a {class}." exactly;
  at the front: "{class} a photo of a."."""
  m = coop
  assert m.prompt.ctx.shape == (4, 64)
  names = [n.replace("_", " ") for n in NAMES]
  ref = handwritten(m, tok, [f"a photo of a {n}." for n in names])
  np.testing.assert_allclose(np.asarray(m.class_text_features()), ref, atol=1e-5)
  front = build(tok, n_ctx=4, ctx_init="a photo of a", class_token_position="front")
  ref = handwritten(front, tok, [f"{n} a photo of a." for n in names])
  np.testing.assert_allclose(np.asarray(front.class_text_features()), ref, atol=1e-5)
  # class-specific context from the same phrase: the same features
  csc = build(tok, n_ctx=4, ctx_init="a photo of a", class_specific=True)
  assert csc.prompt.ctx.shape == (len(NAMES), 4, 64)
  np.testing.assert_allclose(np.asarray(csc.class_text_features()),
                             np.asarray(m.class_text_features()), atol=1e-6)


def test_coop_on_a_sentencepiece_tower():
  """A SigLIP-style text tower (bidirectional, last-token pooling) with a sentencepiece
  tokenizer (no start token): the phrase-initialised prompts equal the hand-written ones."""
  sp = tokenizers.SentencePieceTokenizer(SP_MODEL, 32)
  base = zoo.models.configs.get_model_config("test-tiny-siglip", text={
      "vocab_size": int(sp.sp.get_piece_size()), "context_length": 32})
  m = build(sp, base=base, n_ctx=3, ctx_init="a photo of")
  ids, pos, _ = prompt.build_prompts(sp, ["red circle"], n_ctx=3, ctx_init="a photo of",
                                     context_length=32)
  assert pos.tolist() == [[0, 1, 2]]
  ref = handwritten(m, sp, [f"a photo of {n.replace('_', ' ')}." for n in NAMES])
  np.testing.assert_allclose(np.asarray(m.class_text_features()), ref, atol=1e-5)


def test_middle_position_keeps_the_class_tokens(tok):
  ids, pos, _ = prompt.build_prompts(tok, ["red circle", "dog"], n_ctx=4, position="middle")
  x = tok.encode(prompt.placeholder(tok))[0]
  for row, p, name in zip(ids, pos, ["red circle", "dog"]):
    assert (row[p] == x).all() and len(set(p.tolist())) == 4
    rest = [int(t) for i, t in enumerate(row) if i not in set(p.tolist()) and t != 0]
    assert tok.decode(rest).strip() == f"<start_of_text>{name} . <end_of_text>"


def test_maple_without_deep_prompts_equals_coop(tok, coop, images):
  off = build(tok, "maple", depth=0)
  np.testing.assert_allclose(np.asarray(off.class_logits(images)),
                             np.asarray(coop.class_logits(images)), atol=1e-5)
  # depth 1: vision prompts at the input only -> the text side is still CoOp's, images differ
  shallow = build(tok, "maple", depth=1)
  np.testing.assert_allclose(np.asarray(shallow.class_text_features()),
                             np.asarray(coop.class_text_features()), atol=1e-6)
  assert not np.allclose(shallow.encode_image(images), coop.encode_image(images), atol=1e-4)
  deep = build(tok, "maple", depth=2)
  assert deep.prompt.deep_text.shape == (1, 4, 64) and deep.prompt.deep_kernel.shape == (1, 64, 64)
  assert not np.allclose(deep.class_text_features(), coop.class_text_features(), atol=1e-4)


def test_cocoop_with_a_zero_meta_net_equals_coop(tok, coop, images):
  co = build(tok, "cocoop")
  assert co.prompt.meta1.kernel.shape == (32, 2)  # embed 32 -> 32 / 16
  for v in (co.prompt.meta2.kernel, co.prompt.meta2.bias):
    v[...] = jnp.zeros(v.shape)
  np.testing.assert_allclose(np.asarray(co.class_logits(images)),
                             np.asarray(coop.class_logits(images)), atol=1e-5)
  co.prompt.meta1.bias[...] = jnp.ones(co.prompt.meta1.bias.shape)  # the ReLU passes it on
  co.prompt.meta2.kernel[...] = jax.random.normal(jax.random.key(0), co.prompt.meta2.kernel.shape)
  assert not np.allclose(co.class_logits(images), coop.class_logits(images), atol=1e-3)


def test_bad_prompt_settings(tok):
  with pytest.raises(ValueError, match="ctx_init='a photo' has 2 tokens, fewer than"):
    prompt.build_prompts(tok, ["dog"], n_ctx=4, ctx_init="a photo")
  with pytest.raises(ValueError, match="class_specific applies to coop only"):
    prompt.prompt_config("test-tiny", tok, ["dog"], method="maple", class_specific=True)
  with pytest.raises(ValueError, match="does not fit the text context of 8"):
    prompt.build_prompts(tok, ["a very long class name indeed"], n_ctx=4, context_length=8)


# ----------------------------------------------------------------------------- few-shot data


def test_few_shot_is_seeded_per_class():
  labels = np.repeat(np.arange(4), 10)
  names = [f"c{i}" for i in range(4)]
  a = fewshot.few_shot(labels, [0, 1], 3, seed=1, classnames=names)
  assert np.array_equal(a, fewshot.few_shot(labels, [0, 1], 3, seed=1, classnames=names))
  assert not np.array_equal(a, fewshot.few_shot(labels, [0, 1], 3, seed=2, classnames=names))
  assert np.bincount(labels[a], minlength=4).tolist() == [3, 3, 0, 0]
  # a class's draw does not depend on the others
  b = fewshot.few_shot(labels, [1], 3, seed=1, classnames=names)
  assert np.array_equal(a[3:], b)
  with pytest.raises(ValueError, match=r"class 'c2' has 10 image\(s\), fewer than data.shots=16"):
    fewshot.few_shot(labels, [2], 16, seed=0, classnames=names)
  kept = fewshot.few_shot(labels, [2], 16, seed=0, classnames=names, policy="all")
  assert len(kept) == 10


def test_base_novel_split():
  assert fewshot.base_novel(24) == (list(range(12)), list(range(12, 24)))
  assert fewshot.base_novel(5) == ([0, 1, 2], [3, 4])
  with pytest.raises(ValueError, match="empty novel half"):
    fewshot.base_novel(1)


def test_folder_source(tmp_path):
  rng = np.random.default_rng(0)
  for cls, n in (("cat", 3), ("dog", 2), ("sea_lion", 3)):
    os.makedirs(tmp_path / cls)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
          tmp_path / cls / f"{i}.png")
  cfg = {"dataset": "folder", "folder": str(tmp_path), "shots": 2}
  assert fewshot.class_names(cfg) == ["cat", "dog", "sea lion"]
  src = fewshot.train_source(cfg, 32, seed=0)  # base: cat, dog
  assert len(src) == 4 and src.classnames == ["cat", "dog"]
  item = src[3]
  assert item["image"].shape == (20, 24, 3) and item["label"] == 1 and item["caption"] == "dog"
  with pytest.raises(ValueError, match=r"class 'dog' has 2 image\(s\), fewer than data.shots=3"):
    fewshot.train_source(dict(cfg, shots=3), 32, seed=0)
  assert len(fewshot.train_source(dict(cfg, shots=3, shots_policy="all"), 32, 0)) == 5


def test_benchmark_by_name_source(tmp_path):
  """data.dataset=<benchmark name>: the class names and images of zoo.data.benchmarks (here an
  image folder per class under DATA_ROOT/<name>/train)."""
  rng = np.random.default_rng(1)
  for cls in ("apple", "bear", "crab", "dolphin"):
    os.makedirs(tmp_path / "cifar100" / "train" / cls)
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
          tmp_path / "cifar100" / "train" / cls / f"{i}.png")
  cfg = {"dataset": "cifar100", "data_root": str(tmp_path), "shots": 2}
  src = fewshot.train_source(cfg, 32, seed=0)  # base: apple, bear
  assert src.classnames == ["apple", "bear"] and len(src) == 4
  assert sorted(src[i]["label"] for i in range(4)) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- the family


def test_maple_demo_trains_prompts_only_and_round_trips(tmp_path):
  """configs/maple_demo.py for 3 steps through train.py on 8 devices: base / novel / HM, the
  export is a PromptCLIP whose CLIP towers are the frozen ones and whose prompts moved."""
  work = tmp_path / "run"
  overrides = ["--config.total_steps=3", "--config.eval_every=3", "--config.checkpoint_every=3",
               "--config.warmup_steps=1", "--config.data.pool_size=200",
               "--config.data.shots=2", "--config.data.eval_size=48"]
  proc = cli_run.run("train.py", "--config", "configs/maple_demo.py", "--workdir", str(work),
                     *overrides, devices=8)  # parameters and batch sharded over 8 devices
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in open(work / "metrics.jsonl")] if (
      work / "metrics.jsonl").exists() else json.load(open(work / "metrics.json"))
  final = records[-1] if isinstance(records, list) else records
  for key in ("demo/base_accuracy", "demo/novel_accuracy", "demo/hm"):
    assert 0.0 <= float(final[key]) <= 1.0, final
  loaded, _, _ = zoo.load(work / "model")
  assert isinstance(loaded, prompt.PromptCLIP)
  assert loaded.config.prompt.classnames == tuple(demo.class_names()[:12])
  from configs import maple_demo
  config = maple_demo.get_config()
  fresh = prompt_family.FAMILY.build_model(config, prompt_family.FAMILY.settings(config))
  flat = lambda m: {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  got, ref = flat(loaded), flat(fresh)
  assert got.keys() == ref.keys()
  moved = [k for k in ref if not np.array_equal(got[k], ref[k])]
  assert moved and all(k[0] == "prompt" for k in moved), moved
  assert ("prompt", "deep_text") in moved and ("prompt", "ctx") in moved


def test_family_is_registered():
  assert families.get("prompt") is prompt_family.FAMILY
  assert prompt_family.FAMILY.trainable(None)(("prompt", "ctx"))
  assert not prompt_family.FAMILY.trainable(None)(("text", "token_embedding"))


def test_maple_vit_b16_train_step_lowers_for_tpu(tmp_path):
  """configs/maple_vit_b16.py's train step (ViT-B/16 frozen, depth 9, SGD) traced on abstract
  parameters and lowered for a TPU v5e (random weights instead of the download)."""
  from configs import maple_vit_b16
  from zoo.train import step as train_step

  for i in range(10):
    os.makedirs(tmp_path / f"class_{i}")
  config = maple_vit_b16.get_config()
  config.init_from = ""
  config.data.dataset, config.data.folder = "folder", str(tmp_path)
  config.dtype = "bfloat16"
  family = families.get(config.family)
  settings = family.settings(config)
  model = nnx.eval_shape(lambda: family.build_model(config, settings))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  trainable = family.trainable(settings)
  tx = train_step.make_optimizer(config, params, trainable)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  step = train_step.make_train_step(graphdef, rest, family, tx, config, mesh, trainable, settings)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params),
           "rng": jax.eval_shape(lambda: jax.random.key(0))}
  batch = {"image": jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
  dev = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("data",),
                                                                abstract_device=dev)):
    lowered = jax.jit(step).trace(state, batch).lower(lowering_platforms=("tpu",))
  text = lowered.as_text()
  assert "bf16" in text and len(text) > 10000
  assert model.config.prompt.depth == 9 and len(model.config.prompt.classnames) == 5
  assert model.prompt.deep_kernel.shape == (8, 512, 768)


def test_base_to_novel_table_over_runs(tmp_path):
  """python -m zoo.eval.base_to_novel: seeds of a dataset averaged, HM of the means, the average
  over datasets (CoCoOp / MaPLe's reporting), from the runs' metrics.json."""
  runs = {"dtd_s1": {"dtd/base_accuracy": 0.8, "dtd/novel_accuracy": 0.5},
          "dtd_s2": {"dtd/base_accuracy": 0.6, "dtd/novel_accuracy": 0.7},
          "eurosat_s1": {"eurosat/base_accuracy": 0.9, "eurosat/novel_accuracy": 0.3}}
  for name, metrics in runs.items():
    os.makedirs(tmp_path / name)
    (tmp_path / name / "metrics.json").write_text(json.dumps(
        [{"step": 5, "dtd/base_accuracy": 0.0}, {"step": 10, **metrics}]))
  out = tmp_path / "table.json"
  r = subprocess.run([sys.executable, "-m", "zoo.eval.base_to_novel",
                      *[str(tmp_path / n) for n in runs], "--json", str(out)],
                     cwd=cli_run.ROOT, env=cli_run.env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-800:]
  rows = {row["dataset"]: row for row in json.loads(out.read_text())}
  assert rows["dtd"]["runs"] == 2 and rows["dtd"]["base"] == pytest.approx(0.7)
  assert rows["dtd"]["hm"] == pytest.approx(2 * 0.7 * 0.6 / 1.3)
  assert rows["eurosat"]["hm"] == pytest.approx(2 * 0.9 * 0.3 / 1.2)
  avg = rows["average"]
  assert (avg["base"], avg["novel"]) == (pytest.approx(0.8), pytest.approx(0.45))
  assert avg["hm"] == pytest.approx(2 * 0.8 * 0.45 / 1.25) and avg["runs"] == 3
  assert "average" in r.stdout and "57.60" in r.stdout  # 100 * HM(0.8, 0.45)
  os.makedirs(tmp_path / "clip_run")
  (tmp_path / "clip_run" / "metrics.json").write_text(json.dumps([{"step": 1, "zeroshot/top1": 1}]))
  with pytest.raises(errors.UserError, match="no DATASET/base_accuracy"):
    base_to_novel.main([str(tmp_path / "clip_run")])
