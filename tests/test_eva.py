"""EVA01 / EVA02 / PE-Core (timm's Eva trunk in open_clip's CustomTextCLIP): table coverage,
config conversion both ways, parity with open_clip on jittered random weights, round trips.

Parity models are open_clip's own classes with timm's trunk of the released name shrunk through
timm.create_model (so the rotary grid, SwiGLU / sub-LN, q/k/v bias layout, post-norm and pool
are the released trunk's); every parameter is jittered so a dropped LayerNorm or bias cannot
hide.
"""

from __future__ import annotations

import dataclasses
import json
from unittest import mock

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

import zoo  # noqa: E402
from tests.test_vit_siglip import TOL, _features, _jitter, _round_trip  # noqa: E402
from zoo import convert  # noqa: E402
from zoo.convert import common, open_clip as oc_layout, open_clip_config  # noqa: E402
from zoo.models import configs, eva, sharding  # noqa: E402
from zoo.weights import hub, pretrained  # noqa: E402

PAIRS = {"EVA01-g-14": "laion400m_s11b_b41k", "EVA01-g-14-plus": "merged2b_s11b_b114k",
         "EVA02-B-16": "merged2b_s8b_b131k", "EVA02-L-14": "merged2b_s4b_b131k",
         "EVA02-L-14-336": "merged2b_s6b_b61k", "EVA02-E-14": "laion2b_s4b_b115k",
         "EVA02-E-14-plus": "laion2b_s9b_b144k", "PE-Core-T-16-384": "meta",
         "PE-Core-S-16-384": "meta", "PE-Core-B-16": "meta", "PE-Core-L-14-336": "meta",
         "PE-Core-bigG-14-448": "meta"}


def _oc_config(name: str) -> dict:
  return json.loads(json.dumps(open_clip.get_model_config(name)))


def test_every_eva_and_pe_pair_is_served():
  """open_clip's EVA and PE-Core pairs are all in zoo's table with open_clip's hub repo and
  preprocessing; each config converts to zoo's registered one and back to open_clip's JSON."""
  ours = {(n, t) for n, t in open_clip.list_pretrained() if n.startswith(("EVA", "PE-Core"))}
  assert ours == set(PAIRS.items())
  assert ours <= set(map(tuple, zoo.list_pretrained()))
  for name, tag in PAIRS.items():
    entry, cfg = pretrained.get_pretrained_cfg(name, tag), open_clip.get_pretrained_cfg(name, tag)
    assert cfg["hf_hub"] == entry["hf_hub"] + "/" and entry["architecture"] == name
    assert entry["preprocess"] == {k: list(cfg[k]) if k in ("mean", "std") else cfg[k]
                                   for k in ("mean", "std", "interpolation", "resize_mode")}
    assert entry["tokenizer"] == {"kind": "clip"}
    arch = configs.get_model_config(name)
    assert isinstance(arch, eva.EvaCLIPConfig)
    assert open_clip_config.config_from_open_clip_cfg(_oc_config(name)) == arch
    assert open_clip_config.open_clip_model_cfg(arch) == _oc_config(name)
    assert tuple(entry["preprocess"]["mean"]) == arch.image_mean


@pytest.mark.parametrize("name", ["EVA02-B-16"])
def test_full_size_state_dict_shapes_equal_open_clip(name):
  """zoo's expected open_clip keys and shapes of a full-size model equal open_clip's own model
  (built on the meta device: no memory), and zoo's model traces under eval_shape."""
  config = configs.get_model_config(name)
  _, state = common.abstract_state(config, lambda c: eva.EvaCLIP(c, rngs=nnx.Rngs(0)))
  want = common.expected_torch_shapes(oc_layout.rules_for(config), common.flat_shapes(state))
  with torch.device("meta"):
    model = open_clip.model.CustomTextCLIP(**{k: v for k, v in _oc_config(name).items()
                                              if k != "custom_text"})
  assert want == {k: tuple(v.shape) for k, v in model.state_dict().items()}
  size = config.vision.image_size
  out = jax.eval_shape(lambda x: zoo.create(name).encode_image(x),
                       jax.ShapeDtypeStruct((2, size, size, 3), np.float32))
  assert out.shape == (2, config.embed_dim)


