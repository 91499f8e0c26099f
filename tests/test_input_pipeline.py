"""data.image_dtype='uint8': the pipeline hands over the cropped pixels, the train step
normalizes them on the device; the host-normalized (float32) path is unchanged."""

from __future__ import annotations

import io

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.train_utils import tiny_config
from zoo import tokenizers, transforms
from zoo.data import pipeline, webdataset as wds
from zoo.models import configs
from zoo.train import loop, step as train_step

MEAN, STD = configs.OPENAI_MEAN, configs.OPENAI_STD


def _shards(tmp_path):
  rng = np.random.default_rng(0)
  samples = []
  for i in range(6):
    img = rng.integers(0, 256, (48, 64, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    samples.append({"image": buf.getvalue(), "caption": f"a photo of thing {i}"})
  return wds.write_shards(samples, str(tmp_path), 6)


def _pipeline(shards, image_size=32, **data):
  """The 4-sample train pipeline over `shards`, seed 7, with `data` keys added."""
  return pipeline.build_train_pipeline(
      {"name": "webdataset", "shards": shards, "num_threads": 2, **data},
      tokenizer=tokenizers.get_tokenizer("test-tiny", context_length=16), image_size=image_size,
      mean=MEAN, std=STD, global_batch_size=4, seed=7, context_length=16)


def _batch(shards, image_dtype, image_size=32, **data):
  it = _pipeline(shards, image_size, image_dtype=image_dtype, **data)
  batch = next(it)
  it.close()
  return batch


def test_float32_path_bytes_and_uint8_path(tmp_path):
  shards = _shards(tmp_path)
  f32, u8 = _batch(shards, "float32"), _batch(shards, "uint8")
  assert f32["image"].dtype == np.float32 and u8["image"].dtype == np.uint8
  np.testing.assert_array_equal(f32["tokens"], u8["tokens"])
  # The float32 batch is, byte for byte, the seeded crop of the full decode, normalized on the host.
  np.testing.assert_array_equal(transforms.normalize(u8["image"], MEAN, STD), f32["image"])
  raw = wds.TarShardSource(shards)
  order = [int(i) for i in np.asarray(
      grain.MapDataset.range(len(raw)).shuffle(seed=7)[:4])]
  for row, index in enumerate(order):
    image = wds.decode_image(raw[index]["jpg"])
    rng = np.random.default_rng([7, 0, 0, index])
    crop = transforms.random_resized_crop_params(rng, 48, 64, (0.9, 1.0), pipeline.DEFAULT_RATIO)
    expect = transforms.normalize(transforms.apply_crop_resize(image, crop, 32), MEAN, STD)
    assert f32["image"][row].tobytes() == expect.tobytes()
  on_device = jax.jit(lambda x: train_step.normalize_on_device(x, MEAN, STD))(jnp.asarray(u8["image"]))
  np.testing.assert_allclose(np.asarray(on_device), f32["image"], atol=1e-6)
  same = train_step.normalize_on_device(jnp.asarray(f32["image"]), MEAN, STD)
  assert same.dtype == jnp.float32 and np.array_equal(np.asarray(same), f32["image"])


def test_worker_processes_same_batches_skips_and_interchangeable_state(tmp_path):
  # data.worker_processes: grain worker processes send chunks of consecutive samples; the batches,
  # skip counts and states equal the threads' (a state saved with either resumes with the other).
  rng = np.random.default_rng(1)
  samples = []
  for i in range(14):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(buf, format="JPEG")
    samples.append({"image": buf.getvalue()[:200] if i == 4 else buf.getvalue(),
                    "caption": f"a photo of thing {i}"})
  shards = wds.write_shards(samples, str(tmp_path), 7)

  def build(**kw):
    return pipeline.build_train_pipeline(
        {"name": "webdataset", "shards": shards, "num_threads": 1, "image_dtype": "uint8", **kw},
        tokenizer=tokenizers.get_tokenizer("test-tiny", context_length=16), image_size=24,
        mean=MEAN, std=STD, global_batch_size=5, seed=3, context_length=16)

  threads = build()
  want, states = [], []
  for _ in range(6):  # 30 samples of a 14-sample epoch: the corrupt one is met 3 times
    states.append(threads.get_state())
    want.append(next(threads))
  threads.close()
  assert threads.skipped == 3 and threads.skipped_by_reason == {"corrupt_image": 3}
  procs = build(worker_processes=2)
  try:
    for k in range(4):
      assert procs.get_state() == states[k]
      got = next(procs)
      assert all(np.array_equal(got[f], want[k][f]) for f in want[k])
    # positions that are not a whole number of chunks (5 samples per chunk): restore mid-chunk
    mid = next(k for k, s in enumerate(states) if s["grain"]["next_index"] % 5)
    procs.set_state(states[mid])
    for k in range(mid, 6):
      got = next(procs)
      assert all(np.array_equal(got[f], want[k][f]) for f in want[k])
    assert procs.get_state()["skipped"] == threads.skipped
  finally:
    procs.close()


@pytest.mark.parametrize("h, w, flip", [(283, 217, 0), (470, 350, 1), (350, 470, 0),
                                        (100, 150, 1), (224, 400, 0), (300, 224, 0)])
def test_resize_on_device_is_pils_bicubic(h, w, flip):
  # Down and up, width or height unchanged, and shapes where Pillow 13 runs the vertical pass
  # first (283 x 217, 470 x 350 is one where it does not).
  image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), np.uint8)
  canvas = np.zeros((1, 512, 512, 3), np.uint8)
  canvas[0, :h, :w] = image
  out = np.asarray(jax.jit(train_step.resize_on_device, static_argnums=2)(
      jnp.asarray(canvas), jnp.asarray([[h, w, flip]], jnp.int32), 224))[0]
  expect = transforms.apply_crop_resize(image, (0, 0, h, w), 224, hflip=bool(flip))
  diff = np.abs(out.astype(int) - expect)
  assert diff.max() <= 1 and (diff > 0).mean() < 2e-4, ((diff > 0).mean(), diff.max())


