"""CLIP-MoE: routing vs a numpy reference, upcycling = dense, aux losses, gradients, expert
parallelism (8 devices, expert=4) vs one device, save/load, k-means, within-cluster loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.train_utils import synthetic_batches, tiny_config
from zoo import families, losses
from zoo.convert import clip_moe
from zoo.eval import evaluator
from zoo.families.moe import dmu, family as moe_family
from zoo.models import layers, moe, moe_stats, sharding
from zoo.train import loop as train_lib, trainer as trainer_lib

E, K = 4, 2


def tiny_inputs(n=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((n, 16), np.int32)
  tokens[:, 0] = 49406
  for i in range(n):
    k = 3 + i
    tokens[i, 1:k] = rng.integers(1, 4000, k - 1)
    tokens[i, k] = 49407
  return images, tokens


@pytest.fixture(scope="module")
def dense():
  return zoo.create("test-tiny", seed=1)


def jitted_forward(model):
  """model(images, tokens) and the summarized MoE aux, jitted over the model's state."""
  graphdef, _ = nnx.split(model)

  @jax.jit
  def run(state, images, tokens):
    m = nnx.merge(graphdef, state)
    out, aux = moe.capture_aux(lambda mm: mm(images, tokens), m)
    return out, moe.summarize_aux(aux), len(aux)

  return lambda m, images, tokens: run(nnx.state(m), images, tokens)


def randomize_routers(model, seed, std=3.0):
  """Large random router weights: confident, uneven routing."""
  key = jax.random.key(seed)
  for layer in model.moe_layers().values():
    key, sub = jax.random.split(key)
    layer.router.kernel.set_value(std * jax.random.normal(sub, layer.router.kernel.shape))


# ----------------------------------------------------------------------------- reference


def numpy_route(logits, k, capacity, normalize=True):
  """GShard priority written as loops: all 1st choices in token order, then 2nd choices..."""
  g, s, e = logits.shape
  z = logits - logits.max(-1, keepdims=True)
  probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  index = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
  gates = np.take_along_axis(probs, index, -1)
  if normalize:
    gates = gates / gates.sum(-1, keepdims=True)
  kept = np.zeros((g, s, k), bool)
  slot = np.full((g, s, k), -1)
  for gi in range(g):
    fill = np.zeros(e, int)
    for j in range(k):
      for si in range(s):
        ex = index[gi, si, j]
        if fill[ex] < capacity:
          kept[gi, si, j], slot[gi, si, j] = True, fill[ex]
        fill[ex] += 1
  return probs, index, gates, kept, slot


def numpy_moe(x, layer, capacity):
  """y[t] = sum over kept choices j of gate_j * expert_{e_j}(x[t]), expert = fc2(gelu(fc1 x))."""
  w1, b1 = np.asarray(layer.fc1_kernel[...]), np.asarray(layer.fc1_bias[...])
  w2, b2 = np.asarray(layer.fc2_kernel[...]), np.asarray(layer.fc2_bias[...])
  logits = np.einsum("gsw,we->gse", x, np.asarray(layer.router.kernel[...]))
  _, index, gates, kept, _ = numpy_route(logits, layer.moe.top_k, capacity)
  # every expert on every token (exact GELU), then pick per token
  hidden = np.asarray(layers.gelu(np.einsum("gsw,ewh->egsh", x, w1) + b1[:, None, None]))
  out = np.einsum("egsh,ehw->egsw", hidden, w2) + b2[:, None, None]
  y = np.zeros_like(x)
  for gi in range(x.shape[0]):
    for si in range(x.shape[1]):
      for j in range(layer.moe.top_k):
        if kept[gi, si, j]:
          y[gi, si] += gates[gi, si, j] * out[index[gi, si, j], gi, si]
  return y, int((~kept).sum())


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("capacity", [1, 3, 7, 10])
def test_route_matches_numpy_priority_and_drop_counts(capacity):
  logits = np.random.default_rng(capacity).normal(size=(3, 10, E)).astype(np.float32) * 2
  r = moe.route(jnp.asarray(logits), top_k=K, capacity=capacity)
  probs, index, gates, kept, slot = numpy_route(logits, K, capacity)
  np.testing.assert_array_equal(np.asarray(r.expert_index), index)
  np.testing.assert_array_equal(np.asarray(r.kept), kept)
  np.testing.assert_allclose(np.asarray(r.probs), probs, atol=1e-6)
  combine = np.zeros((3, 10, E, capacity), np.float32)
  for g, s, j in zip(*np.nonzero(kept)):
    combine[g, s, index[g, s, j], slot[g, s, j]] = gates[g, s, j]
  np.testing.assert_allclose(np.asarray(r.combine), combine, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(r.dispatch), combine > 0)
  # each slot holds at most one token
  assert np.asarray(r.dispatch).sum(1).max() <= 1
  if capacity >= 10:  # capacity >= tokens: nothing is dropped
    assert kept.all()


