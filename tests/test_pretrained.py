"""Pretrained weights by name, hf-hub repos, the converted cache and export, with no network.

Each test writes a Hugging Face cache in huggingface_hub's own layout (models--ORG--REPO/
{blobs,refs/main,snapshots/REV/...}) holding small random weights under the released repo ids
and file names, sets HF_HOME to it and HF_HUB_OFFLINE=1.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import zoo
from zoo import convert
from zoo.convert import clip_moe, mclip, open_clip_config
from zoo.convert.io import write_safetensors
from zoo.convert.long_clip import to_long_clip
from zoo.families import base as family_base
from zoo.models import configs as registry, moe, multilingual
from zoo.weights import hub as hub_lib, pretrained

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OC = {"embed_dim": 32, "quick_gelu": False,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                          "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                        "layers": 2}}
B32 = ("ViT-B-32", "laion2b_s34b_b79k")  # a real table entry; tests swap in a tiny architecture
registry.register("test-tiny-qg", dataclasses.replace(registry.get_model_config("test-tiny"),
                                                      quick_gelu=True))
_tiny = registry.get_model_config("test-tiny-qg")
registry.register("test-tiny-long", dataclasses.replace(
    _tiny, text=dataclasses.replace(_tiny.text, context_length=248)))


def put_repo(hf_home, repo_id, files):
  """Writes `files` (name -> bytes) as one snapshot of `repo_id` in huggingface_hub's layout."""
  base = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
  rev = hashlib.sha1(repo_id.encode()).hexdigest()
  os.makedirs(os.path.join(base, "refs"), exist_ok=True)
  with open(os.path.join(base, "refs", "main"), "w") as f:
    f.write(rev)
  for name, data in files.items():
    if name.endswith(".json"):  # git blobs are named by their git sha1, LFS blobs by sha256
      digest = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    else:
      digest = hashlib.sha256(data).hexdigest()
    blob = os.path.join(base, "blobs", digest)
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    with open(blob, "wb") as f:
      f.write(data)
    link = os.path.join(base, "snapshots", rev, name)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
      os.remove(link)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  return os.path.join(base, "snapshots", rev)


def _bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _safetensors_bytes(state_dict, tmp):
  path = os.path.join(tmp, "w.safetensors")
  write_safetensors({k: np.asarray(v) for k, v in state_dict.items()}, path, {"format": "pt"})
  return _bytes(path)


