"""zoo.save / zoo.load and the train-loop TrainCheckpointer (Orbax), on 8 CPU devices."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import zoo
from zoo.models import configs
from zoo.train.checkpoints import TrainCheckpointer
from zoo.weights import model_dir
from zoo.weights.layout import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A test-tiny model saved once with a user config; (model, directory)."""
  model = zoo.create("test-tiny", seed=3)
  directory = str(tmp_path_factory.mktemp("zoo_save") / "ckpt")
  zoo.save(model, directory, {"lr": 1e-3, "schedule": ("warmup", 10), "note": "tiny"})
  return model, directory


def _inputs():
  images = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  return images, zoo.get_tokenizer("test-tiny")(["a photo of a cat", "a dog"])


def _img(model, images):
  return np.asarray(jax.jit(lambda x: model.encode_image(x))(images))


def _txt(model, tokens):
  return np.asarray(jax.jit(lambda t: model.encode_text(t))(tokens))


def _copy(directory: str, tmp_path) -> str:
  dst = str(tmp_path / "copy")
  shutil.copytree(directory, dst)
  return dst


# ----------------------------------------------------------------------------- save / load


def test_load_gives_identical_outputs_tokenizer_preprocess_and_config(saved):
  model, directory = saved
  loaded, tokenizer, preprocess = zoo.load(directory)
  images, tokens = _inputs()
  np.testing.assert_array_equal(_img(loaded, images), _img(model, images))
  np.testing.assert_array_equal(_txt(loaded, tokens), _txt(model, tokens))
  assert loaded.config == model.config
  np.testing.assert_array_equal(tokenizer(["a photo of a cat", "a dog"]), tokens)
  from PIL import Image

  image = Image.fromarray(np.random.RandomState(1).randint(0, 255, (40, 50, 3), np.uint8))
  assert preprocess(image).shape == (32, 32, 3)
  model_config, user_config = model_dir.load_config(directory)
  assert model_config == model.config
  assert user_config == {"lr": 1e-3, "schedule": ["warmup", 10], "note": "tiny"}


def test_siglip_model_round_trip(tmp_path):
  model = zoo.create("test-tiny-siglip", seed=1)
  zoo.save(model, str(tmp_path / "s"))
  loaded, _, _ = model_dir.load(str(tmp_path / "s"))
  images, tokens = _inputs()
  np.testing.assert_array_equal(_img(loaded, images), _img(model, images))
  np.testing.assert_array_equal(_txt(loaded, tokens), _txt(model, tokens))
  assert float(loaded.logit_bias[...]) == float(model.logit_bias[...]) == -10.0


def test_load_into_other_architecture_names_keys_and_shapes(saved):
  _, directory = saved
  with pytest.raises(CheckpointError) as info:
    model_dir.load(directory, config=configs.get_model_config("test-tiny", embed_dim=16))
  msg = str(info.value)
  assert "2 problems" in msg
  assert "mis-shaped visual.proj: expected (64, 16), found (64, 32)" in msg
  assert "mis-shaped text.text_projection: expected (64, 16), found (64, 32)" in msg
  with pytest.raises(CheckpointError) as info:
    model_dir.load(directory, config="test-tiny-siglip")
  msg = str(info.value)
  # 20 problems: the first line counts them, then five lines (every kind shows) and the rest.
  assert "(20 problems; was it saved from another model?)" in msg.splitlines()[0]
  assert "missing    logit_bias: expected ()" in msg
  assert "unexpected visual.class_embedding: found (64,)" in msg
  assert "mis-shaped visual.positional_embedding: expected (16, 64), found (17, 64)" in msg
  assert len(msg.splitlines()) == 7 and msg.splitlines()[-1] == "  ... and 15 more"


def test_restore_weights_into_an_existing_model(saved):
  model, directory = saved
  other = zoo.create("test-tiny", seed=99)
  model_dir.restore_weights(other, directory)
  images, _ = _inputs()
  np.testing.assert_array_equal(_img(other, images), _img(model, images))


@pytest.mark.parametrize("damage", ["delete_chunk", "truncate_chunk", "flip_bytes",
                                    "delete_config", "garbage_config", "delete_weights"])