def test_capacity_rule():
  cfg = moe.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.25, dropless=False)
  assert moe.MoEConfig().dropless and cfg.capacity(17) == 17  # inference: dropless
  with moe.capacity_routing():
    assert cfg.capacity(17) == 11  # ceil(2 * 17 * 1.25 / 4)
    assert cfg.capacity(2) == 2  # never more than the tokens
    assert moe.MoEConfig(dropless=True).capacity(50) == 50
  with pytest.raises(ValueError, match="top_k"):
    moe.MoEConfig(num_experts=2, top_k=3)


@pytest.mark.parametrize("capacity_factor,dropless", [(0.5, False), (1.0, False), (1.0, True)])
def test_layer_output_and_dropped_count_equal_numpy(capacity_factor, dropless):
  cfg = moe.MoEConfig(num_experts=E, top_k=K, capacity_factor=capacity_factor, dropless=dropless)
  layer = moe.MoEMLP(16, 32, cfg, router_init_std=1.0, rngs=nnx.Rngs(0))
  for name in ("fc1_bias", "fc2_bias"):  # non-zero biases so they are checked too
    v = getattr(layer, name)
    v.set_value(0.1 * jax.random.normal(jax.random.key(len(name)), v.shape))
  x = np.random.default_rng(1).normal(size=(2, 12, 16)).astype(np.float32)
  with moe.capacity_routing():  # as in a training step
    y, aux = moe.capture_aux(lambda m, v: m(v), layer, jnp.asarray(x))
    capacity = cfg.capacity(12)
  y = np.asarray(y)
  ref, dropped = numpy_moe(x, layer, capacity)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  assert int(aux[0]["dropped"]) == dropped
  assert aux[0]["assignments"] == 2 * 12 * K
  if dropless:
    assert dropped == 0
  elif capacity_factor == 0.5:
    assert dropped > 0  # the case is non-trivial


# ----------------------------------------------------------------------------- upcycling


@pytest.mark.parametrize("kw", [dict(), dict(dropless=False, capacity_factor=0.5)])
def test_upcycled_identical_experts_equal_dense(dense, kw):
  """Defaults, and a capacity-trained config outside training: dropless, equal to dense."""
  images, tokens = tiny_inputs()
  ref = dense(images, tokens)
  forward = None
  for seed in (0, 1):
    m = moe.upcycle(dense, E, K, "all", **kw)
    randomize_routers(m, seed)
    forward = forward or jitted_forward(m)
    out, aux, n_layers = forward(m, images, tokens)
    assert n_layers == 4  # 2 vision + 2 text blocks
    assert float(aux["moe_dropped"]) == 0
    for key in ("image_features", "text_features"):
      np.testing.assert_allclose(np.asarray(out[key]), np.asarray(ref[key]), atol=1e-5)


def test_capacity_routing_only_in_the_training_forward(dense):
  images, tokens = tiny_inputs()
  m = moe.upcycle(dense, E, K, "all", dropless=False, capacity_factor=0.5)
  randomize_routers(m, 0)
  forward = jitted_forward(m)
  _, aux, _ = forward(m, images, tokens)
  assert float(aux["moe_dropped"]) == 0  # inference: dropless
  with moe.capacity_routing():
    out, aux = moe.capture_aux(lambda mm: mm(images, tokens), m)
  assert float(moe.summarize_aux(aux)["moe_dropped"]) > 0
  diff = np.abs(np.asarray(out["text_features"]) - np.asarray(dense(images, tokens)["text_features"]))
  assert diff.max() > 1e-3  # drops change the function: why they are training-only


