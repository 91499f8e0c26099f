"""Region heads: RoIAlign vs numpy / torchvision, whole-image box = mean patch tokens, boxes
through crop / flip / resize, losses vs numpy references, padded boxes inert, sharded =
single device, save / load, the region family and the region_zeroshot eval."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from configs import base
from tests import test_data as data_tests
from tests.train_utils import tiny_config
from zoo import losses, transforms
from zoo.data import demo, pipeline
from zoo.eval import evaluator, suite
from zoo.families import base as family_base
from zoo.families.region import evals as region_evals, family as region_family
from zoo.models import clip as clip_lib, configs, region, sharding
from zoo.train import loop as train_lib, step as train_step, trainer as trainer_lib

FAMILY = region_family.FAMILY

RNG = np.random.default_rng(0)


def random_boxes(rng, shape, min_size=0.05):
  """Normalized xyxy boxes [*shape, 4] with positive size."""
  a = rng.uniform(0, 1, size=(*shape, 2, 2))
  lo, hi = a.min(-2), a.max(-2)
  hi = np.maximum(hi, np.minimum(lo + min_size, 1.0))
  return np.concatenate([lo, hi], -1).astype(np.float32)


def numpy_roi_align(features, boxes, out, sr):
  """Direct per-sample bilinear RoIAlign (torchvision's aligned=True algorithm), loops."""
  b, gh, gw, c = features.shape
  r = boxes.shape[1]
  result = np.zeros((b, r, out, out, c), np.float64)

  def bilinear(f, y, x):
    y = min(max(y, 0.0), gh - 1.0)
    x = min(max(x, 0.0), gw - 1.0)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, gh - 1), min(x0 + 1, gw - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * f[y0, x0] + (1 - ly) * lx * f[y0, x1]
            + ly * (1 - lx) * f[y1, x0] + ly * lx * f[y1, x1])

  for i in range(b):
    for j in range(r):
      x0, y0, x1, y1 = boxes[i, j].astype(np.float64)
      sx, sy = x0 * gw - 0.5, y0 * gh - 0.5
      bw, bh = (x1 - x0) * gw / out, (y1 - y0) * gh / out
      for p in range(out):
        for q in range(out):
          acc = 0.0
          for u in range(sr):
            for v in range(sr):
              y = sy + p * bh + (u + 0.5) * bh / sr
              x = sx + q * bw + (v + 0.5) * bw / sr
              acc = acc + bilinear(features[i].astype(np.float64), y, x)
          result[i, j, p, q] = acc / sr ** 2
  return result


# ----------------------------------------------------------------------------- RoIAlign


@pytest.mark.parametrize("grid,out,sr", [((6, 5), 3, 2), ((8, 8), 4, 0), ((4, 7), 2, 3)])
def test_roi_align_equals_numpy_bilinear(grid, out, sr):
  f = RNG.normal(size=(2, *grid, 3)).astype(np.float32)
  boxes = random_boxes(RNG, (2, 3))
  boxes[0, 0] = [0.0, 0.0, 1.0, 1.0]  # whole image (samples clamp at the border)
  boxes[1, 2] = [0.9, 0.05, 0.97, 0.12]  # tiny box near a corner
  got = np.asarray(region.roi_align(jnp.asarray(f), jnp.asarray(boxes), out, sr))
  want = numpy_roi_align(f, boxes, out, region.sampling_ratio_for(max(grid), out, sr))
  assert got.shape == (2, 3, out, out, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_roi_align_equals_torchvision():
  torch = pytest.importorskip("torch")
  tv_ops = pytest.importorskip("torchvision.ops")
  f = RNG.normal(size=(2, 8, 8, 4)).astype(np.float32)
  boxes = random_boxes(RNG, (2, 5))
  got = np.asarray(region.roi_align(jnp.asarray(f), jnp.asarray(boxes), 4, 2))
  rois = np.concatenate([np.repeat(np.arange(2.0), 5)[:, None], boxes.reshape(-1, 4) * 8], 1)
  want = tv_ops.roi_align(torch.from_numpy(f).permute(0, 3, 1, 2),
                          torch.from_numpy(rois.astype(np.float32)), output_size=4,
                          spatial_scale=1.0, sampling_ratio=2, aligned=True)
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy().reshape(got.shape), atol=1e-5)


