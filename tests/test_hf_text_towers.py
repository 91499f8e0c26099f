"""open_clip's CLIPs with Hugging Face text towers (roberta-ViT-B-32, xlm-roberta-*-ViT-*):
parity with open_clip on random weights, tokenizer ids, strict round trips, the pretrained
table, and Babel-ImageNet through eval.py over two multilingual families (XLM-R CLIP, M-CLIP).

open_clip builds these towers through `AutoConfig.from_pretrained(hf_model_name)` and its
tokenizer through `AutoTokenizer`: the module writes tiny `roberta-base` / `xlm-roberta-base`
repos (config.json + tokenizer files) into an offline huggingface_hub cache, as a user's cache
would hold them.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import zoo
from tests.test_pretrained import put_repo
from zoo import convert, tokenizers
from zoo.convert import mclip, open_clip_config
from zoo.convert.common import StateDictError
from zoo.convert.io import write_safetensors
from zoo.data import demo
from zoo.models import configs as registry, m2m100, multilingual
from zoo.weights import pretrained

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_NAMES = ("roberta-ViT-B-32", "xlm-roberta-base-ViT-B-32", "xlm-roberta-large-ViT-H-14",
            "nllb-clip-base", "nllb-clip-large", "nllb-clip-base-siglip", "nllb-clip-large-siglip")
TINY_ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=80, type_vocab_size=1,
                    layer_norm_eps=1e-5, pad_token_id=1)
TINY_VISION = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
TEXTS = ["Ein Foto: ein grünes Quadrat.", "a photo of a cat", "  two   dogs &amp; a cat ",
         "фотография: зелёный квадрат.", "a photo of a red circle. " * 20]


def _files(directory):
  return {n: open(os.path.join(directory, n), "rb").read() for n in os.listdir(directory)}


def _xlmr_repo(tmp):
  src = os.path.join(tmp, "xlmr")
  os.makedirs(src)
  shutil.copyfile(multilingual.DEMO_TOKENIZER, os.path.join(src, "sentencepiece.bpe.model"))
  transformers.XLMRobertaTokenizer.from_pretrained(src).save_pretrained(os.path.join(src, "out"))
  files = dict(_files(os.path.join(src, "out")), **{
      "sentencepiece.bpe.model": open(multilingual.DEMO_TOKENIZER, "rb").read()})
  cfg = transformers.XLMRobertaConfig(vocab_size=347, **TINY_ENCODER)
  return dict(files, **{"config.json": cfg.to_json_string().encode()})


def _nllb_repo(tmp):
  src = os.path.join(tmp, "nllb")
  os.makedirs(src)
  shutil.copyfile(multilingual.DEMO_TOKENIZER, os.path.join(src, "sentencepiece.bpe.model"))
  transformers.NllbTokenizer.from_pretrained(src).save_pretrained(os.path.join(src, "out"))
  cfg = transformers.M2M100Config(
      vocab_size=347, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
      decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
      max_position_embeddings=80, pad_token_id=1, scale_embedding=True)
  return dict(_files(os.path.join(src, "out")), **{"config.json": cfg.to_json_string().encode()})


def _roberta_repo(tmp):
  from tokenizers import ByteLevelBPETokenizer

  bpe = ByteLevelBPETokenizer()
  corpus = [t for lang in ("en", "de", "fr") for t in demo.class_names(lang)] + TEXTS
  bpe.train_from_iterator(corpus * 5, vocab_size=300, min_frequency=1,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
  src = os.path.join(tmp, "roberta")
  os.makedirs(src)
  bpe.save_model(src)
  with open(os.path.join(src, "merges.txt")) as f:
    merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line]
  with open(os.path.join(src, "vocab.json")) as f:
    vocab = json.load(f)
  transformers.RobertaTokenizer(vocab=vocab, merges=merges).save_pretrained(
      os.path.join(src, "out"))
  cfg = transformers.RobertaConfig(vocab_size=len(vocab), **TINY_ENCODER)
  return dict(_files(os.path.join(src, "out")), **{"config.json": cfg.to_json_string().encode()})


@contextlib.contextmanager
def offline(home):
  """HF_HOME = `home`, offline, for zoo and for transformers (which reads huggingface_hub's
  constants at call time)."""
  from huggingface_hub import constants

  saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "ZOO_CACHE")}
  consts = (constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
  os.environ.update(HF_HOME=home, HF_HUB_OFFLINE="1")
  os.environ.pop("HF_HUB_CACHE", None)
  os.environ.pop("ZOO_CACHE", None)
  constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = os.path.join(home, "hub"), True
  try:
    yield home
  finally:
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = consts
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _jitter(model, seed):
  """Every parameter + N(0, 0.02): LayerNorm scales / zero biases are not at their init."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.02)
  return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """The offline cache, open_clip's tiny models on it (random, jittered), zoo's configs."""
  home = str(tmp_path_factory.mktemp("hf_home"))
  tmp = str(tmp_path_factory.mktemp("scratch"))
  put_repo(home, "xlm-roberta-base", _xlmr_repo(tmp))
  put_repo(home, "roberta-base", _roberta_repo(tmp))
  put_repo(home, "facebook/nllb-200-distilled-600M", _nllb_repo(tmp))
  cfg_dir = os.path.join(tmp, "oc_cfg")
  os.makedirs(cfg_dir)
  model_cfgs = {}
  for name, encoder, quick, pool, proj in (
      ("tiny-xlmr-clip", "xlm-roberta-base", False, "mean_pooler", "mlp"),
      ("tiny-roberta-clip", "roberta-base", True, "mean_pooler", "mlp"),
      ("tiny-nllb-clip", "facebook/nllb-200-distilled-600M", False, "cls_pooler", "linear")):
    model_cfgs[name] = {"embed_dim": 32, "quick_gelu": quick, "vision_cfg": TINY_VISION,
                        "text_cfg": {"hf_model_name": encoder, "hf_tokenizer_name": encoder,
                                     "hf_pooler_type": pool, "hf_proj_type": proj}}
    with open(os.path.join(cfg_dir, f"{name}.json"), "w") as f:
      json.dump(model_cfgs[name], f)
  open_clip.add_model_config(cfg_dir)
  out = {"home": home, "tmp": tmp, "model_cfgs": model_cfgs}
  with offline(home):
    for i, name in enumerate(model_cfgs):
      torch.manual_seed(i)
      oc = _jitter(open_clip.create_model(name, pretrained_hf=False), seed=10 + i)
      encoder = model_cfgs[name]["text_cfg"]["hf_model_name"]
      repo = os.path.join(home, "hub", "models--" + encoder.replace("/", "--"))
      with open(os.path.join(repo, "refs", "main")) as f:
        snapshot = os.path.join(repo, "snapshots", f.read())
      with open(os.path.join(snapshot, "config.json")) as f:
        config = open_clip_config.config_from_open_clip_cfg(model_cfgs[name], json.load(f))
      config = dataclasses.replace(config, tokenizer=os.path.join(snapshot, "tokenizer.json"))
      out[name] = dict(oc=oc, oc_tok=open_clip.get_tokenizer(name), config=config)
  return out


