"""zoo.kernels.contrastive.contrastive_loss: xla / pallas (interpret mode) / sharded forms equal the reference.

Tolerances. fp32: |impl - reference| <= 1e-5 * scale, where scale is the larger of the
reference's magnitude (max |.| for arrays) and the magnitude of the summed contributions,
computed in float64 (e.g. sum_ij |G_ij raw_ij| for d loss / d scale). The second term matters
only for cancelling sums (a gradient that is 0 at B = 1, or dscale where positive and negative
pairs nearly cancel); every backend, the reference included, is accurate only to eps relative
to that magnitude. bf16 inputs (fp32 accumulation): loss 1e-5, gradients 2e-2 of the same scale
(the kernels round the probabilities to bf16 before the gradient matmuls, as flash kernels do).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # the race report
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zoo import losses
from zoo.kernels import _mosaic, _pallas
from zoo.kernels.contrastive import contrastive_loss, reference_loss
from zoo.models import sharding

SCALE, BIAS = 10.0, -5.0


def _embeddings(b: int, d: int, seed: int = 0, dtype=jnp.float32):
  """Normalized pairs whose positives are correlated (as in training)."""
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (b, d))
  y = x + 1.5 * jax.random.normal(ky, (b, d))
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
  return x.astype(dtype), y.astype(dtype)


def _args(kind: str, b: int, d: int, dtype=jnp.float32, seed: int = 0):
  x, y = _embeddings(b, d, seed, dtype)
  s = jnp.float32(SCALE)
  return (x, y, s, jnp.float32(BIAS)) if kind == "sigmoid" else (x, y, s)


def _value_and_grads(fn, args, target: str | None = None):
  """jit(value_and_grad) over all inputs; `target` selects the pallas kernels interpreted."""
  with _pallas.use_target(target) if target else contextlib.nullcontext():
    return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


def _scales(kind: str, args) -> list[float]:
  """float64 magnitudes of the loss and of each gradient's summed contributions (see top)."""
  x, y = (np.asarray(a, np.float64) for a in args[:2])
  s = float(args[2])
  b = x.shape[0]
  raw = x @ y.T
  if kind == "softmax":
    z = s * raw
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(z - z.max(0, keepdims=True))
    q /= q.sum(0, keepdims=True)
    g_abs = (p + q + 2 * np.eye(b)) / (2 * b)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    loss_scale = (np.abs(lse).sum() + np.abs(np.diag(z)).sum()) / b
  else:
    zz = s * raw + float(args[3])
    sign = 2 * np.eye(b) - 1
    g_abs = 1 / (1 + np.exp(sign * zz)) / b
    loss_scale = np.logaddexp(0, -sign * zz).sum() / b
  scales = [loss_scale,
            s * g_abs.sum(1).max() * np.abs(y).max(),
            s * g_abs.sum(0).max() * np.abs(x).max(),
            (g_abs * np.abs(raw)).sum()]
  if kind == "sigmoid":
    scales.append(g_abs.sum())
  return scales


def _assert_close(got, want, scales, rtol_loss: float, rtol_grad: float):
  (v, grads), (v0, grads0) = got, want
  names = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
  for name, a, r, scale, rtol in zip(names, [v, *grads], [v0, *grads0], scales,
                                     [rtol_loss] + [rtol_grad] * 4):
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    assert a.shape == r.shape, (name, a.shape, r.shape)
    tol = rtol * max(np.abs(r).max(), scale)
    err = np.abs(a - r).max()
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (rtol {rtol})"


def _loss(impl: str, kind: str, block: int | None = None, **kw):
  return functools.partial(contrastive_loss, kind=kind, impl=impl, block_size=block, **kw)


# B in {1, 7, 128, 1000} and d in {16, 64, 512}, block sizes chosen so that padding / masking and
# several row and column blocks are exercised while interpret-mode Pallas stays fast. "pallas"
# runs the GPU (Triton) kernels interpreted; "pallas-tpu" the TPU (Mosaic) kernels in the TPU
# interpreter (DMAs, semaphores, the two-core row split), whose tiles are >= 128.
SHAPES = [(1, 16, 16), (7, 64, 16), (128, 512, 32), (1000, 16, 128), (1000, 64, 256)]
TARGET = {"xla": None, "pallas": "interpret-gpu", "pallas-tpu": "interpret-tpu"}


