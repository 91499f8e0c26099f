"""transformers' SiglipModel and Siglip2Model (NaFlex) <-> zoo: parity on jittered random
weights (tiny configs), exact round trips, variable resolution and its input errors."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import zoo  # noqa: E402
from tests.test_pretrained import _safetensors_bytes, put_repo  # noqa: E402
from tests.test_vit_siglip import write_gemma_tokenizer  # noqa: E402
from zoo import convert  # noqa: E402
from zoo.convert import common  # noqa: E402
from zoo.models import layers  # noqa: E402

TOL = 1e-4
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2)


def _jitter(model, seed: int):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=g))
  return model.eval()


def _hf(kind: str):
  torch.manual_seed(0)
  text = dict(TINY, vocab_size=300, max_position_embeddings=16)
  if kind == "siglip":
    config = transformers.SiglipConfig(text_config=text,
                                       vision_config=dict(TINY, image_size=32, patch_size=8))
    return _jitter(transformers.SiglipModel(config), 1)
  config = transformers.Siglip2Config(text_config=text,
                                      vision_config=dict(TINY, num_patches=16, patch_size=8))
  return _jitter(transformers.Siglip2Model(config), 2)


@pytest.fixture(scope="module")
def siglip2():
  hf = _hf("siglip2")
  return hf, convert.from_hf(hf.state_dict(), hf.config.to_dict())


def _pooled(out):
  return getattr(out, "pooler_output", out).numpy()


def _round_trip(hf, model):
  back = convert.to_hf(model)
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  result = hf.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys


def test_siglip_model_parity_and_round_trip():
  hf = _hf("siglip")
  model = convert.from_hf(hf.state_dict(), hf.config.to_dict())
  assert model.config.vision.act == model.config.text.act == "gelu_tanh"
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens = np.random.default_rng(1).integers(1, 300, size=(3, 16))
  with torch.no_grad():
    want_img = _pooled(hf.get_image_features(
        pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())))
    want_txt = _pooled(hf.get_text_features(input_ids=torch.from_numpy(tokens)))
  assert np.abs(np.asarray(jax.jit(model.encode_image)(images)) - want_img).max() <= TOL
  assert np.abs(np.asarray(model.encode_text(tokens.astype(np.int32))) - want_txt).max() <= TOL
  assert float(model.logit_bias[...]) == hf.logit_bias.item()
  _round_trip(hf, model)
  assert convert.config_from_hf(convert.config_to_hf(model.config)) == model.config


def _patchify(images: np.ndarray, p: int) -> np.ndarray:
  """transformers' Siglip2 processor layout: row-major patches, each (row, col, channel)."""
  c, h, w = images.shape
  return images.reshape(c, h // p, p, w // p, p).transpose(1, 3, 2, 4, 0).reshape(
      (h // p) * (w // p), -1)


def test_siglip2_naflex_parity_non_square_and_padded(siglip2):
  """32 x 48 at patch 8 (4 x 6 patches, the 4 x 4 grid stretched), 16 x 48 (squeezed:
  the antialias weights) and a padded batch of both, against get_image_features."""
  hf, model = siglip2
  assert model.config.vision.naflex and model.config.vision.grid_size == 4
  rng = np.random.default_rng(2)
  tall = rng.normal(size=(2, 32, 48, 3)).astype(np.float32)
  flat = rng.normal(size=(1, 16, 48, 3)).astype(np.float32)
  length = 24
  rows, shapes, masks = [], [], []
  for img in (*tall, *flat):
    patches = _patchify(img.transpose(2, 0, 1), 8)
    n = len(patches)
    rows.append(np.pad(patches, ((0, length - n), (0, 0))))
    masks.append(np.arange(length) < n)
    shapes.append((img.shape[0] // 8, img.shape[1] // 8))
  pixel_values, mask, spatial = np.stack(rows), np.stack(masks), np.asarray(shapes, np.int64)
  with torch.no_grad():
    want = _pooled(hf.get_image_features(pixel_values=torch.from_numpy(pixel_values),
                                         pixel_attention_mask=torch.from_numpy(mask),
                                         spatial_shapes=torch.from_numpy(spatial)))
  got = np.asarray(jax.jit(model.encode_patches)(pixel_values, spatial.astype(np.int32), mask))
  assert np.abs(got - want).max() <= TOL
  # whole images of one size through encode_image: the same features
  assert np.abs(np.asarray(model.encode_image(tall)) - want[:2]).max() <= TOL
  assert np.abs(np.asarray(model.encode_image(flat)) - want[2:]).max() <= TOL
  # padding changes nothing: the 16 x 48 image alone, unpadded
  alone = model.encode_patches(pixel_values[2:, :12], spatial[2:].astype(np.int32))
  assert np.abs(np.asarray(alone) - want[2:]).max() <= TOL


def test_naflex_preprocess_equals_siglip2_processor_end_to_end(siglip2):
  """zoo.transforms.NaFlexPreprocess on non-square PIL images = Siglip2ImageProcessor's pixel
  values, mask and spatial shapes (PIL backend exactly; the torchvision backend's uint8 resize
  within one level), and the tiny Siglip2Model's features from its output = zoo's, also
  padded to the shorter bucketed length."""
  from PIL import Image
  from transformers.models.siglip2 import image_processing_pil_siglip2 as pil_proc

  from zoo import transforms
  hf, model = siglip2
  rng = np.random.default_rng(5)
  sizes = ((37, 91), (120, 50), (5, 200), (64, 64))
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
  pre = transforms.naflex_preprocess(model.config, max_patches=20)
  assert (pre.patch_size, pre.max_patches, pre.mean) == (8, 20, (0.5, 0.5, 0.5))
  patches, shapes, mask = pre.batch(images)
  assert shapes.tolist() == [[3, 6], [6, 3], [1, 20], [4, 4]]
  kw = dict(patch_size=8, max_num_patches=20, return_tensors="np")
  want = pil_proc.Siglip2ImageProcessorPil(**kw)(images)
  np.testing.assert_array_equal(patches, want["pixel_values"])
  np.testing.assert_array_equal(shapes, want["spatial_shapes"])
  np.testing.assert_array_equal(mask, want["pixel_attention_mask"].astype(bool))
  tv = transformers.Siglip2ImageProcessor(**kw)(images)
  assert np.abs(patches - tv["pixel_values"]).max() <= 2 / 255 + 1e-6
  np.testing.assert_array_equal(shapes, tv["spatial_shapes"])
  with torch.no_grad():
    feats = _pooled(hf.get_image_features(**{k: torch.from_numpy(v) for k, v in want.items()}))
  got = np.asarray(jax.jit(model.encode_patches)(patches, shapes, mask))
  assert np.abs(got - feats).max() <= TOL
  assert transforms.bucket_length(18, 20) == 20 and transforms.bucket_length(9, 20) == 16
  short = pre.batch(images[:2], length=transforms.bucket_length(18, 20))
  assert np.abs(np.asarray(model.encode_patches(*short)) - feats[:2]).max() <= TOL
  with pytest.raises(ValueError, match="image 0 has 18 patches"):
    pre.batch(images[:1], length=16)


def test_siglip2_round_trip_and_config(siglip2):
  hf, model = siglip2
  _round_trip(hf, model)
  assert convert.config_from_hf(convert.config_to_hf(model.config)) == model.config


def test_resize_positions_equals_torch_interpolate():
  grid = np.random.default_rng(4).normal(size=(5, 5, 3)).astype(np.float32)
  for h, w in ((5, 5), (2, 9), (7, 3)):
    want = torch.nn.functional.interpolate(
        torch.from_numpy(grid.transpose(2, 0, 1))[None], size=(h, w), mode="bilinear",
        align_corners=False, antialias=True)[0].numpy().transpose(1, 2, 0).reshape(h * w, 3)
    got = np.asarray(layers.resize_positions(grid, np.asarray([[h, w]]), h * w + 2))[0]
    np.testing.assert_allclose(got[: h * w], want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[h * w:], np.broadcast_to(got[0], (2, 3)))


def test_naflex_input_errors_are_one_line(siglip2):
  hf, model = siglip2
  with pytest.raises(ValueError) as e:
    model.encode_image(np.zeros((1, 30, 48, 3), np.float32))
  assert "\n" not in str(e.value) and "(1, 30, 48, 3)" in str(e.value) and "8" in str(e.value)
  v = model.config.vision
  budget = dataclasses.replace(model.config, vision=dataclasses.replace(v, max_patches=16))
  capped = convert.from_hf(hf.state_dict(), budget)
  assert capped.visual.patchify(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 16, 192)
  with pytest.raises(ValueError) as e:
    capped.encode_image(np.zeros((1, 40, 48, 3), np.float32))  # 30 patches
  msg = str(e.value)
  assert "\n" not in msg and "40x48" in msg and "30 patches" in msg and "16" in msg


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
  return write_gemma_tokenizer(tmp_path_factory.mktemp("gemma"))


def test_hf_hub_siglip2_repo_offline(siglip2, gemma_dir, tmp_path, monkeypatch):
  """`hf-hub:google/siglip2-...`: a transformers Siglip2Model repo (config.json,
  model.safetensors, Gemma tokenizer.model) from a hub cache on disk, nothing downloaded."""
  hf, model = siglip2
  home = str(tmp_path / "hf")
  with open(os.path.join(gemma_dir, "tokenizer.model"), "rb") as f:
    spm_bytes = f.read()
  config = convert.config_to_hf(model.config)
  src = common.build_clip(model.config)
  put_repo(home, "google/siglip2-tiny-naflex", {
      "config.json": json.dumps(config).encode(), "tokenizer.model": spm_bytes,
      "model.safetensors": _safetensors_bytes(convert.to_hf(src), str(tmp_path))})
  monkeypatch.setenv("HF_HOME", home)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("ZOO_CACHE", raising=False)
  loaded, tok, preprocess = zoo.create_model_and_transforms("hf-hub:google/siglip2-tiny-naflex")
  assert loaded.config == model.config and preprocess.resize_mode == "squash"
  ids = tok(["A photo of the cat!"])
  assert ids.shape == (1, 16) and ids[0, -1] == 0 and 1 in ids[0].tolist()
  images = np.random.default_rng(5).normal(size=(1, 32, 48, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(loaded.encode_image(images)),
                                np.asarray(src.encode_image(images)))