@pytest.mark.parametrize("grid,out", [(8, 4), (14, 7), (4, 2), (8, 2)])
def test_whole_image_box_is_mean_of_patch_tokens(grid, out):
  tokens = RNG.normal(size=(3, grid * grid, 6)).astype(np.float32)  # [B, N, C] as the ViT gives
  whole = jnp.tile(jnp.array([[[0.0, 0.0, 1.0, 1.0]]]), (3, 1, 1))
  got = np.asarray(region.roi_mean(jnp.asarray(tokens), whole, out))
  np.testing.assert_allclose(got[:, 0], tokens.mean(1), atol=1e-5)


def test_roi_align_gradients_match_finite_differences():
  from jax.test_util import check_grads

  f = jnp.asarray(RNG.normal(size=(1, 4, 4, 2)).astype(np.float32))
  boxes = jnp.asarray(random_boxes(RNG, (1, 2), min_size=0.3))
  check_grads(lambda x: region.roi_align(x, boxes, 2, 2), (f,), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2)
  # Interior boxes: coordinates get gradients too (a box is differentiable).
  inner = jnp.array([[[0.2, 0.3, 0.7, 0.8]]], jnp.float32)
  check_grads(lambda b: region.roi_align(f, b, 2, 2), (inner,), order=1, modes=("rev",),
              atol=2e-2, rtol=2e-2, eps=1e-3)