def _inputs(seed=0):
  return np.random.default_rng(seed).normal(size=(2, 32, 32, 3)).astype(np.float32)


def _oc_features(oc, images, tokens):
  with torch.no_grad():
    return (oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy(),
            oc.encode_text(torch.from_numpy(np.asarray(tokens, np.int64))).numpy())


# ----------------------------------------------------------------------------- architectures


def test_architectures_equal_open_clip_configs():
  for name in HF_NAMES:
    ours = registry.get_model_config(name)
    mapped = open_clip_config.config_from_open_clip_cfg(open_clip.get_model_config(name))
    assert isinstance(ours, multilingual.MultilingualCLIPConfig)
    assert open_clip_config.same_towers(ours, mapped), name
  big = registry.get_model_config("xlm-roberta-large-ViT-H-14")
  assert (big.vision.width, big.vision.heads, big.vision.layers, big.embed_dim) == (1280, 16, 32, 1024)
  assert (big.text.width, big.text.layers, big.text.proj_type, big.text.proj_bias) == (1024, 24, "mlp", False)
  assert registry.get_model_config("roberta-ViT-B-32").quick_gelu
  assert registry.get_model_config("roberta-ViT-B-32").text.vocab_size == 50265


def test_every_open_clip_pair_of_the_family_resolves():
  pairs = [p for p in open_clip.list_pretrained() if p[0] in HF_NAMES]
  assert len(pairs) == 9 and set(pairs) <= set(map(tuple, zoo.list_pretrained()))
  for name, tag in pairs:
    entry = pretrained.get_pretrained_cfg(name, tag)
    ref = open_clip.get_pretrained_cfg(name, tag)
    assert entry["hf_hub"] == ref["hf_hub"].rstrip("/") and entry["architecture"] == name
    assert entry["preprocess"]["mean"] == list(ref["mean"])
    assert entry["tokenizer"]["kind"] == "hf" and entry["tokenizer"]["file"] == "tokenizer.json"
    assert entry["tokenizer"]["hf_hub"] == open_clip.get_model_config(name)["text_cfg"]["hf_tokenizer_name"]


