"""python -m zoo.embed (a folder of images and a text file -> embeddings + index, resumed, queried)
and python -m zoo.data.make_shards (a folder -> WebDataset shards zoo's reader reads back), run
as a user would, in subprocesses, on a folder the test writes and a tiny random model."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import zoo
from tests import cli_run
from zoo import embed as embed_lib, errors
from zoo.data import make_shards, webdataset as wds

TEXTS = ["a photo of a dog", "a red square", "", "a photo of a dog", "blue sky"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A model directory, an image folder (PNGs, a JPEG and a BMP in a subfolder, a corrupt .jpg,
  a non-image file) and a text file."""
  root = tmp_path_factory.mktemp("embed")
  images = root / "images"
  (images / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (36 + 4 * i, 48, 3), np.uint8)).save(images / f"{i}.png")
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(images / "sub" / "cat.jpg")
  Image.fromarray(rng.integers(0, 256, (32, 44), np.uint8)).save(images / "sub" / "gray.bmp")
  (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  (images / "notes.txt").write_text("not an image")
  (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
  zoo.save(zoo.create("test-tiny", seed=1), str(root / "model"))
  return root


@pytest.fixture(scope="module")
def reference(folder):
  """The model's own normalized embeddings, computed here (in-process, unsharded)."""
  model, tokenizer, preprocess = zoo.load(str(folder / "model"))

  def images(paths):
    pixels = preprocess.batch([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return np.asarray(model.encode_image(jnp.asarray(pixels), normalize=True), np.float32)

  def texts(lines):
    return np.asarray(model.encode_text(jnp.asarray(tokenizer(lines)), normalize=True), np.float32)

  return images, texts


def _embed(folder, out, *extra):
  return cli_run.run("-m", "zoo.embed", "--checkpoint", str(folder / "model"), "--images",
                     str(folder / "images"), "--out", str(out), "--batch_size", "3", *extra,
                     devices=4)


def _rows(path):
  return [json.loads(line) for line in open(path)]


def test_embed_resume_and_query_round_trip(folder, reference, tmp_path):
  images, texts = reference
  out = tmp_path / "out"
  r = _embed(folder, out, "--texts", str(folder / "texts.txt"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "5 new images" in r.stdout and "1 unreadable" in r.stdout, r.stdout
  good = sorted(str(folder / "images" / p) for p in ("0.png", "1.png", "2.png", "sub/cat.jpg",
                                                      "sub/gray.bmp"))
  emb = np.load(out / "embeddings.npy")
  assert emb.dtype == np.float32 and emb.shape == (5, 32)
  assert [row["path"] for row in _rows(out / "index.jsonl")] == good
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  # Row i is the embedding of index row i (batches of 4 split over 4 devices, last one padded).
  np.testing.assert_allclose(emb, images(good), atol=2e-5)
  distinct = ["a photo of a dog", "a red square", "blue sky"]
  assert [row["text"] for row in _rows(out / "text_index.jsonl")] == distinct
  np.testing.assert_allclose(np.load(out / "text_embeddings.npy"), texts(distinct), atol=2e-5)
  assert not (out / ".parts").exists()

  # A second run embeds only the file added since; the rows written stay as they were.
  new = folder / "images" / "sub" / "new.png"
  Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(new)
  try:
    r = _embed(folder, out)
    expected_new = images([str(new)])
  finally:
    new.unlink()
  assert r.returncode == 0, r.stderr[-2000:]
  assert "1 new images (5 already embedded, 1 unreadable" in r.stdout, r.stdout
  emb2 = np.load(out / "embeddings.npy")
  assert [row["path"] for row in _rows(out / "index.jsonl")] == good + [str(new)]
  np.testing.assert_array_equal(emb2[:5], emb)
  np.testing.assert_allclose(emb2[5:], expected_new, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(emb2, axis=-1), 1.0, atol=1e-5)

  # query: the top rows by cosine, as numpy computes them over the written file.
  r = cli_run.run("-m", "zoo.embed", "query", "--index", str(out), "--query", "a red square",
                  "--top", "4")
  assert r.returncode == 0, r.stderr[-2000:]
  printed = [line.split("\t") for line in r.stdout.splitlines()]
  scores = emb2 @ texts(["a red square"])[0]
  order = np.argsort(-scores)[:4]
  paths = [row["path"] for row in _rows(out / "index.jsonl")]
  assert [p for _, p in printed] == [paths[i] for i in order]
  np.testing.assert_allclose([float(s) for s, _ in printed], scores[order], atol=1e-5)
  assert [float(s) for s, _ in printed] == sorted((float(s) for s, _ in printed), reverse=True)


def test_killed_merge_leaves_readable_rows(tmp_path):
  """Parts are merged arrays-then-index; a run killed between the two renames, or before the
  parts were removed, reads back every row once."""
  table = embed_lib.Table(str(tmp_path), "image")
  a, b = np.eye(4, dtype=np.float32)[:2], np.eye(4, dtype=np.float32)[2:]
  table.add(a, ["a0", "a1"])
  assert table.merge() == 2 and not (tmp_path / ".parts").exists()
  table.add(b, ["b0", "b1"])
  np.save(tmp_path / "embeddings.npy", np.concatenate([a, b]))  # killed after the first rename
  emb, keys = table.read()
  assert keys == ["a0", "a1", "b0", "b1"]
  np.testing.assert_array_equal(emb, np.eye(4))
  (tmp_path / "index.jsonl").write_text("".join(json.dumps({"path": k}) + "\n" for k in keys))
  emb, keys = table.read()  # killed after both renames, parts still there
  assert keys == ["a0", "a1", "b0", "b1"] and len(emb) == 4
  assert table.merge() == 4 and table.keys() == {"a0", "a1", "b0", "b1"}


def test_bad_input_is_one_line_exit_2(folder, tmp_path):
  """One case through the command line (the one-line form, exit 2); the others through `main`
  (the same checks, before any model is loaded)."""
  (tmp_path / "empty").mkdir()
  model, o = str(folder / "model"), str(tmp_path / "o")
  proc = cli_run.run("-m", "zoo.embed", "--checkpoint", model, "--out", o)
  lines = cli_run.lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-1000:])
  assert lines[0].startswith("python -m zoo.embed: error: nothing to embed"), lines
  cases = {
      "not both": ["--checkpoint", model, "--model", "ViT-B-32", "--pretrained", "openai",
                   "--images", str(folder / "images"), "--out", o],
      "no such directory": ["--checkpoint", model, "--images", str(tmp_path / "nope"), "--out", o],
      "no image files": ["--checkpoint", model, "--images", str(tmp_path / "empty"), "--out", o],
      "needs --pretrained": ["--model", "ViT-B-32", "--texts", str(folder / "texts.txt"),
                             "--out", o],
      "required: --out": ["--checkpoint", model, "--images", str(folder / "images")],
      "no embed.json": ["query", "--index", str(tmp_path), "--query", "x"],
  }
  for want, args in cases.items():
    with pytest.raises(errors.UserError, match=want):
      embed_lib.main(args)
  assert not (tmp_path / "o").exists()


def test_make_shards_read_back_by_the_webdataset_reader(folder, tmp_path):
  images = folder / "images"
  captions = tmp_path / "captions.jsonl"
  captions.write_text(json.dumps({"path": "sub/cat.jpg", "caption": "a cat, in JPEG"}) + "\n"
                      + json.dumps({"path": str(images / "1.png"), "caption": "noise"}) + "\n")
  out = tmp_path / "shards"
  r = cli_run.run("-m", "zoo.data.make_shards", "--images", str(images), "--captions",
                  str(captions), "--out", str(out), "--shard_size", "2")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "5 images in 3 shards" in r.stdout and "1 unreadable" in r.stdout, r.stdout
  assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "00002.tar"]
  source = wds.TarShardSource(wds.expand_shards(str(out / "*.tar")))
  samples = [wds.decode_sample(source[i]) for i in range(len(source))]
  source.close()
  metas = [json.loads(source[i]["json"]) for i in range(len(source))]
  rel = ["0.png", "1.png", "2.png", "sub/cat.jpg", "sub/gray.bmp"]
  assert [m["url"] for m in metas] == rel
  assert [s["key"] for s in samples] == ["000000", "000001", "000010", "000011", "000020"]
  assert [s["caption"] for s in samples] == ["0", "noise", "2", "a cat, in JPEG", "gray"]
  for sample, name in zip(samples, rel):
    np.testing.assert_array_equal(sample["image"],
                                  np.asarray(Image.open(images / name).convert("RGB")))
  assert "jpg" in source[3] and "png" in source[4]  # JPEG bytes kept; BMP stored as PNG
  with pytest.raises(errors.OutputExists):  # the shards are kept unless --overwrite
    make_shards.main(["--images", str(images), "--out", str(out)])