def test_roi_align_bad_input_errors():
  with pytest.raises(ValueError, match=r"\[B, R, 4\]"):
    region.roi_align(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4)), 2)
  with pytest.raises(ValueError, match="square grid"):
    region.roi_align(jnp.zeros((1, 10, 2)), jnp.zeros((1, 1, 4)), 2)
  with pytest.raises(ValueError, match="box rows"):
    region.roi_align(jnp.zeros((2, 4, 4, 2)), jnp.zeros((1, 1, 4)), 2)
  with pytest.raises(ValueError, match="unknown region config key 'roi'"):
    region.region_config("test-tiny", roi=3)
  with pytest.raises(TypeError, match="needs a RegionCLIP"):
    FAMILY.forward(clip_lib.create("test-tiny"), {}, None, None)
  abstract = nnx.eval_shape(lambda: region.create("test-tiny"))
  with pytest.raises(ValueError, match=r"region batch lacks \['boxes', 'box_mask', 'region_tokens'\]"):
    FAMILY.forward(abstract, {"image": None, "tokens": None}, None, None)
  with pytest.raises(TypeError, match="needs a RegionCLIPConfig"):
    region.RegionCLIP(configs.get_model_config("test-tiny"), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- data: boxes


def test_boxes_follow_crop_flip_resize_so_roi_align_reads_the_object():
  """A coloured rectangle through the train transform (strong random-resized crop, random
  flip, resize to 48 px): the output box matches the rectangle's pixels, and RoIAlign of the
  output image inside that box reads the rectangle's colour."""
  size, hw = 48, (96, 128)
  colour = np.array([230, 40, 20], np.uint8)
  proc = pipeline.SampleProcessor(fields=("image", "boxes", "box_mask"), tokenizer=None,
                                  image_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                  scale=(0.3, 0.7), hflip=True,
                                  hooks=(region_family.RegionFields(2, min_box_visible=0.3),))
  checked, flips = 0, set()
  rng = np.random.default_rng(3)
  for trial in range(30):
    x0, y0 = int(rng.integers(0, 80)), int(rng.integers(0, 50))
    x1, y1 = x0 + int(rng.integers(24, 48)), y0 + int(rng.integers(24, 46))
    image = np.full((*hw, 3), 90, np.uint8)
    image[y0:y1, x0:x1] = colour
    box = np.array([[x0 / hw[1], y0 / hw[0], x1 / hw[1], y1 / hw[0]]], np.float32)
    sample = {"image": image, "caption": "", "boxes": box, "region_captions": ["r"],
              "region_labels": np.array([0], np.int32)}
    srng = np.random.default_rng(trial)
    out = proc(sample, srng)
    # the same draws the processor made: crop, then flip
    srng = np.random.default_rng(trial)
    crop = transforms.random_resized_crop_params(srng, *hw, (0.3, 0.7), pipeline.DEFAULT_RATIO)
    flip = bool(srng.random() < 0.5)
    want, keep = transforms.transform_boxes(box, crop, hw, flip, min_visible=0.3)
    assert out["box_mask"].tolist() == [bool(keep[0]), False]
    if not keep[0]:
      assert not out["boxes"].any()
      continue
    np.testing.assert_allclose(out["boxes"][0], want[0], atol=1e-6)
    pixels = out["image"] * 255.0  # mean 0, std 1
    red = pixels[..., 0] > 160
    ys, xs = np.nonzero(red)
    measured = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / size
    assert np.abs(measured - out["boxes"][0]).max() <= 1.5 / size, (trial, measured, out["boxes"][0])
    # RoIAlign over the pixel grid inside the (slightly shrunk) box reads the object's colour
    b = out["boxes"][0]
    inner = b + np.array([1, 1, -1, -1]) * 2.0 / size
    mean = np.asarray(region.roi_mean(jnp.asarray(pixels[None]), jnp.asarray(inner[None, None]), 4, 4))
    np.testing.assert_allclose(mean[0, 0], colour, atol=12)
    checked += 1
    flips.add(flip)
  assert checked >= 10 and flips == {True, False}


# ----------------------------------------------------------------------------- losses


def numpy_multi_positive_ce(logits, pos, valid):
  rows = []
  for i in np.flatnonzero(valid):
    cols = np.flatnonzero(valid)
    l = logits[i, cols]
    p = pos[i, cols]
    lse = np.log(np.exp(l - l.max()).sum()) + l.max()
    lse_pos = np.log(np.exp(l[p] - l.max()).sum()) + l.max()
    rows.append(lse - lse_pos)
  return np.mean(rows)


def normalized(rng, shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_region_text_loss_equals_contrastive_loss_on_valid_regions():
  r, t = normalized(RNG, (4, 3, 8)), normalized(RNG, (4, 3, 8))
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], bool)
  scale = jnp.float32(7.0)
  got = region_family.region_text_loss(jnp.asarray(r), jnp.asarray(t), jnp.asarray(mask), scale)
  want = losses.contrastive_loss(jnp.asarray(r[mask]), jnp.asarray(t[mask]), scale,
                                 kind="softmax", impl="reference")
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_region_text_loss_same_captions_are_positives_and_ids_are_exact():
  tokens = np.zeros((3, 2, 6), np.int32)
  tokens[0, 0, :3] = [49406, 7, 49407]
  tokens[1, 1, :3] = [49406, 7, 49407]  # same caption as (0, 0)
  tokens[2, 0, :4] = [49406, 7, 9, 49407]
  tokens[0, 1, :3] = [49406, 8, 49407]
  tokens[2, 1, :3] = [49406, 9, 49407]
  mask = np.array([[1, 1], [0, 1], [1, 1]], bool)
  ids = np.asarray(region_family.caption_ids(jnp.asarray(tokens))).reshape(-1)
  flat = tokens.reshape(6, -1)
  same = (flat[:, None] == flat[None]).all(-1)
  np.testing.assert_array_equal(ids[:, None] == ids[None], same)
  r, t = normalized(RNG, (3, 2, 8)), normalized(RNG, (3, 2, 8))
  got = region_family.region_text_loss(jnp.asarray(r), jnp.asarray(t), jnp.asarray(mask), 5.0,
                                ids=jnp.asarray(ids.reshape(3, 2)))
  logits = 5.0 * r.reshape(6, -1) @ t.reshape(6, -1).T
  valid = mask.reshape(-1)
  want = 0.5 * (numpy_multi_positive_ce(logits, same, valid)
                + numpy_multi_positive_ce(logits.T, same.T, valid))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # TIC: captions against captions, identical ones positive
  tic = region_family.tic_loss(jnp.asarray(t), jnp.asarray(mask), 5.0, jnp.asarray(ids))
  tt = t.reshape(6, -1)
  np.testing.assert_allclose(float(tic), numpy_multi_positive_ce(5.0 * tt @ tt.T, same, valid),
                             rtol=1e-5)
  # no valid region: zero, not NaN
  zero = region_family.region_text_loss(jnp.asarray(r), jnp.asarray(t), jnp.zeros((3, 2), bool), 5.0)
  assert float(zero) == 0.0


