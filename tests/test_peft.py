"""LoRA (zoo.models.lora): zero update at init, merged = unmerged, only adapters train, adapters saved
and loaded alone with clear mismatch errors, per-language adapter swapping, merged models save
and load as plain zoo models, adapter shardings."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import zoo
from tests.train_utils import synthetic_batches, tiny_config
from zoo import losses
from zoo.models import layers, lora as peft, sharding
from zoo.train import step as train_step
from zoo.weights import adapters

ALL = r"kernel$"  # every LoRA-able kernel: Linear.kernel, qkv_kernel, out_kernel
BATCH = synthetic_batches(1, 4)[0]


def outputs(model) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in model(BATCH["image"], BATCH["tokens"]).items()}


def set_lora(model, seed: int = 1, std: float = 0.05) -> None:
  """Random non-zero LoRA weights (a fresh adapter's b is zero, i.e. no update)."""
  rng = np.random.default_rng(seed)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, peft.LoRA):
      node.a.set_value(jnp.asarray(rng.normal(0, std, node.a.shape), jnp.float32))
      node.b.set_value(jnp.asarray(rng.normal(0, std, node.b.shape), jnp.float32))


def max_diff(x: dict, y: dict) -> float:
  return max(float(np.abs(x[k] - y[k]).max()) for k in x)


def assert_same(x: dict, y: dict) -> None:
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- attach / merge


@pytest.mark.parametrize("name,count", [("test-tiny", 16), ("test-tiny-siglip", 21)])
def test_fresh_lora_leaves_outputs_unchanged(name, count):
  model = zoo.create(name)
  base = outputs(model)
  paths = peft.apply_lora(model, targets=ALL, rank=4, alpha=8.0)
  # 2 blocks x 2 towers x (qkv, out, fc1, fc2); SigLIP adds the attention pool's 5 Linears.
  assert len(paths) == count and peft.lora_paths(model) == paths
  assert "visual/transformer/resblocks/1/attn/out_kernel" in paths
  assert "text/transformer/resblocks/0/mlp/fc2/kernel" in paths
  assert_same(outputs(model), base)


@pytest.mark.parametrize("targets", [r"attn/qkv_kernel$", r"attn/out_kernel$",
                                     r"mlp/fc[12]/kernel$", r"attn_pool/(q|kv|proj)/kernel$"])
def test_merged_equals_unmerged(targets):
  model = zoo.create("test-tiny-siglip")
  base = outputs(model)
  plain = sorted(k for k, _ in nnx.to_flat_state(nnx.state(model)))
  peft.apply_lora(model, targets=targets, rank=4, alpha=8.0)
  set_lora(model)
  unmerged = outputs(model)
  assert max_diff(unmerged, base) > 1e-3  # the adapters change the model
  assert peft.merge_lora(model) is model
  assert peft.lora_paths(model) == []
  assert sorted(k for k, _ in nnx.to_flat_state(nnx.state(model))) == plain
  assert max_diff(outputs(model), unmerged) <= 1e-5


def test_remove_lora_restores_the_base_model():
  model = zoo.create("test-tiny")
  base = outputs(model)
  paths = peft.apply_lora(model, targets=["^text/", "^visual/.*fc1"], rank=2, alpha=4.0)
  set_lora(model)
  assert peft.remove_lora(model) == paths
  assert_same(outputs(model), base)


