"""The sharded train step: same losses on every mesh, parameters sharded as the rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.train_utils import synthetic_batches, tiny_config
from zoo.models import sharding
from zoo.train import step as train_step, trainer as trainer_lib

MESHES = {
    "single": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def run(mesh_kw, steps=5, **cfg):
  devices = jax.devices()[:1] if mesh_kw == MESHES["single"] else jax.devices()
  mesh = sharding.make_mesh(devices=devices, **mesh_kw)
  trainer = trainer_lib.build_trainer(tiny_config(**cfg), mesh)
  losses = []
  for batch in synthetic_batches(steps, 16):
    trainer.state, metrics = trainer.step_fn(trainer.state, sharding.host_to_global(batch, mesh))
    losses.append(float(metrics["loss"]))
  return np.array(losses), trainer


@pytest.fixture(scope="module")
def reference():
  return run(MESHES["single"])


@pytest.mark.parametrize("name", ["data8", "data2_fsdp4", "data2_fsdp2_tensor2"])
def test_loss_trajectory_matches_single_device(reference, name):
  ref_losses, ref_trainer = reference
  losses, trainer = run(MESHES[name])
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
  assert ref_losses[-1] < ref_losses[0]  # it actually trains
  ref_params = jax.device_get(ref_trainer.state["params"])
  params = jax.device_get(trainer.state["params"])
  # Adam divides by sqrt(v): where a gradient is near zero, a different reduction order moves
  # that element by a visible fraction of one step (at most lr). Bound every element by 5% of
  # one step, and the bulk much tighter.
  one_step = tiny_config().lr
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=0.05 * one_step)
    assert np.mean(np.abs(np.asarray(a) - np.asarray(b))) < 1e-6


def test_parameters_sharded_by_rules():
  mesh_kw = MESHES["data2_fsdp2_tensor2"]
  mesh = sharding.make_mesh(**mesh_kw)
  trainer = trainer_lib.build_trainer(tiny_config(), mesh)
  params = trainer.state["params"]
  block = params["visual"]["transformer"]["resblocks"][0]
  assert block["mlp"]["fc1"]["kernel"].value.sharding.spec == P("fsdp", "tensor")
  assert block["mlp"]["fc2"]["kernel"].value.sharding.spec == P("tensor", "fsdp")
  assert block["attn"]["qkv_kernel"].value.sharding.spec == P("fsdp", None, "tensor", None)
  assert block["attn"]["out_kernel"].value.sharding.spec == P("tensor", None, "fsdp")
  assert params["text"]["token_embedding"].value.sharding.spec == P("tensor", "fsdp")
  assert block["ln_1"]["scale"].value.sharding.spec == P(None)
  assert params["logit_scale"].value.sharding.spec == P()
  # Each device really holds a quarter of fc1 (fsdp=2 x tensor=2).
  kernel = block["mlp"]["fc1"]["kernel"].value
  shard_shapes = {s.data.shape for s in kernel.addressable_shards}
  assert shard_shapes == {(kernel.shape[0] // 2, kernel.shape[1] // 2)}
  # Adam moments follow their parameters.
  mu = trainer.state["opt_state"][1][0].mu
  assert mu["visual"]["transformer"]["resblocks"][0]["mlp"]["fc1"]["kernel"].value.sharding.spec == P("fsdp", "tensor")


def test_grad_accumulation_runs_and_matches_shapes():
  losses, _ = run(MESHES["data2_fsdp4"], steps=2, grad_accum=2)
  assert np.all(np.isfinite(losses))


def test_no_weight_decay_on_norms_embeddings_and_scale():
  trainer = trainer_lib.build_trainer(tiny_config(), sharding.make_mesh(devices=jax.devices()[:1]))
  mask = train_step.decay_mask(trainer.state["params"])
  assert mask["visual"]["transformer"]["resblocks"][0]["mlp"]["fc1"]["kernel"].value
  assert not mask["visual"]["transformer"]["resblocks"][0]["mlp"]["fc1"]["bias"].value
  assert not mask["text"]["token_embedding"].value
  assert not mask["text"]["positional_embedding"].value
  assert not mask["logit_scale"].value
  assert not mask["visual"]["ln_post"]["scale"].value
  attn = mask["text"]["transformer"]["resblocks"][0]["attn"]
  assert attn["qkv_kernel"].value and not attn["qkv_bias"].value  # [3, H, Dh] is still a bias


def test_only_trainable_parameters_are_differentiated():
  """Frozen leaves get exact zeros and no backward work; trainable ones the full gradient."""
  import jax.numpy as jnp

  params = {"frozen": {"w": jnp.arange(12.0).reshape(3, 4)},
            "train": {"w": jnp.ones((4, 2)), "b": jnp.full((2,), 0.5)}}
  x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

  def loss_fn(p, x):
    y = jnp.tanh(x @ p["frozen"]["w"]) @ p["train"]["w"] + p["train"]["b"]
    return jnp.sum(y ** 2), {"mean": jnp.mean(y)}

  trainable = lambda path: path[0] == "train"  # noqa: E731
  (loss, aux), grads = train_step.trainable_value_and_grad(loss_fn, trainable)(params, x)
  (ref_loss, ref_aux), ref = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
  assert float(loss) == float(ref_loss) and float(aux["mean"]) == float(ref_aux["mean"])
  np.testing.assert_array_equal(grads["frozen"]["w"], np.zeros((3, 4)))
  for k in ("w", "b"):
    np.testing.assert_allclose(grads["train"][k], ref["train"][k], rtol=1e-6)
  # The backward pass has no matmul for the frozen weight's gradient.
  count = lambda f: str(jax.make_jaxpr(f)(params, x)).count("dot_general")  # noqa: E731
  assert count(train_step.trainable_value_and_grad(loss_fn, trainable)) < count(
      jax.value_and_grad(loss_fn, has_aux=True))