def test_corrupt_checkpoint_is_a_clear_error(saved, tmp_path, damage):
  _, directory = saved
  d = _copy(directory, tmp_path)
  chunks = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "weights", "d")) for f in fs]
  assert chunks
  if damage == "delete_chunk":
    os.remove(chunks[0])
    match = "missing   weights/d/"
  elif damage == "truncate_chunk":
    with open(chunks[0], "r+b") as f:
      f.truncate(10)
    match = "truncated weights/d/"
  elif damage == "flip_bytes":
    with open(chunks[0], "r+b") as f:
      data = bytearray(f.read())
      data[len(data) // 2] ^= 0xFF
      f.seek(0)
      f.write(data)
    match = "checksum differs"
  elif damage == "delete_config":
    os.remove(os.path.join(d, model_dir.CONFIG_FILE))
    match = "zoo_config.json is missing"
  elif damage == "garbage_config":
    with open(os.path.join(d, model_dir.CONFIG_FILE), "w") as f:
      f.write('{"format_version": 1, "model_cl')
    match = "not valid JSON"
  else:
    shutil.rmtree(os.path.join(d, "weights"))
    match = "corrupt or incomplete"
  with pytest.raises(CheckpointError, match=match):
    zoo.load(d)


# Orbax leaves tensorstore callbacks behind when its metadata read fails; they complain about
# a closed asyncio loop after the (correctly raised) error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_weights_without_manifest_check_still_a_clear_error(saved, tmp_path):
  _, directory = saved
  d = _copy(directory, tmp_path)
  for root, _, files in os.walk(os.path.join(d, "weights", "d")):
    for f in files:
      os.remove(os.path.join(root, f))
  with pytest.raises(CheckpointError, match="is corrupt"):
    model_dir.load(d, verify=False)
  gc.collect()  # their finalizers log here, not in the middle of a later test


def test_interrupted_save_is_never_loaded_and_save_is_not_clobbering(saved, tmp_path):
  model, _ = saved
  target = str(tmp_path / "ckpt")
  # What an interrupted save leaves: only the temporary sibling, never `target` itself.
  os.makedirs(target + ".zoo-tmp/weights")
  with pytest.raises(CheckpointError, match="never completed"):
    zoo.load(target)
  zoo.save(model, target)  # the leftover is cleaned up and the save completes
  assert not os.path.exists(target + ".zoo-tmp")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    zoo.save(model, target)
  newer = zoo.create("test-tiny", seed=5)
  model_dir.save(newer, target, overwrite=True)
  images, _ = _inputs()
  np.testing.assert_array_equal(_img(zoo.load(target)[0], images), _img(newer, images))


def test_record_refuses_classes_outside_zoo(saved, tmp_path):
  _, directory = saved
  d = _copy(directory, tmp_path)
  path = os.path.join(d, model_dir.CONFIG_FILE)
  with open(path) as f:
    record = json.load(f)
  record["model_class"] = "os.system"
  with open(path, "w") as f:
    json.dump(record, f)
  with pytest.raises(CheckpointError, match="outside the zoo package"):
    zoo.load(d)


# ----------------------------------------------------------------------------- TrainCheckpointer


def _mesh():
  return jax.make_mesh((2, 4), ("data", "fsdp"))


def _state(mesh, seed: int) -> dict:
  """A train-state-like pytree: sharded params, optimizer moments, step, raw rng key data."""
  key = jax.random.key(seed)
  k1, k2 = jax.random.split(key)
  fsdp = NamedSharding(mesh, P("fsdp", None))
  both = NamedSharding(mesh, P("data", "fsdp"))
  repl = NamedSharding(mesh, P())
  params = {"w": jax.device_put(jax.random.normal(k1, (8, 12)), fsdp),
            "b": jax.device_put(jax.random.normal(k2, (12,)), repl)}
  return {"params": params,
          "opt_state": {"mu": jax.device_put(jnp.full((4, 8), float(seed)), both),
                        "count": jax.device_put(jnp.int32(seed), repl)},
          "step": jax.device_put(jnp.int32(seed), repl),
          "rng": jax.device_put(jax.random.key_data(key), repl)}


def _abstract(state, shardings=None):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings if shardings is not None else
                      jax.tree.map(lambda x: x.sharding, state))


def _assert_same(got, want):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))


def test_train_checkpointer_sharded_save_restore(tmp_path):
  mesh = _mesh()
  assert len(mesh.devices.flat) == 8
  ckpt = TrainCheckpointer(str(tmp_path / "ckpts"), save_every=2, keep=2)
  saved_steps = []
  for step in range(1, 8):
    state = _state(mesh, step)
    if ckpt.save(step, state, {"data_state": {"epoch": 0, "index": step * 4},
                               "raw": b"\x00\xffiterator"}):
      saved_steps.append(step)
    # Async save copied to host already: the caller may donate / delete its arrays.
    jax.tree.map(lambda x: x.delete(), state)
  assert saved_steps == [2, 4, 6]
  assert ckpt.save(7, _state(mesh, 7), {}, force=True)  # the loop's final step
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]  # keep=2
  assert ckpt.latest_step() == 7
  want = _state(mesh, 6)
  restored, extra = ckpt.restore(6, _abstract(want))
  _assert_same(restored, want)
  assert jax.tree.map(lambda r, w: r.sharding == w.sharding, restored, want) == \
      jax.tree.map(lambda _: True, want)
  assert extra == {"data_state": {"epoch": 0, "index": 24}, "raw": b"\x00\xffiterator"}
  # Restoring straight into different shardings (e.g. another mesh layout).
  other = jax.tree.map(lambda x: NamedSharding(mesh, P(*([None] * x.ndim))), want)
  restored, _ = ckpt.restore(6, _abstract(want, other))
  _assert_same(restored, want)
  assert restored["params"]["w"].sharding.spec == P(None, None)
  ckpt.close()

  # A fresh manager (a restarted process) sees the same complete steps.
  with TrainCheckpointer(str(tmp_path / "ckpts"), save_every=2, keep=2) as again:
    assert again.latest_step() == 7
    restored, _ = again.restore(7, _abstract(_state(mesh, 7)))
    _assert_same(restored, _state(mesh, 7))


