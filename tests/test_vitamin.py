"""ViTamin CLIP (open_clip's ViTamin-* through timm's vitamin trunks): parity with open_clip on
random weights (with learned positions, and without as ViTamin-XL), strict bitwise round trips,
full-size state-dict shapes, the pretrained table, bad sizes / layouts."""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import convert
from zoo.convert import common, open_clip as oc_layout, open_clip_config
from zoo.convert.common import StateDictError
from zoo.models import configs as registry, vitamin
from zoo.weights import pretrained

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

TINY = {  # timm name -> (positions, zoo's trunk config); stem 8 != stage width 16: an expand conv
    "vitamin_zoo_tiny": vitamin.ViTaminVisionConfig(64, 8, (16, 32), (2, 2), 64, 2, 2, 2.0, True),
    "vitamin_zoo_tiny_nopos": vitamin.ViTaminVisionConfig(64, 8, (16, 32), (2, 2), 64, 2, 2, 2.0,
                                                          False),
}


def _tiny_trunks():
  """Small timm ViTamins (vitamin_small_224's layout, fewer and narrower blocks) by name."""
  from timm.models import register_model, vitamin as timm_vitamin

  for name, cfg in TINY.items():
    if name in timm.list_models(name):
      continue

    def make(pretrained=False, _name=name, _cfg=cfg, **kwargs):
      embed_cfg = timm_vitamin.VitCfg(
          embed_dim=(*_cfg.dims, _cfg.width), depths=(*_cfg.depths, 1), stem_width=_cfg.stem_width,
          conv_cfg=timm_vitamin.VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
          head_type="1d")
      args = dict(img_size=_cfg.image_size, embed_dim=_cfg.width, depth=_cfg.layers,
                  num_heads=_cfg.heads, mlp_layer=timm_vitamin.GeGluMlp, mlp_ratio=2.0,
                  class_token=False, global_pool="avg", embed_cfg=embed_cfg,
                  pos_embed="learn" if _cfg.pos_embed else "none",
                  pretrained_cfg=timm_vitamin._cfg())
      return timm_vitamin._create_vitamin(_name, pretrained=pretrained, **dict(args, **kwargs))

    make.__name__ = name
    register_model(make)
    vitamin.TIMM_VITAMINS.setdefault(name, cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  _tiny_trunks()
  cfg_dir = tmp_path_factory.mktemp("oc_cfg")
  models = {}
  # the no-position trunk's config says 48 px for a trunk built at 64 px (as ViTamin-XL-384 says
  # 256); it reads any multiple of 16: both models are fed 64 px (the same shapes, cheaper)
  for i, (trunk, size) in enumerate((("vitamin_zoo_tiny", 64), ("vitamin_zoo_tiny_nopos", 48))):
    cfg = {"embed_dim": 32, "vision_cfg": {"timm_model_name": trunk, "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "linear", "timm_drop": 0.0,
                                           "timm_drop_path": 0.1, "image_size": size},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}, "custom_text": True}
    with open(os.path.join(cfg_dir, f"tiny-{trunk}.json"), "w") as f:
      json.dump(cfg, f)
    open_clip.add_model_config(str(cfg_dir))
    torch.manual_seed(i)
    oc = open_clip.create_model(f"tiny-{trunk}")
    g = torch.Generator().manual_seed(10 + i)
    with torch.no_grad():  # every parameter off its init (LN 1/0, biases 0)
      for p in oc.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.02)
    config = open_clip_config.config_from_open_clip_cfg(cfg)
    sd = {k: v.numpy() for k, v in oc.state_dict().items()}
    models[trunk] = (oc.eval(), config, 64, sd, convert.from_open_clip(sd, config))
  return models


def test_architectures_equal_open_clip_configs():
  for name in vitamin.VITAMINS:
    ours = registry.get_model_config(name)
    mapped = open_clip_config.config_from_open_clip_cfg(open_clip.get_model_config(name))
    assert isinstance(ours, vitamin.ViTaminCLIPConfig)
    assert open_clip_config.same_towers(ours, mapped), name
  assert registry.get_model_config("ViTamin-S-LTT").text.width == 768
  assert registry.get_model_config("ViTamin-XL-384").vision.image_size == 256  # open_clip's
  pairs = [p for p in open_clip.list_pretrained() if p[0].startswith("ViTamin")]
  assert len(pairs) == 15 and set(pairs) <= set(map(tuple, zoo.list_pretrained()))
  for name, tag in pairs:
    assert pretrained.get_pretrained_cfg(name, tag)["architecture"] == name


def test_full_size_state_dict_shapes_equal_open_clip(name="ViTamin-S"):
  """(Every ViTamin was checked so once; the suite keeps the smallest.)"""
  cfg = open_clip.get_model_config(name)
  with torch.device("meta"):
    oc = open_clip.model.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
  want = {k: tuple(v.shape) for k, v in oc.state_dict().items()}
  config = registry.get_model_config(name)
  _, state = common.abstract_state(config, lambda c: vitamin.ViTaminCLIP(c, rngs=nnx.Rngs(0)))
  assert common.expected_torch_shapes(oc_layout.rules_for(config), common.flat_shapes(state)) == want


@pytest.mark.parametrize("trunk", list(TINY))
def test_features_equal_open_clip_and_round_trip(tiny, trunk):
  oc, config, size, sd, model = tiny[trunk]
  images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  tokens = np.asarray(zoo.get_tokenizer("ViTamin-S")(["a photo of a cat", "two dogs"]))
  with torch.no_grad():
    ref_img = oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    ref_txt = oc.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
  img, txt = np.asarray(model.encode_image(images)), np.asarray(model.encode_text(tokens))
  diff = max(np.abs(img - ref_img).max(), np.abs(txt - ref_txt).max())
  print(f"parity tiny ViTamin ({trunk}): max |diff| {diff:.2e}")
  assert diff <= 1e-4
  back = convert.to_open_clip(model)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  oc.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  blocks = model.visual.transformer.resblocks
  assert blocks[0].mlp.w0.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_bad_sizes_and_layouts_are_one_line(tiny):
  _, config, _, sd, model = tiny["vitamin_zoo_tiny"]
  assert tiny["vitamin_zoo_tiny_nopos"][1].vision.image_size == 48
  with pytest.raises(ValueError, match=r"^image size 72: a ViTamin tower needs a multiple of 16"):
    dataclasses.replace(config.vision, image_size=72)
  with pytest.raises(ValueError, match=r"images of shape \(1, 48, 48, 3\).*\[B, 64, 64, 3\]"):
    model.encode_image(np.zeros((1, 48, 48, 3), np.float32))
  nopos = tiny["vitamin_zoo_tiny_nopos"][4]
  with pytest.raises(ValueError, match=r"images of shape \(1, 40, 40, 3\).*multiples of 16"):
    nopos.encode_image(np.zeros((1, 40, 40, 3), np.float32))
  with pytest.raises(StateDictError, match=r"(?s)missing +visual\.trunk\.pos_embed"):
    convert.from_open_clip({k: v for k, v in sd.items() if "pos_embed" not in k}, config)
  with pytest.raises(StateDictError, match=r"(?s)missing +text\.token_embedding\.weight.*"
                     r"unexpected visual\.conv1\.weight"):
    convert.from_open_clip(convert.to_open_clip(zoo.create("test-tiny")), config)  # a ViT
  with pytest.raises(zoo.weights.hub.PretrainedError, match="positions are fixed to 64 px"):
    cfg = dict(open_clip.get_model_config("tiny-vitamin_zoo_tiny"))
    open_clip_config.config_from_open_clip_cfg(
        dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=96)))
