"""Long-CLIP: positional stretching, PCM loss vs a numpy SVD computation, sharding, conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from configs import base
from tests.train_utils import tiny_config
from zoo.convert import cli, long_clip as lc_convert
from zoo.eval import evaluator, suite
from zoo.families import long_clip as lc_family
from zoo.models import long_clip as lc_model, sharding
from zoo.train import trainer as trainer_lib

L, NEW, KEEP = 77, 248, 20


@pytest.fixture(scope="module")
def models():
  base = zoo.create("test-tiny", seed=3)
  return base, lc_model.stretch_positions(base, NEW, KEEP)


def table(model):
  return np.asarray(model.text.positional_embedding[...])


def long_clip_reference_table(a: np.ndarray, keep: int) -> np.ndarray:
  """Long-CLIP's `load_from_clip` rule written out (4x, extrapolate the last segment)."""
  n = a.shape[0]
  out = np.zeros((4 * n - 3 * keep, a.shape[1]), np.float64)
  a = a.astype(np.float64)
  out[:keep] = a[:keep]
  for i in range(n - 1 - keep):
    for r in range(4):
      out[keep + 4 * i + r] = (4 - r) / 4 * a[keep + i] + r / 4 * a[keep + i + 1]
  for r in range(4):
    out[4 * n - 3 * keep - 4 + r] = a[n - 1] + r / 4 * (a[n - 1] - a[n - 2])
  return out


# ----------------------------------------------------------------------------- stretching


def test_stretch_keeps_prefix_bit_identical_and_updates_config(models):
  base, stretched = models
  old, new = table(base), table(stretched)
  assert new.shape == (NEW, old.shape[1])
  assert np.array_equal(new[:KEEP], old[:KEEP])
  assert stretched.config.text.context_length == NEW
  assert base.config.text.context_length == L and table(base).shape[0] == L  # input untouched
  # every other weight is shared unchanged
  for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(nnx_params(base))),
                            jax.tree_util.tree_leaves_with_path(jax.device_get(nnx_params(stretched)))):
    if "positional_embedding" in jax.tree_util.keystr(p) and "text" in jax.tree_util.keystr(p):
      continue
    assert np.array_equal(a, b), jax.tree_util.keystr(p)


def nnx_params(model):
  from flax import nnx

  return nnx.state(model, nnx.Param)


def test_stretch_equals_long_clip_rule(models):
  base, stretched = models
  ref = long_clip_reference_table(table(base), KEEP)
  assert ref.shape[0] == NEW
  np.testing.assert_allclose(table(stretched), ref, rtol=0, atol=1e-7)
  # integer factor: the original positions land exactly on slots keep + 4 i
  assert np.array_equal(table(stretched)[KEEP::4][:L - KEEP], table(base)[KEEP:])


@pytest.mark.parametrize("length,new_length,keep", [(77, 248, 20), (12, 40, 3), (10, 17, 0)])
def test_interpolated_positions_lie_on_segments(length, new_length, keep):
  rng = np.random.default_rng(0)
  old = rng.normal(size=(length, 8)).astype(np.float32)
  new = lc_model.stretch_table(old, new_length, keep)
  assert np.array_equal(new[:keep], old[:keep])
  o = old.astype(np.float64)
  factor = (new_length - keep) / (length - keep)
  prev_s = keep - 1.0
  for j in range(keep, new_length):
    # which segment: the closest point on each segment [old[i], old[i+1]]
    best = None
    for i in range(keep, length - 1):
      d = o[i + 1] - o[i]
      t = float(np.dot(new[j] - o[i], d) / np.dot(d, d))
      resid = np.abs(o[i] + t * d - new[j]).max()
      if best is None or resid < best[0]:
        best = (resid, i, t)
    resid, i, t = best
    assert resid < 1e-5, (j, resid)
    s = i + t  # source coordinate; monotone, and the expected value
    np.testing.assert_allclose(s, keep + (j - keep) / factor, atol=1e-4)
    if i < length - 2:
      assert -1e-6 <= t <= 1 + 1e-6  # interior slots: on the segment itself
    assert s > prev_s
    prev_s = s


def test_stretch_rejects_bad_arguments(models):
  base, _ = models
  with pytest.raises(ValueError, match="new_length=60 must exceed"):
    lc_model.stretch_positions(base, 60, KEEP)
  with pytest.raises(ValueError, match="keep=76"):
    lc_model.stretch_positions(base, NEW, 76)


