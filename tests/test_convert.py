"""Conversion parity: zoo models built from PyTorch weights compute PyTorch's features.

References are the installed open_clip and transformers models themselves (random init with a
fixed torch seed); features must agree to 1e-4 in float32, and conversions must round-trip
bit-exactly and load back with strict=True.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

import zoo  # noqa: E402
from zoo import convert
from zoo.convert import cli, io as convert_io  # noqa: E402
from zoo.models import configs
from zoo.weights import model_dir

TOL = 1e-4
TEXTS = ["a photo of a cat", "A DIAGRAM of the <b>zoo</b>'s layout &amp; more!!", "",
         "emoji 🦒 and unicode naïve café " * 4]


def _texts_tokens() -> np.ndarray:
  return open_clip.get_tokenizer("ViT-B-32")(TEXTS).numpy()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
  return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _torch_features(model, images: torch.Tensor, tokens: np.ndarray):
  with torch.no_grad():
    return (model.encode_image(images).numpy(), model.encode_text(torch.from_numpy(tokens)).numpy())


def _zoo_features(model, images: torch.Tensor, tokens: np.ndarray):
  nhwc = images.permute(0, 2, 3, 1).numpy()
  img = jax.jit(lambda x: model.encode_image(x))(nhwc)
  txt = jax.jit(lambda t: model.encode_text(t))(tokens.astype(np.int32))
  return np.asarray(img), np.asarray(txt)


def _as_numpy(sd) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def _assert_same_state_dict(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _load_strict(model, sd: dict[str, np.ndarray]) -> None:
  result = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                 strict=True)
  assert not result.missing_keys and not result.unexpected_keys


def tiny_open_clip(quick_gelu: bool = False, seed: int = 0):
  """open_clip's CLIP class with zoo's 'test-tiny' dimensions (fast, same code path)."""
  torch.manual_seed(seed)
  vision = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
  text = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
  return open_clip.model.CLIP(32, vision, text, quick_gelu=quick_gelu).eval()


def tiny_hf(act: str = "quick_gelu", seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, hidden_act=act),
      vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8, hidden_act=act),
      projection_dim=32)
  return transformers.CLIPModel(config).eval()


# ----------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def b32():
  torch.manual_seed(0)
  return open_clip.create_model("ViT-B-32", pretrained=None).eval()


def test_open_clip_vit_b32_parity_and_exact_round_trip(b32):
  sd = b32.state_dict()
  model = convert.from_open_clip(sd, "ViT-B-32")
  images, tokens = _images(2, 224), _texts_tokens()
  want_img, want_txt = _torch_features(b32, images, tokens)
  got_img, got_txt = _zoo_features(model, images, tokens)
  assert np.abs(got_img - want_img).max() <= TOL
  assert np.abs(got_txt - want_txt).max() <= TOL
  assert float(model.logit_scale[...]) == b32.logit_scale.item()

  back = convert.to_open_clip(model)
  _assert_same_state_dict(back, _as_numpy(sd))
  _load_strict(b32, back)


@pytest.mark.slow
def test_open_clip_quickgelu_parity(b32):
  torch_model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
  torch_model.load_state_dict(b32.state_dict(), strict=True)
  model = convert.from_open_clip(torch_model.state_dict(), "ViT-B-32-quickgelu")
  assert model.config.quick_gelu
  images, tokens = _images(2, 224, seed=1), _texts_tokens()
  want_img, want_txt = _torch_features(torch_model, images, tokens)
  got_img, got_txt = _zoo_features(model, images, tokens)
  assert np.abs(got_img - want_img).max() <= TOL
  assert np.abs(got_txt - want_txt).max() <= TOL
  # GELU and QuickGELU really differ on these weights, so the check above has teeth.
  gelu_img, _ = _torch_features(b32, images, tokens)
  assert np.abs(gelu_img - want_img).max() > 100 * TOL


@pytest.mark.slow
def test_open_clip_vit_b16_parity_and_exact_round_trip():
  torch.manual_seed(0)
  torch_model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
  sd = torch_model.state_dict()
  model = convert.from_open_clip(sd, "ViT-B-16")
  images, tokens = _images(2, 224, seed=2), _texts_tokens()[:2]
  want_img, want_txt = _torch_features(torch_model, images, tokens)
  got_img, got_txt = _zoo_features(model, images, tokens)
  assert np.abs(got_img - want_img).max() <= TOL
  assert np.abs(got_txt - want_txt).max() <= TOL
  back = convert.to_open_clip(model)
  _assert_same_state_dict(back, _as_numpy(sd))
  _load_strict(torch_model, back)


def test_tiny_open_clip_parity_with_numpy_and_torch_inputs():
  torch_model = tiny_open_clip()
  sd = torch_model.state_dict()
  images, tokens = _images(3, 32), _texts_tokens()
  want = _torch_features(torch_model, images, tokens)
  for source in (sd, _as_numpy(sd)):
    got = _zoo_features(convert.from_open_clip(source, "test-tiny"), images, tokens)
    for g, w in zip(got, want):
      assert np.abs(g - w).max() <= TOL


def test_trim_padding_text_encoding_matches_open_clip():
  """encode_text(trim_padding=True) runs a shorter bucket yet equals open_clip on full tokens."""
  torch_model = tiny_open_clip(seed=2)
  model = convert.from_open_clip(torch_model.state_dict(), "test-tiny")
  tokenizer = open_clip.get_tokenizer("ViT-B-32")
  short = tokenizer(["a cat", "two dogs on a red sofa", "x"]).numpy()
  mixed = tokenizer(["a cat", "word " * 100]).numpy()  # the second fills all 77 positions
  trimmed = jax.jit(lambda t: model.encode_text(t, trim_padding=True))
  for tokens in (short, mixed):
    with torch.no_grad():
      want = torch_model.encode_text(torch.from_numpy(tokens)).numpy()
    got = np.asarray(trimmed(tokens.astype(np.int32)))
    assert np.abs(got - want).max() <= TOL


def test_openai_state_dict_needs_quickgelu_and_fp16_is_widened():
  torch_model = tiny_open_clip(quick_gelu=True)
  sd = {k: v.half() for k, v in torch_model.state_dict().items()}
  sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77),
            vocab_size=torch.tensor(49408))
  with pytest.raises(ValueError, match="quickgelu"):
    convert.from_open_clip(sd, "test-tiny")
  model = convert.from_open_clip(sd, "test-tiny", quick_gelu=True)
  images, tokens = _images(2, 32, seed=4), _texts_tokens()
  want = _torch_features(torch_model.half().float(), images, tokens)  # the fp16-rounded weights
  for g, w in zip(_zoo_features(model, images, tokens), want):
    assert np.abs(g - w).max() <= TOL
  back = convert.to_open_clip(model)
  for k, v in back.items():
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, sd[k].float().numpy())


def test_ddp_module_prefix_is_stripped():
  sd = {f"module.{k}": v for k, v in tiny_open_clip().state_dict().items()}
  model = convert.from_open_clip(sd, "test-tiny")
  _assert_same_state_dict(convert.to_open_clip(model),
                          {k[len("module."):]: v.numpy() for k, v in sd.items()})


def test_bad_state_dict_lists_missing_unexpected_and_misshaped_keys():
  sd = _as_numpy(tiny_open_clip().state_dict())
  del sd["visual.ln_post.bias"]
  sd["visual.extra_head.weight"] = np.zeros((3, 4), np.float32)
  sd["transformer.resblocks.1.mlp.c_fc.weight"] = np.zeros((128, 64), np.float32)
  with pytest.raises(convert.StateDictError) as info:
    convert.from_open_clip(sd, "test-tiny")
  msg = str(info.value)
  assert "3 problems" in msg
  assert "missing    visual.ln_post.bias: expected (64,)" in msg
  assert "unexpected visual.extra_head.weight: found (3, 4)" in msg
  assert ("mis-shaped transformer.resblocks.1.mlp.c_fc.weight: expected (256, 64), "
          "found (128, 64)") in msg


def test_wrong_architecture_name_is_reported_with_shapes(b32):
  with pytest.raises(convert.StateDictError, match=r"visual.conv1.weight: expected \(768, 3, 16, 16\), "
                     r"found \(768, 3, 32, 32\)"):
    convert.from_open_clip(b32.state_dict(), "ViT-B-16")


def test_hf_layout_rejects_siglip_models_with_a_vision_projection():
  with pytest.raises(ValueError, match="SiglipModel / Siglip2Model layout"):
    convert.to_hf(nnx.eval_shape(lambda: zoo.create("test-tiny-siglip")))


# ----------------------------------------------------------------------------- SigLIP


def tiny_open_clip_siglip(seed: int = 0):
  """open_clip's SigLIP model class (timm ViT trunk + MAP head, custom text) at tiny size."""
  timm = pytest.importorskip("timm")
  torch.manual_seed(seed)
  vision = dict(image_size=32, timm_model_name="vit_base_patch16_siglip_224",
                timm_model_pretrained=False, timm_pool="map", timm_proj="none")
  text = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2,
              no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6})
  model = open_clip.model.CustomTextCLIP(64, vision, text, init_logit_bias=-10.0)
  # Same timm architecture as ViT-B-16-SigLIP's trunk, shrunk.
  model.visual.trunk = timm.create_model(
      "vit_base_patch16_siglip_224", pretrained=False, num_classes=0, global_pool="map",
      img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
  return model.eval()


def test_siglip_timm_layout_parity_and_exact_round_trip():
  torch_model = tiny_open_clip_siglip()
  sd = torch_model.state_dict()
  config = configs.get_model_config("test-tiny-siglip", embed_dim=64, vision={"projection": False})
  model = convert.from_open_clip(sd, config)
  images, tokens = _images(2, 32, seed=5), _texts_tokens()
  want = _torch_features(torch_model, images, tokens)
  for g, w in zip(_zoo_features(model, images, tokens), want):
    assert np.abs(g - w).max() <= TOL
  assert float(model.logit_bias[...]) == -10.0
  back = convert.to_open_clip(model)
  _assert_same_state_dict(back, _as_numpy(sd))
  _load_strict(torch_model, back)


@pytest.mark.slow
def test_siglip_vit_b16_parity_and_exact_round_trip():
  pytest.importorskip("timm")
  torch.manual_seed(0)
  torch_model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
  sd = torch_model.state_dict()
  model = convert.from_open_clip(sd, "ViT-B-16-SigLIP")
  images = _images(1, 224, seed=6)
  tokens = np.random.default_rng(0).integers(1, 32000, size=(2, 64))
  want = _torch_features(torch_model, images, tokens)
  for g, w in zip(_zoo_features(model, images, tokens), want):
    assert np.abs(g - w).max() <= TOL
  _assert_same_state_dict(convert.to_open_clip(model), _as_numpy(sd))


# ----------------------------------------------------------------------------- HF


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_parity_and_exact_round_trip(act):
  hf = tiny_hf(act)
  sd = hf.state_dict()
  model = convert.from_hf(sd, hf.config.to_dict())
  assert model.config.quick_gelu == (act == "quick_gelu")
  images, tokens = _images(3, 32, seed=3), _texts_tokens()
  with torch.no_grad():
    out_img = hf.get_image_features(pixel_values=images)
    out_txt = hf.get_text_features(input_ids=torch.from_numpy(tokens))
  want_img = getattr(out_img, "pooler_output", out_img).numpy()
  want_txt = getattr(out_txt, "pooler_output", out_txt).numpy()
  got_img, got_txt = _zoo_features(model, images, tokens)
  assert np.abs(got_img - want_img).max() <= TOL
  assert np.abs(got_txt - want_txt).max() <= TOL

  back = convert.to_hf(model)
  _assert_same_state_dict(back, _as_numpy(sd))
  # The exported config rebuilds an equivalent CLIPModel that takes the weights strictly.
  rebuilt = transformers.CLIPModel(transformers.CLIPConfig(**convert.config_to_hf(model.config)))
  _load_strict(rebuilt.eval(), back)
  with torch.no_grad():
    again = rebuilt.get_text_features(input_ids=torch.from_numpy(tokens))
  np.testing.assert_array_equal(getattr(again, "pooler_output", again).numpy(), want_txt)


def test_hf_legacy_position_ids_are_ignored_and_bad_keys_listed():
  hf = tiny_hf()
  sd = _as_numpy(hf.state_dict())
  sd["text_model.embeddings.position_ids"] = np.arange(77)[None]
  sd["vision_model.embeddings.position_ids"] = np.arange(17)[None]
  convert.from_hf(sd, hf.config)
  del sd["vision_model.encoder.layers.0.self_attn.k_proj.bias"]
  sd["visual_projection.weight"] = sd["visual_projection.weight"].T
  with pytest.raises(convert.StateDictError) as info:
    convert.from_hf(sd, hf.config)
  msg = str(info.value)
  assert "missing    vision_model.encoder.layers.0.self_attn.k_proj.bias: expected (64,)" in msg
  assert "mis-shaped visual_projection.weight: expected (32, 64), found (64, 32)" in msg


def test_hf_config_mapping():
  config = convert.config_from_hf(tiny_hf("gelu").config.to_dict())
  assert (config.vision.width, config.vision.layers, config.vision.heads) == (64, 2, 2)
  assert (config.vision.image_size, config.vision.patch_size, config.embed_dim) == (32, 8, 32)
  assert (config.text.context_length, config.text.vocab_size, config.text.mlp_ratio) == (77, 49408, 4.0)
  assert not config.quick_gelu
  # HF's ViT-B/32 config maps to zoo's ViT-B-32-quickgelu architecture.
  b32 = transformers.CLIPConfig(
      text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8),
      vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                         patch_size=32, image_size=224),
      projection_dim=512)
  got = convert.config_from_hf(b32.to_dict())
  want = configs.get_model_config("ViT-B-32-quickgelu")
  assert got.vision == want.vision and got.text == want.text and got.quick_gelu
  assert abs(got.init_logit_scale - want.init_logit_scale) < 1e-4