def test_upcycled_defaults_equal_dense_and_ignore_batch_composition(dense):
  """zoo's encode path (the eval loop's) on an upcycled model with the defaults: dense outputs,
  whatever the batch size or the other rows of the batch."""
  images, tokens = tiny_inputs(n=6, seed=3)
  m = moe.upcycle(dense, E, K, "all")
  assert m.config.moe.dropless
  randomize_routers(m, 5)
  for method, x in (("encode_image", images), ("encode_text", tokens)):
    ref = np.asarray(evaluator.encode_batched(dense, x, method, batch_size=6))
    for bs in (1, 4, 6):
      got = np.asarray(evaluator.encode_batched(m, x, method, batch_size=bs))
      np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{method} batch_size={bs}")
    mixed = np.asarray(evaluator.encode_batched(m, x[::-1].copy(), method, batch_size=4))[::-1]
    np.testing.assert_allclose(mixed, ref, atol=1e-5, err_msg=f"{method} reversed")


def test_upcycle_structure_and_sources(dense):
  other = zoo.create("test-tiny", seed=2)
  m = moe.upcycle(dense, 2, 1, "every_other", expert_sources=[dense, other])
  assert m.config.moe.vision_layers == (1,) and m.config.moe.text_layers == (1,)
  assert isinstance(m.visual.transformer.resblocks[0].mlp, layers.MLP)
  layer = m.visual.transformer.resblocks[1].mlp
  np.testing.assert_array_equal(np.asarray(layer.fc1_kernel[...][1]),
                                np.asarray(other.visual.transformer.resblocks[1].mlp.fc1.kernel[...]))
  np.testing.assert_array_equal(np.asarray(layer.fc2_bias[...][0]),
                                np.asarray(dense.visual.transformer.resblocks[1].mlp.fc2.bias[...]))
  np.testing.assert_array_equal(np.asarray(m.visual.proj[...]), np.asarray(dense.visual.proj[...]))
  counts = moe_stats.parameter_counts(m)
  per_expert = sum(int(np.prod(p.shape[1:])) for l in m.moe_layers().values()
                   for p in (l.fc1_kernel, l.fc1_bias, l.fc2_kernel, l.fc2_bias))
  assert counts["total"] - counts["active"] == per_expert  # (E - k) = 1 expert idle per layer
  assert counts["total"] == moe_stats.parameter_counts(dense)["total"] + per_expert + 2 * 64 * 2
  with pytest.raises(ValueError, match="expert_sources"):
    moe.upcycle(dense, 3, 1, expert_sources=[dense, other])
  with pytest.raises(ValueError, match="out of range"):
    moe.upcycle(dense, 2, 1, "0,5")


def test_save_load_keeps_moe_config_and_outputs(dense, tmp_path):
  m = moe.upcycle(dense, E, K, {"vision": "last:1", "text": "all"}, capacity_factor=1.5)
  randomize_routers(m, 3, std=0.5)
  path = zoo.save(m, tmp_path / "moe")
  loaded, _, _ = zoo.load(path)
  assert isinstance(loaded, moe.MoECLIP) and loaded.config == m.config
  images, tokens = tiny_inputs()
  forward = jitted_forward(m)
  (a, _, _), (b, _, _) = forward(m, images, tokens), forward(loaded, images, tokens)
  for key in ("image_features", "text_features"):
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


# ----------------------------------------------------------------------------- aux losses


def test_balance_loss_minimal_for_uniform_routing():
  n = 64
  uniform = jnp.zeros((n, E))
  r = moe.route(uniform[None], top_k=1, capacity=n)
  assert float(moe.balance_loss(r.probs, r.expert_index)) == pytest.approx(1.0, abs=1e-6)
  rng = np.random.default_rng(0)
  for trial in range(20):
    # sharp routing with a random load: loss = E * sum f_e^2 >= 1, = 1 only when balanced
    assign = rng.integers(0, E, n) if trial else np.arange(n) % E
    logits = 30.0 * jax.nn.one_hot(assign, E)
    r = moe.route(logits[None], top_k=1, capacity=n)
    f = np.bincount(assign, minlength=E) / n
    value = float(moe.balance_loss(r.probs, r.expert_index))
    assert value == pytest.approx(E * np.sum(f * f), rel=1e-4)
    assert value >= 1.0 - 1e-4
  collapsed = moe.route((30.0 * jax.nn.one_hot(np.zeros(n, int), E))[None], top_k=1, capacity=n)
  assert float(moe.balance_loss(collapsed.probs, collapsed.expert_index)) == pytest.approx(E, rel=1e-4)


def test_z_loss_matches_numpy():
  logits = np.random.default_rng(0).normal(size=(5, 7, E)).astype(np.float32)
  ref = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  assert float(moe.z_loss(jnp.asarray(logits))) == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------------------- training


