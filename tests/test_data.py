"""zoo.data: demo scenes, WebDataset shards, grain pipeline (resume, hosts, skips), eval sets."""

from __future__ import annotations

import json
import unicodedata

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from zoo import transforms
from zoo.data import demo, pipeline, webdataset as wds
from zoo.families import long_clip, region

L = 24
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def byte_tokenizer(texts, context_length=None):
  """A trivial tokenizer: [1, utf-8 bytes + 3, 2, 0...], so tokens can be decoded in tests."""
  length = context_length or L
  out = np.zeros((len(texts), length), np.int32)
  for i, t in enumerate(texts):
    ids = [1] + [b + 3 for b in t.encode("utf-8")][:length - 2] + [2]
    out[i, :len(ids)] = ids
  return out


def decode_tokens(row) -> str:
  row = [int(x) for x in row]
  end = row.index(2)
  return bytes(x - 3 for x in row[1:end]).decode("utf-8", errors="replace")


def demo_cfg(**kw):
  c = ml_collections.ConfigDict(dict(name="demo", size=64, shards="", eval_shards="",
                                     random_resized_crop_scale=(0.9, 1.0), max_regions=4,
                                     eval_size=16, num_threads=2))
  c.update(kw)
  return c


def train_iter(cfg, batch=8, seed=0, fields=("image", "tokens"), context_length=L, **kw):
  return pipeline.build_train_pipeline(
      cfg, tokenizer=byte_tokenizer, image_size=32, mean=MEAN, std=STD, global_batch_size=batch,
      seed=seed, fields=fields, context_length=context_length, **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- demo data


def test_demo_sample_is_deterministic_and_splits_differ():
  a, b = demo.make_sample(0, 7, 32), demo.make_sample(0, 7, 32)
  np.testing.assert_array_equal(a["image"], b["image"])
  for k in ("caption", "long_caption", "short_caption", "label", "region_captions", "captions_ml"):
    assert a[k] == b[k]
  np.testing.assert_array_equal(a["boxes"], b["boxes"])
  train = {demo.make_sample(0, i, 32)["image"].tobytes() for i in range(40)}
  held_out = {demo.make_sample(demo.SPLIT_SEEDS["zeroshot"], i, 32)["image"].tobytes() for i in range(40)}
  assert len(train) == 40 and not train & held_out


def test_demo_label_is_largest_object_and_boxes_are_tight():
  for index in range(30):
    scene = demo.sample_scene(0, index)
    sample = demo.make_sample(0, index, 64)
    sizes = [o.size for o in scene.objects]
    assert sizes[0] == max(sizes) and sample["label"] == scene.objects[0].label
    assert demo.class_names()[sample["label"]] == scene.objects[0].name
    assert sample["region_captions"][0].endswith(scene.objects[0].name)
    assert sample["boxes"].shape == (len(scene.objects), 4)
  # Each object alone on a background: its box equals the extent of the non-background pixels.
  for index in range(12):
    for obj in demo.sample_scene(0, index).objects:
      scene = demo.DemoScene((obj,), "black", (0, 0, 0), (0.0, 0.0), noise_seed=0)
      image = demo.render(scene, 128).astype(np.int32)  # noise sigma 4 << the threshold
      ys, xs = np.nonzero(image.sum(-1) > 150)  # inside the shape's anti-aliased edge
      x0, y0, x1, y1 = demo.object_box(obj) * 128
      assert abs(xs.min() - x0) <= 2 and abs(xs.max() + 1 - x1) <= 2
      assert abs(ys.min() - y0) <= 2 and abs(ys.max() + 1 - y1) <= 2


def test_demo_class_names_and_languages():
  assert demo.num_classes() == 24
  assert len(set(demo.class_names())) == 24
  assert len(demo.LANGUAGES) >= 6
  scripts = set()
  for lang in demo.LANGUAGES:
    names = demo.class_names(lang)
    assert len(set(names)) == 24, lang
    tpls = demo.templates(lang)
    assert tpls and all("{}" in t for t in tpls)
    for ch in "".join(names):
      if ch.isalpha():
        scripts.add(unicodedata.name(ch).split()[0])
  assert {"LATIN", "CYRILLIC", "CJK", "ARABIC"} <= scripts
  s = demo.make_sample(0, 3)
  assert set(s["captions_ml"]) == set(demo.LANGUAGES)
  label = s["label"]
  for lang, cap in s["captions_ml"].items():
    phrase = demo.class_names(lang)[label]
    assert phrase in cap, (lang, cap, phrase)


def test_long_caption_details_lie_beyond_77_clip_tokens():
  from zoo import tokenizers

  tok = tokenizers.get_tokenizer("ViT-B-32", context_length=248)
  for index in range(20):
    s = demo.make_sample(0, index)
    long = s["long_caption"]
    assert long.startswith(s["short_caption"])
    start = long.index("The background is")  # first scene-specific detail after the preamble
    before = tok.encode(long[:start])
    assert len(before) + 1 >= 77  # + SOT: the details begin at position >= 77
    full = tok.encode(long)
    assert len(full) + 2 <= 248  # the whole description fits Long-CLIP's 248 positions
    # Under 77-token truncation every secondary object and the background are lost.
    truncated = tok.decode(tok([long], context_length=77)[0])
    for o in s["region_captions"][1:]:
      assert o.split(" ", 1)[1] not in truncated
    assert all(o.split(" ", 1)[1] in long for o in s["region_captions"])


# ----------------------------------------------------------------------------- pipeline: demo


def test_demo_pipeline_fields_and_values():
  it = train_iter(demo_cfg(random_resized_crop_scale=(1.0, 1.0), random_resized_crop_ratio=(1.0, 1.0)),
                  fields=("image", "tokens", "label", "short_tokens", "long_tokens"),
                  field_hooks=(long_clip.CaptionFields(),))
  batch = next(it)
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (8, L) and batch["tokens"].dtype == np.int32
  # Row i of step 0 is global position i: the source index comes from grain's shuffled order.
  order = grain.MapDataset.range(64).shuffle(seed=0)
  for i in range(8):
    s = demo.make_sample(0, order[i], 32)
    # Full-image crop of a 32 x 32 render: the image is exactly the normalized render.
    np.testing.assert_allclose(batch["image"][i], transforms.normalize(s["image"], MEAN, STD), atol=1e-6)
    np.testing.assert_array_equal(batch["tokens"][i], byte_tokenizer([s["caption"]])[0])
    np.testing.assert_array_equal(batch["short_tokens"][i], byte_tokenizer([s["short_caption"]])[0])
    np.testing.assert_array_equal(batch["long_tokens"][i], byte_tokenizer([s["long_caption"]])[0])
    assert batch["label"][i] == s["label"]


def test_same_seed_same_batches_other_seed_differs():
  a = take(train_iter(demo_cfg()), 3)
  b = take(train_iter(demo_cfg()), 3)
  c = take(train_iter(demo_cfg(), seed=1), 3)
  serial = take(train_iter(demo_cfg(num_threads=0)), 3)  # thread count does not matter
  assert_batches_equal(a, b)
  assert_batches_equal(a, serial)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_augmentation_differs_between_epochs():
  # size 8 = one batch per epoch: epoch 1 shows the same scenes, reshuffled and re-cropped.
  it = train_iter(demo_cfg(size=8, random_resized_crop_scale=(0.3, 0.6)), fields=("image", "label"))
  e0, e1 = next(it), next(it)
  assert sorted(e0["label"]) == sorted(e1["label"])
  assert not np.array_equal(e0["image"], e1["image"])


def test_resume_from_state_gives_identical_batches():
  cfg = demo_cfg(size=40)  # 40 / 8 = 5 steps per epoch: the resume crosses an epoch boundary
  fields = ("image", "tokens", "boxes", "region_tokens")  # with a family's field hook
  hooks = (region.family.field_hook(cfg),)
  it = train_iter(cfg, fields=fields, field_hooks=hooks)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
  expected = take(it, 3)
  resumed = train_iter(cfg, fields=fields, field_hooks=hooks)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)
  straight = train_iter(cfg, fields=fields, field_hooks=hooks)
  assert_batches_equal(take(straight, 7)[4:], expected)


