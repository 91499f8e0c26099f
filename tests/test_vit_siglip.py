"""open_clip's larger native ViTs (H, g, bigG, B-plus, 256 / 378 px) and SigLIP / SigLIP 2 at
every size: table coverage, parity with open_clip on jittered random weights, round trips.

Parity models are open_clip's own classes at tiny sizes with the features that distinguish
the family (head width != 64, fractional mlp_ratio, tanh GELU, no text projection, a text
projection to a wider embedding, an image side that is not a multiple of the patch); every
parameter is jittered so a dropped LayerNorm or bias cannot hide.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from unittest import mock

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

import zoo  # noqa: E402
from tests.test_pretrained import _safetensors_bytes, put_repo  # noqa: E402
from zoo import convert, tokenizers  # noqa: E402
from zoo.convert import common, open_clip_config  # noqa: E402
from zoo.models import configs, layers, sharding  # noqa: E402
from zoo.weights import pretrained  # noqa: E402

TOL = 1e-4
NATIVE = ("ViT-B-32-256", "ViT-B-16-plus-240", "ViT-H-14", "ViT-H-14-378", "ViT-g-14",
          "ViT-bigG-14", "ViT-H-14-quickgelu", "ViT-H-14-378-quickgelu", "ViT-bigG-14-quickgelu")


def _family(name: str) -> str | None:
  """open_clip's families as the issue counts them (native ViT: the built-in towers without
  CLIPA's or MetaCLIP 2's changes)."""
  cfg = open_clip.get_model_config(name) or {}
  vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
  if "SigLIP" in name and not name.startswith("nllb"):
    return "siglip2" if "SigLIP2" in name else "siglip"
  if "worldwide" in name:
    return "metaclip2"
  if "CLIPA" in name:
    return "clipa"
  if (isinstance(vision.get("layers"), int) and not cfg.get("custom_text")
      and not text.get("hf_model_name")
      and not vision.get("timm_model_name") and not vision.get("no_ln_pre")
      and text.get("pool_type", "argmax") == "argmax"):
    return "vit"
  return None


def _pairs(family: str) -> list[tuple[str, str]]:
  return [(n, t) for n, t in open_clip.list_pretrained() if _family(n) == family]


def _jitter(model, seed: int):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=g))
  return model.eval()


def _features(torch_model, model, images: np.ndarray, tokens: np.ndarray):
  with torch.no_grad():
    want = (torch_model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy(),
            torch_model.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy())
  got = (np.asarray(jax.jit(model.encode_image)(images)),
         np.asarray(jax.jit(model.encode_text)(tokens.astype(np.int32))))
  return got, want


def _round_trip(torch_model, model):
  sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  back = convert.to_open_clip(model)
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  result = torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()},
                                       strict=True)
  assert not result.missing_keys and not result.unexpected_keys


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("family,count", [("vit", 80), ("siglip", 11), ("siglip2", 15),
                                          ("metaclip2", 5), ("clipa", 7)])
def test_every_pair_of_the_family_resolves(family, count):
  """Every (name, tag) of the family is in zoo's table with open_clip's hub repo and
  preprocessing, and its architecture is open_clip's config field for field."""
  pairs = _pairs(family)
  assert len(pairs) == count
  served = set(map(tuple, zoo.list_pretrained()))
  for name, tag in pairs:
    assert (name, tag) in served, (name, tag)
    entry = pretrained.get_pretrained_cfg(name, tag)
    cfg = open_clip.get_pretrained_cfg(name, tag)
    assert cfg["hf_hub"].startswith(entry["hf_hub"] + "/")
    assert entry["preprocess"]["resize_mode"] == cfg["resize_mode"]
    assert entry["preprocess"]["interpolation"] == cfg["interpolation"]
    arch = configs.get_model_config(entry["architecture"])
    oc = dict(open_clip.get_model_config(name), quick_gelu=cfg.get("quick_gelu", False))
    assert open_clip_config.same_towers(open_clip_config.config_from_open_clip_cfg(oc), arch)
    if family == "metaclip2":  # XLM-V: sentencepiece with XLM-R's fairseq ids
      assert entry["tokenizer"] == {"kind": "xlmr", "hf_hub": "facebook/xlm-v-base",
                                    "file": "sentencepiece.bpe.model"}
      assert open_clip_config.config_from_open_clip_cfg(
          open_clip_config.open_clip_model_cfg(arch)) == dataclasses.replace(arch, tokenizer="xlmr")
    if family == "clipa":  # BERT's tokenizer.json through the `tokenizers` library
      assert entry["tokenizer"] == {"kind": "hf_tokenizers", "hf_hub": "bert-base-uncased",
                                    "file": "tokenizer.json", "clean": "whitespace",
                                    "strip_sep_token": True}
      assert open_clip_config.config_from_open_clip_cfg(
          open_clip_config.open_clip_model_cfg(arch)) == dataclasses.replace(
              arch, image_mean=configs.OPENAI_MEAN, image_std=configs.OPENAI_STD)
    if family in ("siglip", "siglip2"):  # the export is open_clip's config, key for key
      back = open_clip_config.open_clip_model_cfg(arch)
      want = json.loads(json.dumps(open_clip.get_model_config(name)))
      assert back["text_cfg"].pop("hf_tokenizer_name")
      want["text_cfg"].pop("hf_tokenizer_name")
      assert back == want, name
      tok = entry["tokenizer"]
      assert tok["hf_hub"] == open_clip.get_model_config(name)["text_cfg"]["hf_tokenizer_name"]
      assert (tok["file"], tok.get("pad_id")) == (("tokenizer.model", 0) if family == "siglip2"
                                                  else ("spiece.model", None))