def moe_config(**kw):
  c = tiny_config(family="moe")
  c.moe = moe_family.default_settings()
  c.moe.layers = "all"
  c.moe.dropless = False  # capacity routing, a training option
  c.moe.capacity_factor = 1.0  # some tokens dropped: the path with drops is exercised
  for k, v in kw.items():
    c.moe[k] = v
  return c


def loss_and_grads(config, mesh, batch):
  """The family's loss and gradients, jitted over `mesh` as the train step does."""
  trainer = trainer_lib.build_trainer(config, mesh)
  ctx = families.LossContext(settings=trainer.settings, mesh=mesh, impl="reference")

  def loss_fn(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      model = nnx.merge(trainer.graphdef, params, trainer.rest)
      out = trainer.family.forward(model, batch, None, trainer.settings)
      return trainer.family.loss(out, batch, ctx)

  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, metrics), grads = fn(trainer.state["params"], sharding.host_to_global(batch, mesh))
  return float(loss), jax.device_get(metrics), jax.device_get(grads), trainer, fn


def flat(tree):
  return {sharding.path_names(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def single_device_result():
  batch = synthetic_batches(1, 16)[0]
  mesh = sharding.make_mesh(devices=jax.devices()[:1], fsdp=1)
  return batch, loss_and_grads(moe_config(), mesh, batch)


def test_gradients_reach_router_and_experts(single_device_result):
  _, (loss, metrics, grads, _, _) = single_device_result
  g = flat(grads)
  for tower in ("visual", "text"):
    for i in (0, 1):
      prefix = (tower, "transformer", "resblocks", str(i), "mlp")
      for leaf in (("router", "kernel"), ("fc1_kernel",), ("fc2_kernel",), ("fc1_bias",)):
        value = g[prefix + leaf]
        assert np.all(np.isfinite(value)) and np.abs(value).max() > 0, prefix + leaf
      # every expert gets gradient (each received tokens)
      assert (np.abs(g[prefix + ("fc1_kernel",)]).reshape(E, -1).max(1) > 0).all()
  assert metrics["moe_dropped_fraction"] > 0
  assert loss == pytest.approx(metrics["contrastive_loss"] + 0.01 * metrics["moe_balance_loss"]
                               + 0.001 * metrics["moe_z_loss"], rel=1e-5)


def test_expert_parallel_equals_single_device(single_device_result):
  batch, (loss1, metrics1, grads1, _, _) = single_device_result
  mesh = sharding.make_mesh(expert=4, fsdp=2)
  loss8, metrics8, grads8, trainer, fn = loss_and_grads(moe_config(), mesh, batch)
  assert loss8 == pytest.approx(loss1, abs=1e-5)
  for key in ("moe_balance_loss", "moe_z_loss", "moe_dropped"):
    assert metrics8[key] == pytest.approx(metrics1[key], abs=1e-5)
  g1, g8 = flat(grads1), flat(grads8)
  assert g1.keys() == g8.keys()
  for key in g1:
    np.testing.assert_allclose(g8[key], g1[key], atol=2e-5, err_msg=str(key))
  # expert weights live on the expert axis; tokens move with all-to-all
  kernel = trainer.state["params"]["visual"]["transformer"]["resblocks"][0]["mlp"]["fc1_kernel"]
  assert kernel[...].sharding.spec[0] == "expert"
  assert {s.data.shape[0] for s in kernel[...].addressable_shards} == {1}
  hlo = fn.lower(trainer.state["params"], sharding.host_to_global(batch, mesh)).compile().as_text()
  assert "all-to-all" in hlo


def test_router_only_training_freezes_the_rest():
  cfg = moe_config(trainable="router")
  mesh = sharding.make_mesh(devices=jax.devices()[:1], fsdp=1)
  trainer = trainer_lib.build_trainer(cfg, mesh)
  before = flat(jax.device_get(trainer.state["params"]))
  for b in synthetic_batches(2, 16):  # step 0 has lr 0 (warmup)
    trainer.state, _ = trainer.step_fn(trainer.state, sharding.host_to_global(b, mesh))
  after = flat(jax.device_get(trainer.state["params"]))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all("router" in k for k in changed)
  assert len(changed) == 4  # every router of the 4 MoE blocks


# ----------------------------------------------------------------------------- DMU pieces


def loss_from_logits(logits):
  """Symmetric cross-entropy with the diagonal as targets (numpy)."""
  lse = lambda a, ax: np.log(np.exp(a - a.max(ax, keepdims=True)).sum(ax)) + a.max(ax)
  d = np.diag(logits)
  return 0.5 * (np.mean(lse(logits, 1) - d) + np.mean(lse(logits, 0) - d))


def test_cluster_contrastive_loss():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(12, 8)).astype(np.float32)
  txt = rng.normal(size=(12, 8)).astype(np.float32)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  clusters = rng.integers(0, 3, 12).astype(np.int32)
  same = clusters[:, None] == clusters[None]
  got = moe_family.cluster_contrastive_loss(img, txt, 10.0, clusters, cross_cluster_weight=0.0)
  only_same = np.where(same, 10.0 * img @ txt.T, -np.inf)
  assert float(got) == pytest.approx(loss_from_logits(only_same), rel=1e-5)
  plain = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(10.0),
                                  kind="softmax", impl="reference")
  got1 = moe_family.cluster_contrastive_loss(img, txt, 10.0, clusters, cross_cluster_weight=1.0)
  assert float(got1) == pytest.approx(float(plain), rel=1e-5)
  half = moe_family.cluster_contrastive_loss(img, txt, 10.0, clusters, cross_cluster_weight=0.5)
  shifted = 10.0 * img @ txt.T + np.where(same, 0.0, np.log(0.5))
  assert float(half) == pytest.approx(loss_from_logits(shifted), rel=1e-5)


