"""MobileCLIP / MobileCLIP 2 (open_clip's MobileCLIP*-S*, timm fastvit_mci* trunks): parity with
open_clip on random weights (a tiny FastViT-MCi through timm's own builder), strict bitwise round
trip, the configs and pretrained table, a wrong-family state dict."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import convert
from zoo.convert import open_clip_config
from zoo.convert.common import StateDictError
from zoo.models import configs as registry, mobileclip
from zoo.weights import pretrained

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

NAMES = ("MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP2-S0", "MobileCLIP2-S2", "MobileCLIP2-S3",
         "MobileCLIP2-S4", "MobileCLIP-B", "MobileCLIP2-B", "MobileCLIP2-L-14")
TINY = dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32))


def _tiny_trunk():
  """fastvit_mci0's layout (SE downsampling, CPE + BN attention in the last stage, 1x1 stem
  branches) with one block per stage and narrow widths, registered in timm by name."""
  from timm.models import fastvit, register_model

  if "fastvit_zoo_tiny" not in timm.list_models("fastvit_zoo_tiny"):
    @register_model
    def fastvit_zoo_tiny(pretrained=False, **kwargs):
      cpe = fastvit.partial(fastvit.RepConditionalPosEnc, spatial_shape=(7, 7))
      args = dict(TINY, mlp_ratios=(3,) * 4, se_downsamples=(False, False, True, True),
                  pos_embs=(None, None, None, cpe), lkc_use_act=True,
                  token_mixers=("repmixer",) * 3 + ("attention",))
      return fastvit._create_fastvit("fastvit_mci0", pretrained=pretrained, **dict(args, **kwargs))
  mobileclip.TIMM_MCI.setdefault("fastvit_zoo_tiny", mobileclip.MCiVisionConfig(
      64, TINY["layers"], TINY["embed_dims"], (3,) * 4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  _tiny_trunk()
  cfg = {"embed_dim": 24, "custom_text": True,
         "vision_cfg": {"timm_model_name": "fastvit_zoo_tiny", "timm_model_pretrained": False,
                        "timm_pool": "avg", "timm_proj": None, "image_size": 64},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                      "layers": 1, "no_causal_mask": True}}
  cfg_dir = tmp_path_factory.mktemp("oc_cfg")
  with open(os.path.join(cfg_dir, "tiny-mobileclip.json"), "w") as f:
    json.dump(cfg, f)
  open_clip.add_model_config(str(cfg_dir))
  torch.manual_seed(0)
  oc = open_clip.create_model("tiny-mobileclip").eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # every float entry off its init, batch-norm running statistics too
    for key, value in oc.state_dict().items():
      if value.dtype.is_floating_point:
        value.add_(torch.randn(value.shape, generator=g) * 0.1)
        if key.endswith("running_var"):
          value.copy_(value.abs() + 0.5)
  return oc, open_clip_config.config_from_open_clip_cfg(cfg)


def test_architectures_equal_open_clip_configs():
  for name in NAMES:
    ours = registry.get_model_config(name)
    mapped = open_clip_config.config_from_open_clip_cfg(open_clip.get_model_config(name))
    vit = name.endswith(("-B", "-L-14"))
    assert isinstance(ours, mobileclip.MobileCLIPViTConfig if vit else mobileclip.MobileCLIPConfig)
    assert ours.text.causal == name.endswith("-B")
    assert open_clip_config.same_towers(ours, mapped), name
  pairs = [p for p in open_clip.list_pretrained() if p[0] in NAMES]
  assert len(pairs) == 10 and set(pairs) <= set(map(tuple, zoo.list_pretrained()))
  for name, tag in pairs:
    entry = pretrained.get_pretrained_cfg(name, tag)
    assert entry["architecture"] == name
    assert entry["preprocess"]["mean"] == list(open_clip.get_pretrained_cfg(name, tag)["mean"])


def test_features_equal_open_clip_and_round_trip(tiny):
  oc, config = tiny
  assert config.vision == mobileclip.TIMM_MCI["fastvit_zoo_tiny"] and not config.text.causal
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  model = convert.from_open_clip(sd, config)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  tokens = np.asarray(zoo.get_tokenizer("MobileCLIP2-S0")(["a photo of a cat", "two dogs"]))
  with torch.no_grad():
    ref_img = oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    ref_txt = oc.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
  img, txt = np.asarray(model.encode_image(images)), np.asarray(model.encode_text(tokens))
  diff = max(np.abs(img - ref_img).max(), np.abs(txt - ref_txt).max())
  print(f"parity tiny FastViT-MCi MobileCLIP: max |diff| {diff:.2e} "
        f"(features up to {np.abs(ref_img).max():.2f} / {np.abs(ref_txt).max():.2f})")
  assert diff <= 1e-4 and np.abs(ref_img).max() > 0.1
  back = convert.to_open_clip(model)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  oc.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  stats = model.visual.stages[3].blocks[0].norm.mean
  assert stats.type.__name__ == "BatchStat"
  assert model.visual.stages[0].blocks[0].mlp.fc1.kernel.get_metadata()["out_sharding"] == (
      "embed", "mlp")
  with pytest.raises(StateDictError, match=r"(?s)missing +visual\.trunk\.final_conv\.conv_kxk\.0"
                     r"\.bn\.bias.*unexpected visual\.conv1\.weight"):
    convert.from_open_clip(convert.to_open_clip(zoo.create("test-tiny")), config)  # a ViT
  half_fused = dict(sd, **{"visual.trunk.stem.0.reparam_conv.weight": np.zeros((8, 3, 3, 3))})
  with pytest.raises(StateDictError, match=r"(?s)missing +visual\.trunk\.\S*reparam_conv.*"
                     r"unexpected +visual\.trunk\.\S*(conv_kxk|conv_scale|identity)"):  # mixed
    convert.from_open_clip(half_fused, config)


def _tiny_vits():
  """MobileCLIP-B's hybrid trunk (conv stem, positions on the patch tokens only) and
  MobileCLIP2-L-14's CLIP ViT (patch conv, pre-norm), narrow and one block deep."""
  from timm.models import register_model, vision_transformer, vision_transformer_hybrid as hybrid

  if "vit_zoo_tiny_mci" not in timm.list_models("vit_zoo_tiny_mci"):
    @register_model
    def vit_zoo_tiny_mci(pretrained=False, **kwargs):
      stem = hybrid.ConvStem(channels=(8, 8, 32), stride=(4, 2, 2), kernel_size=(4, 2, 2), padding=0,
                      act_layer=torch.nn.GELU)
      args = dict(embed_dim=32, depth=1, num_heads=2, no_embed_class=True, img_size=64)
      return hybrid._create_vision_transformer_hybrid(
          "vit_base_mci_224", backbone=stem, embed_args=dict(proj=False), pretrained=pretrained,
          **dict(args, **kwargs))

    @register_model
    def vit_zoo_tiny_clip(pretrained=False, **kwargs):
      args = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, pre_norm=True, img_size=64,
                  norm_layer=vision_transformer.partial(torch.nn.LayerNorm, eps=1e-5))
      return vision_transformer._create_vision_transformer(
          "vit_large_patch14_clip_224", pretrained=pretrained, **dict(args, **kwargs))
  mobileclip.TIMM_VITS.setdefault("vit_zoo_tiny_mci", mobileclip.TimmViTConfig(64, 16, 32, 1, 2))
  mobileclip.TIMM_VITS.setdefault("vit_zoo_tiny_clip", mobileclip.TimmViTConfig(
      64, 8, 32, 1, 2, 4.0, 1e-5, False, True, True))