TRUNK_SIZES = {"vit_base_patch16_siglip_384", "vit_so400m_patch14_siglip_384",
               "vit_so400m_patch16_siglip_256", "vit_giantopt_patch16_siglip_256",
               "vit_large_patch16_siglip_512", "vit_base_patch32_siglip_256"}


@pytest.mark.parametrize("trunk", sorted(TRUNK_SIZES))
def test_trunk_table_equals_timm(trunk):
  """zoo's copy of timm's trunk hyper-parameters (timm builds on the meta device: no memory)."""
  with torch.device("meta"):
    m = timm.create_model(trunk, pretrained=False, num_classes=0)
  block = m.blocks[0]
  act = "gelu_tanh" if getattr(block.mlp.act, "approximate", None) != "none" else ""
  got = (m.patch_embed.patch_size[0], m.embed_dim, len(m.blocks), block.attn.num_heads,
         block.mlp.fc1.out_features, act)
  patch, width, depth, heads, mlp_ratio, want_act = open_clip_config.TIMM_TRUNKS[trunk]
  assert got == (patch, width, depth, heads, int(width * mlp_ratio), want_act)
  assert m.pos_embed.shape[1] == (int(trunk.rsplit("_", 1)[1]) // patch) ** 2


# ----------------------------------------------------------------------------- parity


TEXT_EOS = {"pool_type": "eos", "eos_id": 2, "vocab_size": 300}  # MetaCLIP 2 (XLM-V) text
CLIPA = ({"no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
         {"pool_type": "last", "no_causal_mask": True, "vocab_size": 300, "context_length": 32,
          "hf_tokenizer_name": "bert-base-uncased", "tokenizer_kwargs": {"strip_sep_token": True}})


@pytest.mark.parametrize("vision,text", [({}, {}), ({}, TEXT_EOS), CLIPA],
                         ids=["vit", "metaclip2", "clipa"])
def test_native_vit_parity_and_round_trip(vision, text):
  """A g / bigG-shaped tower: head width 24, mlp_ratio 4.3637, 40 px at patch 8; MetaCLIP 2's
  text tower pools at the first EOS (id 2) of XLM-R style rows (<s> ... </s> <pad>...);
  CLIPA: no ln_pre, mean of the patch tokens then ln_post, bidirectional last-token text."""
  oc_cfg = {"embed_dim": 40,
            "vision_cfg": {"image_size": 40, "layers": 2, "width": 48, "head_width": 24,
                           "mlp_ratio": 4.3637, "patch_size": 8, **vision},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 40, "heads": 5,
                         "layers": 2, **text}}
  torch.manual_seed(0)
  torch_model = _jitter(open_clip.model.CLIP(**oc_cfg), 1)
  config = open_clip_config.config_from_open_clip_cfg(oc_cfg)
  assert (config.vision.heads, int(config.vision.width * config.vision.mlp_ratio)) == (2, 209)
  model = convert.from_open_clip(torch_model.state_dict(), config)
  images = np.random.default_rng(0).normal(size=(2, 40, 40, 3)).astype(np.float32)
  tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat", "two dogs"]).numpy()
  if vision:
    assert config.tokenizer == "hf_tokenizers" and not config.vision.ln_pre
    tokens = np.random.default_rng(1).integers(1, 300, size=(3, 32))
  elif text:
    assert config.text.pool == "eos" and config.tokenizer == "xlmr"
    tokens = np.ones((3, 77), np.int64)  # <pad> = 1
    for row, n in zip(tokens, (5, 20, 77)):
      row[0], row[1:n - 1], row[n - 1] = 0, np.arange(10, 8 + n), 2
  for g, w in zip(*_features(torch_model, model, images, tokens)):
    assert np.abs(g - w).max() <= TOL
  _round_trip(torch_model, model)


def _tiny_siglip(base: str, *, image_size: int, patch: int, width: int, mlp_ratio: float,
                 embed_dim: int, text_width: int, seed: int):
  """open_clip's CustomTextCLIP from `base`'s own config, towers shrunk (timm's trunk of the
  same name, so its activation and MAP head are the released model's), and zoo's config."""
  oc = json.loads(json.dumps(open_clip.get_model_config(base)))
  text = dict(oc["text_cfg"], vocab_size=300, context_length=16, width=text_width,
              heads=2, layers=2)
  text.pop("hf_tokenizer_name")
  text.pop("tokenizer_kwargs")
  vision = dict(oc["vision_cfg"], image_size=image_size)
  torch.manual_seed(seed)
  create = timm.create_model
  shrink = dict(img_size=image_size, patch_size=patch, embed_dim=width, depth=2, num_heads=2,
                mlp_ratio=mlp_ratio)
  # open_clip builds the trunk through timm.create_model(name, ...): shrink it there.
  with mock.patch.object(timm, "create_model", lambda name, **kw: create(name, **kw, **shrink)):
    torch_model = open_clip.model.CustomTextCLIP(embed_dim, vision, text, init_logit_bias=-10.0)
  assert torch_model.visual.trunk.embed_dim == width
  ref = configs.get_model_config(base)
  config = dataclasses.replace(
      ref, embed_dim=embed_dim,
      vision=dataclasses.replace(ref.vision, image_size=image_size, patch_size=patch,
                                 width=width, layers=2, heads=2, mlp_ratio=mlp_ratio),
      text=dataclasses.replace(ref.text, vocab_size=300, context_length=16, width=text_width,
                               heads=2, layers=2))
  return _jitter(torch_model, seed + 1), config


SIGLIP_CASES = {
    # SO400M i18n: tanh-GELU trunk, plain-GELU text without a projection, mlp_ratio 3.7362.
    "ViT-SO400M-16-SigLIP-i18n-256": dict(image_size=32, patch=8, width=64, mlp_ratio=3.7362,
                                          embed_dim=64, text_width=64),
    # SigLIP 2 g-opt: tanh GELU in both towers, text projected 48 -> 64; SO400M/14 at 384 px
    # reads 27 patches a side (the last 6 px dropped): here 36 px at patch 8 reads 4.
    "ViT-gopt-16-SigLIP2-256": dict(image_size=36, patch=8, width=64, mlp_ratio=4.0,
                                    embed_dim=64, text_width=48),
}


@pytest.mark.parametrize("base", sorted(SIGLIP_CASES))
def test_siglip_parity_and_round_trip(base):
  torch_model, config = _tiny_siglip(base, seed=3, **SIGLIP_CASES[base])
  model = convert.from_open_clip(torch_model.state_dict(), config)
  size = config.vision.image_size
  images = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
  tokens = np.random.default_rng(2).integers(1, 300, size=(3, 16))
  got, want = _features(torch_model, model, images, tokens)
  for g, w in zip(got, want):
    assert g.shape == w.shape and np.abs(g - w).max() <= TOL
  _round_trip(torch_model, model)
  # the towers run timm's / open_clip's activation: tanh GELU where the released model has it
  blocks = (model.visual.transformer.resblocks[0], model.text.transformer.resblocks[0])
  assert [b.mlp.quick_gelu for b in blocks] == [config.vision.act or False,
                                                config.text.act or False]
  x = np.linspace(-6, 6, 1001, dtype=np.float32)
  tanh = torch.nn.GELU(approximate="tanh")(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(layers.gelu_tanh(x), tanh, atol=1e-6, rtol=0)
  assert np.abs(np.asarray(layers.gelu(x)) - tanh).max() > 1e-4


def _tiny_config(base: str) -> configs.CLIPConfig:
  """`base` at test size: vision width 64 = the embedding; text 48 wide when projected."""
  ref = configs.get_model_config(base)
  text_width = 48 if ref.text.projection else 64
  return dataclasses.replace(
      ref, embed_dim=64,
      vision=dataclasses.replace(ref.vision, image_size=32, patch_size=8, width=64, layers=1,
                                 heads=2),
      text=dataclasses.replace(ref.text, vocab_size=300, context_length=16, width=text_width,
                               heads=2, layers=1))


@pytest.mark.parametrize("base", sorted(SIGLIP_CASES))
def test_new_params_carry_logical_axes(base):
  model = nnx.eval_shape(lambda: common.build_clip(_tiny_config(base)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.get_value().shape), path
    assert set(axes) - {None} <= set(sharding.LOGICAL_RULES), (path, axes)
  assert model.visual.proj is None
  assert (model.text.text_projection is None) == (base == "ViT-SO400M-16-SigLIP-i18n-256")


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
  return write_gemma_tokenizer(tmp_path_factory.mktemp("gemma"))


def write_gemma_tokenizer(folder) -> str:
  """A hub-style tokenizer folder: a tiny sentencepiece `tokenizer.model` with Gemma's
  conventions (pad 0, eos 1, bos 2, unk 3, no dummy prefix, identity normalization, byte
  fallback) and the tokenizer_config of open_clip's SigLIP 2 tokenizer (no BOS, EOS added)."""
  spm = pytest.importorskip("sentencepiece")
  rng = random.Random(0)
  syllables = "ka to ri mu se pa lo ne chi va de ru mi so ta be go".split()
  words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
  words += "a photo of the cat dog".split()
  sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=str(folder / "tokenizer"), vocab_size=400,
      model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True,
      add_dummy_prefix=False, normalization_rule_name="identity", split_digits=True,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "GemmaTokenizer", "add_bos_token": False, "add_eos_token": True,
      "pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>",
      "padding_side": "right"}))
  return str(folder)