# ----------------------------------------------------------------------------- parity


TINY = ["tiny-xlmr-clip", "tiny-roberta-clip", "tiny-nllb-clip"]


@pytest.mark.parametrize("name", TINY)
def test_tokenizer_ids_equal_open_clip(hf, name):
  m = hf[name]
  ours = tokenizers.HFTokenizer(m["config"].tokenizer, 77, clean=m["config"].tokenizer_clean,
                                pad_id=m["config"].text.pad_token_id)
  got = ours(TEXTS)
  np.testing.assert_array_equal(got, m["oc_tok"](TEXTS).numpy())
  assert got[-1, -1] == 2 and (got[-1] != 1).all()  # truncated: </s> kept last


@pytest.mark.parametrize("name", TINY)
def test_features_equal_open_clip_and_round_trip(hf, name):
  m = hf[name]
  sd = {k: v.numpy() for k, v in m["oc"].state_dict().items()}
  model = convert.from_open_clip(sd, m["config"])
  images = _inputs()
  tokens = m["oc_tok"](TEXTS).numpy()
  ref_img, ref_txt = _oc_features(m["oc"], images, tokens)
  img, txt = np.asarray(model.encode_image(images)), np.asarray(model.encode_text(tokens))
  diff = max(np.abs(img - ref_img).max(), np.abs(txt - ref_txt).max())
  print(f"parity {name}: max |diff| {diff:.2e}")
  assert diff <= 1e-4
  back = convert.to_open_clip(model)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  m["oc"].load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  # Logical axis names on the parameters (as zoo.models.sharding reads them).
  axes = lambda v: v.get_metadata().get("out_sharding")  # noqa: E731
  assert axes(model.text.token_embedding) == ("vocab", "embed")
  if name == "tiny-nllb-clip":
    assert isinstance(model.text, m2m100.M2M100TextTransformer)
    assert axes(model.text.blocks[0].fc1.kernel) == ("embed", "mlp")
  else:
    assert axes(model.text.proj.fc1.kernel) == ("embed", "mlp")
    assert axes(model.text.blocks[0].mlp.fc1.kernel) == ("embed", "mlp")