def test_short_caption_output_unchanged(models):
  base, stretched = models
  captions = ["a red circle", "a photo of a dog",
              "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
  tok248 = zoo.get_tokenizer("test-tiny", context_length=NEW)
  tokens = tok248(captions)
  assert tokens.shape == (3, NEW) and ((tokens > 0).sum(1) <= KEEP).all()
  tokens77 = zoo.get_tokenizer("test-tiny")(captions)
  new = np.asarray(stretched.encode_text(tokens, normalize=True))
  old = np.asarray(base.encode_text(tokens77, normalize=True))
  assert np.abs(new - old).max() <= 1e-6
  # at equal length the computation is identical: bitwise
  assert np.array_equal(np.asarray(stretched.encode_text(tokens[:, :L])),
                        np.asarray(base.encode_text(tokens77)))


def long_caption(detail: str) -> str:
  filler = " ".join(f"object {i} is a small grey square near the border." for i in range(20))
  return f"a scene. {filler} finally, the last object is a {detail}."


def test_248_token_captions_run_end_to_end(models):
  _, stretched = models
  tok = zoo.get_tokenizer("test-tiny", context_length=NEW)
  tokens = tok([long_caption("red circle"), long_caption("blue star")])
  n = (tokens > 0).sum(1)
  assert (n > 200).all() and (n <= NEW).all() and (tokens.argmax(1) == n - 1).all()
  feats = np.asarray(stretched.encode_text(tokens, normalize=True))
  assert np.isfinite(feats).all()
  # the detail beyond token 77 reaches the embedding (a 77-token tower cannot see it)
  assert np.abs(feats[0] - feats[1]).max() > 1e-3


# ----------------------------------------------------------------------------- PCM loss


def numpy_pcm(img, long_txt, short_txt, scale, k, weight, renorm=False):
  img = img.astype(np.float64)
  mean = img.mean(0, keepdims=True)
  _, _, vt = np.linalg.svd(img - mean, full_matrices=False)
  coarse = (img - mean) @ vt[:k].T @ vt[:k] + mean
  if renorm:
    coarse = coarse / np.linalg.norm(coarse, axis=1, keepdims=True)

  def clip(a, b):
    logits = scale * a @ b.T.astype(np.float64)

    def ce(z):
      m = z.max(1, keepdims=True)
      lse = np.log(np.exp(z - m).sum(1)) + m[:, 0]
      return np.mean(lse - np.diag(z))

    return (ce(logits) + ce(logits.T)) / 2

  return clip(img, long_txt) + weight * clip(coarse, short_txt)


def fixed_features(b=24, e=16, seed=0):
  rng = np.random.default_rng(seed)
  norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  img = norm(rng.normal(size=(b, e)))
  return img, norm(img + 0.5 * rng.normal(size=(b, e))), norm(img + 0.8 * rng.normal(size=(b, e)))


@pytest.mark.parametrize("k,weight,renorm", [(4, 1.0, False), (8, 0.5, True), (16, 2.0, False)])
def test_pcm_loss_matches_numpy_svd(k, weight, renorm):
  img, lt, st = fixed_features()
  loss, metrics = lc_family.pcm_loss(jnp.asarray(img), jnp.asarray(lt), jnp.asarray(st),
                                     jnp.float32(20.0), components=k, short_weight=weight,
                                     renormalize_coarse=renorm)
  expected = numpy_pcm(img, lt, st, 20.0, k, weight, renorm)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(float(metrics["loss_long"]) + weight * float(metrics["loss_short"]),
                             expected, rtol=2e-6, atol=2e-6)


def test_pca_reconstruct_properties():
  img, _, _ = fixed_features()
  full = np.asarray(lc_model.pca_reconstruct(jnp.asarray(img), 16))
  np.testing.assert_allclose(full, img, atol=1e-5)  # all components: the input back
  one = np.asarray(lc_model.pca_reconstruct(jnp.asarray(img), 1))
  assert np.linalg.matrix_rank(one - img.mean(0), tol=1e-4) == 1
  with pytest.raises(ValueError, match="components=40"):
    lc_model.pca_reconstruct(jnp.asarray(img), 40)


def test_pcm_gradients_finite_and_match_finite_differences():
  img, lt, st = fixed_features(b=12, e=16)
  f = lambda x: lc_family.pcm_loss(x, jnp.asarray(lt), jnp.asarray(st), jnp.float32(10.0),
                                   components=3)[0]
  g = np.asarray(jax.grad(f)(jnp.asarray(img, jnp.float32)))
  assert np.isfinite(g).all()
  fd = lambda x: numpy_pcm(x, lt, st, 10.0, 3, 1.0)
  rng = np.random.default_rng(1)
  for _ in range(3):
    d = rng.normal(size=img.shape)
    eps = 1e-4
    numeric = (fd(img + eps * d) - fd(img - eps * d)) / (2 * eps)
    np.testing.assert_allclose(np.sum(g * d), numeric, rtol=2e-3, atol=2e-4)


# ----------------------------------------------------------------------------- family / sharding


def long_clip_config(**kw):
  c = tiny_config(family="long_clip", batch_size=16, total_steps=3)
  c.long_clip = base.long_clip()
  c.long_clip.components = 4
  for k, v in kw.items():
    c.long_clip[k] = v
  return c


def long_batches(n, b=16, seed=0):
  rng = np.random.default_rng(seed)

  def rows(lo, hi):
    t = np.zeros((b, NEW), np.int32)
    for i in range(b):
      k = int(rng.integers(lo, hi))
      t[i, 0], t[i, 1:k], t[i, k] = 49406, rng.integers(1, 49000, size=k - 1), 49407
    return t

  return [{"image": rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
           "long_tokens": rows(60, NEW - 1), "short_tokens": rows(3, 18)} for _ in range(n)]


def run_steps(mesh, config, batches):
  trainer = trainer_lib.build_trainer(config, mesh)
  losses = []
  for batch in batches:
    trainer.state, m = trainer.step_fn(trainer.state, sharding.host_to_global(batch, mesh))
    losses.append([float(m["loss"]), float(m["loss_long"]), float(m["loss_short"])])
  return np.array(losses), trainer


@pytest.fixture(scope="module")
def single_run():
  mesh = sharding.make_mesh(devices=jax.devices()[:1], data=1, fsdp=1)
  return run_steps(mesh, long_clip_config(), TRAIN_BATCHES)


# one batch three times: the loss on it must fall (the family really trains)
TRAIN_BATCHES = long_batches(1) * 3


def test_family_trains_and_freezes_kept_positions(single_run):
  losses, trainer = single_run
  assert np.isfinite(losses).all() and losses[2, 0] < losses[0, 0] - 0.1  # step 0 has lr 0
  model = trainer.model()
  assert model.config.text.context_length == NEW
  fresh = lc_model.stretch_positions(zoo.create("test-tiny", seed=0), NEW, KEEP)
  before, after = table(fresh), table(model)
  assert np.array_equal(after[:KEEP], before[:KEEP])  # frozen, as Long-CLIP trains them
  assert not np.allclose(after[KEEP:], before[KEEP:])  # the stretched ones are trained


def test_sharded_equals_single_device(single_run):
  ref_losses, ref_trainer = single_run
  mesh = sharding.make_mesh(data=2, fsdp=4)
  losses, trainer = run_steps(mesh, long_clip_config(), TRAIN_BATCHES)
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=2e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(ref_trainer.state["params"])),
                  jax.tree.leaves(jax.device_get(trainer.state["params"]))):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_pcm_loss_global_batch_under_mesh():
  """The jitted loss on a batch sharded over 8 devices equals the numpy loss of the whole batch."""
  img, lt, st = fixed_features(b=32, e=16, seed=4)
  mesh = sharding.make_mesh(data=8, fsdp=1)
  put = lambda x: sharding.host_to_global({"x": x}, mesh)["x"]
  f = jax.jit(lambda a, b, c: lc_family.pcm_loss(a, b, c, jnp.float32(15.0), components=6,
                                                 impl="reference", mesh=mesh)[0])
  got = float(f(put(img), put(lt), put(st)))
  np.testing.assert_allclose(got, numpy_pcm(img, lt, st, 15.0, 6, 1.0), rtol=2e-6, atol=2e-6)
  f_xla = jax.jit(lambda a, b, c: lc_family.pcm_loss(a, b, c, jnp.float32(15.0), components=6,
                                                     impl="xla", mesh=mesh)[0])
  np.testing.assert_allclose(float(f_xla(put(img), put(lt), put(st))), got, rtol=1e-5)