def test_half_written_and_uncommitted_steps_are_ignored(tmp_path):
  mesh = _mesh()
  root = str(tmp_path / "ckpts")
  with TrainCheckpointer(root, save_every=1, keep=5, async_=False) as ckpt:
    ckpt.save(3, _state(mesh, 3), {"i": 3})
  complete = os.path.join(root, "3")
  # Orbax's temporary naming for a save killed mid-write:
  shutil.copytree(complete, os.path.join(root, "9.orbax-checkpoint-tmp-1712345678"))
  os.remove(os.path.join(root, "9.orbax-checkpoint-tmp-1712345678", "commit_success.txt"))
  # A final-named directory missing its commit marker, and one whose metadata never committed.
  shutil.copytree(complete, os.path.join(root, "10"))
  os.remove(os.path.join(root, "10", "commit_success.txt"))
  shutil.copytree(complete, os.path.join(root, "11"))
  with open(os.path.join(root, "11", "_CHECKPOINT_METADATA"), "w") as f:
    json.dump({"item_handlers": {}, "commit_timestamp_nsecs": None}, f)
  shutil.copytree(complete, os.path.join(root, "12"))
  shutil.rmtree(os.path.join(root, "12", "extra"))

  ckpt = TrainCheckpointer(root, save_every=1, keep=5)
  assert ckpt.latest_step() == 3
  assert ckpt.all_steps() == [3]
  for bad in (9, 10, 11, 12):
    with pytest.raises(CheckpointError, match=f"step {bad} .* missing or incomplete"):
      ckpt.restore(bad, _abstract(_state(mesh, 3)))
  restored, extra = ckpt.restore(3, _abstract(_state(mesh, 3)))
  _assert_same(restored, _state(mesh, 3))
  assert extra == {"i": 3}
  # A resumed run reaching step 10 again replaces the debris with a complete checkpoint;
  # an existing complete step is never overwritten.
  assert ckpt.save(10, _state(mesh, 10), {"i": 10})
  assert not ckpt.save(3, _state(mesh, 4), {"i": 4})
  ckpt.wait()
  assert ckpt.latest_step() == 10
  _assert_same(ckpt.restore(10, _abstract(_state(mesh, 10)))[0], _state(mesh, 10))
  assert ckpt.restore(3, _abstract(_state(mesh, 3)))[1] == {"i": 3}
  ckpt.close()


def test_restore_with_wrong_structure_is_a_clear_error(tmp_path):
  mesh = _mesh()
  with TrainCheckpointer(str(tmp_path / "c"), save_every=1, keep=1, async_=False) as ckpt:
    ckpt.save(1, _state(mesh, 1), {})
    bad = _state(mesh, 1)
    bad["params"]["w"] = jnp.zeros((8, 13))
    with pytest.raises(CheckpointError, match="restoring step 1"):
      ckpt.restore(1, _abstract(bad, jax.tree.map(lambda _: NamedSharding(mesh, P()), bad)))


def test_model_params_round_trip_through_train_checkpointer(tmp_path):
  """The loop's use: nnx params split off a model, sharded by logical rules, saved, restored."""
  from zoo.models import sharding

  mesh = sharding.make_mesh(data=2, fsdp=4)
  model = zoo.create("test-tiny", seed=2)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  shardings = sharding.state_shardings(params, mesh)
  params = sharding.shard_state(params, shardings)
  with TrainCheckpointer(str(tmp_path / "c"), save_every=1, keep=1) as ckpt:
    ckpt.save(1, {"params": params}, {})
    ckpt.wait()
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            {"params": params}, {"params": shardings})
    restored, _ = ckpt.restore(1, abstract)
  _assert_same(restored, {"params": params})
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves({"params": params})):
    assert got.sharding == want.sharding


# ----------------------------------------------------------------------------- older layouts

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("kind", ["clip", "moe"])
def test_model_dir_written_by_0_1_0_loads(kind):
  """Directories written by zoo 0.1.0 (before the layout move; the fixture was made with that
  commit) record `zoo.registry.CLIPConfig`: they load through the rename table and give the
  features 0.1.0 computed."""
  expected = np.load(FIXTURES / "model_dir_v0_1_0_expected.npz")
  model, _, _ = zoo.load(FIXTURES / f"model_dir_v0_1_0_{kind}")
  image = np.asarray(model.encode_image(jnp.asarray(expected["images"])))
  text = np.asarray(model.encode_text(jnp.asarray(expected["tokens"])))
  np.testing.assert_allclose(image, expected[f"{kind}_image"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(text, expected[f"{kind}_text"], atol=1e-5, rtol=0)


def test_moved_class_names_resolve():
  assert model_dir.current_qualname("zoo.registry.CLIPConfig") == "zoo.models.configs.CLIPConfig"
  assert model_dir.current_qualname("zoo.moe.MoECLIP") == "zoo.models.moe.MoECLIP"
  assert model_dir.current_qualname("zoo.models.clip.CLIP") == "zoo.models.clip.CLIP"