def test_kmeans_recovers_blobs_and_matches_lloyd():
  rng = np.random.default_rng(0)
  centers = np.array([[5, 0], [0, 5], [-5, -5]], np.float32)
  truth = rng.integers(0, 3, 300)
  x = centers[truth] + 0.3 * rng.normal(size=(300, 2)).astype(np.float32)
  cents, labels = dmu.kmeans(x, 3, seed=1)
  # same partition up to relabelling
  mapping = {t: labels[truth == t][0] for t in range(3)}
  assert len(set(mapping.values())) == 3
  assert all((labels[truth == t] == mapping[t]).all() for t in range(3))
  np.testing.assert_allclose(cents[[mapping[t] for t in range(3)]],
                             np.stack([x[truth == t].mean(0) for t in range(3)]), atol=1e-4)
  # equals plain numpy Lloyd from the same k-means++ seeding
  y = rng.normal(size=(200, 4)).astype(np.float32)
  c = dmu._kmeans_pp(y, 5, np.random.default_rng(7))
  for _ in range(100):
    lab = np.argmin(((y[:, None] - c[None]) ** 2).sum(-1), 1)
    new = np.stack([y[lab == i].mean(0) if (lab == i).any() else c[i] for i in range(5)])
    if np.allclose(new, c):
      break
    c = new
  got_c, got_l = dmu.kmeans(y, 5, seed=7, iters=100)
  np.testing.assert_array_equal(got_l, lab)
  np.testing.assert_allclose(got_c, c, atol=1e-5)


def test_settings_reject_unknown_keys():
  c = moe_config()
  c.moe.unknown_key = 1
  with pytest.raises(ValueError, match="unknown config.moe key 'unknown_key'"):
    moe_family.parse_settings(c)
  c = moe_config()
  c.moe.dmu.bogus = 1
  with pytest.raises(ValueError, match="config.moe.dmu key 'bogus'"):
    moe_family.parse_settings(c)


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("context", [77, 248])
def test_clip_moe_layout_round_trip(context, tmp_path):
  dense = zoo.create("test-tiny", seed=4, text={"context_length": context})
  m = moe.upcycle(dense, E, K, {"vision": "last:1", "text": "all"}, dropless=True,
                  expert_sources=[zoo.create("test-tiny", seed=s, text={"context_length": context})
                                  for s in range(E)])
  randomize_routers(m, 5, std=0.3)
  sd = clip_moe.to_clip_moe(m)
  assert sd["visual.transformer.resblocks.1.gate.weight"].shape == (E, 64)
  assert sd["transformer.resblocks.0.experts.3.c_fc.weight"].shape == (256, 64)
  assert "visual.transformer.resblocks.1.mlp.c_fc.weight" not in sd
  assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in sd  # dense block stays dense
  assert ("positional_embedding_res" in sd) == (context == 248)
  back = clip_moe.from_clip_moe(sd, dense.config)
  assert back.config.moe == m.config.moe
  a, b = flat(nnx.state(m, nnx.Param)), flat(nnx.state(back, nnx.Param))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
  clip_moe.export_safetensors(m, str(tmp_path / "m.safetensors"))
  from safetensors.numpy import load_file
  assert set(load_file(str(tmp_path / "m.safetensors"))) == set(sd)