TEXTS = ["A photo of the cat!", "", "kato rimu, sepa & lone... near THE river " * 4,
         "xyz über 東京 42", "  two   birds\tflying\n", "under_score &amp; entity"]


def test_gemma_tokenizer_ids_equal_open_clip(gemma_dir):
  """SigLIP 2's tokenizer: the table's entry for a 256k vocabulary gives the ids of open_clip's
  HFTokenizer (what open_clip.get_tokenizer builds for SigLIP 2 tags) on the same files."""
  model_cfg = open_clip.get_model_config("ViT-B-16-SigLIP2")
  ref = open_clip.tokenizer.HFTokenizer(gemma_dir, context_length=16,
                                        **model_cfg["text_cfg"]["tokenizer_kwargs"])
  entry = open_clip_config.tokenizer_entry(model_cfg)
  config = configs.get_model_config("ViT-B-16-SigLIP2", text={"context_length": 16})
  ours = pretrained.tokenizer_for({"tokenizer": entry}, config,
                                  {"tokenizer": os.path.join(gemma_dir, entry["file"])})
  want = ref(TEXTS).numpy()
  assert want[1].tolist() == [1] + [0] * 15 and (want[2] != 0).all()  # EOS, pad 0, truncation
  np.testing.assert_array_equal(ours(TEXTS), want)
  assert isinstance(ours, tokenizers.SentencePieceTokenizer)