def test_host_slices_are_disjoint_cover_and_equal_the_global_batch():
  cfg = demo_cfg(size=32)
  single = take(train_iter(cfg, batch=8), 4)
  hosts = [take(pipeline.build_train_pipeline(
      cfg, tokenizer=byte_tokenizer, image_size=32, mean=MEAN, std=STD, global_batch_size=8,
      seed=0, process_index=p, process_count=2, context_length=L), 4) for p in range(2)]
  for step in range(4):
    for k in ("image", "tokens"):
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][k], hosts[1][step][k]]), single[step][k])
  # The host slice of the global stream: disjoint, and one epoch covers every index once.
  order = grain.MapDataset.range(32).shuffle(seed=0).repeat()
  read = [[pipeline.HostSliceMapDataset(order, 4, p, 2)[k] for k in range(16)] for p in range(2)]
  assert not set(read[0]) & set(read[1])
  assert sorted(read[0] + read[1]) == list(range(32))


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown batch field"):
    train_iter(demo_cfg(), fields=("image", "captions"))
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.build_train_pipeline(demo_cfg(), tokenizer=byte_tokenizer, image_size=32, mean=MEAN,
                                  std=STD, global_batch_size=9, seed=0, process_count=2)
  bad = lambda texts: np.zeros((len(texts), 5), np.int32)  # noqa: E731
  it = pipeline.build_train_pipeline(demo_cfg(), tokenizer=bad, image_size=32, mean=MEAN, std=STD,
                                     global_batch_size=4, seed=0, context_length=L)
  with pytest.raises(ValueError, match="rows of length 5"):
    next(it)
  with pytest.raises(ValueError, match="unknown data.name"):
    train_iter(demo_cfg(name="parquet"))