# Tiny towers: 32 px at patch 8 (a 4 x 4 grid; EVA02's rotary grid still rescaled to its 16 x 16
# reference, PE's to its own), width 64, two heads of 32 (PE's pool: 8 heads of 8).
CASES = {
    "EVA02-B-16": "separate q/k/v, SwiGLU + sub-LN, rotary 'ij' rescaled, class token",
    "PE-Core-B-16": "fused qkv bias, norm_pre, rotary 'xy' +1, MAP pool over class + patches",
    "PE-Core-bigG-14-448": "no class token: rotary on every token, MAP pool",
    "EVA01-g-14": "fused qkv + q/v bias, GELU MLP, no rotary",
    "EVA02-E-14": "post-norm blocks",
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request):
  base = request.param
  oc = _oc_config(base)
  text = dict(oc["text_cfg"], vocab_size=300, context_length=16, width=48, heads=2, layers=2)
  create = timm.create_model
  shrink = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
  torch.manual_seed(0)
  with mock.patch.object(timm, "create_model", lambda name, **kw: create(name, **kw, **shrink)):
    torch_model = open_clip.model.CustomTextCLIP(64, dict(oc["vision_cfg"], image_size=32), text)
  ref = configs.get_model_config(base)
  config = dataclasses.replace(
      ref, embed_dim=64,
      vision=dataclasses.replace(ref.vision, image_size=32, patch_size=8, width=64, layers=2,
                                 heads=2, mlp_dim=torch_model.visual.trunk.blocks[0].mlp.fc2
                                 .in_features),
      text=dataclasses.replace(ref.text, vocab_size=300, context_length=16, width=48, heads=2,
                               layers=2))
  _jitter(torch_model, 1)
  with torch.no_grad():  # sharper attention (timm's init is near uniform), so positions matter
    for block in torch_model.visual.trunk.blocks:
      attn = block.attn
      if attn.qkv is not None:
        attn.qkv.weight[:2 * 64].mul_(8.0)
      else:
        attn.q_proj.weight.mul_(8.0)
        attn.k_proj.weight.mul_(8.0)
  return base, torch_model, config


def test_parity_and_round_trip(tiny):
  base, torch_model, config = tiny
  model = convert.from_open_clip(torch_model.state_dict(), config)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens = np.random.default_rng(2).integers(1, 300, size=(3, 16))
  got, want = _features(torch_model, model, images, tokens)
  for g, w in zip(got, want):
    assert g.shape == w.shape and np.abs(g - w).max() <= TOL, (base, np.abs(g - w).max())
  _round_trip(torch_model, model)
  trunk = torch_model.visual.trunk
  if config.vision.rope:  # zoo's rotary tables are timm's (sin | cos), bit for bit or nearly
    sin, cos = eva.rope_tables(config.vision, 4, 4)
    np.testing.assert_allclose(np.concatenate([sin, cos], -1), trunk.rope.get_embed().numpy(),
                               atol=1e-6, rtol=0)
    # and they matter: without rotary positions the features miss the tolerance
    plain = dataclasses.replace(config, vision=dataclasses.replace(config.vision, rope=False))
    other = convert.from_open_clip(torch_model.state_dict(), plain).encode_image(images)
    assert np.abs(np.asarray(other) - want[0]).max() > 2 * TOL


def test_new_params_carry_logical_axes(tiny):
  _, _, config = tiny
  model = nnx.eval_shape(lambda: eva.EvaCLIP(config, rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.get_value().shape), path
    assert set(axes) - {None} <= set(sharding.LOGICAL_RULES), (path, axes)


def test_bad_input_is_one_line():
  config = configs.get_model_config("PE-Core-T-16-384")
  tiny = dataclasses.replace(config, vision=dataclasses.replace(
      config.vision, image_size=32, patch_size=8, width=64, layers=1, heads=2, mlp_dim=128),
      text=dataclasses.replace(config.text, vocab_size=300, width=64, heads=2, layers=1))
  model = nnx.eval_shape(lambda: eva.EvaCLIP(tiny, rngs=nnx.Rngs(0)))  # refused before any math
  with pytest.raises(ValueError, match=r"\(1, 40, 40, 3\).*\[B, 32, 32, 3\]"):
    model.encode_image(np.zeros((1, 40, 40, 3), np.float32))
  oc = _oc_config("EVA02-B-16")
  oc["vision_cfg"]["timm_pool"] = "avg"
  with pytest.raises(hub.PretrainedError, match="timm_pool='avg'.*'token'"):
    open_clip_config.config_from_open_clip_cfg(oc)
  with pytest.raises(ValueError, match="rope.*head width|head width"):
    dataclasses.replace(tiny.vision, heads=3, width=66)