def test_generalized_iou_and_grounding_loss():
  torch = pytest.importorskip("torch")
  tv_ops = pytest.importorskip("torchvision.ops")
  a, b = random_boxes(RNG, (7,)), random_boxes(RNG, (7,))
  got = np.asarray(region_family.generalized_iou(jnp.asarray(a), jnp.asarray(b)))
  want = np.diag(tv_ops.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy())
  np.testing.assert_allclose(got, want, atol=1e-5)
  mask = np.array([True] * 5 + [False] * 2)
  loss = region_family.grounding_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask))
  want_loss = np.mean(np.abs(a - b).sum(-1)[mask] + 1 - want[mask])
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  assert float(region_family.grounding_loss(jnp.asarray(a), jnp.asarray(a), jnp.asarray(mask))) < 1e-5


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny_region():
  return region.create("test-tiny", roi_size=2, width=32, grounding=True, seed=1)


def region_batch(rng, b=8, r=3, length=12, image_size=32):
  boxes = random_boxes(rng, (b, r), min_size=0.2)
  mask = rng.uniform(size=(b, r)) < 0.7
  mask[0, 0] = True
  boxes = np.where(mask[..., None], boxes, 0.0).astype(np.float32)
  tokens = np.zeros((b, length), np.int32)
  rtoks = np.zeros((b, r, length), np.int32)
  tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, rng.integers(1, 400, (b, 3)), 49407
  for i in range(b):
    for j in range(r):
      if mask[i, j]:
        rtoks[i, j, :3] = [49406, int(rng.integers(1, 6)), 49407]  # few distinct: duplicates
  return {"image": rng.normal(size=(b, image_size, image_size, 3)).astype(np.float32),
          "tokens": tokens, "boxes": boxes, "box_mask": mask, "region_tokens": rtoks}


def test_fresh_residual_head_equals_pooled_patch_baseline(tiny_region):
  images = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)).astype(np.float32))
  boxes = jnp.asarray(random_boxes(RNG, (2, 3), min_size=0.2))
  fresh = region.create("test-tiny", roi_size=2, width=32)  # zero-initialised output projection
  encode = nnx.jit(lambda m, x, b: m.encode_regions(x, b))
  emb, mask = encode(fresh, images, boxes)
  base = nnx.jit(lambda m, x, b: region.RegionBaselines(m, roi_size=2).pooled_regions(
      {"images": x, "boxes": b}))(fresh, images, boxes)
  assert mask.all()
  np.testing.assert_allclose(np.asarray(emb), np.asarray(base), atol=1e-5)
  # Whole-image box: mean of the patch tokens through the projection.
  patches = nnx.jit(lambda m, x: m.visual(x, return_tokens=True)[1])(fresh, images)
  whole, _ = encode(fresh, images, jnp.tile(jnp.array([[[0.0, 0.0, 1.0, 1.0]]]), (2, 1, 1)))
  np.testing.assert_allclose(np.asarray(whole[:, 0]),
                             np.asarray(patches.mean(1) @ fresh.visual.proj[...]), atol=1e-5)
  # A trained-like (non-zero) head differs from the baseline, and masks padded boxes.
  emb2, mask2 = encode(tiny_region, images, boxes.at[1, 2].set(0.0))
  assert not mask2[1, 2] and not np.asarray(emb2[1, 2]).any() and np.asarray(emb2[0]).any()


def run_region_steps(mesh_kw, steps=3, **overrides):
  devices = jax.devices()[:1] if mesh_kw.get("data", 1) * mesh_kw.get("fsdp", 1) == 1 else jax.devices()
  mesh = sharding.make_mesh(devices=devices, **mesh_kw)
  config = tiny_config(family="region", batch_size=8)
  config.region = base.region()
  config.region.roi_size = 2
  config.region.width = 32
  config.region.grounding_weight = 1.0
  config.region.tic_weight = 0.5
  for k, v in overrides.items():
    config.region[k] = v
  trainer = trainer_lib.build_trainer(config, mesh)
  # one batch, repeated: the loss must fall. Length 8 = the smallest text bucket: one branch
  # to compile (trim_padding), which keeps this test fast.
  batch = region_batch(np.random.default_rng(11), length=8)
  out = []
  for _ in range(steps):
    trainer.state, metrics = trainer.step_fn(trainer.state, sharding.host_to_global(batch, mesh))
    out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return out, trainer