def test_nllb_siglip_parity_and_round_trip(hf):
  """nllb-clip-base-siglip's own open_clip config (timm SigLIP trunk shrunk where open_clip
  builds it, the cached tiny NLLB encoder): sigmoid kind, features, strict round trip."""
  from unittest import mock

  timm = pytest.importorskip("timm")
  base = open_clip.get_model_config("nllb-clip-base-siglip")
  model_cfg = dict(base, embed_dim=32, vision_cfg=dict(base["vision_cfg"], image_size=32))
  create = timm.create_model
  shrink = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
  with offline(hf["home"]), mock.patch.object(
      timm, "create_model", lambda name, **kw: create(name, **kw, **shrink)):
    torch.manual_seed(5)
    oc = _jitter(open_clip.model.CustomTextCLIP(
        32, model_cfg["vision_cfg"], dict(model_cfg["text_cfg"], hf_model_pretrained=False),
        init_logit_bias=-10.0), seed=6)
    tok = open_clip.get_tokenizer("nllb-clip-base-siglip")
  nllb = hf["tiny-nllb-clip"]["config"]
  mapped = open_clip_config.config_from_open_clip_cfg(base)
  assert (mapped.kind, mapped.vision.pool, mapped.image_mean) == ("siglip", "map", (0.5,) * 3)
  config = dataclasses.replace(
      mapped, embed_dim=32, text=dataclasses.replace(nllb.text),
      vision=dataclasses.replace(mapped.vision, image_size=32, patch_size=8, width=32, layers=2,
                                 heads=2))
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  model = convert.from_open_clip(sd, config)
  images, tokens = _inputs(2), tok(TEXTS).numpy()
  ref_img, ref_txt = _oc_features(oc, images, tokens)
  diff = max(np.abs(np.asarray(model.encode_image(images)) - ref_img).max(),
             np.abs(np.asarray(model.encode_text(tokens)) - ref_txt).max())
  print(f"parity nllb-clip-base-siglip (tiny): max |diff| {diff:.2e}")
  assert diff <= 1e-4
  assert float(model.logit_bias[...]) == pytest.approx(oc.logit_bias.item())
  back = convert.to_open_clip(model)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  oc.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_nllb_language_tokens_equal_transformers_and_reach_babel(hf):
  """for_language sets NLLB's source token as transformers' `src_lang` does (FLORES-200 code
  or CLIP_benchmark's map); Babel-ImageNet tokenizes each language with its own token."""
  from zoo.families import multilingual as ml_family

  src = os.path.join(hf["tmp"], "nllb_langs")
  os.makedirs(src)
  shutil.copyfile(multilingual.DEMO_TOKENIZER, os.path.join(src, "sentencepiece.bpe.model"))
  codes = ["eng_Latn", "deu_Latn", "fra_Latn", "zho_Hant"]
  ref = transformers.NllbTokenizer.from_pretrained(src, additional_special_tokens=codes)
  ref.save_pretrained(os.path.join(src, "out"))
  tok = tokenizers.HFTokenizer(os.path.join(src, "out", "tokenizer.json"), 16)
  assert tok.language_token() == "eng_Latn"
  for language, code in [("DE", "deu_Latn"), ("fra_Latn", "fra_Latn"), ("cn", "zho_Hant"),
                         ("en", "eng_Latn")]:
    ref.src_lang = code
    want = ref([tok.clean(t) for t in TEXTS], padding="max_length", truncation=True,
               max_length=16).input_ids  # open_clip cleans first
    got = tok.for_language(language)
    assert got.language_token() == code
    np.testing.assert_array_equal(got(TEXTS), np.asarray(want))
  assert tok.language_token() == "eng_Latn"  # the original is unchanged
  with pytest.raises(ValueError, match=r"'ES'.*spa_Latn is not in the vocabulary"):
    tok.for_language("ES")
  with pytest.raises(ValueError, match=r"no NLLB language token for 'xx'"):
    tok.for_language("xx")
  import pickle
  assert pickle.loads(pickle.dumps(tok.for_language("DE"))).language_token() == "deu_Latn"
  xlmr = tokenizers.HFTokenizer(hf["tiny-xlmr-clip"]["config"].tokenizer)
  assert xlmr.language_token() is None and xlmr.for_language("DE") is xlmr
  # Babel-ImageNet over the tiny NLLB-CLIP: DE / FR get their tokens, XX keeps eng_Latn.
  config = hf["tiny-nllb-clip"]["config"]
  config = dataclasses.replace(config, text=dataclasses.replace(config.text,
                                                                vocab_size=tok.vocab_size))
  model = multilingual.MultilingualCLIP(config, rngs=nnx.Rngs(0))
  spec = {"images": _inputs(3), "labels": np.array([0, 1]),
          "class_labels": {"DE": [[0, 1], ["Katze", "Hund"]], "FR": [[0, 1], ["chat", "chien"]],
                           "XX": [[0, 1], ["a", "b"]]}}
  metrics = ml_family.eval_babel_zeroshot(model, spec, tok, batch_size=2)
  assert [metrics[f"{lang}/language_token"] for lang in ("DE", "FR", "XX")] == [1.0, 1.0, 0.0]