def _impl(name: str) -> str:
  return name.split("-")[0]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("b,d,block", SHAPES)
def test_fp32_matches_reference(kind, impl, b, d, block):
  args = _args(kind, b, d)
  want = _value_and_grads(_loss("reference", kind), args)
  got = _value_and_grads(_loss(impl, kind, block), args, TARGET[impl])
  _assert_close(got, want, _scales(kind, args), 1e-5, 1e-5)


# The 2-D TPU grid at B a multiple of no block: 3 x 3 tiles of 128 (rows padded to 4 blocks for
# the two-core split), d = 200 padded to 256; and a single tile (B = 7).
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("b,d", [(300, 200), (7, 64)])
def test_tpu_kernels_fp32_match_reference(kind, b, d):
  args = _args(kind, b, d, seed=5)
  want = _value_and_grads(_loss("reference", kind), args)
  got = _value_and_grads(_loss("pallas", kind, 128), args, "interpret-tpu")
  _assert_close(got, want, _scales(kind, args), 1e-5, 1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas-tpu"])
@pytest.mark.parametrize("b,d,block", [(7, 64, 16), (200, 512, 32)])
def test_bf16_matches_reference(kind, impl, b, d, block):
  args = _args(kind, b, d, dtype=jnp.bfloat16)
  want = _value_and_grads(_loss("reference", kind), args)
  got = _value_and_grads(_loss(_impl(impl), kind, block), args, TARGET[impl])
  assert got[1][0].dtype == jnp.bfloat16 and got[0].dtype == jnp.float32
  _assert_close(got, want, _scales(kind, args), 1e-5, 2e-2)


def test_default_block_sizes_and_saturated_positives():
  """Large scale and bias (a trained SigLIP): positives saturate, gradients must not vanish."""
  x, y = _embeddings(300, 64, seed=3)
  y = (x + 0.05 * y) / jnp.linalg.norm(x + 0.05 * y, axis=1, keepdims=True)
  for kind, args in [("softmax", (x, y, jnp.float32(100.0))),
                     ("sigmoid", (x, y, jnp.float32(100.0), jnp.float32(-10.0)))]:
    want = _value_and_grads(_loss("reference", kind), args)
    for impl in ("xla", "pallas", "pallas-tpu"):
      got = _value_and_grads(_loss(_impl(impl), kind), args, TARGET[impl])
      _assert_close(got, want, _scales(kind, args), 1e-5, 1e-5)


# ----------------------------------------------------------------------------- sharded


def _sharded(fn, mesh, axes, n_args, check_vma):
  rows, rep = P(axes), P()
  return jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows) + (rep,) * (n_args - 2),
                       out_specs=rep, check_vma=check_vma)


