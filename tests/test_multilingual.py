"""Multilingual CLIP: XLM-R tokenizer ids, HF XLM-R / BERT / M-CLIP parity and layouts, the
student over a teacher's image tower, distillation through the train loop (+ a LoRA language
adapter), and Babel-ImageNet-style per-language evaluation."""

import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from configs import base
from tests import test_data as data_tests
from tests.train_utils import tiny_config
from zoo import tokenizers
from zoo.convert import cli, mclip
from zoo.convert.common import StateDictError
from zoo.data import babel, demo, pipeline
from zoo.eval import evaluator, report, suite
from zoo.families import multilingual as ml_family
from zoo.models import lora, multilingual
from zoo.train import loop as train_lib, trainer as trainer_lib
from zoo.weights import adapters

TEXTS = ["Ein Foto: ein grünes Quadrat.", "hi", "一张绿色正方形的照片。", "صورة مربع أخضر.",
         "фотография: зелёный квадрат."]


@pytest.fixture(scope="module")
def xlmr_tok():
  return tokenizers.XLMRobertaTokenizer(multilingual.DEMO_TOKENIZER, context_length=24)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  return zoo.save(zoo.create("test-tiny", seed=3), tmp_path_factory.mktemp("teacher") / "clip")


# ----------------------------------------------------------------------------- tokenizer


def test_xlmr_tokenizer_follows_fairseq_ids(xlmr_tok):
  sp = xlmr_tok.sp
  ids = xlmr_tok(TEXTS)
  assert ids.shape == (len(TEXTS), 24) and ids.dtype == np.int32
  for row, text in zip(ids, TEXTS):
    pieces = sp.encode(text)
    expected = [0] + [p + 1 if p != sp.unk_id() else 3 for p in pieces] + [2]
    assert row[:len(expected)].tolist() == expected
    assert (row[len(expected):] == 1).all()  # <pad> = 1
    assert xlmr_tok.decode(row) == text
  assert xlmr_tok.vocab_size == sp.get_piece_size() + 2
  assert xlmr_tok.vocab_size <= multilingual.text_config("xlmr-tiny").vocab_size
  long = xlmr_tok(["ein " * 50], context_length=10)[0]
  assert long[0] == 0 and long[-1] == 2 and (long != 1).all()  # </s> kept last


def test_xlmr_tokenizer_equals_transformers(tmp_path, xlmr_tok):
  transformers = pytest.importorskip("transformers")
  import shutil

  shutil.copyfile(multilingual.DEMO_TOKENIZER, tmp_path / "sentencepiece.bpe.model")
  hf = transformers.XLMRobertaTokenizer.from_pretrained(str(tmp_path))
  corpus = TEXTS + ["", "  spaces   and\ttabs ", "emoji 🙂 and ünïcödé ✓", "Ω≈ç√ unknown ☃",
                    "a photo of a red circle. " * 12]
  ours = xlmr_tok(corpus, context_length=24)
  ref = hf(corpus, padding="max_length", truncation=True, max_length=24)["input_ids"]
  np.testing.assert_array_equal(ours, np.asarray(ref))
  assert len(hf) == xlmr_tok.vocab_size and hf.mask_token_id == xlmr_tok.mask_token_id


def test_demo_vocabulary_covers_every_demo_language(xlmr_tok):
  for lang in demo.LANGUAGES:
    for text in [t.format(n) for t in demo.templates(lang) for n in demo.class_names(lang)]:
      assert tokenizers.XLMRobertaTokenizer.UNK not in xlmr_tok.encode(text), (lang, text)


# ----------------------------------------------------------------------------- HF parity


def _mclip_torch(hf_config_kwargs, embed_dim=32, bert=False, seed=0):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  if bert:
    cfg = transformers.BertConfig(**hf_config_kwargs)
    enc = transformers.BertModel(cfg, add_pooling_layer=False).eval()
  else:
    cfg = transformers.XLMRobertaConfig(**hf_config_kwargs)
    enc = transformers.XLMRobertaModel(cfg, add_pooling_layer=False).eval()
  lin = torch.nn.Linear(cfg.hidden_size, embed_dim)
  return torch, cfg, enc, lin