# ----------------------------------------------------------------------------- CLI


def _read(path: str) -> dict[str, np.ndarray]:
  return convert_io.read_state_dict(path)


def test_cli_open_clip_round_trip_through_safetensors_and_pt(tmp_path):
  sd = _as_numpy(tiny_open_clip().state_dict())
  src = str(tmp_path / "in.safetensors")
  convert_io.write_safetensors(sd, src)
  assert cli.run(["from-open-clip", "--model", "test-tiny", "--input", src,
                   "--output", str(tmp_path / "ckpt")]) == 0
  model, _, _ = model_dir.load(str(tmp_path / "ckpt"))
  _assert_same_state_dict(convert.to_open_clip(model), sd)
  out = str(tmp_path / "out.safetensors")
  assert cli.run(["to-open-clip", "--input", str(tmp_path / "ckpt"), "--output", out]) == 0
  _assert_same_state_dict(_read(out), sd)
  _load_strict(tiny_open_clip(seed=1), _read(out))

  # torch files: plain state dicts and open_clip training checkpoints ({'state_dict': ...}).
  pt = str(tmp_path / "epoch_1.pt")
  torch.save({"epoch": 1, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}}, pt)
  assert cli.run(["from-open-clip", "--model", "test-tiny", "--input", pt,
                   "--output", str(tmp_path / "ckpt_pt")]) == 0
  _assert_same_state_dict(convert.to_open_clip(model_dir.load(str(tmp_path / "ckpt_pt"))[0]), sd)