def test_wrong_family_or_size_names_the_keys(hf):
  m = hf["tiny-xlmr-clip"]
  sd = {k: v.numpy() for k, v in m["oc"].state_dict().items()}
  with pytest.raises(StateDictError, match=r"text\.transformer\.embeddings\.word_embeddings\.weight.*\(347, 64\)"):
    convert.from_open_clip(sd, hf["tiny-roberta-clip"]["config"])  # roberta vocabulary: 300
  with pytest.raises(StateDictError, match=r"(?s)missing +token_embedding\.weight.*unexpected +"
                     r"text\.transformer\.embeddings\.word_embeddings\.weight: found \(347, 64\)"):
    convert.from_open_clip(sd, "test-tiny")  # a built-in CLIP's layout
  clip_sd = convert.to_open_clip(zoo.create("test-tiny"))
  with pytest.raises(StateDictError, match=r"text\.transformer\."):
    convert.from_open_clip(clip_sd, m["config"])


# ----------------------------------------------------------------------------- pretrained


def _safetensors(state_dict, tmp, name):
  path = os.path.join(tmp, name)
  write_safetensors({k: np.asarray(v) for k, v in state_dict.items()}, path, {"format": "pt"})
  with open(path, "rb") as f:
    return f.read()


def test_pretrained_release_offline(hf):
  m = hf["tiny-xlmr-clip"]
  name, tag = "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"
  entry = pretrained.get_pretrained_cfg(name, tag)
  sd = {k: v.numpy() for k, v in m["oc"].state_dict().items()}
  with offline(hf["home"]):
    put_repo(hf["home"], entry["hf_hub"], {
        "open_clip_model.safetensors": _safetensors(sd, hf["tmp"], "release.safetensors")})
    registry.register("test-tiny-xlmr-hf", dataclasses.replace(m["config"], tokenizer=""))
    pretrained.register_pretrained("test-tiny-xlmr-hf", tag,
                                   dict(entry, architecture="test-tiny-xlmr-hf"))
    model, tok, _ = zoo.create_model_and_transforms("test-tiny-xlmr-hf", pretrained=tag)
    assert isinstance(tok, tokenizers.HFTokenizer)
    tokens = tok(TEXTS)
    np.testing.assert_array_equal(tokens, m["oc_tok"](TEXTS).numpy())
    images = _inputs(1)
    ref = _oc_features(m["oc"], images, tokens)
    np.testing.assert_allclose(np.asarray(model.encode_image(images)), ref[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(tokens)), ref[1], atol=1e-4, rtol=0)
    saved = zoo.save(model, os.path.join(hf["tmp"], "saved"))  # tokenizer.json travels along
  _, tok2, _ = zoo.load(saved)
  assert isinstance(tok2, tokenizers.HFTokenizer) and tok2.path.startswith(saved)
  np.testing.assert_array_equal(tok2(TEXTS), tokens)


# ----------------------------------------------------------------------------- Babel-ImageNet


def _babel_files(tmp):
  subset = [1, 4, 9, 17, 20]
  labels = {lang.upper(): [subset, [demo.class_names(lang)[i] for i in subset]]
            for lang in ("de", "fr")}
  prompts = {"DE": ["Ein Foto: {}.", "Ein Bild von {}."]}
  paths = []
  for name, obj in (("labels.json", labels), ("prompts.json", prompts)):
    paths.append(os.path.join(tmp, name))
    with open(paths[-1], "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False)
  return paths


def _eval_cli(hf, pretrained_ref, out, prelude=""):
  labels, prompts = _babel_files(hf["tmp"])
  args = ["--config", "configs/demo.py", "--pretrained", pretrained_ref, "--output", out,
          "--config.data.eval_size=48", "--config.data.eval_sets=",
          f"--config.data.babel_labels={labels}", f"--config.data.babel_prompts={prompts}"]
  code = (prelude + "import runpy, sys; sys.argv = ['eval.py'] + " + repr(args)
          + "; runpy.run_path('eval.py', run_name='__main__')")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HOME=hf["home"],
             HF_HUB_OFFLINE="1")
  env.pop("HF_HUB_CACHE", None)
  env.pop("ZOO_CACHE", None)
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(out, "metrics.json")) as f:
    return json.load(f)[-1]