def _torch_bytes(state_dict, tmp, name="w.pt"):
  path = os.path.join(tmp, name)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)
  return _bytes(path)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  """HF_HOME with the repos every test reads, and the models their files were made from."""
  home = str(tmp_path_factory.mktemp("hf_home"))
  tmp = str(tmp_path_factory.mktemp("scratch"))
  cfg_dir = os.path.join(tmp, "oc_cfg")
  os.makedirs(cfg_dir)
  with open(os.path.join(cfg_dir, "test-tiny.json"), "w") as f:
    json.dump(TINY_OC, f)
  open_clip.add_model_config(cfg_dir)
  torch.manual_seed(0)
  oc_model = open_clip.create_model("test-tiny")
  sd = {k: v.detach().numpy() for k, v in oc_model.state_dict().items()}
  oc_bytes = _safetensors_bytes(sd, tmp)
  entry = pretrained.get_pretrained_cfg(*B32)
  put_repo(home, entry["hf_hub"], {"open_clip_model.safetensors": oc_bytes})
  pretrained.register_pretrained("test-tiny", B32[1], dict(entry, architecture="test-tiny"))
  hub_cfg = {"model_cfg": TINY_OC, "preprocess_cfg": {
      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
      "resize_mode": "squash"}}
  oc_snapshot = put_repo(home, "zoo-test/tiny-open-clip", {
      "open_clip_config.json": json.dumps(hub_cfg).encode(), "open_clip_model.safetensors": oc_bytes})
  # transformers CLIPModel repo
  hf_src = zoo.create("test-tiny", seed=3)
  put_repo(home, "zoo-test/tiny-hf", {
      "config.json": json.dumps(convert.config_to_hf(hf_src.config)).encode(),
      "model.safetensors": _safetensors_bytes(convert.to_hf(hf_src), tmp)})
  # Long-CLIP: torch.save'd state dict, released name
  long_src = zoo.create("test-tiny-long", seed=4)
  lc = pretrained.get_pretrained_cfg("LongCLIP-ViT-B-16", "sharegpt4v")
  put_repo(home, lc["hf_hub"], {lc["weights"][0]: _torch_bytes(to_long_clip(long_src), tmp)})
  pretrained.register_pretrained("test-long", "sharegpt4v", dict(lc, architecture="test-tiny-long"))
  # CLIP-MoE: 4 experts, top-2, every block, Long-CLIP positions
  moe_src = moe.create("test-tiny-long", seed=5, num_experts=4, top_k=2, layers="all",
                       dropless=True)
  mc = pretrained.get_pretrained_cfg("CLIP-MoE-ViT-L-14", "sharegpt4v")
  put_repo(home, mc["hf_hub"], {"CLIP-MoE_ShareGPT4V.pt": _torch_bytes(clip_moe.to_clip_moe(moe_src), tmp)})
  pretrained.register_pretrained("test-moe", "sharegpt4v", dict(mc, architecture="test-tiny-long"))
  # M-CLIP: the text tower repo + OpenAI's image tower repo
  mm = pretrained.get_pretrained_cfg("xlm-roberta-large-ViT-B-32", "mclip")
  image_src = zoo.create("test-tiny-qg", seed=6)
  put_repo(home, mm["image"]["hf_hub"],
           {"open_clip_model.safetensors": _safetensors_bytes(convert.to_open_clip(image_src), tmp)})
  tower = multilingual.MultilingualTextTransformer(multilingual.text_config("xlmr-tiny"), 32,
                                                   rngs=nnx.Rngs(7))
  put_repo(home, mm["hf_hub"], {
      "pytorch_model.bin": _torch_bytes(mclip.to_hf_text(tower), tmp),
      "config.json": json.dumps({"model_type": "M-CLIP", "modelBase": "xlmr-tiny",
                                 "transformerDimensions": 64, "numDims": 32}).encode(),
      "sentencepiece.bpe.model": _bytes(multilingual.DEMO_TOKENIZER)})
  pretrained.register_pretrained("test-mclip", "mclip", dict(
      mm, image=dict(mm["image"], architecture="test-tiny-qg")))
  mclip_src = multilingual.from_clip(image_src, tower, tokenizer=multilingual.DEMO_TOKENIZER)
  return dict(home=home, oc_model=oc_model.eval(), oc_file=os.path.join(oc_snapshot,
              "open_clip_model.safetensors"), oc_snapshot=oc_snapshot, hf_src=hf_src,
              long_src=long_src, moe_src=moe_src, mclip_src=mclip_src)


@pytest.fixture
def offline_home(hub, monkeypatch):
  monkeypatch.setenv("HF_HOME", hub["home"])
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("ZOO_CACHE", raising=False)
  return hub["home"]


def _inputs(size=32, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  tokens = np.asarray(zoo.get_tokenizer("ViT-B-32")(["a photo of a cat", "two dogs"]))
  return images, tokens


def _oc_features(model, images, tokens):
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    txt = model.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
  return img, txt


def _features(model, images, tokens):
  return np.asarray(model.encode_image(images)), np.asarray(model.encode_text(tokens))


def _close(a, b, tol=1e-4):
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=tol, rtol=0)


# ----------------------------------------------------------------------------- the table