def _torch_mean_pool(torch, enc, lin, ids, pad):
  with torch.no_grad():
    t = torch.tensor(np.asarray(ids), dtype=torch.long)
    att = (t != pad).long()
    hidden = enc(input_ids=t, attention_mask=att).last_hidden_state
    pooled = (hidden * att[..., None]).sum(1) / att.sum(1)[:, None]
    return hidden.numpy(), lin(pooled).numpy(), att.numpy().astype(bool)


XLMR_SMALL = dict(vocab_size=347, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=40, type_vocab_size=1,
                  layer_norm_eps=1e-5)


def test_mclip_layout_matches_transformers(xlmr_tok):
  torch, cfg, enc, lin = _mclip_torch(XLMR_SMALL)
  sd = {f"transformer.{k}": v.numpy() for k, v in enc.state_dict().items()}
  sd["LinearTransformation.weight"] = lin.weight.detach().numpy()
  sd["LinearTransformation.bias"] = lin.bias.detach().numpy()
  tower = mclip.from_hf_text(sd, cfg.to_dict())
  ids = xlmr_tok(TEXTS)
  hidden, ref, real = _torch_mean_pool(torch, enc, lin, ids, pad=1)
  np.testing.assert_allclose(np.asarray(tower(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)
  got_hidden = np.asarray(tower.tokens(jnp.asarray(ids)))
  assert np.abs(got_hidden - hidden)[real].max() <= 1e-4
  back = mclip.to_hf_text(tower)  # exact round trip
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_bare_xlmr_and_bert_encoders(xlmr_tok):
  # A bare XLMRobertaModel (prefix "roberta." as in XLMRobertaForMaskedLM): encoder parity,
  # fresh projection to the requested embedding width.
  torch, cfg, enc, _ = _mclip_torch(XLMR_SMALL, seed=1)
  sd = {f"roberta.{k}": v.numpy() for k, v in enc.state_dict().items()}
  tower = mclip.from_hf_text(sd, cfg.to_dict(), embed_dim=16)
  ids = xlmr_tok(TEXTS)
  hidden, _, real = _torch_mean_pool(torch, enc, torch.nn.Identity(), ids, pad=1)
  assert np.abs(np.asarray(tower.tokens(jnp.asarray(ids))) - hidden)[real].max() <= 1e-4
  assert tower(jnp.asarray(ids)).shape == (len(TEXTS), 16)
  # BERT: absolute positions 0..L-1, two token types, pad id 0, CLS pooling also available.
  bert_cfg = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=40)
  torch, cfg, enc, lin = _mclip_torch(bert_cfg, embed_dim=8, bert=True, seed=2)
  sd = {k: v.numpy() for k, v in enc.state_dict().items()}
  sd.update({"LinearTransformation.weight": lin.weight.detach().numpy(),
             "LinearTransformation.bias": lin.bias.detach().numpy()})
  tower = mclip.from_hf_text(sd, cfg.to_dict())
  assert tower.cfg.positions == "bert" and tower.cfg.pad_token_id == 0
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 300, size=(3, 12)).astype(np.int32)
  ids[0, 7:] = 0
  _, ref, _ = _torch_mean_pool(torch, enc, lin, ids, pad=0)
  np.testing.assert_allclose(np.asarray(tower(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)


def test_conversion_errors_and_mclip_config():
  torch, cfg, enc, _ = _mclip_torch(XLMR_SMALL)
  sd = {k: v.numpy() for k, v in enc.state_dict().items()}
  del sd["encoder.layer.1.output.dense.bias"]
  sd["encoder.layer.0.output.dense.weight"] = sd["encoder.layer.0.output.dense.weight"][:, :5]
  with pytest.raises(StateDictError) as err:
    mclip.from_hf_text(sd, cfg.to_dict())
  assert "missing    encoder.layer.1.output.dense.bias" in str(err.value)
  assert "mis-shaped encoder.layer.0.output.dense.weight" in str(err.value)
  with pytest.raises(ValueError, match="not an XLM-R / BERT state dict"):
    mclip.from_hf_text({"foo": np.zeros(3)}, cfg.to_dict())
  # M-CLIP's released config names the encoder by modelBase.
  text, dim = mclip.text_config_from_hf(
      {"model_type": "M-CLIP", "modelBase": "xlm-roberta-large", "transformerDimensions": 1024,
       "numDims": 768})
  assert (text.width, text.layers, text.heads, text.vocab_size, dim) == (1024, 24, 16, 250002, 768)
  with pytest.raises(ValueError, match="modelBase"):
    mclip.text_config_from_hf({"modelBase": "distilbert", "numDims": 512})


# ----------------------------------------------------------------------------- the student


def test_student_uses_teacher_image_tower_and_round_trips(tmp_path, teacher_dir, xlmr_tok):
  teacher, _, _ = zoo.load(teacher_dir)
  student = multilingual.from_clip(teacher, multilingual.text_config("xlmr-tiny"),
                                   keep_teacher=True)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  np.testing.assert_array_equal(student.encode_image(images), teacher.encode_image(images))
  assert float(student.logit_scale[...]) == float(teacher.logit_scale[...])
  ids = jnp.asarray(xlmr_tok(TEXTS[:2]))
  out = student(images, ids)
  assert out["text_features"].shape == (2, 32)
  with pytest.raises(ValueError, match="student_only"):  # zoo.load would not rebuild the teacher
    zoo.save(student, tmp_path / "bad")
  path = zoo.save(multilingual.student_only(student), tmp_path / "student")
  assert student.teacher_text is not None  # student_only copied
  loaded, tok, preprocess = zoo.load(path)
  assert isinstance(loaded, multilingual.MultilingualCLIP) and loaded.teacher_text is None
  assert isinstance(tok, tokenizers.XLMRobertaTokenizer)
  np.testing.assert_array_equal(tok(TEXTS[:2], context_length=24), np.asarray(ids))
  np.testing.assert_allclose(loaded.encode_text(ids), student.encode_text(ids), atol=0)
  assert preprocess is not None


def _distill_config(teacher_dir, **kw):
  c = tiny_config(**{"family": "multilingual", "model": "xlmr-tiny", "batch_size": 32,
                     "total_steps": 30, "lr": 2e-3, "warmup_steps": 2, **kw})
  c.multilingual = base.multilingual()
  c.multilingual.teacher = str(teacher_dir)
  c.multilingual.contrastive_weight = 0.5
  c.data.size = 512
  c.data.languages = "en,de,zh,ja"
  c.data.num_threads = 1
  return c


def test_distillation_learns_and_freezes_all_but_the_student_text(tmp_path, teacher_dir):
  config = _distill_config(teacher_dir)
  trainer0 = trainer_lib.build_trainer(config)
  before = jax.device_get(trainer0.state["params"])
  summary = train_lib.train(config, str(tmp_path / "run"))
  losses = summary["losses"]
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  after = jax.device_get(summary["trainer"].state["params"])
  flat_before = dict(nnx.to_flat_state(before))
  changed = {path for path, var in nnx.to_flat_state(after)
             if not np.array_equal(var.get_value(), flat_before[path].get_value())}
  assert changed and all(p[0] == "text" for p in changed)
  assert any(p[:2] == ("text", "blocks") for p in changed)
  # The export is the student alone, loadable and equal to the trained text tower.
  model, tok, _ = zoo.load(tmp_path / "run" / "model")
  assert isinstance(model, multilingual.MultilingualCLIP) and model.teacher_text is None
  ids = jnp.asarray(tok(["Ein Foto: ein roter Kreis."]))
  np.testing.assert_allclose(model.encode_text(ids), summary["trainer"].model().encode_text(ids),
                             atol=1e-6)


def test_language_adapter_trains_only_lora(tmp_path, teacher_dir):
  base = zoo.save(multilingual.student_only(trainer_lib.build_trainer(
      _distill_config(teacher_dir)).model()), tmp_path / "student")
  config = _distill_config(teacher_dir, total_steps=6, init_from=str(base))
  config.data.languages = "ar"
  config.peft.rank = 4
  config.peft.targets = r"^text/blocks/.*/(attn/(qkv|out)_kernel|mlp/fc[12]/kernel)$"
  config.peft.language = "ar"
  summary = train_lib.train(config, str(tmp_path / "ar"))
  trainer = summary["trainer"]
  params = dict(nnx.to_flat_state(jax.device_get(trainer.state["params"])))
  start = dict(nnx.to_flat_state(nnx.state(zoo.load(base)[0], nnx.Param)))
  for path, var in params.items():
    if lora.is_lora_path(tuple(map(str, path))):
      continue
    if path[0] == "teacher_text":
      continue
    np.testing.assert_array_equal(var.get_value(), start[path].get_value(), err_msg=str(path))
  adapter = adapters.read_adapter_config(tmp_path / "ar" / "adapter")
  assert adapter["metadata"]["language"] == "ar" and adapter["rank"] == 4
  # The exported model has the adapter merged; the base + adapter gives the same features.
  merged, tok, _ = zoo.load(tmp_path / "ar" / "model")
  student, _, _ = zoo.load(base)
  ids = jnp.asarray(tok(["صورة مربع أخضر.", "Ein Foto: ein roter Kreis."]))
  with adapters.with_adapter(student, tmp_path / "ar" / "adapter"):
    np.testing.assert_allclose(student.encode_text(ids), merged.encode_text(ids), atol=1e-5)


# ----------------------------------------------------------------------------- evaluation


def test_babel_eval_counts_only_named_classes(tmp_path, teacher_dir):
  model, tok, _ = zoo.load(teacher_dir)
  sets = pipeline.build_eval_sets({"name": "demo", "eval_size": 60, "eval_sets": "multilingual"},
                                  image_size=32, mean=model.config.image_mean,
                                  std=model.config.image_std)
  base = sets["multilingual"]
  names_de = demo.class_names("de")
  labels_file = tmp_path / "labels.json"
  subset = [1, 4, 9, 17]
  labels_file.write_text(json.dumps({
      "DE": [subset, [names_de[i] for i in subset]],
      "EN": [list(range(24)), demo.class_names("en")]}, ensure_ascii=False))
  prompts_file = tmp_path / "prompts.json"
  prompts_file.write_text(json.dumps({"DE": ["Ein Foto: {}."]}, ensure_ascii=False))
  cfg = {"name": "demo", "eval_size": 60, "eval_sets": "", "babel_labels": str(labels_file),
         "babel_prompts": str(prompts_file)}
  spec = pipeline.build_eval_sets(cfg, image_size=32, mean=model.config.image_mean,
                                  std=model.config.image_std)["babel"]
  got = suite.evaluate(model, {"babel": spec}, tok)
  # Reference: only DE's 4 classes' images, argmax over those 4 classes.
  feats = evaluator.encode_images(model, base["images"])
  keep = np.isin(base["labels"], subset)
  clf = evaluator.zero_shot_classifier(model, tok, [names_de[i] for i in subset], ["Ein Foto: {}."])
  pred = np.argmax(feats[keep] @ clf, axis=1)
  expected = np.mean(np.asarray(subset)[pred] == base["labels"][keep])
  assert got["babel/DE/num_images"] == keep.sum() and got["babel/DE/num_classes"] == 4
  assert got["babel/DE/top1"] == pytest.approx(expected)
  assert got["babel/DE/translated_prompts"] == 1 and got["babel/EN/translated_prompts"] == 0
  assert got["babel/EN/num_images"] == 60
  en = evaluator.zero_shot_metrics(feats, base["labels"],
                                  evaluator.zero_shot_classifier(model, tok, demo.class_names("en"),
                                                                list(ml_family.DEFAULT_TEMPLATES)))
  assert got["babel/EN/top1"] == pytest.approx(en["top1"])
  records = report.language_records(got)
  assert [(r["language"], r["prompts"], r["num_classes"]) for r in records] == [
      ("DE", "translated", 4), ("EN", "english", 24)]
  assert "DE" in report.format_language_table(records)


def _babel_files(tmp_path):
  names = {lang: demo.class_names(lang.lower()) for lang in ("DE", "FR", "ES")}
  labels_file = tmp_path / "labels.json"
  labels_file.write_text(json.dumps({lang: [list(range(24)), n] for lang, n in names.items()},
                                    ensure_ascii=False))
  return labels_file


def test_babel_languages_and_english_protocol(tmp_path, teacher_dir):
  model, tok, _ = zoo.load(teacher_dir)
  cfg = {"name": "demo", "eval_size": 40, "eval_sets": "", "babel_labels": str(_babel_files(tmp_path)),
         "babel_languages": "de,FR"}
  build = lambda c: pipeline.build_eval_sets(c, image_size=32, mean=model.config.image_mean,  # noqa: E731
                                             std=model.config.image_std)["babel"]
  spec = build(cfg)
  assert spec["languages"] == ["DE", "FR"] and "EN" not in spec["class_labels"]  # 24 demo classes
  got = suite.evaluate(model, {"babel": spec}, tok)
  assert {k.split("/")[1] for k in got if k.count("/") == 2} == {"DE", "FR"}
  with pytest.raises(ValueError, match=r"data.babel_languages names \['IT'\]"):
    build(dict(cfg, babel_languages="DE,IT"))
  with pytest.raises(ValueError, match="data.babel_en"):
    build(dict(cfg, babel_en="paper"))


def test_babel_english_openai_protocol(tmp_path, teacher_dir):
  """English as Babel-ImageNet's paper: OpenAI's ImageNet class names and its 80 templates."""
  pytest.importorskip("open_clip")
  model, _, _ = zoo.load(teacher_dir)
  cfg = {"name": "demo", "eval_size": 40, "eval_sets": "", "babel_labels": str(_babel_files(tmp_path)),
         "babel_en": "openai", "babel_languages": "EN,DE"}
  spec = pipeline.build_eval_sets(cfg, image_size=32, mean=model.config.image_mean,
                                  std=model.config.image_std)["babel"]
  idx, names = spec["class_labels"]["EN"]
  assert idx == list(range(1000)) and names[:2] == ["tench", "goldfish"]
  assert len(spec["prompts"]["EN"]) == 80 and spec["prompts"]["EN"][0] == "a bad photo of a {}."
  assert spec["languages"] == ["EN", "DE"]


def test_eval_cli_babel_languages(tmp_path, teacher_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "eval.py", "--config", "configs/demo.py", "--checkpoint",
                      str(teacher_dir), "--output", str(tmp_path / "w"), "--config.data.eval_size=24",
                      "--config.data.eval_sets=", f"--config.data.babel_labels={_babel_files(tmp_path)}",
                      "--config.data.babel_languages=DE,ES"], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "DE" in r.stdout and "ES" in r.stdout and "FR" not in r.stdout, r.stdout


def test_babel_files_are_validated(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"DE": [[3, 1], ["a", "b"]]}))
  with pytest.raises(ValueError, match="ascending"):
    babel.load_babel_labels(bad)
  bad.write_text(json.dumps({"DE": [[1, 3], ["a"]]}))
  with pytest.raises(ValueError, match="2 indices but 1 names"):
    babel.load_babel_labels(bad)
  bad.write_text(json.dumps({"DE": ["ohne Platzhalter"]}))
  with pytest.raises(ValueError, match="placeholder"):
    babel.load_babel_prompts(bad)
  with pytest.raises(FileNotFoundError, match="missing.json"):
    babel.load_babel_labels(tmp_path / "missing.json")


