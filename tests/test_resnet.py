"""ModifiedResNet CLIP (RN50 ... RN50x64): parity with open_clip on random weights (batch-norm
statistics included), strict round trips, the pretrained table, bad sizes and layouts."""

import copy
import dataclasses
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
from zoo.models import configs as registry, resnet, sharding
from zoo.weights import pretrained

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

RN_NAMES = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
TINY = {"embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  cfg_dir = tmp_path_factory.mktemp("oc_cfg")
  with open(os.path.join(cfg_dir, "tiny-rn.json"), "w") as f:
    json.dump(TINY, f)
  open_clip.add_model_config(str(cfg_dir))
  torch.manual_seed(0)
  oc = open_clip.create_model("tiny-rn")
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # every parameter off its init; running statistics not (0, 1)
    for p in oc.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.02)
    for name, b in oc.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn(b.shape, generator=g) * 0.1)
      elif name.endswith("running_var"):
        b.copy_(torch.rand(b.shape, generator=g) + 0.5)
      elif name.endswith("num_batches_tracked"):
        b.fill_(7)
  config = open_clip_config.config_from_open_clip_cfg(TINY)
  return oc.eval(), config


def test_architectures_equal_open_clip_configs():
  for base in RN_NAMES:
    for name in (base, f"{base}-quickgelu"):
      ours = registry.get_model_config(name)
      mapped = open_clip_config.config_from_open_clip_cfg(open_clip.get_model_config(name))
      assert isinstance(ours, resnet.ResNetCLIPConfig)
      assert open_clip_config.same_towers(ours, mapped), name
  pairs = [p for p in open_clip.list_pretrained() if p[0].startswith("RN")]
  assert len(pairs) == 16 and set(pairs) <= set(map(tuple, zoo.list_pretrained()))
  for name, tag in pairs:
    entry = pretrained.get_pretrained_cfg(name, tag)
    quick = open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False)
    assert registry.get_model_config(entry["architecture"]).quick_gelu == (
        quick or name.endswith("-quickgelu"))


def test_features_equal_open_clip_and_round_trip(tiny):
  oc, config = tiny
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  model = convert.from_open_clip(sd, config)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  tokens = np.asarray(zoo.get_tokenizer("RN50")(["a photo of a cat", "two dogs"]))
  with torch.no_grad():
    ref_img = oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    ref_txt = oc.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
  img, txt = np.asarray(model.encode_image(images)), np.asarray(model.encode_text(tokens))
  diff = max(np.abs(img - ref_img).max(), np.abs(txt - ref_txt).max())
  print(f"parity tiny ModifiedResNet: max |diff| {diff:.2e}")
  assert diff <= 1e-4
  back = convert.to_open_clip(model)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  oc.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()}, strict=True)
  # Statistics are non-trainable state; parameters carry logical axis names.
  bn = model.visual.layers[1][0].bn2
  assert isinstance(bn.mean, nnx.BatchStat) and not isinstance(bn.mean, nnx.Param)
  assert len(nnx.state(model, nnx.BatchStat)) and bn.scale.get_metadata()["out_sharding"] == ("mlp",)
  assert model.visual.conv1.kernel.get_metadata()["out_sharding"] == (None, None, None, "mlp")


def test_bad_sizes_and_layouts_are_one_line(tiny):
  oc, config = tiny
  with pytest.raises(ValueError, match=r"^image size 100: a ModifiedResNet needs a multiple of 32"):
    dataclasses.replace(config.vision, image_size=100)
  model = resnet.ResNetCLIP(config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"images of shape \(1, 96, 96, 3\).*\[B, 64, 64, 3\]"):
    model.encode_image(np.zeros((1, 96, 96, 3), np.float32))
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  wider = dataclasses.replace(config, vision=dataclasses.replace(config.vision, width=16))
  with pytest.raises(StateDictError, match=r"(?s)mis-shaped visual\.conv1\.weight: expected "
                     r"\(8, 3, 3, 3\), found \(4, 3, 3, 3\)"):
    convert.from_open_clip(sd, wider)
  with pytest.raises(StateDictError, match=r"(?s)mis-shaped visual\.conv1\.weight: expected \(4, 3, 3, 3\), "
                     r"found \(64, 3, 8, 8\).*unexpected visual\.class_embedding"):  # a ViT
    convert.from_open_clip(convert.to_open_clip(zoo.create("test-tiny")), config)


def test_batch_norm_update_mode_equals_torch_train_mode(tiny):
  """`set_batch_norm(model, True)`: a forward normalises with the batch's statistics and moves
  the running ones as open_clip's ModifiedResNet in `.train()` does (momentum 0.1, unbiased
  running variance, num_batches_tracked + 1), also jitted with the batch split over 4 devices;
  frozen again, the model reads the new ones."""
  oc, config = tiny
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  model = convert.from_open_clip(sd, config)
  assert resnet.set_batch_norm(model, True) == 3 + 3 * 5 + 4  # stem, 5 blocks, 4 downsamples
  images = np.random.default_rng(1).normal(size=(4, 64, 64, 3)).astype(np.float32)
  ref = copy.deepcopy(oc).train()
  with torch.no_grad():
    want = ref.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  got = np.asarray(model.encode_image(images))
  diff = np.abs(got - want).max()
  after = convert.to_open_clip(model)
  stats = {k: v.numpy() for k, v in ref.state_dict().items() if ".bn" in k or "downsample.1" in k}
  stat_diff = max(np.abs(np.asarray(after[k], np.float64) - v).max() for k, v in stats.items())
  print(f"batch-norm train mode vs torch: features {diff:.2e}, running statistics {stat_diff:.2e}")
  assert diff <= 1e-4 and stat_diff <= 1e-5
  assert all(int(after[k]) == 8 for k in stats if k.endswith("num_batches_tracked"))
  assert any(np.abs(after[k] - sd[k]).max() > 1e-3 for k in stats if k.endswith("running_var"))
  # Under a mesh, one image per device: the statistics are still the global batch's (sync).
  fresh = convert.from_open_clip(sd, config)
  graphdef, state = nnx.split(fresh)
  mesh = sharding.make_mesh(devices=jax.devices()[:4])

  @jax.jit
  def train_forward(state, images):
    m = nnx.merge(graphdef, state, copy=True)
    resnet.set_batch_norm(m, True)
    return m.encode_image(images), nnx.state(m, nnx.BatchStat)

  out, new_stats = train_forward(state, jax.device_put(images, sharding.batch_sharding(mesh)))
  assert len(out.sharding.device_set) == 4
  nnx.update(fresh, new_stats)
  sharded = convert.to_open_clip(fresh)
  assert np.abs(np.asarray(out) - want).max() <= 1e-4
  assert max(np.abs(np.asarray(sharded[k], np.float64) - v).max() for k, v in stats.items()) <= 1e-5
  resnet.set_batch_norm(model, False)
  ref.eval()
  with torch.no_grad():
    frozen = ref.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  assert np.abs(np.asarray(model.encode_image(images)) - frozen).max() <= 1e-4