@pytest.fixture(scope="module")
def single_device_run():
  return run_region_steps(dict(data=1, fsdp=1, tensor=1))


@pytest.mark.slow  # ~20 s: compiles the region train step for a second (2x2x2) mesh
def test_sharded_equals_single_device(single_device_run):
  single, t1 = single_device_run
  sharded, t8 = run_region_steps(dict(data=2, fsdp=2, tensor=2))
  for a, b in zip(single, sharded):
    for k in ("loss", "image_text_loss", "region_text_loss", "grounding_loss", "tic_loss"):
      np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2e-5, err_msg=k)
  assert single[-1]["loss"] < single[0]["loss"]  # it trains
  p1, p8 = jax.device_get(t1.state["params"]), jax.device_get(t8.state["params"])
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_padded_boxes_never_contribute_to_loss_or_gradients(single_device_run):
  """Garbage boxes and captions in the padded slots: the same loss and the same update (the
  train step with lr > 0, every loss term on), and zero gradient on padded region features."""
  _, trainer = single_device_run
  batch = region_batch(np.random.default_rng(5), length=8)
  assert not batch["box_mask"].all()
  other = {k: v.copy() for k, v in batch.items()}
  pad = ~batch["box_mask"]
  other["boxes"][pad] = [0.1, 0.2, 0.9, 0.7]
  other["region_tokens"][pad] = np.array([49406, 123, 456, 49407] + [0] * 4, np.int32)
  results = []
  for b in (batch, other):
    state = jax.tree.map(jnp.copy, trainer.state)  # the step donates its input state
    new, metrics = trainer.step_fn(state, sharding.host_to_global(b, trainer.mesh))
    results.append((jax.device_get(new["params"]), jax.device_get(metrics)))
  (p1, m1), (p2, m2) = results
  assert float(m1["lr"]) > 0 and float(m1["grounding_loss"]) > 0 and float(m1["tic_loss"]) > 0
  for k in ("loss", "region_text_loss", "grounding_loss", "tic_loss", "grad_norm"):
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, atol=1e-7)
  # The loss's gradient w.r.t. padded regions' features (and captions) is exactly zero.
  r, t = normalized(RNG, (4, 3, 8)), normalized(RNG, (4, 3, 8))
  mask = jnp.asarray(RNG.uniform(size=(4, 3)) < 0.6).at[0, 0].set(True)
  grads = jax.grad(lambda r, t: region_family.region_text_loss(r, t, mask, 5.0), argnums=(0, 1))(
      jnp.asarray(r), jnp.asarray(t))
  for g in grads:
    assert not np.asarray(g)[~np.asarray(mask)].any()
    assert np.asarray(g)[np.asarray(mask)].any()


def test_trainable_region_only_updates_the_head(tiny_region):
  config = tiny_config(family="region")
  config.region = base.region()
  config.region.trainable = "region"
  params = nnx.state(tiny_region, nnx.Param)
  tx = train_step.make_optimizer(config, params, FAMILY.trainable(FAMILY.settings(config)))
  grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
  update = jax.jit(tx.update)
  _, opt_state = update(grads, jax.jit(tx.init)(params), params)  # step 0: warm-up lr is 0
  updates, _ = update(grads, opt_state, params)
  flat = dict(nnx.to_flat_state(updates))
  moved = {path[0] for path, u in flat.items() if np.asarray(u[...]).any()}
  assert moved == {"prompter", "grounding"}
  config.region.trainable = "all"
  assert FAMILY.trainable(FAMILY.settings(config)) is None
  config.region.trainable = "towers"
  with pytest.raises(ValueError, match="config.region.trainable"):
    FAMILY.settings(config)