def test_table_is_generated_and_current():
  r = subprocess.run([sys.executable, "scripts/gen_pretrained_table.py", "--check"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "of 196 open_clip pairs" in r.stdout


def test_table_facts_equal_open_clip():
  data = pretrained.table()
  served = 0
  for name, tags in data["models"].items():
    for tag, e in tags.items():
      cfg = open_clip.get_pretrained_cfg(name, tag)
      if not cfg:  # a variant's release, not from open_clip
        continue
      served += 1
      assert cfg["hf_hub"].startswith(e["hf_hub"] + "/"), (name, tag)
      assert tuple(e["preprocess"]["mean"]) == tuple(cfg["mean"])
      assert tuple(e["preprocess"]["std"]) == tuple(cfg["std"])
      assert e["preprocess"]["resize_mode"] == cfg["resize_mode"]
      assert e["preprocess"]["interpolation"] == cfg["interpolation"]
      # QuickGELU from the tag, or from the model config itself (roberta-ViT-B-32)
      assert e["quick_gelu"] == (cfg.get("quick_gelu", False)
                                 or bool(open_clip.get_model_config(name).get("quick_gelu")))
      assert registry.get_model_config(e["architecture"]).quick_gelu == e["quick_gelu"]
  assert served == data["open_clip_pairs_served"] >= 60
  unsupported = sum(len(u["tags"]) for u in data["unsupported"].values())
  assert served + unsupported == len(open_clip.list_pretrained()) == data["open_clip_pairs"]
  assert ("ViT-B-16-SigLIP", "webli") in zoo.list_pretrained()
  assert ("ViT-L-14-336", "openai") in zoo.list_pretrained()


@pytest.mark.parametrize("name,tag", [("ViT-B-16-SigLIP", "webli"), ("ViT-L-14", "laion2b_s32b_b82k"),
                                      ("ViT-B-32", "openai")])
def test_preprocess_equals_open_clip_transform(name, tag):
  from open_clip.transform import image_transform

  cfg = open_clip.get_pretrained_cfg(name, tag)
  size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
  ref = image_transform(size, is_train=False, mean=cfg["mean"], std=cfg["std"],
                        resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"])
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 256, (173, 251, 3), dtype=np.uint8))
  ours = pretrained.get_preprocess(name, tag)(image)
  np.testing.assert_allclose(ours, ref(image).numpy().transpose(1, 2, 0), atol=1e-5, rtol=0)


def test_unknown_tag_and_model_are_one_line_errors():
  with pytest.raises(hub_lib.PretrainedError) as e:
    zoo.create("ViT-B-32", pretrained="laion9b_nope")
  msg = str(e.value)
  assert "\n" not in msg and "'laion9b_nope'" in msg and "laion2b_s34b_b79k" in msg
  # every pair of open_clip's table is served: nothing is left with a reason
  assert pretrained.table()["unsupported"] == {}
  # an architecture without released weights, and a misspelt one
  with pytest.raises(hub_lib.PretrainedError) as e:
    zoo.create("demo-tiny", pretrained="openai")
  assert "\n" not in str(e.value) and "'demo-tiny' has no pretrained weights" in str(e.value)
  with pytest.raises(hub_lib.PretrainedError) as e:
    zoo.create("ViT-B-32-nope", pretrained="openai")
  assert "\n" not in str(e.value) and "did you mean 'ViT-B-32'?" in str(e.value)


# ----------------------------------------------------------------------------- loading


def test_create_pretrained_equals_open_clip_then_cache_then_export(hub, offline_home, tmp_path,
                                                                   monkeypatch):
  images, tokens = _inputs()
  oc_loaded = open_clip.create_model("test-tiny", pretrained=hub["oc_file"]).eval()
  ref = _oc_features(oc_loaded, images, tokens)
  model, tokenizer, preprocess = zoo.create_model_and_transforms("test-tiny", pretrained=B32[1])
  first = _features(model, images, tokens)
  _close(first, ref)
  np.testing.assert_array_equal(tokenizer(["a photo of a cat"]),
                                open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat"]).numpy())
  assert preprocess.image_size == (32, 32) and preprocess.resize_mode == "shortest"
  cache = os.path.join(offline_home, "zoo", "converted")
  assert os.path.isdir(cache), "the converted model is cached beside the hub cache"

  calls = []
  monkeypatch.setattr(pretrained, "convert_weights", lambda *a: calls.append(a) or 1 / 0)
  again = zoo.create("test-tiny", pretrained=B32[1])  # must be a plain restore
  assert calls == []
  _close(_features(again, images, tokens), first, tol=0)

  out = zoo.export_pretrained(again, str(tmp_path / "export"), preprocess=preprocess)
  oc2, _, oc_pre = open_clip.create_model_and_transforms(f"local-dir:{out}")
  _close(_oc_features(oc2.eval(), images, tokens), ref)
  assert oc_pre.transforms[0].size == 32


def test_hf_hub_open_clip_repo(hub, offline_home):
  images, tokens = _inputs()
  model, tok, pre = zoo.create_model_and_transforms("hf-hub:zoo-test/tiny-open-clip")
  oc, _, oc_pre = open_clip.create_model_and_transforms(f"local-dir:{hub['oc_snapshot']}")
  _close(_features(model, images, tokens), _oc_features(oc.eval(), images, tokens))
  image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 57, 3), dtype=np.uint8))
  np.testing.assert_allclose(pre(image), oc_pre(image).numpy().transpose(1, 2, 0), atol=1e-5)
  assert pre.resize_mode == "squash" and pre.interpolation == "bilinear"


