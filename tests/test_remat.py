"""Gradient checkpointing (config.remat), bf16 compute, and the fast attention path.

- remat 'block' / 'full' give bitwise the same loss, gradients and updated parameters as no
  remat in float32 (the recomputed forward is the same program), and really change what the
  backward stores (smaller temporary buffers).
- bfloat16 compute (float32 parameters) tracks float32 within a stated tolerance over 5 steps.
- layers.dot_product_attention equals jax.nn.dot_product_attention (values and gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train_utils import synthetic_batches, tiny_config
from zoo import losses
from zoo.models import clip as clip_lib, layers, sharding
from zoo.train import trainer as trainer_lib

# bf16 vs fp32 over 5 train steps of test-tiny (lr 1e-3): |loss difference| per step.
BF16_LOSS_ATOL = 2e-2


def one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


def loss_and_grads(model: nnx.Module, batch: dict):
  """(jitted value_and_grad of the CLIP loss, params, bytes the backward keeps from forward)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    out = nnx.merge(graphdef, params, rest)(batch["image"], batch["tokens"])
    return losses.clip_loss(out, batch, impl="reference", mesh=None)[0]

  # The vjp closure holds exactly the residuals saved for the backward.
  saved = jax.eval_shape(lambda p: jax.vjp(loss_fn, p)[1], params)
  saved_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(saved))
  return jax.jit(jax.value_and_grad(loss_fn)), params, saved_bytes


def test_remat_bitwise_equal_and_saves_memory():
  batch = {k: jnp.asarray(v) for k, v in synthetic_batches(1, 8)[0].items()}
  model = clip_lib.create("test-tiny", seed=0)
  fn, params, saved = loss_and_grads(model, batch)
  loss, grads = fn(params)
  saved_by_mode = {"none": saved}
  for mode in ("block", "full"):
    assert layers.set_remat(model, mode) == 2  # both towers
    fn_r, params_r, saved_by_mode[mode] = loss_and_grads(model, batch)
    loss_r, grads_r = fn_r(params_r)
    assert np.asarray(loss_r) == np.asarray(loss), mode
    for (path, g), g_r in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(grads_r)):
      np.testing.assert_array_equal(np.asarray(g_r), np.asarray(g), err_msg=f"{mode} {path}")
  assert saved_by_mode["none"] > saved_by_mode["block"] > saved_by_mode["full"], saved_by_mode


@functools.lru_cache(maxsize=None)
def _run_steps(n: int, overrides: tuple) -> tuple[list[float], dict]:
  config = tiny_config(**dict(overrides))
  trainer = trainer_lib.build_trainer(config, one_device_mesh())
  state, out = trainer.state, []
  for batch in synthetic_batches(n, config.batch_size):
    state, metrics = trainer.step_fn(state, sharding.host_to_global(batch, trainer.mesh))
    out.append(float(metrics["loss"]))
  return out, jax.device_get(state["params"])


def run_steps(n: int, **overrides) -> tuple[list[float], dict]:
  """Losses of `n` train steps of test-tiny on fixed batches, and the final parameters."""
  return _run_steps(n, tuple(sorted(overrides.items())))


def test_config_remat_train_steps_bitwise():
  base_losses, base_params = run_steps(5)
  remat_losses, remat_params = run_steps(5, remat="full")
  assert remat_losses == base_losses
  for a, b in zip(jax.tree.leaves(base_params), jax.tree.leaves(remat_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_remat_is_a_clear_error():
  with pytest.raises(ValueError, match="remat 'some'"):
    trainer_lib.build_trainer(tiny_config(remat="some"), one_device_mesh())


def test_bf16_tracks_fp32_over_5_steps():
  fp32, _ = run_steps(5)
  bf16, params = run_steps(5, dtype="bfloat16")
  assert all(np.isfinite(bf16))
  assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both actually train
  np.testing.assert_allclose(bf16, fp32, atol=BF16_LOSS_ATOL, rtol=0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # params stay fp32


def test_bf16_compute_dtype_is_used():
  model = clip_lib.create("test-tiny", seed=0, dtype="bfloat16")
  batch = synthetic_batches(1, 2)[0]
  hlo = jax.jit(lambda m, i, t: m(i, t)).lower(model, batch["image"], batch["tokens"]).as_text()
  assert "bf16" in hlo and "dot_general" in hlo


@pytest.mark.parametrize("causal,with_mask", [(False, False), (True, False), (False, True)])
def test_attention_equals_jax(causal, with_mask):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 7, 3, 8)).astype(np.float32)) for _ in range(3))
  mask = jnp.asarray(rng.random((2, 1, 7, 7)) > 0.3) | jnp.eye(7, dtype=bool) if with_mask else None

  def ours(q, k, v):
    return layers.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

  def ref(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-6, rtol=1e-6)
  cot = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