def test_build_model_stretches_a_clip_and_keeps_a_long_clip(models, tmp_path):
  base, stretched = models
  zoo.save(base, tmp_path / "clip77")
  zoo.save(stretched, tmp_path / "long248")
  from_clip = build(long_clip_config_with(init_from=str(tmp_path / "clip77")))
  np.testing.assert_array_equal(table(from_clip), table(stretched))
  from_long = build(long_clip_config_with(init_from=str(tmp_path / "long248")))
  np.testing.assert_array_equal(table(from_long), table(stretched))
  assert from_long.config.text.context_length == NEW and from_long.config.text.frozen_positions == KEEP


def build(config):
  return lc_family.FAMILY.build_model(config, lc_family.FAMILY.settings(config))


def long_clip_config_with(**kw):
  c = long_clip_config()
  for k, v in kw.items():
    c[k] = v
  return c


def test_cli_round_trip(models, tmp_path):
  _, stretched = models
  zoo.save(stretched, tmp_path / "zoo")
  assert cli.run(["to-long-clip", "--input", str(tmp_path / "zoo"),
                         "--output", str(tmp_path / "lc.safetensors")]) == 0
  assert cli.run(["from-long-clip", "--model", "test-tiny", "--input",
                         str(tmp_path / "lc.safetensors"), "--output", str(tmp_path / "back")]) == 0
  back, tok, _ = zoo.load(tmp_path / "back")
  np.testing.assert_array_equal(table(back), table(stretched))
  assert tok(["a red circle"]).shape == (1, NEW)