def test_hf_hub_transformers_repo(hub, offline_home):
  images, tokens = _inputs()
  model = zoo.create("hf-hub:zoo-test/tiny-hf")
  _close(_features(model, images, tokens), _features(hub["hf_src"], images, tokens), tol=1e-6)


def test_long_clip_release(hub, offline_home):
  images, _ = _inputs()
  model, tok, _ = zoo.create_model_and_transforms("test-long", pretrained="sharegpt4v")
  tokens = tok(["a long caption " * 30])
  assert tokens.shape == (1, 248)
  _close(_features(model, images, tokens), _features(hub["long_src"], images, tokens), tol=1e-6)


def test_clip_moe_release(hub, offline_home):
  images, tokens = _inputs()
  model = zoo.create("test-moe", pretrained="sharegpt4v")
  assert isinstance(model, moe.MoECLIP) and model.config.moe.num_experts == 4
  assert model.config.moe.top_k == 2
  _close(_features(model, images, tokens), _features(hub["moe_src"], images, tokens), tol=1e-5)


def test_mclip_release(hub, offline_home):
  images, _ = _inputs()
  model, tok, pre = zoo.create_model_and_transforms("test-mclip", pretrained="mclip")
  assert isinstance(model, multilingual.MultilingualCLIP)
  tokens = tok(["Älgen är skogens konung!", "a dog"])
  _close(_features(model, images, tokens), _features(hub["mclip_src"], images, tokens), tol=1e-5)


# ----------------------------------------------------------------------------- failures


def test_offline_with_empty_cache_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(hub_lib.PretrainedError) as e:
    zoo.create(*B32[:1], pretrained=B32[1])
  msg = str(e.value)
  assert "\n" not in msg and "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg


def test_truncated_download_is_one_line(hub, tmp_path, monkeypatch):
  entry = pretrained.get_pretrained_cfg(*B32)
  good = _bytes(hub["oc_file"])
  snap = put_repo(str(tmp_path), entry["hf_hub"], {"open_clip_model.safetensors": good})
  blob = os.path.realpath(os.path.join(snap, "open_clip_model.safetensors"))
  with open(blob, "wb") as f:  # an interrupted download: the LFS blob holds only a prefix
    f.write(good[: len(good) // 3])
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(hub_lib.PretrainedError) as e:
    zoo.create("test-tiny", pretrained=B32[1])
  assert "\n" not in str(e.value) and "truncated or corrupt" in str(e.value)
  # without a digest to compare, the reader itself names the damaged file
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(good[: len(good) // 3])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    hub_lib.read_weights(str(cut))


# ----------------------------------------------------------------------------- train / push


def test_init_from_pretrained(hub, offline_home):
  config = ml_collections.ConfigDict({"init_from": f"pretrained:test-tiny/{B32[1]}"})
  pretrained.resolve_init_from(config)
  assert os.path.isfile(os.path.join(config.init_from, "zoo_config.json"))
  fresh = zoo.create("test-tiny", seed=9)
  family_base.init_params_from(config, fresh)
  images, tokens = _inputs()
  _close(_features(fresh, images, tokens), _oc_features(hub["oc_model"], images, tokens))


def test_push_dry_run_cli(hub, offline_home, tmp_path):
  model = zoo.create("test-tiny", pretrained=B32[1])
  zoo.save(model, str(tmp_path / "ckpt"))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "zoo.convert", "push", "--input",
                      str(tmp_path / "ckpt"), "--repo", "me/tiny", "--dry-run"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "open_clip_config.json" in r.stdout and "hf-hub:me/tiny" in r.stdout
  r = subprocess.run([sys.executable, "-m", "zoo.convert", "push", "--input",
                      str(tmp_path / "nothing"), "--repo", "me/tiny", "--dry-run"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_open_clip_model_configs_round_trip():
  for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-B-16-SigLIP",
               "ViT-B-32-quickgelu", "LongCLIP-ViT-B-16"):
    config = registry.get_model_config(name)
    back = open_clip_config.open_clip_model_cfg(config)
    assert open_clip_config.same_towers(open_clip_config.config_from_open_clip_cfg(back), config), name
    oc = open_clip.get_model_config(name)
    if oc is not None:
      assert open_clip_config.same_towers(open_clip_config.config_from_open_clip_cfg(oc), config), name
  # the SigLIP export is open_clip's own config, key for key
  assert open_clip_config.open_clip_model_cfg(registry.get_model_config("ViT-B-16-SigLIP")) == \
      json.loads(json.dumps(open_clip.get_model_config("ViT-B-16-SigLIP")))


@pytest.mark.slow
def test_vit_b32_release_equals_open_clip(tmp_path, monkeypatch):
  """The real table entry and architecture, on random full-size weights."""
  torch.manual_seed(0)
  oc_model = open_clip.create_model(*B32[:1])
  sd = {k: v.detach().numpy() for k, v in oc_model.state_dict().items()}
  entry = pretrained.get_pretrained_cfg(*B32)
  snap = put_repo(str(tmp_path), entry["hf_hub"],
                  {"open_clip_model.safetensors": _safetensors_bytes(sd, str(tmp_path))})
  del sd
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("ZOO_CACHE", raising=False)
  model = zoo.create(*B32[:1], pretrained=B32[1])
  ref = open_clip.create_model(B32[0], pretrained=os.path.join(snap, "open_clip_model.safetensors"))
  images, tokens = _inputs(224)
  _close(_features(model, images, tokens), _oc_features(ref.eval(), images, tokens))


@pytest.mark.slow
def test_eval_cli_pretrained(hub, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HOME=hub["home"],
             HF_HUB_OFFLINE="1")
  # Benchmarks by name need no --config: an image folder with one sub-folder per class.
  from PIL import Image

  rng = np.random.default_rng(0)
  for c in range(10):  # cifar10's 10 classes, one image each
    os.makedirs(tmp_path / "cifar" / f"class_{c}")
    pixels = np.clip(rng.normal(20 * c, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cifar" / f"class_{c}" / "0.png")
  r = subprocess.run([sys.executable, "eval.py", "--pretrained", "hf-hub:zoo-test/tiny-hf",
                      "--datasets", f"cifar10={tmp_path / 'cifar'}", "--output",
                      str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  with open(tmp_path / "out" / "metrics.json") as f:
    top1 = json.load(f)[-1]["cifar10/top1"]
  assert 0.0 <= top1 <= 1.0