def test_save_load_and_init_from_clip(tmp_path, tiny_region):
  images = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)).astype(np.float32))
  boxes = jnp.asarray(random_boxes(RNG, (2, 2), min_size=0.2))
  regions = nnx.jit(lambda m, x, b: m.encode_regions(x, b)[0])
  globals_ = nnx.jit(lambda m, x: m.encode_image(x))
  path = zoo.save(tiny_region, str(tmp_path / "region"))
  loaded, tokenizer, preprocess = zoo.load(path)
  assert isinstance(loaded, region.RegionCLIP) and loaded.config == tiny_region.config
  np.testing.assert_allclose(np.asarray(regions(loaded, images, boxes)),
                             np.asarray(regions(tiny_region, images, boxes)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(globals_(loaded, images)),
                             np.asarray(globals_(tiny_region, images)), atol=1e-6)
  # fine-tuning from a plain CLIP: the loop's init_from copies the towers, the head stays fresh
  clip = clip_lib.create("test-tiny", seed=3)
  clip_dir = zoo.save(clip, str(tmp_path / "clip"))
  config = tiny_config(family="region", init_from=clip_dir)
  config.region = base.region()
  model = FAMILY.build_model(config, FAMILY.settings(config))
  family_base.init_params_from(config, model)
  np.testing.assert_allclose(np.asarray(globals_(model, images)),
                             np.asarray(globals_(clip, images)), atol=1e-6)
  same = region.from_clip(clip, roi_size=4, seed=config.seed)
  np.testing.assert_allclose(np.asarray(regions(same, images, boxes)),
                             np.asarray(regions(model, images, boxes)), atol=1e-5)


# ----------------------------------------------------------------------------- eval


def test_crop_and_resize_exact_on_pixel_aligned_boxes():
  images = RNG.normal(size=(2, 16, 16, 3)).astype(np.float32)
  boxes = np.array([[[0.25, 0.25, 0.75, 0.75], [0.0, 0.5, 0.5, 1.0]]] * 2, np.float32)
  crops = np.asarray(region.crop_and_resize(jnp.asarray(images), jnp.asarray(boxes), 8))
  np.testing.assert_allclose(crops[:, 0], images[:, 4:12, 4:12], atol=1e-5)
  np.testing.assert_allclose(crops[:, 1], images[:, 8:16, 0:8], atol=1e-5)
  wide = np.asarray(region.expand_boxes(jnp.asarray(boxes[0]), 2.0))
  np.testing.assert_allclose(wide, [[0.0, 0.0, 1.0, 1.0], [0.0, 0.25, 0.75, 1.0]], atol=1e-6)
  up = np.asarray(region.crop_and_resize(jnp.asarray(images), jnp.asarray(boxes[:, :1]), 16))
  want = jax.image.resize(jnp.asarray(images[:, 4:12, 4:12]), (2, 16, 16, 3), "linear")
  # (the outermost output pixels also read the image just outside the box; resize of the cut
  # crop clamps there instead)
  np.testing.assert_allclose(up[:, 0, 1:-1, 1:-1], np.asarray(want)[:, 1:-1, 1:-1], atol=1e-5)


def test_region_zeroshot_eval_matches_direct_computation(tiny_region):
  tok = zoo.get_tokenizer("test-tiny")
  n, r = 6, 3
  images = RNG.normal(size=(n, 32, 32, 3)).astype(np.float32)
  boxes = random_boxes(RNG, (n, r), min_size=0.2)
  counts = [3, 1, 2, 3, 2, 1]
  mask = np.arange(r)[None] < np.array(counts)[:, None]
  boxes = np.where(mask[..., None], boxes, 0.0)
  classes = ["red circle", "blue square", "green star"]
  labels = np.where(mask, RNG.integers(0, 3, (n, r)), -1)
  captions = [[f"a {classes[labels[i, j]]}" for j in range(counts[i])] for i in range(n)]
  spec = {"kind": "region_zeroshot", "images": images, "boxes": boxes, "box_mask": mask,
          "region_labels": labels, "region_captions": captions, "class_names": classes,
          "templates": ["a {}.", "a photo of a {}."]}
  metrics = suite.evaluate(tiny_region, {"regions": spec}, tok, batch_size=4)
  feats, _ = nnx.jit(lambda m, x, b: m.encode_regions(x, b, normalize=True))(
      tiny_region, jnp.asarray(images), jnp.asarray(boxes))
  feats = np.asarray(feats)[mask]
  classifier = evaluator.zero_shot_classifier(tiny_region, tok, classes, spec["templates"])
  top1 = np.mean(np.argmax(feats @ classifier, -1) == labels[mask])
  np.testing.assert_allclose(metrics["regions/top1"], top1, atol=1e-6)
  assert metrics["regions/num_regions"] == mask.sum()
  for key in ("text_to_region_recall@1", "region_to_text_recall@1", "region_to_text_recall@5"):
    assert 0.0 <= metrics[f"regions/{key}"] <= 1.0
  # region -> text: caption set is the 3 distinct "a <class>" strings -> top-5 always hits
  assert metrics["regions/region_to_text_recall@5"] == 1.0
  # grounding head: IoU of the boxes it predicts from the (normalized) caption embeddings
  txt = evaluator.encode_texts(tiny_region, tok([c for row in captions for c in row]))
  text = np.zeros((n, r, txt.shape[1]), np.float32)
  text[mask] = txt
  pred = np.asarray(nnx.jit(lambda m, x, t: m.ground(m.image_and_patches(x)[1], t))(
      tiny_region, jnp.asarray(images), jnp.asarray(text)))
  # batched prediction (ragged last batch padded) equals the direct call
  np.testing.assert_allclose(region_evals.predict_boxes(tiny_region, images, text, batch_size=4), pred,
                             atol=1e-5)
  torch = pytest.importorskip("torch")
  tv_ops = pytest.importorskip("torchvision.ops")
  iou = np.diag(tv_ops.box_iou(torch.from_numpy(pred[mask]), torch.from_numpy(boxes[mask])).numpy())
  np.testing.assert_allclose(metrics["regions/grounding_miou"], iou.mean(), atol=1e-5)
  np.testing.assert_allclose(metrics["regions/grounding_acc@0.5"], (iou >= 0.5).mean(), atol=1e-6)
  # a plain CLIP is evaluated on box crops; both baselines run and mask padded boxes
  clip = clip_lib.create("test-tiny")
  crop = suite.evaluate(clip, {"regions": spec}, tok)
  assert 0.0 <= crop["regions/top1"] <= 1.0
  pooled = region_evals.region_features(clip, images, boxes, method="pooled_patches")
  assert pooled.shape == (n, r, 32) and not pooled[~mask].any()
  np.testing.assert_allclose(np.linalg.norm(pooled[mask], axis=-1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="needs a RegionCLIP"):
    region_evals.region_features(clip, images, boxes, method="head")


@pytest.mark.slow
def test_train_loop_reports_region_metrics(tmp_path):
  from configs import cloc_demo

  config = cloc_demo.get_config()
  config.model = "test-tiny"
  config.batch_size = 16
  config.total_steps = 2
  config.eval_every = 2
  config.checkpoint_every = 2
  config.data.size = 64
  config.data.eval_size = 16
  summary = train_lib.train(config, str(tmp_path / "run"))
  ev = summary["eval"]
  for key in ("regions/top1", "regions/text_to_region_recall@1", "zeroshot/top1"):
    assert key in ev and np.isfinite(ev[key])
  loaded, _, _ = zoo.load(str(tmp_path / "run" / "model"))
  assert isinstance(loaded, region.RegionCLIP)


def test_configs_build_region_models():
  from configs import cloc_b16, cloc_demo

  for module, model, grid in ((cloc_b16, "ViT-B-16-quickgelu", 14), (cloc_demo, "region-tiny", 8)):
    config = module.get_config()
    assert config.family == "region" and config.model == model
    # shapes only, no allocation
    built = nnx.eval_shape(lambda: FAMILY.build_model(config, FAMILY.settings(config)))
    rc = built.config.region
    assert built.config.vision.grid_size == grid
    # RoIAlign samples once per patch of the grid: the whole-image box = mean patch tokens
    assert rc.roi_size * region.sampling_ratio_for(grid, rc.roi_size, rc.sampling_ratio) == grid
    assert (built.grounding is not None) == (config.region.grounding_weight > 0)
  config = cloc_demo.get_config()
  config.region.roi = 3
  with pytest.raises(ValueError, match="unknown config.region key 'roi'"):
    FAMILY.settings(config)


def test_webdataset_region_eval_set(tmp_path, tiny_region):
  from zoo.data import demo, webdataset as wds

  samples = demo.samples(6, "regions", 40)  # 40 px scenes: the eval transform resizes them
  paths = wds.write_shards(samples, str(tmp_path), samples_per_shard=3)
  config = tiny_config(family="region")
  config.data.name = "webdataset"
  config.data.eval_shards = ",".join(paths)
  config.data.max_regions = 3
  spec = region_evals.webdataset_region_set(config.data.eval_shards, image_size=32,
                                      mean=tiny_region.config.image_mean,
                                      std=tiny_region.config.image_std, max_regions=3)
  pre = transforms.make_preprocess(32, tiny_region.config.image_mean, tiny_region.config.image_std)
  assert spec["images"].shape == (6, 32, 32, 3)
  for i, s in enumerate(samples):  # shards keep the sample order
    moved, keep = transforms.transform_boxes(s["boxes"], pre.crop_box(40, 40), (40, 40))
    k = int(keep.sum())
    np.testing.assert_allclose(spec["boxes"][i, :k], moved[keep], atol=1e-6)
    assert spec["box_mask"][i].sum() == k
    assert spec["region_captions"][i] == [c for c, kk in zip(s["region_captions"], keep) if kk]
  metrics = region_evals.webdataset_region_metrics(tiny_region, config.data, zoo.get_tokenizer("test-tiny"), None)
  for key in ("text_to_region_recall@1", "region_to_text_recall@5", "grounding_miou"):
    assert 0.0 <= metrics[f"regions/{key}"] <= 1.0
  assert metrics["regions/num_regions"] == spec["box_mask"].sum()
  config.data.name = "demo"
  assert region_evals.webdataset_region_metrics(tiny_region, config.data, None, None) == {}


# ----------------------------------------------------------------------------- data: field hook


def test_regions_padded_masked_and_follow_the_crop():
  fields = ("image", "boxes", "region_tokens", "region_labels")
  full = data_tests.demo_cfg(size=64, max_regions=4, random_resized_crop_scale=(1.0, 1.0),
                             random_resized_crop_ratio=(1.0, 1.0))
  batch = next(data_tests.train_iter(full, batch=16, fields=fields,
                                     field_hooks=(region_family.field_hook(full),)))
  assert batch["boxes"].shape == (16, 4, 4) and batch["box_mask"].dtype == bool
  assert batch["region_tokens"].shape == (16, 4, data_tests.L)
  order = grain.MapDataset.range(64).shuffle(seed=0)
  for i in range(16):
    s = demo.make_sample(0, order[i], 32)
    n = len(s["boxes"])
    assert batch["box_mask"][i].tolist() == [True] * n + [False] * (4 - n)
    np.testing.assert_allclose(batch["boxes"][i, :n], s["boxes"], atol=1e-6)
    np.testing.assert_array_equal(batch["region_tokens"][i, :n], data_tests.byte_tokenizer(s["region_captions"]))
    np.testing.assert_array_equal(batch["region_labels"][i, :n], s["region_labels"])
    assert not batch["boxes"][i, n:].any() and not batch["region_tokens"][i, n:].any()
    assert (batch["region_labels"][i, n:] == -1).all()
  # max_regions below the object count keeps the first (primary first) ones.
  two_cfg = data_tests.demo_cfg(size=64, max_regions=2)
  two = next(data_tests.train_iter(two_cfg, batch=16, fields=fields,
                        field_hooks=(region_family.field_hook(two_cfg),)))
  assert two["boxes"].shape == (16, 2, 4) and two["box_mask"].sum(1).max() == 2
  # Strong crops: boxes follow the crop exactly as transforms.transform_boxes moves them.
  cfg = data_tests.demo_cfg(size=64, random_resized_crop_scale=(0.2, 0.4))
  got = next(data_tests.train_iter(cfg, batch=16, fields=("boxes",),
                        field_hooks=(region_family.field_hook(cfg),)))
  dropped = 0
  for i in range(16):
    s = demo.make_sample(0, order[i], 32)
    rng = np.random.default_rng([0, 0, 0, order[i]])  # (seed, stream, epoch, index)
    crop = transforms.random_resized_crop_params(rng, 32, 32, (0.2, 0.4), pipeline.DEFAULT_RATIO)
    moved, keep = transforms.transform_boxes(s["boxes"], crop, (32, 32), min_visible=0.5)
    k = int(keep.sum())
    dropped += len(keep) - k
    np.testing.assert_allclose(got["boxes"][i, :k], moved[keep], atol=1e-6)
    assert got["box_mask"][i].sum() == k
  assert dropped > 0  # some regions left the crop and were dropped
