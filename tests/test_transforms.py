"""Image transforms: eval preprocess equals open_clip's; crops and boxes match torchvision / pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zoo import transforms as T
from zoo.models import configs

SIZES = [(100, 150), (300, 227), (224, 224), (481, 640), (37, 500), (640, 97)]


def _random_image(rng: np.random.Generator, hw: tuple[int, int], mode: str = "RGB") -> Image.Image:
  # Smooth-ish content (low-res noise upsampled) plus noise, so resampling errors would show.
  base = rng.integers(0, 256, (max(hw[0] // 8, 2), max(hw[1] // 8, 2), 3), dtype=np.uint8)
  im = Image.fromarray(base).resize((hw[1], hw[0]), Image.BILINEAR)
  noisy = np.clip(np.asarray(im, np.int16) + rng.integers(-20, 21, (*hw, 3)), 0, 255)
  return Image.fromarray(noisy.astype(np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def open_clip():
  return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def vit_b32_preprocess(open_clip):
  _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
  return preprocess


def test_preprocess_equals_open_clip_vit_b32(vit_b32_preprocess):
  rng = np.random.default_rng(0)
  ours = T.make_preprocess(224, configs.OPENAI_MEAN, configs.OPENAI_STD)
  images = [_random_image(rng, hw) for hw in SIZES]
  for im in images:
    got = ours(im)
    want = vit_b32_preprocess(im).numpy().transpose(1, 2, 0)
    assert got.dtype == np.float32 and got.shape == (224, 224, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=str(im.size))
  batch = ours.batch(images)
  assert batch.shape == (len(images), 224, 224, 3)
  np.testing.assert_array_equal(batch[2], ours(images[2]))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_preprocess_other_pil_modes_equal_open_clip(vit_b32_preprocess, mode):
  im = _random_image(np.random.default_rng(1), (90, 130), mode)
  want = vit_b32_preprocess(im).numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(T.make_preprocess(224)(im), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("image_size,resize_mode,mean,std", [
    ((224, 192), "shortest", configs.OPENAI_MEAN, configs.OPENAI_STD),
    (64, "longest", configs.INCEPTION_MEAN, configs.INCEPTION_STD),
    ((48, 80), "longest", configs.IMAGENET_MEAN, configs.IMAGENET_STD),
    (96, "squash", configs.SIGLIP_MEAN, configs.SIGLIP_STD),
    (336, "shortest", configs.OPENAI_MEAN, configs.OPENAI_STD),
])
def test_preprocess_modes_equal_open_clip(open_clip, image_size, resize_mode, mean, std):
  from open_clip.transform import image_transform

  ref = image_transform(image_size, is_train=False, mean=mean, std=std, resize_mode=resize_mode)
  ours = T.make_preprocess(image_size, mean, std, resize_mode)
  rng = np.random.default_rng(2)
  for hw in SIZES:
    im = _random_image(rng, hw)
    want = ref(im).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours(im), want, rtol=0, atol=1e-5, err_msg=f"{hw}")


def test_preprocess_numpy_input_equals_pil():
  rng = np.random.default_rng(3)
  im = _random_image(rng, (120, 90))
  pre = T.make_preprocess(64)
  np.testing.assert_array_equal(pre(np.asarray(im)), pre(im))
  gray = np.asarray(im.convert("L"))
  np.testing.assert_array_equal(pre(gray), pre(Image.fromarray(gray)))
  np.testing.assert_array_equal(pre(gray[..., None]), pre(Image.fromarray(gray)))


def test_get_preprocess_uses_model_config():
  registry = pytest.importorskip("zoo.models.configs")
  cfg = registry.get_model_config("ViT-B-16-SigLIP")
  pre = T.get_preprocess("ViT-B-16-SigLIP")
  assert pre.image_size == (cfg.vision.image_size,) * 2 and pre.mean == configs.SIGLIP_MEAN
  white = np.full((50, 70, 3), 255, np.uint8)
  np.testing.assert_allclose(pre(white), 1.0, atol=1e-6)  # SigLIP: x / 127.5 - 1
  small = registry.get_model_config("test-tiny")
  assert T.get_preprocess(small) == T.make_preprocess(small.vision.image_size)
  with pytest.raises(TypeError, match="CLIPConfig"):
    T.get_preprocess(3)


def test_preprocess_bad_input_errors():
  pre = T.make_preprocess(32)
  with pytest.raises(TypeError, match="dtype float32"):
    pre(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"shape \(8, 8, 2\)"):
    pre(np.zeros((8, 8, 2), np.uint8))
  with pytest.raises(TypeError, match="list"):
    pre([1, 2, 3])
  with pytest.raises(ValueError, match="resize_mode"):
    T.make_preprocess(32, resize_mode="stretch")
  with pytest.raises(ValueError, match="mean must have 3"):
    T.make_preprocess(32, mean=(0.5, 0.5))
  with pytest.raises(ValueError, match="image size"):
    T.make_preprocess((32, 0))


def test_encode_image_refuses_unpreprocessed_input():
  """One ValueError naming the expected input for an unbatched image or raw pixels; the check
  is on shape / dtype at trace time (jit works; the value range only for numpy arrays)."""
  import jax

  from zoo.models import clip

  expected = r"encode_image expects preprocessed float images \[B, H, W, 3\] \(e.g. preprocess"
  with pytest.raises(ValueError, match=expected + r".*got shape \(224, 224, 3\)$"):
    clip.check_images(np.zeros((224, 224, 3), np.float32))
  with pytest.raises(ValueError, match=expected + r".*got uint8 pixels; apply the model's "
                     "preprocess first"):
    clip.check_images(np.zeros((2, 224, 224, 3), np.uint8))
  with pytest.raises(ValueError, match=r"got values up to 200 \(raw pixels\?\)"):
    clip.check_images(np.full((2, 8, 8, 3), 200.0, np.float32))
  clip.check_images(jax.ShapeDtypeStruct((2, 8, 8, 3), np.float32))  # traced: no value check
  images = T.make_preprocess(8).batch([np.zeros((10, 12, 3), np.uint8)] * 2)
  clip.check_images(images)

  def encode(x):  # CLIP.encode_image checks at trace time (abstract: nothing is compiled)
    return clip.create("test-tiny").encode_image(x)

  with pytest.raises(ValueError, match=expected + r".*got shape \(32, 32, 3\)"):
    jax.eval_shape(encode, jax.ShapeDtypeStruct((32, 32, 3), np.float32))
  assert jax.eval_shape(encode, jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)).shape[0] == 2


# ----------------------------------------------------------------------------- train augmentation


def test_apply_crop_resize_equals_torchvision():
  F = pytest.importorskip("torchvision.transforms.functional")
  from torchvision.transforms import InterpolationMode

  rng = np.random.default_rng(4)
  for hw in SIZES[:4]:
    im = _random_image(rng, hw)
    for _ in range(3):
      crop = T.random_resized_crop_params(rng, hw[0], hw[1], scale=(0.3, 1.0))
      for flip in (False, True):
        want = F.resized_crop(im, *crop, [56, 48], InterpolationMode.BICUBIC)
        if flip:
          want = F.hflip(want)
        got = T.apply_crop_resize(im, crop, (56, 48), hflip=flip)
        assert got.dtype == np.uint8 and got.shape == (56, 48, 3)
        np.testing.assert_array_equal(got, np.asarray(want))


def test_random_resized_crop_params_bounds_and_distribution():
  tv = pytest.importorskip("torchvision.transforms")
  import torch

  rng = np.random.default_rng(5)
  height, width, scale, ratio = 240, 320, (0.3, 1.0), (3 / 4, 4 / 3)
  ours = np.array([T.random_resized_crop_params(rng, height, width, scale, ratio)
                   for _ in range(3000)], np.float64)
  top, left, h, w = ours.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
  torch.manual_seed(0)
  img = torch.zeros(1, height, width)
  ref = np.array([tv.RandomResizedCrop.get_params(img, list(scale), list(ratio))
                  for _ in range(3000)], np.float64)

  def stats(p):
    area = p[:, 2] * p[:, 3] / (height * width)
    cy = (p[:, 0] + p[:, 2] / 2) / height
    return np.array([area.mean(), area.std(), np.log(p[:, 3] / p[:, 2]).mean(),
                     np.log(p[:, 3] / p[:, 2]).std(), cy.mean()])

  # Same algorithm -> same distribution: moments agree within sampling error (3000 draws).
  np.testing.assert_allclose(stats(ours), stats(ref), atol=0.02)


def test_random_resized_crop_params_fallback_equals_torchvision():
  tv = pytest.importorskip("torchvision.transforms")
  import torch

  rng = np.random.default_rng(6)
  # No crop with >= 90% of the area fits these aspect ratios -> the deterministic fallback.
  for height, width in [(10, 1000), (1000, 10), (40, 41)]:
    got = T.random_resized_crop_params(rng, height, width, (0.9, 1.0), (3 / 4, 4 / 3))
    want = tv.RandomResizedCrop.get_params(torch.zeros(1, height, width), [0.9, 1.0], [3 / 4, 4 / 3])
    if (height, width) != (40, 41):
      assert got == tuple(want)
    assert 0 <= got[0] and got[0] + got[2] <= height and 0 <= got[1] and got[1] + got[3] <= width
  with pytest.raises(ValueError, match="scale"):
    T.random_resized_crop_params(rng, 10, 10, scale=(1.0, 0.5))


def _rect_image(hw, box_px) -> Image.Image:
  """Black image with a white filled rectangle covering pixels [x0, x1) x [y0, y1)."""
  a = np.zeros((*hw, 3), np.uint8)
  x0, y0, x1, y1 = box_px
  a[y0:y1, x0:x1] = 255
  return Image.fromarray(a)


def _measured_box(image: np.ndarray) -> np.ndarray | None:
  """Normalized (x0, y0, x1, y1) of the pixels brighter than half, or None."""
  ys, xs = np.nonzero(image[..., 0] > 127)
  if len(xs) == 0:
    return None
  h, w = image.shape[:2]
  return np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])


def test_transform_boxes_follow_rendered_rectangles():
  rng = np.random.default_rng(7)
  hw, out = (120, 160), (64, 80)
  checked = dropped = 0
  for _ in range(40):
    x0, x1 = sorted(rng.choice(np.arange(0, 161), 2, replace=False))
    y0, y1 = sorted(rng.choice(np.arange(0, 121), 2, replace=False))
    if x1 - x0 < 6 or y1 - y0 < 6:
      continue
    image = _rect_image(hw, (x0, y0, x1, y1))
    box = np.array([[x0 / hw[1], y0 / hw[0], x1 / hw[1], y1 / hw[0]]])
    crop = T.random_resized_crop_params(rng, *hw, scale=(0.2, 0.6))
    flip = bool(rng.integers(2))
    boxes, keep = T.transform_boxes(box, crop, hw, hflip=flip, min_size=0.05)
    measured = _measured_box(T.apply_crop_resize(image, crop, out, hflip=flip))
    if keep[0]:
      assert measured is not None
      tol = np.array([1 / out[1], 1 / out[0]] * 2) + 1e-6  # within one output pixel
      assert (np.abs(boxes[0] - measured) <= tol).all(), (crop, flip, boxes[0], measured)
      checked += 1
    else:
      assert (boxes[0] == 0).all()
      # Dropped: outside the crop, or thinner than min_size (5% = 4 px wide / 3.2 px high).
      if measured is not None:
        assert min(measured[2] - measured[0], measured[3] - measured[1]) < 0.05 + 2 / 64
      dropped += 1
  assert checked >= 10 and dropped >= 1


def test_transform_boxes_eval_crop_box_follows_rendered_rectangle():
  hw = (150, 260)
  pre = T.make_preprocess(64)
  box_px = (100, 20, 240, 140)
  image = _rect_image(hw, box_px)
  box = np.array([[box_px[0] / hw[1], box_px[1] / hw[0], box_px[2] / hw[1], box_px[3] / hw[0]]])
  boxes, keep = T.transform_boxes(box, pre.crop_box(*hw), hw)
  measured = _measured_box(np.asarray(pre.resize_crop(image)))
  assert keep[0] and np.abs(boxes[0] - measured).max() <= 1 / 64 + 1e-6
  # 150 x 260 -> 64 x 110, crop cols 23..87 = source x 54.4..205.8: the box's right side
  # (x = 240) lies beyond the crop and is clipped to 1.
  assert boxes[0, 2] == 1.0


def test_transform_boxes_keep_rules():
  crop = (10, 20, 50, 100)  # rows 10..60, cols 20..120 of a 100 x 200 image
  boxes = np.array([
      [0.2, 0.2, 0.4, 0.4],      # inside
      [0.7, 0.2, 0.9, 0.4],      # right of the crop (x from 140 px)
      [0.05, 0.2, 0.15, 0.4],    # straddles the left edge (x 10..30 px, crop from 20 px)
      [0.0, 0.0, 1.0, 1.0],      # covers everything: becomes the full crop
      [0.3, 0.3, 0.3, 0.5],      # zero width
  ])
  out, keep = T.transform_boxes(boxes, crop, (100, 200))
  assert keep.tolist() == [True, False, True, True, False]
  np.testing.assert_allclose(out[0], [(40 - 20) / 100, (20 - 10) / 50, (80 - 20) / 100, (40 - 10) / 50])
  np.testing.assert_allclose(out[2], [0, 0.2, 0.1, 0.6], atol=1e-6)
  np.testing.assert_allclose(out[3], [0, 0, 1, 1])
  assert (out[[1, 4]] == 0).all()
  flipped, _ = T.transform_boxes(boxes, crop, (100, 200), hflip=True)
  np.testing.assert_allclose(flipped[0], [1 - 0.6, 0.2, 1 - 0.2, 0.6], atol=1e-6)
  # min_visible: box 2 keeps half its area inside the crop, box 3 a quarter.
  _, keep = T.transform_boxes(boxes, crop, (100, 200), min_visible=0.4)
  assert keep.tolist() == [True, False, True, False, False]
  _, keep = T.transform_boxes(boxes, crop, (100, 200), min_visible=0.6)
  assert keep.tolist() == [True, False, False, False, False]
  with pytest.raises(ValueError, match=r"\[N, 4\]"):
    T.transform_boxes(np.zeros((3, 3)), crop, (100, 200))
