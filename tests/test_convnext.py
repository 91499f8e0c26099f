"""ConvNeXt CLIP (open_clip's convnext_* through timm's trunk): parity with open_clip on random
weights (linear and MLP heads), strict round trips, the pretrained table, bad sizes/layouts."""

import dataclasses
import json
import os

import numpy as np
import pytest

import zoo
from zoo import convert
from zoo.convert import open_clip_config
from zoo.convert.common import StateDictError
from zoo.models import configs as registry, convnext
from zoo.weights import pretrained

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

NAMES = ("convnext_base", "convnext_base_w", "convnext_base_w_320", "convnext_large_d",
         "convnext_large_d_320", "convnext_xxlarge")
TINY_DEPTHS, TINY_DIMS = (1, 1, 2, 1), (16, 32, 48, 64)


def _tiny_trunk():
  """A small timm ConvNeXt (convnext_base's layout, fewer and narrower blocks) by name."""
  from timm.models import convnext as timm_convnext, register_model

  if "convnext_zoo_tiny" not in timm.list_models("convnext_zoo_tiny"):
    @register_model
    def convnext_zoo_tiny(pretrained=False, **kwargs):
      return timm_convnext._create_convnext("convnext_tiny", pretrained=pretrained,
                                            **dict(dict(depths=TINY_DEPTHS, dims=TINY_DIMS), **kwargs))
  convnext.TIMM_CONVNEXTS.setdefault("convnext_zoo_tiny", (TINY_DEPTHS, TINY_DIMS, 1e-6))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  _tiny_trunk()
  cfg_dir = tmp_path_factory.mktemp("oc_cfg")
  out = {}
  for proj in ("linear", "mlp"):
    cfg = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "convnext_zoo_tiny",
                                           "timm_model_pretrained": False, "timm_pool": "",
                                           "timm_proj": proj, "timm_drop": 0.0,
                                           "timm_drop_path": 0.1, "image_size": 64},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    with open(os.path.join(cfg_dir, f"tiny-convnext-{proj}.json"), "w") as f:
      json.dump(cfg, f)
    out[proj] = cfg
  open_clip.add_model_config(str(cfg_dir))
  models = {}
  for i, proj in enumerate(out):
    torch.manual_seed(i)
    oc = open_clip.create_model(f"tiny-convnext-{proj}")
    g = torch.Generator().manual_seed(10 + i)
    with torch.no_grad():  # every parameter off its init (layer scale 1e-6, LN 1/0, biases 0)
      for p in oc.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.02)
    models[proj] = (oc.eval(), open_clip_config.config_from_open_clip_cfg(out[proj]))
  return models


def test_architectures_equal_open_clip_configs():
  for name in NAMES:
    ours = registry.get_model_config(name)
    mapped = open_clip_config.config_from_open_clip_cfg(open_clip.get_model_config(name))
    assert isinstance(ours, convnext.ConvNeXtCLIPConfig)
    assert open_clip_config.same_towers(ours, mapped), name
  assert registry.get_model_config("convnext_xxlarge").vision.ln_eps == 1e-5
  pairs = [p for p in open_clip.list_pretrained() if p[0].startswith("convnext")]
  assert len(pairs) == 12 and set(pairs) <= set(map(tuple, zoo.list_pretrained()))
  for name, tag in pairs:
    assert pretrained.get_pretrained_cfg(name, tag)["architecture"] == name


@pytest.mark.parametrize("proj", ["linear", "mlp"])
def test_features_equal_open_clip_and_round_trip(tiny, proj):
  oc, config = tiny[proj]
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  model = convert.from_open_clip(sd, config)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  tokens = np.asarray(zoo.get_tokenizer("convnext_base")(["a photo of a cat", "two dogs"]))
  with torch.no_grad():
    ref_img = oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    ref_txt = oc.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
  img, txt = np.asarray(model.encode_image(images)), np.asarray(model.encode_text(tokens))
  diff = max(np.abs(img - ref_img).max(), np.abs(txt - ref_txt).max())
  print(f"parity tiny ConvNeXt ({proj} head): max |diff| {diff:.2e}")
  assert diff <= 1e-4
  back = convert.to_open_clip(model)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  oc.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  assert model.visual.stages[1].blocks[0].fc1.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_bad_sizes_and_layouts_are_one_line(tiny):
  oc, config = tiny["linear"]
  with pytest.raises(ValueError, match=r"^image size 250: a ConvNeXt tower needs a multiple of 32"):
    dataclasses.replace(config.vision, image_size=250)
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  model = convert.from_open_clip(sd, config)
  with pytest.raises(ValueError, match=r"images of shape \(1, 72, 72, 3\).*multiples of 32"):
    model.encode_image(np.zeros((1, 72, 72, 3), np.float32))
  with pytest.raises(StateDictError, match=r"(?s)missing +visual\.head\.mlp\.fc1\.weight"):
    convert.from_open_clip(sd, tiny["mlp"][1])  # a linear head's weights for an MLP head
  with pytest.raises(StateDictError, match=r"(?s)missing +visual\.trunk\.stem\.0\.weight.*"
                     r"unexpected visual\.conv1\.weight"):
    convert.from_open_clip(convert.to_open_clip(zoo.create("test-tiny")), config)  # a ViT