def test_clip_moe_block_matches_torch_routing():
  """CLIP-MoE's block FFN in torch terms (softmax gate, top-k, renormalize, sum of experts)
  on the exported weights equals zoo's MoEMLP."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  dense = zoo.create("test-tiny", seed=4)
  m = moe.upcycle(dense, E, K, "all", dropless=True,
                  expert_sources=[zoo.create("test-tiny", seed=s) for s in range(E)])
  randomize_routers(m, 6, std=0.5)
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in clip_moe.to_clip_moe(m).items()}
  x = np.random.default_rng(0).normal(size=(2, 9, 64)).astype(np.float32)
  ours = np.asarray(m.text.transformer.resblocks[1].mlp(jnp.asarray(x)))
  p = "transformer.resblocks.1"
  h = torch.from_numpy(x).reshape(-1, 64)
  weights = F.softmax(F.linear(h, sd[f"{p}.gate.weight"]), dim=-1)
  top, chosen = torch.topk(weights, K, dim=-1)
  top = top / top.sum(-1, keepdim=True)
  out = torch.zeros_like(h)
  for e in range(E):
    y = F.linear(F.gelu(F.linear(h, sd[f"{p}.experts.{e}.c_fc.weight"], sd[f"{p}.experts.{e}.c_fc.bias"])),
                 sd[f"{p}.experts.{e}.c_proj.weight"], sd[f"{p}.experts.{e}.c_proj.bias"])
    w = (top * (chosen == e)).sum(-1, keepdim=True)
    out += w * y
  np.testing.assert_allclose(ours, out.reshape(2, 9, 64).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- DMU recipe


@pytest.mark.slow
def test_dmu_recipe_end_to_end(tmp_path):
  """Two DMU stages then a router-only MoE phase, all through train_lib.train."""
  base_model = zoo.create("test-tiny", seed=0)
  base_dir = zoo.save(base_model, tmp_path / "base")
  c = moe_config(num_experts=2, top_k=1, layers="every_other", trainable="router")
  c.init_from = base_dir
  c.total_steps = 2
  c.batch_size = 16
  c.context_length = 32
  c.data.size = 256
  c.data.eval_size = 32
  c.checkpoint_every = 2
  c.moe.dmu.stages = 2
  c.moe.dmu.steps_per_stage = 3
  c.moe.dmu.lr = 1e-3
  c.moe.dmu.clusters = 3
  c.moe.dmu.kmeans_samples = 48
  labels_seen = []
  original = dmu.ClusterLabeler.__call__

  def spy(self, batch):
    out = original(self, batch)
    labels_seen.append(out["cluster"])
    return out

  dmu.ClusterLabeler.__call__ = spy
  try:
    result = train_lib.train(c, str(tmp_path / "run"))
  finally:
    dmu.ClusterLabeler.__call__ = original
  stage_dirs = result["dmu"]["stage_dirs"]
  assert len(stage_dirs) == 2 and result["step"] == 2
  # stage 2 trained on cluster labels of stage 1's features
  assert len(labels_seen) == 3 and all(l.shape == (16,) and l.max() < 3 for l in labels_seen)
  final, _, _ = zoo.load(tmp_path / "run" / "model")
  assert isinstance(final, moe.MoECLIP) and final.config.moe.vision_layers == (1,)
  base = flat(nnx.state(base_model, nnx.Param))
  stages = [flat(nnx.state(zoo.load(d)[0], nnx.Param)) for d in stage_dirs]
  for s in stages:  # stages fine-tune FFNs only
    for key in base:
      same = np.array_equal(s[key], base[key])
      assert same != ("mlp" in key), key
  got = flat(nnx.state(final, nnx.Param))
  for tower in ("visual", "text"):
    moe_prefix = (tower, "transformer", "resblocks", "1", "mlp")
    dense_prefix = moe_prefix
    for e, s in enumerate(stages):  # the router phase leaves the experts as the stages made them
      np.testing.assert_array_equal(got[moe_prefix + ("fc1_kernel",)][e],
                                    s[dense_prefix + ("fc1", "kernel")])
      np.testing.assert_array_equal(got[moe_prefix + ("fc2_bias",)][e],
                                    s[dense_prefix + ("fc2", "bias")])
  assert not np.array_equal(got[("visual", "transformer", "resblocks", "1", "mlp", "fc1_kernel")][0],
                            got[("visual", "transformer", "resblocks", "1", "mlp", "fc1_kernel")][1])
  np.testing.assert_array_equal(got[("visual", "proj")], base[("visual", "proj")])