def test_lora_layers_compute_in_the_layer_dtype():
  lin = layers.Linear(8, 16, axes=("embed", "mlp"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  attn = layers.Attention(16, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  peft.apply_lora(lin, targets="kernel", rank=2, alpha=2.0)
  peft.apply_lora(attn, targets="kernel", rank=2, alpha=2.0)
  assert peft.lora_paths(attn) == ["qkv_kernel", "out_kernel"]
  assert lin(jnp.ones((3, 8))).dtype == jnp.bfloat16
  assert attn(jnp.ones((1, 3, 16))).dtype == jnp.bfloat16


def test_lora_module_init_and_delta():
  lora = peft.LoRA(32, 6, rank=4, alpha=8.0, rngs=nnx.Rngs(0))
  a = np.asarray(lora.a[...])
  assert a.shape == (32, 4) and np.abs(a).max() <= 32 ** -0.5 and a.std() > 0.05
  assert not np.any(np.asarray(lora.b[...]))
  lora.b.set_value(jnp.ones((4, 6)))
  x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(lora.delta()), a @ np.ones((4, 6)) * 2.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(lora(jnp.asarray(x))), x @ np.asarray(lora.delta()),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="rank must be a positive int"):
    peft.LoRA(4, 4, rank=0, alpha=1.0, rngs=nnx.Rngs(0))


def test_adapter_init_depends_on_seed_and_path_only():
  one, two = zoo.create("test-tiny"), zoo.create("test-tiny")
  peft.apply_lora(one, targets="fc1", rank=2, alpha=1.0, seed=3)
  peft.apply_lora(two, targets="kernel$", rank=2, alpha=1.0, seed=3)
  a = lambda m, tower="visual": np.asarray(
      getattr(m, tower).transformer.resblocks[1].mlp.fc1.kernel_lora.a[...])
  np.testing.assert_array_equal(a(one), a(two))
  assert not np.array_equal(a(one, "text"), a(one))
  peft.apply_lora(two, targets="fc1", rank=2, alpha=1.0, seed=4, replace=True)
  assert not np.array_equal(a(one), a(two))


def test_target_errors():
  model = zoo.create("test-tiny")
  with pytest.raises(ValueError, match=r"match no kernel of CLIP; available kernels: "
                                       r"text/transformer/resblocks/0/attn/qkv_kernel"):
    peft.apply_lora(model, targets="decoder/.*,lm_head", rank=2, alpha=1.0)
  with pytest.raises(ValueError, match="targets are empty"):
    peft.apply_lora(model, targets=" , ", rank=2, alpha=1.0)
  with pytest.raises(ValueError, match=r"'attn/\(qkv' is not a valid regular expression"):
    peft.apply_lora(model, targets="attn/(qkv", rank=2, alpha=1.0)
  assert peft.lora_paths(model) == []
  peft.apply_lora(model, targets="fc1", rank=2, alpha=1.0)
  with pytest.raises(ValueError, match="already have LoRA.*replace=True"):
    peft.apply_lora(model, targets="mlp", rank=2, alpha=1.0)
  assert len(peft.apply_lora(model, targets="mlp", rank=3, alpha=1.0, replace=True)) == 8
  assert {n.rank for _, n in nnx.iter_graph(model) if isinstance(n, peft.LoRA)} == {3}


# ----------------------------------------------------------------------------- training


def test_only_lora_parameters_train():
  model = zoo.create("test-tiny")
  n = len(peft.apply_lora(model, targets=r"^text/.*(attn/(qkv|out)_kernel|fc[12]/kernel)$",
                          rank=4, alpha=8.0))
  config = tiny_config(lr=1e-2, warmup_steps=0, total_steps=10)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = train_step.make_optimizer(config, params, trainable=peft.is_lora_path)
  lora_keys = {sharding.path_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
               if peft.is_lora_path(sharding.path_names(p))}
  assert len(lora_keys) == 2 * n and all(k[0] == "text" for k in lora_keys)

  def loss_fn(params, batch):
    out = nnx.merge(graphdef, params, rest)(batch["image"], batch["tokens"])
    return losses.clip_loss(out, batch)[0]

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state, loss

  before = jax.tree.map(np.asarray, params)
  opt_state = tx.init(params)
  trained, history = params, []
  for _ in range(4):
    trained, opt_state, loss = step(trained, opt_state, BATCH)
    history.append(float(loss))
  assert history[-1] < history[0] - 1e-3, history
  changed = 0
  for path, old in jax.tree_util.tree_leaves_with_path(before):
    new = np.asarray(trained_leaf(trained, path))
    if peft.is_lora_path(sharding.path_names(path)):
      changed += int(not np.array_equal(new, old))
    else:
      assert new.dtype == old.dtype and np.array_equal(new, old), sharding.path_names(path)
  assert changed == 2 * n  # every a and b moved


def trained_leaf(tree, path):
  for p, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if p == path:
      return leaf
  raise KeyError(path)


def test_apply_settings():
  model = zoo.create("test-tiny")
  settings = adapters.default_settings()
  assert settings.rank == 0 and adapters.apply_settings(model, settings) == []
  settings.rank = 2
  with pytest.raises(ValueError, match="peft.targets is empty"):
    adapters.apply_settings(model, settings)
  settings.targets = r"^text/.*qkv_kernel$"
  assert adapters.apply_settings(model, settings) == [
      f"text/transformer/resblocks/{i}/attn/qkv_kernel" for i in range(2)]


# ----------------------------------------------------------------------------- save / load


def adapter(tmp_path, name: str, seed: int, language: str, targets=r"^text/.*kernel$"):
  model = zoo.create("test-tiny")
  peft.apply_lora(model, targets=targets, rank=4, alpha=8.0)
  set_lora(model, seed=seed)
  path = adapters.save_adapters(model, tmp_path / name, metadata={"language": language})
  return model, path


def test_save_load_adapters_round_trip(tmp_path):
  source, path = adapter(tmp_path, "ar", seed=1, language="ar")
  assert sorted(os.listdir(path)) == [adapters.ADAPTER_FILE, adapters.CONFIG_FILE]
  tensors = load_file(os.path.join(path, adapters.ADAPTER_FILE))
  assert tensors.keys() == adapters.lora_state(source).keys()
  assert all(peft.is_lora_path(tuple(k.split("/"))) for k in tensors)  # adapters only
  with open(os.path.join(path, adapters.CONFIG_FILE)) as f:
    config = json.load(f)
  assert (config["rank"], config["alpha"], config["metadata"]) == (4, 8.0, {"language": "ar"})
  assert len(config["kernel_paths"]) == 8 and config["patterns"] == [r"^text/.*kernel$"]

  fresh = zoo.create("test-tiny")
  assert adapters.load_adapters(fresh, path)["metadata"]["language"] == "ar"
  assert peft.lora_paths(fresh) == peft.lora_paths(source)
  assert_same(outputs(fresh), outputs(source))
  again = adapters.save_adapters(fresh, tmp_path / "again")
  assert adapters.read_adapter_config(again)["patterns"] == config["patterns"]
  with pytest.raises(FileExistsError, match="overwrite=True"):
    adapters.save_adapters(source, path)
  set_lora(source, seed=5)
  adapters.save_adapters(source, path, overwrite=True)
  adapters.load_adapters(fresh, path)  # same layout: the values are swapped in place
  assert_same(outputs(fresh), outputs(source))


def test_load_adapters_mismatch_errors(tmp_path):
  _, path = adapter(tmp_path, "ar", seed=1, language="ar")
  narrow = zoo.create("test-tiny", text={"width": 32, "layers": 1})
  with pytest.raises(ValueError, match="does not fit CLIP") as err:
    adapters.load_adapters(narrow, path)
  message = str(err.value)
  assert "missing kernel text/transformer/resblocks/1/attn/qkv_kernel" in message
  assert ("mis-shaped text/transformer/resblocks/0/attn/out_lora/a: expected (32, 4), found "
          "(64, 4)") in message
  assert "(12 problems)" in message and message.endswith("... and 7 more")  # the first five shown
  assert "unexpected" not in message
  assert peft.lora_paths(narrow) == []  # untouched

  other = zoo.create("test-tiny")
  peft.apply_lora(other, targets="^visual/", rank=4, alpha=8.0)
  with pytest.raises(ValueError, match="already has LoRA on other kernels"):
    adapters.load_adapters(other, path)
  with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
    adapters.load_adapters(other, tmp_path)


def test_with_adapter_swaps_and_restores(tmp_path):
  ar_model, ar = adapter(tmp_path, "ar", seed=1, language="ar")
  model = zoo.create("test-tiny")
  peft.apply_lora(model, targets=r"^text/.*attn", rank=2, alpha=4.0)
  set_lora(model, seed=7)
  own, own_state, own_paths = outputs(model), adapters.lora_state(model), peft.lora_paths(model)
  with adapters.with_adapter(model, ar) as config:
    assert config["metadata"]["language"] == "ar"
    assert_same(outputs(model), outputs(ar_model))
  assert peft.lora_paths(model) == own_paths
  assert_same(adapters.lora_state(model), own_state)
  assert_same(outputs(model), own)

  plain = zoo.create("test-tiny")
  base = outputs(plain)
  with pytest.raises(RuntimeError, match="inside"):
    with adapters.with_adapter(plain, ar):
      raise RuntimeError("inside")
  assert peft.lora_paths(plain) == []
  assert_same(outputs(plain), base)


def test_merged_model_saves_and_loads_as_plain_zoo(tmp_path):
  model = zoo.create("test-tiny")
  peft.apply_lora(model, targets=ALL, rank=4, alpha=8.0)
  set_lora(model)
  merged = outputs(peft.merge_lora(model))
  zoo.save(model, tmp_path / "merged")
  loaded, _, _ = zoo.load(tmp_path / "merged")
  assert_same(outputs(loaded), merged)


# ----------------------------------------------------------------------------- sharding


def test_lora_shardings_follow_the_base_kernels():
  model = zoo.create("test-tiny")
  peft.apply_lora(model, targets=r"^text/transformer/resblocks/0/", rank=4, alpha=8.0)
  set_lora(model)
  expected = outputs(model)
  mesh = sharding.make_mesh(fsdp=2, tensor=4)
  params = nnx.state(model, nnx.Param)
  shardings = sharding.state_shardings(params, mesh)
  specs = {"/".join(map(str, p)): v.get_value().spec
           for p, v in nnx.to_flat_state(shardings)}
  prefix = "text/transformer/resblocks/0/"
  P = jax.sharding.PartitionSpec
  assert specs[prefix + "attn/qkv_lora/a"] == P("fsdp", None)
  assert specs[prefix + "attn/qkv_lora/b"] == P(None, None)  # q|k|v blocks: not by heads
  assert specs[prefix + "attn/out_lora/a"] == P("tensor", None)  # H*Dh rows: by heads
  assert specs[prefix + "attn/out_lora/b"] == P(None, "fsdp")
  assert specs[prefix + "mlp/fc1/kernel_lora/b"] == P(None, "tensor")
  assert specs[prefix + "mlp/fc2/kernel_lora/a"] == P("tensor", None)
  nnx.update(model, sharding.shard_state(params, shardings))
  got = nnx.jit(outputs_fn)(model)
  assert max_diff({k: np.asarray(v) for k, v in got.items()}, expected) <= 1e-5
  lora_a = model.text.transformer.resblocks[0].attn.out_lora.a.get_value()
  assert lora_a.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("tensor", None)), 2)