def test_cli_build_and_to_mclip(tmp_path, teacher_dir):
  torch, cfg, enc, lin = _mclip_torch(dict(XLMR_SMALL, max_position_embeddings=80))
  from safetensors.numpy import load_file, save_file

  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  sd = {f"transformer.{k}": np.ascontiguousarray(v.numpy()) for k, v in enc.state_dict().items()}
  sd["LinearTransformation.weight"] = lin.weight.detach().numpy()
  sd["LinearTransformation.bias"] = lin.bias.detach().numpy()
  save_file(sd, str(hf_dir / "model.safetensors"))
  (hf_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
  out = tmp_path / "built"
  assert cli.run(["build-mclip", "--teacher", str(teacher_dir), "--text", str(hf_dir),
                            "--tokenizer", multilingual.DEMO_TOKENIZER, "--output", str(out)]) == 0
  model, tok, _ = zoo.load(out)
  ids = tok(TEXTS)
  _, ref, _ = _torch_mean_pool(torch, enc, lin, ids, pad=1)
  np.testing.assert_allclose(np.asarray(model.text(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)
  assert cli.run(["to-mclip", "--input", str(out), "--output", str(tmp_path / "m")]) == 0
  back = mclip.from_hf_text(load_file(str(tmp_path / "m" / "model.safetensors")),
                                   json.loads((tmp_path / "m" / "config.json").read_text()))
  np.testing.assert_array_equal(np.asarray(back(jnp.asarray(ids))), np.asarray(model.text(jnp.asarray(ids))))
  assert cli.run(["build-mclip", "--teacher", str(teacher_dir), "--text", str(tmp_path / "nope"),
                            "--tokenizer", multilingual.DEMO_TOKENIZER, "--output", str(tmp_path / "x")]) == 2


def _convert(*args):
  """`python -m zoo.convert ARGS` in a subprocess (the user's command line)."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "zoo.convert", *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_mclip_unknown_or_local_model_base_and_round_trip(tmp_path, teacher_dir):
  """M-CLIP releases over LaBSE-like (unknown) or local encoders, through the subprocess CLI:
  class names recorded by module path, encoder context = max_position_embeddings - 2,
  to-mclip writes a modelBase that build-mclip reads back."""
  torch, cfg, enc, lin = _mclip_torch(dict(XLMR_SMALL, max_position_embeddings=80), seed=4)
  from safetensors.numpy import save_file

  hf_dir = tmp_path / "mclip"
  hf_dir.mkdir()
  sd = {f"transformer.{k}": np.ascontiguousarray(v.numpy()) for k, v in enc.state_dict().items()}
  sd["LinearTransformation.weight"] = lin.weight.detach().numpy()
  sd["LinearTransformation.bias"] = lin.bias.detach().numpy()
  save_file(sd, str(hf_dir / "model.safetensors"))
  mclip_cfg = {"model_type": "M-CLIP", "modelBase": "sentence-transformers/LaBSE",
               "transformerDimensions": 64, "numDims": 32}
  (hf_dir / "config.json").write_text(json.dumps(mclip_cfg))
  (tmp_path / "enc.json").write_text(json.dumps(cfg.to_dict()))
  common = ["--teacher", teacher_dir, "--text", hf_dir, "--tokenizer", multilingual.DEMO_TOKENIZER]
  r = _convert("build-mclip", *common, "--output", tmp_path / "x")
  assert r.returncode == 2 and "--encoder-config" in r.stderr and len(r.stderr.splitlines()) == 1
  r = _convert("build-mclip", *common, "--encoder-config", tmp_path / "enc.json",
               "--output", tmp_path / "built")
  assert r.returncode == 0, r.stderr
  record = json.loads((tmp_path / "built" / zoo.weights.model_dir.CONFIG_FILE).read_text())
  assert record["model_class"] == "zoo.models.multilingual.MultilingualCLIP"
  assert record["config_class"] == "zoo.models.multilingual.MultilingualCLIPConfig"
  model, tok, _ = zoo.load(tmp_path / "built")
  assert model.config.text.context_length == 78  # max_position_embeddings 80 - 2, not 77
  ids = tok(["ein " * 90, TEXTS[0]])
  assert ids.shape == (2, 78)
  _, ref, _ = _torch_mean_pool(torch, enc, lin, ids, pad=1)
  np.testing.assert_allclose(np.asarray(model.text(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)
  # modelBase a local directory holding the encoder's config.json: no option needed
  local = tmp_path / "labse_local"
  local.mkdir()
  (local / "config.json").write_text(json.dumps(cfg.to_dict()))
  (hf_dir / "config.json").write_text(json.dumps(dict(mclip_cfg, modelBase=str(local))))
  r = _convert("build-mclip", *common, "--output", tmp_path / "built2")
  assert r.returncode == 0, r.stderr
  assert isinstance(zoo.load(tmp_path / "built2")[0], multilingual.MultilingualCLIP)
  # to-mclip names modelBase (here the written encoder config), and build-mclip reads it back
  r = _convert("to-mclip", "--input", tmp_path / "built", "--output", tmp_path / "out")
  assert r.returncode == 0, r.stderr
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  base_cfg = json.loads((tmp_path / "out" / "encoder" / "config.json").read_text())
  assert written["modelBase"] == str(tmp_path / "out" / "encoder")
  assert {k: base_cfg[k] for k in ("hidden_size", "num_hidden_layers", "max_position_embeddings")} \
      == {"hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 80}
  del written["encoder"]  # as a plain M-CLIP config: the encoder comes from modelBase alone
  (tmp_path / "out" / "config.json").write_text(json.dumps(written))
  r = _convert("build-mclip", *common[:2], "--text", tmp_path / "out", *common[4:],
               "--output", tmp_path / "built3")
  assert r.returncode == 0, r.stderr
  again, _, _ = zoo.load(tmp_path / "built3")
  np.testing.assert_array_equal(np.asarray(again.text(jnp.asarray(ids))),
                                np.asarray(model.text(jnp.asarray(ids))))
  assert mclip.model_base(multilingual.text_config("xlm-roberta-large"), str(tmp_path)) == \
      "xlm-roberta-large"


def test_from_hf_names_an_unsupported_model_type(tmp_path):
  from zoo.convert import hf
  with pytest.raises(ValueError, match="model_type 'blip'"):
    hf.config_from_hf({"model_type": "blip", "vision_config": {}, "text_config": {}})
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "blip", "vision_config": {"hidden_act": "gelu_pytorch_tanh"},
       "text_config": {"hidden_act": "gelu_pytorch_tanh"}}))
  from safetensors.numpy import save_file
  save_file({"logit_scale": np.zeros((1,), np.float32)}, str(tmp_path / "w.safetensors"))
  r = _convert("from-hf", "--model", tmp_path / "config.json", "--input", tmp_path / "w.safetensors",
               "--output", tmp_path / "o")
  assert r.returncode == 2 and "model_type 'blip'" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- data: field hook


def test_multilingual_fields():
  ml_tok = lambda texts, context_length=None: data_tests.byte_tokenizer(texts, 120)  # noqa: E731
  cfg = data_tests.demo_cfg(languages=("en", "de", "ru", "zh", "ar", "ja"))
  it = pipeline.build_train_pipeline(
      cfg, tokenizer=data_tests.byte_tokenizer, image_size=32, mean=data_tests.MEAN, std=data_tests.STD, global_batch_size=32,
      seed=0, fields=("ml_tokens", "ml_en_tokens", "tokens_ar"), context_length=None,
      field_hooks=(ml_family.MultilingualFields(ml_family.languages(cfg), {"ml_tokens": ml_tok}),))
  batch = next(it)
  assert batch["ml_tokens"].shape == (32, 120) and batch["tokens_ar"].shape == (32, 120)
  assert batch["ml_en_tokens"].shape == (32, data_tests.L)
  assert len(set(batch["ml_lang"].tolist())) >= 4 and batch["ml_lang"].max() < 6
  order = grain.MapDataset.range(64).shuffle(seed=0)
  for i in range(32):
    s = demo.make_sample(0, order[i], 32)
    lang = cfg.languages[batch["ml_lang"][i]]
    assert data_tests.decode_tokens(batch["ml_tokens"][i]) == s["captions_ml"][lang]
    assert data_tests.decode_tokens(batch["ml_en_tokens"][i]) == s["captions_ml"]["en"][:data_tests.L - 2]
    np.testing.assert_array_equal(batch["tokens_ar"][i], ml_tok([s["captions_ml"]["ar"]])[0])