@pytest.mark.slow
def test_babel_eval_over_xlmr_clip_and_mclip(hf):
  """eval.py --pretrained NAME/TAG with Babel files on two multilingual families, each read
  through its own tokenizer: an open_clip XLM-R CLIP (hf-hub repo; tokenizer.json) and an
  M-CLIP release (sentencepiece)."""
  from flax import nnx

  from zoo.data import pipeline
  from zoo.eval import suite

  m = hf["tiny-xlmr-clip"]
  sd = {k: v.numpy() for k, v in m["oc"].state_dict().items()}
  put_repo(hf["home"], "zoo-test/tiny-xlmr-clip", {
      "open_clip_config.json": json.dumps({"model_cfg": hf["model_cfgs"]["tiny-xlmr-clip"],
                                           "preprocess_cfg": {}}).encode(),
      "open_clip_model.safetensors": _safetensors(sd, hf["tmp"], "hub.safetensors")})
  got = _eval_cli(hf, "hf-hub:zoo-test/tiny-xlmr-clip", os.path.join(hf["tmp"], "eval-xlmr"))
  # The same evaluation in process, with open_clip's own tokenizer.
  model = convert.from_open_clip(sd, m["config"])
  labels, prompts = _babel_files(hf["tmp"])
  spec = pipeline.build_eval_sets(
      {"name": "demo", "eval_size": 48, "eval_sets": "", "babel_labels": labels,
       "babel_prompts": prompts}, image_size=32, mean=model.config.image_mean,
      std=model.config.image_std)["babel"]
  ref = suite.evaluate(model, {"babel": spec}, lambda t: m["oc_tok"](t).numpy())
  for lang in ("DE", "FR"):
    assert got[f"babel/{lang}/top1"] == pytest.approx(ref[f"babel/{lang}/top1"], abs=1e-6)
    assert got[f"babel/{lang}/num_classes"] == 5
  assert got["babel/DE/translated_prompts"] == 1
  # M-CLIP: XLM-R student + an OpenAI-layout image tower, sentencepiece ids.
  mm = pretrained.get_pretrained_cfg("xlm-roberta-large-ViT-B-32", "mclip")
  put_repo(hf["home"], mm["image"]["hf_hub"], {"open_clip_model.safetensors": _safetensors(
      convert.to_open_clip(zoo.create("test-tiny", seed=6)), hf["tmp"], "image.safetensors")})
  tower = multilingual.MultilingualTextTransformer(multilingual.text_config("xlmr-tiny"), 32,
                                                   rngs=nnx.Rngs(7))
  put_repo(hf["home"], mm["hf_hub"], {
      "model.safetensors": _safetensors(mclip.to_hf_text(tower), hf["tmp"], "mclip.safetensors"),
      "config.json": json.dumps({"model_type": "M-CLIP", "modelBase": "xlmr-tiny",
                                 "transformerDimensions": 64, "numDims": 32}).encode(),
      "sentencepiece.bpe.model": open(multilingual.DEMO_TOKENIZER, "rb").read()})
  prelude = ("from zoo.weights import pretrained as p; e = p.get_pretrained_cfg("
             "'xlm-roberta-large-ViT-B-32', 'mclip'); p.register_pretrained('tiny-mclip', "
             "'mclip', dict(e, image=dict(e['image'], architecture='test-tiny'))); ")
  got = _eval_cli(hf, "tiny-mclip/mclip", os.path.join(hf["tmp"], "eval-mclip"), prelude)
  assert {"babel/DE/top1", "babel/FR/top1"} <= set(got) and got["babel/DE/num_classes"] == 5