@pytest.mark.parametrize("image_size, canvas", [(32, 64), (96, 96), (32, 40)])
def test_device_resize_batches_equal_host_resize(tmp_path, image_size, canvas):
  # data.resize='device': the host sends each crop on a canvas (64, 96: every crop of the 48 x 64
  # JPEGs fits, down- and up-sampled; 40: none fits, so the host resizes and the device's resize
  # is the identity); the step's resize gives the host path's pixels (+-1 now and then).
  shards = _shards(tmp_path)
  expect = _batch(shards, "uint8", image_size, hflip=True)
  got = _batch(shards, "uint8", image_size, hflip=True, resize="device", resize_canvas=canvas)
  assert got["image"].shape == (4, canvas, canvas, 3) and got["image_crop"].shape == (4, 3)
  np.testing.assert_array_equal(got["tokens"], expect["tokens"])
  if canvas == 40:
    assert (got["image_crop"][:, :2] == image_size).all() and not got["image_crop"][:, 2].any()
  else:
    assert (got["image_crop"][:, :2] > 40).all() and got["image_crop"][:, 2].any()
  out = np.asarray(train_step.resize_on_device(
      jnp.asarray(got["image"]), jnp.asarray(got["image_crop"]), image_size))
  diff = np.abs(out.astype(int) - expect["image"])
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, ((diff > 0).mean(), diff.max())
  if canvas == 40:
    np.testing.assert_array_equal(out, expect["image"])


def test_device_resize_needs_uint8_one_line():
  with pytest.raises(ValueError, match="image_dtype='uint8'"):
    pipeline.SampleProcessor(fields=("image",), tokenizer=None, image_size=32, mean=MEAN,
                             std=STD, resize="device")


def test_loop_trains_with_device_resize_as_with_host_resize(tmp_path):
  # The same run (demo data, uint8) with the resize in the train step: the same losses, up to
  # the few pixels rounded the other way.
  losses = {}
  for resize in ("host", "device"):
    config = tiny_config(**{"data.size": 64, "total_steps": 2, "data.image_dtype": "uint8",
                            "data.resize": resize, "data.resize_canvas": 48})
    losses[resize] = loop.train(config, str(tmp_path / resize))["losses"]
  assert np.all(np.isfinite(losses["device"]))
  np.testing.assert_allclose(losses["device"], losses["host"], rtol=1e-4)


def _jpeg_shards(tmp_path, h, w, n=6, corrupt=()):
  rng = np.random.default_rng(3)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  samples = []
  for i in range(n):
    a, b = rng.uniform(0.02, 0.08, 2)
    img = np.stack([np.sin(xx * a), np.cos(yy * b), np.sin((xx + yy) * a * b)], -1)
    img = np.clip(127 + 100 * img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    samples.append({"image": data[:len(data) // 3] if i in corrupt else data,
                    "caption": f"a photo of thing {i}"})
  return wds.write_shards(samples, str(tmp_path), n)


def _draft_batch(shards, draft):
  it = _pipeline(shards, image_dtype="uint8", jpeg_draft=draft)
  batch = next(it)
  next(it)  # 8 samples: the 6 of the epoch are all read
  skipped = dict(it.skipped_by_reason)
  it.close()
  return batch, skipped


def test_jpeg_draft_same_bytes_where_it_cannot_apply_close_where_it_does(tmp_path):
  # 48 x 64 sources, crops >= 0.9 of them to 32: no DCT scale keeps 32 pixels a side, so the
  # bytes are the exact path's. 192 x 256 sources: decoded at 1/4 (crop >= 4 x 32 a side), close.
  small = _jpeg_shards(tmp_path / "small", 48, 64)
  np.testing.assert_array_equal(_draft_batch(small, True)[0]["image"],
                                _draft_batch(small, False)[0]["image"])
  large = _jpeg_shards(tmp_path / "large", 192, 256)
  exact, drafted = _draft_batch(large, False)[0], _draft_batch(large, True)[0]
  np.testing.assert_array_equal(drafted["tokens"], exact["tokens"])
  diff = np.abs(drafted["image"].astype(int) - exact["image"])
  assert 0 < diff.mean() < 3 and np.percentile(diff, 99) <= 12, (diff.mean(), diff.max())
  proc = pipeline.SampleProcessor(fields=("image",), tokenizer=None, image_size=32, mean=MEAN,
                                  std=STD, jpeg_draft=True)
  raw = wds.TarShardSource(large)[0]
  image, crop, hw = proc.decode(wds.decode_pil(raw["jpg"], load=False), (0, 0, 192, 256),
                                (192, 256))
  assert image.size == (64, 48) and crop == (0, 0, 48, 64) and hw == (48, 64)


def test_jpeg_draft_skips_a_truncated_jpeg(tmp_path):
  shards = _jpeg_shards(tmp_path, 192, 256, n=6, corrupt=(2,))
  batch, skipped = _draft_batch(shards, True)
  assert batch["image"].shape == (4, 32, 32, 3)
  assert skipped == {"corrupt_image": 1}, skipped