def test_settings_reject_unknown_keys():
  c = long_clip_config()
  c.long_clip.unlocked = 1
  with pytest.raises(ValueError, match="unknown config.long_clip key 'unlocked'"):
    lc_family.FAMILY.settings(c)


# ----------------------------------------------------------------------------- eval


def test_long_retrieval_evaluator(models):
  base, stretched = models
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  captions = [long_caption(d) for d in ("red circle", "blue star", "green square", "pink ring")]
  spec = {"kind": "long_retrieval", "images": images, "captions": captions,
          "image_to_captions": [[0], [1], [2], [3]]}
  tok77 = zoo.get_tokenizer("test-tiny")
  for model, truncated in ((base, 1.0), (stretched, 0.0)):
    got = suite.evaluate(model, {"long": spec}, tok77)
    img = evaluator.encode_images(model, images)
    txt = evaluator.encode_texts(model, tok77(captions, context_length=model.config.text.context_length))
    want = evaluator.retrieval_metrics(img, txt, spec["image_to_captions"])
    for k, v in want.items():
      assert got[f"long/{k}"] == v
    assert got["long/truncated_fraction"] == truncated


# ----------------------------------------------------------------------------- conversion


def test_long_clip_state_dict_round_trip_and_mask_split(models):
  _, stretched = models
  sd = lc_convert.to_long_clip(stretched)
  assert sd["positional_embedding"].shape == (NEW, 64)
  assert np.array_equal(sd["positional_embedding_res"], sd["positional_embedding"])
  back = lc_convert.from_long_clip(sd, "test-tiny")
  assert back.config.text.context_length == NEW
  a, b = lc_convert.to_long_clip(back), sd
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  # Long-CLIP reads rows [0, keep) of positional_embedding and the rest of *_res
  sd2 = dict(sd)
  sd2["positional_embedding"] = sd["positional_embedding"].copy()
  sd2["positional_embedding"][KEEP:] = 7.0  # masked out by Long-CLIP's mask1
  sd2["positional_embedding_res"] = sd["positional_embedding"].copy()
  sd2["positional_embedding_res"][:KEEP] = -7.0  # masked out by mask2
  np.testing.assert_array_equal(table(lc_convert.from_long_clip(sd2, "test-tiny")), table(stretched))
  del sd2["positional_embedding_res"]
  with pytest.raises(ValueError, match="positional_embedding_res"):
    lc_convert.from_long_clip(sd2, "test-tiny")


def test_long_clip_weights_run_in_open_clip_with_248_positions(models):
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  _, stretched = models
  cfg = stretched.config
  model = open_clip.model.CLIP(
      embed_dim=cfg.embed_dim,
      vision_cfg=open_clip.model.CLIPVisionCfg(layers=cfg.vision.layers, width=cfg.vision.width,
                                               patch_size=cfg.vision.patch_size,
                                               image_size=cfg.vision.image_size,
                                               head_width=cfg.vision.width // cfg.vision.heads),
      text_cfg=open_clip.model.CLIPTextCfg(context_length=NEW, vocab_size=cfg.text.vocab_size,
                                           width=cfg.text.width, heads=cfg.text.heads,
                                           layers=cfg.text.layers))
  sd = lc_convert.to_long_clip(stretched)
  del sd["positional_embedding_res"]  # open_clip has the single (effective) table
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
  model.eval()
  tokens = zoo.get_tokenizer("test-tiny", context_length=NEW)([long_caption("red circle"),
                                                               "a blue star"])
  with torch.no_grad():
    ref = model.encode_text(torch.from_numpy(tokens).long()).numpy()
  np.testing.assert_allclose(np.asarray(stretched.encode_text(tokens)), ref, atol=2e-5)
