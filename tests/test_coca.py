"""CoCa: parity with open_clip's CoCa on random weights (features, caption logits, greedy
captions), strict bitwise round trips, the config mapping and the pretrained table, beam search,
and 3 train steps of the `coca` family through the one loop."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.train_utils import tiny_config
from zoo import convert
from zoo.convert import open_clip_config
from zoo.families import coca as coca_family
from zoo.models import coca, configs as registry, sharding
from zoo.train import trainer as trainer_lib

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers")  # open_clip's generate uses its logits processors

VOCAB, SOT, EOT = 64, 62, 63  # a small vocabulary keeps the decoder cheap
TINY = {"embed_dim": 32, "custom_text": True,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 48, "head_width": 24,
                       "layers": 2, "attentional_pool": True, "attn_pooler_heads": 2,
                       "attn_pooler_queries": 5, "output_tokens": True},
        "text_cfg": {"context_length": 12, "vocab_size": VOCAB, "width": 32, "heads": 2,
                     "layers": 2, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 12, "vocab_size": VOCAB, "width": 32, "heads": 2,
                           "layers": 2}}


def _jittered(name, seed=1):
  torch.manual_seed(0)
  oc = open_clip.create_model(name)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    # open_clip leaves the decoder's projection uninitialized (torch.empty): draw it as CLIP's.
    torch.nn.init.normal_(oc.text_decoder.text_projection, std=32 ** -0.5)
  with torch.no_grad():  # every parameter off its constant init (LayerNorms included)
    for p in oc.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.02)
  return oc.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  cfg_dir = tmp_path_factory.mktemp("oc_cfg")
  packed = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], width=32, head_width=16))
  for name, cfg in (("tiny-coca", TINY), ("tiny-coca-packed", packed)):
    with open(os.path.join(cfg_dir, f"{name}.json"), "w") as f:
      json.dump(cfg, f)
  open_clip.add_model_config(str(cfg_dir))
  oc = _jittered("tiny-coca")
  with torch.no_grad():  # make the end token likely, so some greedy captions end early
    w = oc.text_decoder.text_projection[:, EOT]
    oc.text_decoder.ln_final.bias.add_(3.0 * w / w.dot(w))
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  model = convert.from_open_clip(sd, open_clip_config.config_from_open_clip_cfg(TINY))
  return oc, sd, model


def _tokens():
  t = np.zeros((3, 12), np.int64)
  t[0, :5] = [SOT, 5, 7, 9, EOT]
  t[1, :] = [SOT, *range(3, 13), EOT]
  t[2, :3] = [SOT, 0, EOT]  # a token equal to the pad id inside the caption
  return t


def test_configs_equal_open_clip_and_table():
  for name in ("coca_ViT-B-32", "coca_ViT-L-14"):
    ours = registry.get_model_config(name)
    mapped = open_clip_config.config_from_open_clip_cfg(open_clip.get_model_config(name))
    assert isinstance(ours, coca.CoCaConfig) and mapped == ours, name
    assert open_clip_config.config_from_open_clip_cfg(
        open_clip_config.open_clip_model_cfg(ours)) == ours  # the export's model_cfg maps back
    assert coca.CoCaConfig.from_dict(ours.to_dict()) == ours
  pairs = [p for p in open_clip.list_pretrained() if p[0].startswith("coca")]
  assert len(pairs) == 4 and set(pairs) <= set(map(tuple, zoo.list_pretrained()))


def test_features_and_logits_equal_open_clip_and_round_trip(tiny):
  oc, sd, model = tiny
  images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  tokens = _tokens()
  with torch.no_grad():
    timg = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ref = oc(timg, torch.from_numpy(tokens))
    ref_img = oc.encode_image(timg, normalize=False).numpy()
    ref_txt = oc.encode_text(torch.from_numpy(tokens), normalize=False).numpy()
  out, img, txt = nnx.jit(lambda m, i, t: (m(i, t), m.encode_image(i), m.encode_text(t)))(
      model, images, tokens.astype(np.int32))
  diffs = {"image": np.abs(np.asarray(img) - ref_img).max(),
           "text": np.abs(np.asarray(txt) - ref_txt).max(),
           "logits": np.abs(np.asarray(out["logits"]) - ref["logits"].numpy()).max()}
  print("parity tiny CoCa: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
  assert max(diffs.values()) <= 1e-4
  np.testing.assert_array_equal(np.asarray(out["labels"]), tokens[:, 1:])
  back = convert.to_open_clip(model)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  oc.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()}, strict=True)
  # Pooler widths equal: torch packs q, k, v into in_proj_weight; the same round trip.
  packed = _jittered("tiny-coca-packed")
  psd = {k: v.numpy() for k, v in packed.state_dict().items()}
  assert "visual.attn_pool.attn.in_proj_weight" in psd
  pmodel = convert.from_open_clip(psd, open_clip_config.config_from_open_clip_cfg(
      open_clip.get_model_config("tiny-coca-packed")))
  assert pmodel.visual.attn_pool.packed
  with torch.no_grad():
    ref_img = packed.encode_image(timg, normalize=False).numpy()
  assert np.abs(np.asarray(nnx.jit(lambda m, i: m.encode_image(i))(pmodel, images))
                - ref_img).max() <= 1e-4
  pback = convert.to_open_clip(pmodel)
  assert set(pback) == set(psd) and all(np.array_equal(pback[k], psd[k]) for k in psd)


def test_greedy_captions_equal_open_clip(tiny, monkeypatch):
  """open_clip's generate(generation_type='top_k', top_k=1): one token survives the top-k
  filter, so its multinomial draw is deterministic (greedy). transformers 5 dropped
  BeamSearchScorer, which makes open_clip switch generate off at import; its top-k path needs
  only the processors it did import, so the test switches it back on."""
  from open_clip import coca_model
  from transformers import TopKLogitsWarper

  monkeypatch.setattr(coca_model, "_has_transformers", True)
  monkeypatch.setattr(coca_model, "GENERATION_TYPES",
                      dict(coca_model.GENERATION_TYPES, top_k=TopKLogitsWarper))
  oc, _, model = tiny
  images = np.random.default_rng(1).normal(size=(6, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    ref = oc.generate(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), seq_len=10,
                      generation_type="top_k", top_k=1, sot_token_id=SOT, eos_token_id=EOT,
                      fixed_output_length=True).numpy()
  got = np.asarray(model.generate(images, seq_len=10, sot_id=SOT, eos_id=EOT))
  print("open_clip greedy captions:\n", ref)
  np.testing.assert_array_equal(got, ref)
  ended = ref[:, :-1] == EOT
  assert ended.any() and (ref[:, -1] == 0).any()  # some captions end early, then padding

  # One beam (open_clip's scores: sums of raw logits, a constant per step for one beam) is
  # greedy: a caption that ends is the same; one that runs to seq_len has no forced eos.
  beam = np.asarray(model.generate(images, seq_len=10, generation_type="beam_search",
                                   num_beams=1, num_beam_groups=1, sot_id=SOT, eos_id=EOT))
  early = ended.any(axis=1)
  np.testing.assert_array_equal(beam[early], ref[early])
  np.testing.assert_array_equal(beam[~early, :-1], ref[~early, :-1])
  assert (beam[~early, -1] != EOT).all()
  with pytest.raises(ValueError, match="num_beams 4, num_beam_groups 3"):
    model.generate(images, seq_len=10, generation_type="beam_search", num_beams=4)
  with pytest.raises(ValueError, match="generation_type 'nucleus'"):
    model.generate(images, generation_type="nucleus")


def test_beam_search_equals_open_clip(tiny):
  """zoo's beam search against open_clip's `generate(generation_type="beam_search")` (its
  default 6 beams in 3 groups; 3 beams in 1 group with a repetition penalty). open_clip needs
  transformers' BeamSearchScorer (gone in transformers 5, not importable by open_clip 3.3 from
  4.56): skipped where its generate is off."""
  from open_clip import coca_model

  if not coca_model._has_transformers:
    pytest.skip("open_clip's generate is off: transformers has no BeamSearchScorer it can import")
  oc, _, model = tiny
  images = np.random.default_rng(1).normal(size=(6, 16, 16, 3)).astype(np.float32)
  for beams, groups, penalty, seq_len in ((6, 3, 1.0, 10), (3, 1, 1.3, 12)):
    with torch.no_grad():
      ref = oc.generate(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), seq_len=seq_len,
                        generation_type="beam_search", num_beams=beams, num_beam_groups=groups,
                        repetition_penalty=penalty, sot_token_id=SOT, eos_token_id=EOT,
                        fixed_output_length=True).numpy()
    got = np.asarray(model.generate(images, seq_len=seq_len, generation_type="beam_search",
                                    num_beams=beams, num_beam_groups=groups,
                                    repetition_penalty=penalty, sot_id=SOT, eos_id=EOT))
    print(f"open_clip beam search ({beams} beams, {groups} groups):\n", ref)
    np.testing.assert_array_equal(got, ref)


def test_family_trains_three_steps():
  # coca-demo-tiny reads CLIP BPE (49408 ids); a 512-id vocabulary keeps the logits small here.
  config = tiny_config(family="coca", model="coca-demo-tiny", batch_size=8, total_steps=3)
  config.model_overrides = {"text": {"vocab_size": 512, "context_length": 16, "layers": 1},
                           "vision": {"layers": 1}, "multimodal": {"layers": 1}}
  config.coca = coca_family.default_settings()
  mesh = sharding.make_mesh(devices=jax.devices()[:1], data=1, fsdp=1)
  trainer = trainer_lib.build_trainer(config, mesh)
  rng = np.random.default_rng(0)
  tokens = np.zeros((8, 16), np.int32)
  for i in range(8):
    k = int(rng.integers(3, 14))
    tokens[i, 0], tokens[i, 1:k], tokens[i, k] = 510, rng.integers(1, 500, size=k - 1), 511
  batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32), "tokens": tokens}
  losses = []
  for _ in range(3):
    trainer.state, m = trainer.step_fn(trainer.state, sharding.host_to_global(batch, mesh))
    losses.append([float(m[k]) for k in ("loss", "contrastive_loss", "caption_loss")])
  losses = np.array(losses)
  assert np.isfinite(losses).all() and losses[2, 0] < losses[0, 0]  # step 0 has lr 0
  np.testing.assert_allclose(losses[:, 0], losses[:, 1] + 2.0 * losses[:, 2], rtol=1e-5)
  assert isinstance(trainer.model(), coca.CoCa)