@pytest.mark.parametrize("trunk", ["vit_zoo_tiny_mci", "vit_zoo_tiny_clip"])
def test_vit_trunks_equal_open_clip(tmp_path, trunk):
  _tiny_vits()
  cfg = {"embed_dim": 24, "custom_text": True,
         "vision_cfg": {"timm_model_name": trunk, "timm_model_pretrained": False,
                        "timm_pool": "token", "timm_proj": None, "image_size": 64},
         "text_cfg": {"width": 32, "heads": 2, "layers": 1}}
  with open(tmp_path / f"tiny-{trunk}.json", "w") as f:
    json.dump(cfg, f)
  open_clip.add_model_config(str(tmp_path))
  torch.manual_seed(0)
  oc = open_clip.create_model(f"tiny-{trunk}").eval()
  g = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for key, value in oc.visual.state_dict().items():
      if value.dtype.is_floating_point:
        value.add_(torch.randn(value.shape, generator=g) * 0.1)
        if key.endswith("running_var"):
          value.copy_(value.abs() + 0.5)
  config = open_clip_config.config_from_open_clip_cfg(cfg)
  assert isinstance(config, mobileclip.MobileCLIPViTConfig) and config.text.causal
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  model = convert.from_open_clip(sd, config)
  images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    ref = oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  diff = np.abs(np.asarray(model.encode_image(images)) - ref).max()
  print(f"parity tiny {trunk} MobileCLIP: max |diff| {diff:.2e} (features up to "
        f"{np.abs(ref).max():.2f})")
  assert diff <= 1e-4 and np.abs(ref).max() > 0.1
  back = convert.to_open_clip(model)
  assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  oc.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def _numel(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def test_reparameterized_equals_train_form_and_timm(tiny):
  """The fused inference form (one conv per MobileOne / large-kernel / RepMixer / CPE block)
  equals zoo's train-time form and timm's own reparameterize_model on the same weights."""
  from timm.utils import reparameterize_model

  from zoo.models import mobileclip_reparam

  oc, config = tiny
  model = convert.from_open_clip({k: v.numpy() for k, v in oc.state_dict().items()}, config)
  before = jax.tree.map(np.asarray, nnx.state(model))
  fused = mobileclip_reparam.reparameterize(model)
  images = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
  unfused_img, fused_img = np.asarray(model.encode_image(images)), np.asarray(
      fused.encode_image(images))
  oc_fused = reparameterize_model(oc)  # a fused copy; oc itself stays unfused
  trunk = oc_fused.visual.trunk
  with torch.no_grad():
    timm_img = oc_fused.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    timm_img = timm_img.numpy()
  d_self, d_timm = np.abs(fused_img - unfused_img).max(), np.abs(fused_img - timm_img).max()
  print(f"reparameterized tiny FastViT-MCi: max |fused - unfused| {d_self:.2e}, "
        f"|fused - timm fused| {d_timm:.2e} (features up to {np.abs(unfused_img).max():.2f})")
  assert d_self <= 1e-5 and d_timm <= 1e-4 and np.abs(unfused_img).max() > 0.1
  # the caller's model is unchanged
  after = jax.tree.map(np.asarray, nnx.state(model))
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
  # no train-time branch is left: the fused tower holds exactly timm's inference-mode entries
  paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(fused.visual))]
  branches = ("conv_kxk", "conv_scale", "identity", "large_conv", "small_conv", "pos_enc",
              "token_mixer.mixer", "token_mixer.norm")
  assert not [p for p in paths if any(b in p for b in branches)]
  n_rep = sum(p.endswith("reparam_conv.kernel") for p in paths)
  timm_sd = {k: v for k, v in trunk.state_dict().items() if "num_batches_tracked" not in k}
  assert n_rep == sum(k.endswith("reparam_conv.weight") for k in timm_sd) == 14
  n_bn = sum(p.endswith(".var") for p in paths)
  assert n_bn == sum(k.endswith("running_var") for k in timm_sd)  # ConvMlp + attention norms
  visual = nnx.state(fused.visual)
  counted = _numel(visual) - sum(p.endswith("num_batches_tracked") for p in paths)
  assert counted == _numel(list(timm_sd.values())) < _numel(nnx.state(model.visual))
  # timm's fused state dict converts into the fused form and back, bitwise and strict
  fused_sd = {k: v.numpy() for k, v in oc_fused.state_dict().items()}
  loaded = convert.from_open_clip(fused_sd, config)
  assert np.abs(np.asarray(loaded.encode_image(images)) - timm_img).max() <= 1e-5
  back = convert.to_open_clip(loaded)
  assert set(back) == set(fused_sd) and all(np.array_equal(back[k], fused_sd[k]) for k in back)
  oc_fused.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