# (The TPU interpreter is not used under shard_map: with 8 simulated CPU devices it stalls.)
SHARDED = [("xla", True), ("xla", False), ("pallas", False), ("reference", True)]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl,check_vma", SHARDED)
def test_sharded_equals_global_reference(kind, impl, check_vma):
  """Rings over 8 devices, 5 rows each (not a multiple of the block): equal the unsharded loss."""
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("d",))
  args = _args(kind, 40, 16, seed=1)
  want = _value_and_grads(_loss("reference", kind), args)
  fn = _sharded(_loss(_impl(impl), kind, 16, axis_name="d"), mesh, "d", len(args), check_vma)
  got = _value_and_grads(fn, args, TARGET.get(impl))
  _assert_close(got, want, _scales(kind, args), 1e-5, 1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_sharded_tuple_axes(kind):
  """axis_name may be a tuple of mesh axes (the train loop's batch axes)."""
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  args = _args(kind, 64, 64, seed=2)
  want = _value_and_grads(_loss("reference", kind), args)
  axes = ("data", "fsdp")
  fn = _sharded(_loss("xla", kind, 16, axis_name=axes), mesh, axes, len(args), True)
  _assert_close(_value_and_grads(fn, args), want, _scales(kind, args), 1e-5, 1e-5)


# ----------------------------------------------------------------------------- zoo.losses


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas", "auto"])
def test_zoo_losses_on_mesh_is_global(kind, impl):
  mesh = sharding.make_mesh(data=2, fsdp=4)
  args = _args(kind, 64, 32, seed=4)
  want = _value_and_grads(_loss("reference", kind), args)
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  placed = [jax.device_put(a, rows) for a in args[:2]] + list(args[2:])
  fn = functools.partial(losses.contrastive_loss, kind=kind, impl=impl, mesh=mesh)
  got = _value_and_grads(fn, placed, TARGET.get(impl))
  _assert_close(got, want, _scales(kind, args), 1e-5, 1e-5)


def test_clip_loss_dispatch_and_metrics():
  x, y = _embeddings(16, 32)
  out = {"image_features": x, "text_features": y, "logit_scale": jnp.float32(SCALE)}
  loss, metrics = losses.clip_loss(out, {}, impl="xla")
  np.testing.assert_allclose(loss, reference_loss(x, y, SCALE), rtol=1e-6)
  assert set(metrics) == {"loss", "logit_scale"}
  loss_sig, _ = losses.clip_loss({**out, "logit_bias": jnp.float32(BIAS)}, {})
  np.testing.assert_allclose(
      loss_sig, reference_loss(x, y, SCALE, BIAS, kind="sigmoid"), rtol=1e-6)
  with pytest.raises(ValueError, match="text_features"):
    losses.clip_loss({"image_features": x, "logit_scale": 1.0}, {})


# ----------------------------------------------------------------------------- memory, errors


def test_xla_memory_is_linear_in_batch():
  """The compiled forward+backward of impl='xla' never holds a B x B buffer."""
  b, d, block = 2048, 64, 128
  args = _args("softmax", b, d)

  def temp_bytes(impl):
    grad = jax.jit(jax.grad(_loss(impl, "softmax", block), argnums=(0, 1, 2)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  ref, xla = temp_bytes("reference"), temp_bytes("xla")
  assert ref >= b * b * 4  # the reference materializes the logits
  assert xla < 8 * b * block * 4 + 8 * b * d * 4, (xla, ref)


def test_bad_inputs_raise_clear_errors():
  x, y = _embeddings(8, 16)
  with pytest.raises(ValueError, match="kind"):
    contrastive_loss(x, y, 1.0, kind="hinge")
  with pytest.raises(ValueError, match="impl"):
    contrastive_loss(x, y, 1.0, impl="cuda")
  with pytest.raises(ValueError, match="equal shapes"):
    contrastive_loss(x, y[:4], 1.0)
  with pytest.raises(ValueError, match="logit_bias"):
    contrastive_loss(x, y, 1.0, 0.0, kind="softmax")
  with pytest.raises(ValueError, match="logit_scale"):
    contrastive_loss(x, y, jnp.ones(3))
  with pytest.raises(ValueError, match="block_size"):
    contrastive_loss(x, y, 1.0, impl="xla", block_size=100)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("d",))
  fn = _sharded(_loss("pallas", "softmax", axis_name="d"), mesh, "d", 3, True)
  with _pallas.use_target("interpret-gpu"), pytest.raises(ValueError, match="check_vma=False"):
    fn(*_args("softmax", 16, 16))
  # Not forced: on CPU inside check_vma=True the pallas loss runs the xla backend.
  np.testing.assert_allclose(fn(*_args("softmax", 16, 16)),
                             reference_loss(*_args("softmax", 16, 16)), rtol=1e-5)
  with pytest.raises(ValueError, match="not divisible"):
    losses.contrastive_loss(x[:6], y[:6], 1.0, kind="softmax", impl="xla",
                            mesh=sharding.make_mesh(data=2, fsdp=4))


# ----------------------------------------------------------------------------- label smoothing


def test_label_smoothing_reference_matches_numpy():
  x, y = _embeddings(12, 8, seed=6)
  eps, b = 0.1, 12
  z = SCALE * np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
  t = np.full((b, b), eps / (b - 1))
  np.fill_diagonal(t, 1 - eps)
  lsm = lambda a: a - np.log(np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - a.max(1, keepdims=True)
  want = -(np.sum(t * lsm(z)) + np.sum(t * lsm(z.T))) / (2 * b)
  got = contrastive_loss(x, y, SCALE, impl="reference", label_smoothing=eps)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_label_smoothing_matches_reference(impl):
  args = _args("softmax", 300, 32, seed=7)
  want = _value_and_grads(_loss("reference", "softmax", label_smoothing=0.1), args)
  got = _value_and_grads(_loss(impl, "softmax", 64, label_smoothing=0.1), args, TARGET[impl])
  _assert_close(got, want, _scales("softmax", args), 1e-5, 1e-5)


@pytest.mark.parametrize("impl,check_vma", [("xla", True), ("pallas", False)])
def test_label_smoothing_sharded_equals_single_device(impl, check_vma):
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("d",))
  args = _args("softmax", 40, 16, seed=8)
  want = _value_and_grads(_loss("reference", "softmax", label_smoothing=0.2), args)
  fn = _sharded(_loss(impl, "softmax", 16, axis_name="d", label_smoothing=0.2), mesh, "d", 3,
                check_vma)
  got = _value_and_grads(fn, args, TARGET[impl])
  _assert_close(got, want, _scales("softmax", args), 1e-5, 1e-5)
  with pytest.raises(ValueError, match="label_smoothing"):
    contrastive_loss(*args[:2], 1.0, 0.0, kind="sigmoid", label_smoothing=0.1)


# ----------------------------------------------------------------------------- TPU DMAs


def test_tpu_kernels_race_free_on_two_cores():
  """The TPU interpreter with 2 cores per chip (the megacore row split) and its happens-before
  race detector: the gradient kernel's HBM accumulation by DMA has no race, results exact."""
  x, y = _embeddings(300, 130, seed=9)
  y = y[:260]
  s = jnp.float32(SCALE)
  z = s * np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
  lr, lc = jax.nn.logsumexp(z, 1), jax.nn.logsumexp(z, 0)
  g = np.exp(z - np.asarray(lr)[:, None]) + np.exp(z - np.asarray(lc)[None, :])
  g -= 2 * np.eye(*g.shape)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  gx, gy = _mosaic.grads_call(x, y, jnp.stack([s, 0.0, 2.0, 0.0]), 128, sigmoid=False,
                              lse_rows=lr, lse_cols=lc, offset=jnp.int32(0), cores=2,
                              interpret=params)
  assert not ipc.races.races_found
  xf, yf = np.asarray(x, np.float64), np.asarray(y, np.float64)
  np.testing.assert_allclose(gx, g @ yf, atol=1e-5 * np.abs(g).sum(1).max())
  np.testing.assert_allclose(gy, g.T @ xf, atol=1e-5 * np.abs(g).sum(0).max())
  _mosaic.grads_call(x, y, jnp.stack([s, -5.0, 0.0, 0.0]), 128, sigmoid=True,
                     offset=jnp.int32(0), cores=2, interpret=params)
  assert not ipc.races.races_found
  # One core, 3 row blocks: each write back runs on under the next step's tile.
  gx1, gy1 = _mosaic.grads_call(x, y, jnp.stack([s, 0.0, 2.0, 0.0]), 128, sigmoid=False,
                                lse_rows=lr, lse_cols=lc, offset=jnp.int32(0), cores=1,
                                interpret=params)
  assert not ipc.races.races_found
  np.testing.assert_allclose(gx1, g @ yf, atol=1e-5 * np.abs(g).sum(1).max())
  np.testing.assert_allclose(gy1, g.T @ xf, atol=1e-5 * np.abs(g).sum(0).max())