def test_bert_tokenizer_json_ids_equal_open_clip(tmp_path):
  """CLIPA's tokenizer: open_clip's HFTokenizer('bert-base-uncased', strip_sep_token=True) and
  zoo's `tokenizers`-library reader on the same (tiny, trained here) WordPiece tokenizer.json."""
  from tokenizers import BertWordPieceTokenizer
  from tokenizers.processors import TemplateProcessing

  rng = random.Random(1)
  words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(300)]
  bert = BertWordPieceTokenizer(lowercase=True)
  bert.train_from_iterator([" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)],
                           vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                           "[MASK]"])
  # as bert-base-uncased's tokenizer.json: [CLS] ... [SEP] added by its post-processor
  bert.post_processor = TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", bert.token_to_id("[CLS]")),
                                               ("[SEP]", bert.token_to_id("[SEP]"))])
  bert.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length": 512}))
  model_cfg = open_clip.get_model_config("ViT-L-14-CLIPA")
  ref = open_clip.tokenizer.HFTokenizer(str(tmp_path), context_length=8,
                                        **model_cfg["text_cfg"]["tokenizer_kwargs"])
  entry = open_clip_config.tokenizer_entry(model_cfg)
  config = configs.get_model_config("ViT-L-14-CLIPA", text={"context_length": 8})
  ours = pretrained.tokenizer_for({"tokenizer": entry}, config,
                                  {"tokenizer": str(tmp_path / entry["file"])})
  texts = ["ABC  def\tghij", "", "Ä bcd " * 10, "caf\u00e9 j"]
  want = ref(texts).numpy()
  assert (want == 0).any() and not (want == 3).any()  # [SEP] stripped to 0, padding
  np.testing.assert_array_equal(ours(texts), want)