def test_cli_refuses_pickled_objects(tmp_path):
  bad = str(tmp_path / "model.pt")
  torch.save({"weights": tiny_open_clip()}, bad)  # a whole nn.Module needs full unpickling
  with pytest.raises(ValueError, match="weights_only=True"):
    convert_io.read_state_dict(bad)
  other = tmp_path / "model.ckpt"
  other.write_bytes(b"\0" * 8)
  with pytest.raises(ValueError, match="unknown weight file type"):
    convert_io.read_state_dict(str(other))


def test_cli_hf_round_trip_with_config_json(tmp_path):
  hf = tiny_hf()
  hf.save_pretrained(str(tmp_path / "hf_in"))  # model.safetensors + config.json
  sd = _as_numpy(hf.state_dict())
  assert cli.run(["from-hf", "--input", str(tmp_path / "hf_in" / "model.safetensors"),
                   "--output", str(tmp_path / "ckpt")]) == 0
  assert cli.run(["to-hf", "--input", str(tmp_path / "ckpt"), "--output",
                   str(tmp_path / "hf_out")]) == 0
  _assert_same_state_dict(_read(str(tmp_path / "hf_out" / "model.safetensors")), sd)
  reloaded = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf_out")).eval()
  _assert_same_state_dict(_as_numpy(reloaded.state_dict()), sd)
  with open(tmp_path / "hf_out" / "config.json") as f:
    assert json.load(f)["vision_config"]["hidden_act"] == "quick_gelu"
  assert os.path.isfile(tmp_path / "ckpt" / model_dir.CONFIG_FILE)