def outputs_fn(model):
  return model(BATCH["image"], BATCH["tokens"])


@pytest.mark.parametrize("name,count,convs", [("resnet_demo", 4, 19), ("convnext_demo", 9, 8),
                                              ("vitamin_demo", 6, 10),
                                              ("mobileclip_demo", 17, 27)])
def test_lora_on_conv_image_towers(name, count, convs):
  """LoRA on a tiny ModifiedResNet's (attention pool q/k/v/c_proj), ConvNeXt's (block MLPs,
  head projection), ViTamin's (attention, GeGLU MLP, projection) and MobileCLIP MCi's (block
  MLPs, squeeze-excite, head) Linear / attention kernels, and on all their conv kernels (plain,
  strided, grouped and depthwise; ViTamin's stem and MBConv convs): image features equal the
  base model's at init (b = 0); with the trainer's LoRA mask only the adapters get gradients
  (base kernels, norms and batch-norm state untouched); with every b random, merge_lora's
  plain model equals the adapted one."""
  c = importlib.import_module(f"configs.{name}").get_config()
  # random values set from numpy (an eager init compiles one XLA program per parameter shape)
  model = nnx.eval_shape(lambda: zoo.create(c.model, **c.model_overrides.to_dict()))
  rng = np.random.default_rng(1)
  nnx.update(model, jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(rng.uniform(-0.2, 0.2, s.shape) + ("var" in sharding.path_names(p)),
                               s.dtype),
      nnx.state(model)))
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)

  def features(params, graphdef, rest):
    return nnx.merge(graphdef, params, rest).encode_image(images, normalize=True)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  plain_features = jax.jit(features, static_argnums=1)
  base = np.asarray(plain_features(params, graphdef, rest))
  paths = peft.apply_lora(model, targets="^visual/", rank=2, alpha=4.0)
  conv_paths = [s.path for s in peft.kernel_sites(model) if isinstance(s.layer, layers.LoRAConv)]
  assert len(paths) == count + convs and len(conv_paths) == convs, (len(paths), conv_paths)
  assert all(p.endswith("kernel") for p in paths), paths
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):  # any scalar of the features: the gradient's support is what counts
    f = features(params, graphdef, rest)
    return jnp.sum(f * jnp.arange(f.shape[-1], dtype=f.dtype)), f

  grad_fn = jax.jit(train_step.trainable_value_and_grad(loss_fn, peft.is_lora_path))
  (_, with_lora), grads = grad_fn(params)
  # a second program: XLA may fuse the float adds differently
  assert np.isfinite(base).all() and np.abs(base).max() > 0.1
  np.testing.assert_allclose(np.asarray(with_lora), base, rtol=0, atol=1e-6)
  moved = set()
  for (path, g) in jax.tree_util.tree_leaves_with_path(grads):
    names = sharding.path_names(path)
    if peft.is_lora_path(names):
      if names[-1] == "b":  # a's gradient is zero while b = 0
        assert np.abs(np.asarray(g)).max() > 0, names
        moved.add(names)
    else:
      assert not np.asarray(g).any(), names
  assert len(moved) == count + convs
  # trained adapters (every b random) merged into the kernels: the plain model, same features
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype)
      if sharding.path_names(p)[-1] == "b" else x, params)
  adapted = np.asarray(grad_fn(params)[0][1])  # the programs compiled above, run again
  merged = peft.merge_lora(nnx.merge(graphdef, params, rest))
  assert not peft.lora_paths(merged)
  graphdef, params, rest = nnx.split(merged, nnx.Param, ...)
  plain = np.asarray(plain_features(params, graphdef, rest))
  diff = np.abs(plain - adapted).max()
  print(f"{name}: merged vs adapted features max |diff| {diff:.2e}, "
        f"moved by the adapters {np.abs(adapted - base).max():.2e}")
  assert diff <= 1e-5 and np.abs(adapted - base).max() > 1e-3