# ----------------------------------------------------------------------------- loading


def test_create_siglip2_pretrained_offline(tmp_path, monkeypatch, gemma_dir):
  """zoo.create_model_and_transforms on a SigLIP 2 table entry from a hub cache on disk
  (tiny weights registered under the real entry's repo and file names)."""
  home = str(tmp_path / "hf")
  config = _tiny_config("ViT-gopt-16-SigLIP2-256")
  configs.register("test-tiny-siglip2", config)
  src = common.build_clip(config)
  entry = pretrained.get_pretrained_cfg("ViT-gopt-16-SigLIP2-256", "webli")
  put_repo(home, entry["hf_hub"], {
      "open_clip_model.safetensors": _safetensors_bytes(convert.to_open_clip(src), str(tmp_path))})
  with open(os.path.join(gemma_dir, "tokenizer.model"), "rb") as f:
    put_repo(home, entry["tokenizer"]["hf_hub"], {"tokenizer.model": f.read()})
  pretrained.register_pretrained("test-tiny-siglip2", "webli",
                                 dict(entry, architecture="test-tiny-siglip2"))
  monkeypatch.setenv("HF_HOME", home)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("ZOO_CACHE", raising=False)
  model, tok, preprocess = zoo.create_model_and_transforms("test-tiny-siglip2", pretrained="webli")
  assert preprocess.resize_mode == "squash"
  ids = tok(["a photo of the cat"])
  assert ids.shape == (1, 16) and ids[0, -1] == 0 and 1 in ids[0].tolist()
  np.testing.assert_array_equal(np.asarray(model.encode_text(ids)),
                                np.asarray(src.encode_text(ids)))
  assert os.path.isdir(os.path.join(home, "zoo", "converted"))
  assert common.model_to_flat(model).keys() == common.model_to_flat(src).keys()