# ----------------------------------------------------------------------------- webdataset


def truncated_jpeg(seed: int = 0) -> bytes:
  image = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
  data = wds.encode_image(image)
  return data[: len(data) // 2]


def labelled_samples(n: int):
  out = []
  for i in range(n):
    s = demo.make_sample(demo.SPLIT_SEEDS["test"], i, 32)
    s["caption"] = f"sample {i}: {s['caption']}"
    out.append(s)
  return out


@pytest.fixture()
def shards_with_bad_samples(tmp_path):
  samples = labelled_samples(10)
  samples[3] = dict(samples[3], image=truncated_jpeg())
  samples[6] = dict(samples[6], caption="   ")
  paths = wds.write_shards(samples, str(tmp_path), samples_per_shard=4)
  good = sorted(s["caption"] for i, s in enumerate(samples) if i not in (3, 6))
  return paths, good


def test_write_and_index_shards(tmp_path):
  samples = labelled_samples(5)
  paths = wds.write_shards(samples, str(tmp_path), samples_per_shard=2)
  assert [p.rsplit("/", 1)[1] for p in paths] == ["shard-000000.tar", "shard-000001.tar",
                                                  "shard-000002.tar"]
  src = wds.TarShardSource(wds.expand_shards(str(tmp_path / "shard-{000000..000002}.tar")))
  assert len(src) == 5
  raw = src[4]
  assert raw["__key__"] == "0000020000" and set(raw) >= {"jpg", "txt", "json"}
  s = wds.decode_sample(raw)
  assert s["caption"] == samples[4]["caption"] and s["short_caption"] == samples[4]["short_caption"]
  assert s["label"] == samples[4]["label"]
  np.testing.assert_allclose(s["boxes"], samples[4]["boxes"], atol=1e-6)
  assert s["region_captions"] == samples[4]["region_captions"]
  assert s["captions_ml"] == samples[4]["captions_ml"]
  # JPEG round trip: close to the original pixels.
  assert np.abs(s["image"].astype(int) - samples[4]["image"].astype(int)).mean() < 6
  assert wds.expand_shards(f"{tmp_path}/*.tar") == paths


def test_decode_reports_reasons():
  good = wds.sample_to_members(labelled_samples(1)[0])
  assert wds.decode_sample(dict(good, __key__="k"))["caption"].startswith("sample 0")
  cases = {"corrupt_image": dict(good, jpg=truncated_jpeg()),
           "empty_caption": dict(good, txt=b" \n"),
           "unreadable_caption": dict(good, txt=b"\xff\xfe\xfa"),
           "unreadable_json": dict(good, json=b"{not json"),
           "missing_image": {"txt": b"x"}, "missing_caption": {"jpg": good["jpg"]}}
  for reason, raw in cases.items():
    with pytest.raises(wds.SkipSample) as e:
      wds.decode_sample(raw)
    assert e.value.reason == reason
  no_json = {k: v for k, v in good.items() if k != "json"}
  no_json["txt"] = b"A first sentence. And more details."
  assert wds.decode_sample(no_json)["short_caption"] == "A first sentence."


def test_webdataset_skips_and_counts_bad_samples(shards_with_bad_samples):
  paths, good = shards_with_bad_samples
  cfg = demo_cfg(name="webdataset", shards=",".join(paths))
  # A seed whose epoch 0 ends with a usable sample: 2 batches of 4 then consume exactly epoch 0.
  valid = np.array([i not in (3, 6) for i in range(10)])
  seed = next(s for s in range(50) if valid[grain.MapDataset.range(10).shuffle(seed=s)[9]])
  it = train_iter(cfg, batch=4, seed=seed, fields=("image", "tokens"), context_length=160)
  epoch0 = take(it, 2)
  captions = sorted(decode_tokens(r) for b in epoch0 for r in b["tokens"])
  assert captions == good
  assert it.skipped == 2 and it.skipped_by_reason == {"corrupt_image": 1, "empty_caption": 1}
  state = it.get_state()
  assert state["grain"]["next_index"] == 10
  expected = take(it, 2)
  # Epoch 1 meets the bad samples again: the count is exact over the positions consumed.
  order = grain.MapDataset.range(10).shuffle(seed=seed).repeat()
  consumed = range(10, it.get_state()["grain"]["next_index"])
  assert it.skipped == 2 + sum(not valid[order[p]] for p in consumed)
  resumed = train_iter(cfg, batch=4, seed=seed, fields=("image", "tokens"), context_length=160)
  resumed.set_state(json.loads(json.dumps(state)))
  assert resumed.skipped == 2
  assert_batches_equal(take(resumed, 2), expected)
  assert resumed.skipped == it.skipped


def test_webdataset_hosts_read_disjoint_shards(tmp_path):
  paths = wds.write_shards(labelled_samples(12), str(tmp_path), samples_per_shard=3)
  assert wds.host_shards(paths, 0, 2) == paths[0::2] and wds.host_shards(paths, 1, 2) == paths[1::2]
  cfg = demo_cfg(name="webdataset", shards=",".join(paths))
  seen = []
  for p in range(2):
    it = pipeline.build_train_pipeline(cfg, tokenizer=byte_tokenizer, image_size=32, mean=MEAN,
                                       std=STD, global_batch_size=12, seed=0, process_index=p,
                                       process_count=2, context_length=160)
    batch = next(it)  # 6 per host = one epoch of its 2 shards
    seen.append({decode_tokens(r).split(":")[0] for r in batch["tokens"]})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {f"sample {i}" for i in range(12)}
  with pytest.raises(ValueError, match="cannot be split over 16 hosts"):
    wds.host_shards(paths, 0, 16)


def test_webdataset_regions_from_json(tmp_path):
  samples = labelled_samples(4)
  paths = wds.write_shards(samples, str(tmp_path), samples_per_shard=4)
  cfg = demo_cfg(name="webdataset", shards=paths[0], random_resized_crop_scale=(1.0, 1.0),
                 random_resized_crop_ratio=(1.0, 1.0), max_regions=3)
  batch = next(train_iter(cfg, batch=4, fields=("boxes", "region_tokens", "short_tokens",
                                                 "long_tokens"), context_length=160,
                          field_hooks=(region.family.field_hook(cfg), long_clip.CaptionFields())))
  by_caption = {s["short_caption"]: s for s in samples}
  for i in range(4):
    short = decode_tokens(batch["short_tokens"][i])
    s = next(x for x in samples if decode_tokens(byte_tokenizer([x["caption"]], 160)[0])
             == decode_tokens(batch["long_tokens"][i]))
    assert short == s["short_caption"] and short in by_caption
    n = len(s["boxes"])
    np.testing.assert_allclose(batch["boxes"][i, :n], s["boxes"], atol=1e-6)
    assert batch["box_mask"][i].sum() == n


def test_webdataset_eval_retrieval_set(shards_with_bad_samples):
  paths, good = shards_with_bad_samples
  cfg = demo_cfg(name="webdataset", shards=",".join(paths), eval_shards=",".join(paths), eval_size=0)
  sets = pipeline.build_eval_sets(cfg, tokenizer=byte_tokenizer, image_size=32, mean=MEAN, std=STD)
  ret = sets["retrieval"]
  assert ret["skipped"] == 2 and sorted(ret["captions"]) == good
  assert ret["images"].shape == (8, 32, 32, 3) and ret["image_to_captions"][5] == [5]


# ----------------------------------------------------------------------------- eval sets


def test_demo_eval_sets():
  cfg = demo_cfg(eval_size=12, eval_sets=pipeline.ALL_DEMO_EVAL_SETS)
  sets = pipeline.build_eval_sets(cfg, tokenizer=byte_tokenizer, image_size=32, mean=MEAN, std=STD)
  assert set(sets) == set(pipeline.ALL_DEMO_EVAL_SETS)
  zs = sets["zeroshot"]
  assert zs["kind"] == "zeroshot" and zs["images"].shape == (12, 32, 32, 3)
  ref = [demo.make_sample(demo.SPLIT_SEEDS["zeroshot"], i, 32) for i in range(12)]
  np.testing.assert_allclose(zs["images"][3], transforms.make_preprocess(32, MEAN, STD)(ref[3]["image"]),
                             atol=1e-6)
  assert zs["labels"].tolist() == [s["label"] for s in ref]
  assert zs["class_names"] == demo.class_names() and zs["templates"] == demo.templates()
  assert sets["retrieval"]["captions"][0] == demo.make_sample(demo.SPLIT_SEEDS["retrieval"], 0, 32)["caption"]
  assert sets["retrieval_long"]["captions"][0] == demo.make_sample(
      demo.SPLIT_SEEDS["retrieval"], 0, 32)["long_caption"]
  reg = sets["regions"]
  assert reg["boxes"].shape == (12, 4, 4) and reg["box_mask"].any(1).all()
  ml = sets["multilingual"]  # Babel-ImageNet's format: upper-case codes, [[indices], [names]]
  assert ml["kind"] == "babel_zeroshot" and set(ml["class_labels"]) == {x.upper() for x in demo.LANGUAGES}
  assert ml["class_labels"]["ZH"] == [list(range(24)), demo.class_names("zh")]
  assert ml["prompts"]["JA"] == demo.templates("ja") and len(ml["labels"]) == 12
  # Held-out images are not training images.
  train = {demo.make_sample(0, i, 32)["image"].tobytes() for i in range(12)}
  assert not train & {s["image"].tobytes() for s in ref}
  with pytest.raises(ValueError, match="unknown data.eval_sets"):
    pipeline.build_eval_sets(demo_cfg(eval_sets="zeroshot,bogus"), image_size=32, mean=MEAN, std=STD)


# ----------------------------------------------------------------------------- TFDS


def test_tfds_zero_shot_set_from_array_record(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from zoo.data import tfds as tfds_lib

  images = [demo.make_sample(9, i, 40)["image"][:, :36] for i in range(6)]  # non-square

  class ZooTinyShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["red_circle", "blue_square", "green_star"])}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, im in enumerate(images):  # PIL images are PNG-encoded without TensorFlow
        yield i, {"image": Image.fromarray(im), "label": i % 3}

  ZooTinyShapes(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = demo_cfg(eval_sets="zeroshot", eval_size=4,
                 tfds=dict(name="zoo_tiny_shapes", split="test", data_dir=str(tmp_path), size=5))
  sets = pipeline.build_eval_sets(cfg, image_size=32, mean=MEAN, std=STD)
  ts = sets["tfds_zoo_tiny_shapes"]
  assert ts["class_names"] == ["red circle", "blue square", "green star"]
  src = tfds_lib.data_source("zoo_tiny_shapes", "test", str(tmp_path))
  assert len(src) == 6 and ts["images"].shape == (5, 32, 32, 3)
  pre = transforms.make_preprocess(32, MEAN, STD)
  originals = {im.tobytes(): i for i, im in enumerate(images)}
  for i in range(5):  # tfds stores examples in its own (key-hashed) order
    j = originals[np.asarray(src[i]["image"]).tobytes()]  # PNG: lossless
    assert int(src[i]["label"]) == j % 3 == ts["labels"][i]
    np.testing.assert_allclose(ts["images"][i], pre(images[j]), atol=1e-6)
  with pytest.raises(ValueError, match="cannot be opened"):
    tfds_lib.data_source("zoo_tiny_shapes", "train", str(tmp_path))


# ----------------------------------------------------------------------------- multi-caption


def multi_caption_shards(tmp_path, n=8):
  """n samples with two captions each (KEY.txt, KEY.txt_1)."""
  samples = []
  for i, s in enumerate(labelled_samples(n)):
    s = dict(s, caption=f"s{i} primary", captions=[f"s{i} primary", f"s{i} alt one"])
    s.pop("captions_ml", None)
    samples.append(s)
  paths = wds.write_shards(samples, str(tmp_path), samples_per_shard=4)
  return paths


def test_alternative_captions_and_arrays_decode(tmp_path):
  members = wds.sample_to_members(dict(labelled_samples(1)[0], captions=["a", "b", "c"],
                                       arrays={"emb": np.arange(4, dtype=np.float32)}))
  assert members["txt_1"] == b"b" and members["txt_2"] == b"c" and "emb.npy" in members
  members["json"] = json.dumps({"captions": ["d", ""]}).encode()
  members["txt_10"], members["txt_3"] = b"after three", b"  "  # numeric order; blanks dropped
  s = wds.decode_sample(dict(members, __key__="k"))
  assert s["captions"] == [s["caption"], "b", "c", "after three", "d"]
  np.testing.assert_array_equal(s["arrays"]["emb"], np.arange(4, dtype=np.float32))
  with pytest.raises(wds.SkipSample) as e:
    wds.decode_sample(dict(members, **{"emb.npy": b"\x93NUMPY garbage"}))
  assert e.value.reason == "unreadable_array"
  # A tar member round trip keeps the keys (KEY.txt_1 and KEY.emb.npy group with KEY).
  path = wds.write_shards([dict(labelled_samples(1)[0], captions=["x", "y"],
                                arrays={"emb": np.ones(2)})], str(tmp_path))[0]
  raw = wds.TarShardSource([path])[0]
  assert {"txt", "txt_1", "emb.npy"} <= set(raw)


def test_multi_caption_draws_are_seeded_vary_by_epoch_and_resume_exactly(tmp_path):
  paths = multi_caption_shards(tmp_path)
  cfg = demo_cfg(name="webdataset", shards=",".join(paths))
  it = train_iter(cfg, batch=4, seed=1)
  epochs = [sorted(decode_tokens(r) for b in take(it, 2) for r in b["tokens"]) for _ in range(3)]
  for drawn in epochs:  # each epoch: every sample once, with one of its own captions
    assert sorted(d.split(" ")[0] for d in drawn) == sorted(f"s{i}" for i in range(8))
  assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # draws differ between epochs
  seen = {d for e in epochs for d in e}
  assert any(d.endswith("alt one") for d in seen) and any(d.endswith("primary") for d in seen)
  # Same seed: same draws; a restored iterator continues with the same draws.
  it = train_iter(cfg, batch=4, seed=1)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 3)
  resumed = train_iter(cfg, batch=4, seed=1)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)
  # captions="first": only the primary caption.
  first = train_iter(demo_cfg(name="webdataset", shards=",".join(paths), captions="first"),
                     batch=4, seed=1)
  assert all(decode_tokens(r).endswith("primary") for b in take(first, 4) for r in b["tokens"])
  with pytest.raises(ValueError, match="data.captions='all'"):
    train_iter(demo_cfg(name="webdataset", shards=",".join(paths), captions="all"))
