"""The SigLIP / SigLIP 2 (NaFlex) / CLIPA / MetaCLIP 2 towers in training: each family's demo
config trains 3 steps through the train loop; the new towers (MAP head, CLIPA's average pool,
NaFlex) carry logical axis names and their train steps lower for TPU on an abstract mesh; so do
the ResNet / ConvNeXt / ViTamin / MobileCLIP image towers (batch-norm statistics frozen or
updated);
unknown architecture names are answered with the nearest known one."""

from __future__ import annotations

import importlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.cli_run import lines, run
from zoo import errors, families
from zoo.models import configs, sharding
from zoo.train import checkpoints as train_checkpoint, loop, step as train_step
from zoo.weights import hub, model_dir

# One demo config per transformer family of open_clip's table (SigLIP 2's NaFlex form trains
# in the NaFlex demo below).
DEMOS = ("siglip_demo", "siglip2_demo", "clipa_demo", "metaclip2_demo", "eva02_demo",
         "pe_core_demo")
# The conv / hybrid image towers (their demos are already 1 block per stage on 32 px).
TOWER_DEMOS = ("resnet_demo", "convnext_demo", "vitamin_demo", "mobileclip_demo")


def demo_config(name: str, **model):
  """configs/NAME.py for a 3-step run: batch 8, 1-layer towers on 32 px, 16 tokens."""
  c = importlib.import_module(f"configs.{name}").get_config()
  c.batch_size, c.total_steps, c.warmup_steps = 8, 4, 1
  c.eval_every, c.checkpoint_every, c.log_every = 0, 1000, 1
  c.data.size, c.context_length = 32, 16
  o = c.model_overrides.to_dict()
  v = o["vision"]
  v.update(image_size=32, **model)
  if not isinstance(v.get("layers"), (list, tuple)) and "depths" not in v:
    v["layers"] = 1  # a transformer tower; the conv towers' demos already have 1 block/stage
  o["text"].update(layers=1, context_length=16)
  c.model_overrides = ml_collections.ConfigDict(o)
  return c


@pytest.mark.parametrize("name", DEMOS)
def test_demo_config_trains_3_steps(name, tmp_path):
  """The family's demo config (its architecture narrowed) through loop.train: 3 finite steps."""
  base = importlib.import_module(f"configs.{name}").get_config()
  built = zoo.create(base.model, **base.model_overrides.to_dict())
  assert built.config.kind == ("siglip" if "siglip" in name else "clip")
  summary = loop.train(demo_config(name), str(tmp_path), stop_after=3)
  assert summary["step"] == 3 and np.all(np.isfinite(summary["losses"])), summary["losses"]
  model = summary["trainer"].model()
  v = model.config.vision
  assert v.pool == {"siglip_demo": "map", "siglip2_demo": "map", "clipa_demo": "avg",
                    "metaclip2_demo": "tok", "eva02_demo": "token", "pe_core_demo": "map"}[name]
  assert (model.logit_bias is not None) == ("siglip" in name)


@pytest.mark.parametrize("name", TOWER_DEMOS)
def test_tower_demo_config_trains_3_steps(name, tmp_path):
  """ResNet / ConvNeXt / ViTamin / MobileCLIP demo configs through loop.train: 3 finite steps.
  Batch-norm statistics (ResNet, MobileCLIP) are not parameters. Frozen (the default, ResNet):
  still at their initial values (mean 0, var 1, nothing tracked) after the steps.
  `batch_norm="update"` (MobileCLIP: MobileOne, RepMixer, attention and ConvMlp norms): every
  norm tracked 3 batches, the statistics moved, and the checkpoint of step 3 carries them."""
  update = name == "mobileclip_demo"
  config = demo_config(name)
  if update:
    config.batch_norm, config.checkpoint_every = "update", 3
  summary = loop.train(config, str(tmp_path), stop_after=3)
  assert summary["step"] == 3 and np.all(np.isfinite(summary["losses"])), summary["losses"]
  model = summary["trainer"].model()
  assert type(model).__name__ == {"resnet_demo": "ResNetCLIP", "convnext_demo": "ConvNeXtCLIP",
                                  "vitamin_demo": "ViTaminCLIP",
                                  "mobileclip_demo": "MobileCLIP"}[name]
  stats = {tuple(map(str, p)): np.asarray(v[...])
           for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
  assert bool(stats) == (name in ("resnet_demo", "mobileclip_demo"))
  assert ("batch_stats" in summary["trainer"].state) == update
  for p, v in stats.items():
    assert p[-1] in ("mean", "var", "num_batches_tracked"), p
    init = np.ones_like(v) if p[-1] == "var" else np.zeros_like(v)
    if not update:
      np.testing.assert_array_equal(v, init, err_msg=str(p))
    elif p[-1] == "num_batches_tracked":
      assert int(v) == 3, p
    else:
      assert np.all(np.isfinite(v)) and np.abs(v - init).max() > 1e-4, p
  if update:  # evaluation reads the trained statistics, in frozen mode, from the checkpoint too
    assert not any(getattr(m, "update", False) for _, m in nnx.iter_modules(model))
    saved = summary["trainer"].state["batch_stats"]
    restored = train_checkpoint.restore_params(
        tmp_path / "checkpoints", 3, jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding), saved), "batch_stats")
    for p, v in nnx.to_flat_state(restored):
      np.testing.assert_array_equal(np.asarray(v[...]), stats[tuple(map(str, p))])


def test_siglip2_demo_config_builds_siglip2_towers():
  c = importlib.import_module("configs.siglip2_demo").get_config()
  config = nnx.eval_shape(lambda: zoo.create(c.model, **c.model_overrides.to_dict())).config
  naflex = importlib.import_module("configs.siglip2_naflex_demo").get_config()
  assert naflex.model == c.model and config.kind == "siglip"
  assert config.text.act == "gelu_tanh" and config.vision.pool == "map"  # as open_clip's


def lower_for_tpu(config, batch: dict):
  """The family's train step on abstract parameters, lowered for a TPU v5e (as the prompt
  family's test does); every parameter carries a logical axis name per dimension."""
  family = families.get(config.family)
  settings = family.settings(config)
  model = nnx.eval_shape(lambda: family.build_model(config, settings))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert var.ndim == 0 or (axes is not None and len(axes) == var.ndim), (path, axes)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # non-trainable state (frozen batch-norm statistics) is a constant of the step, as in a run
  rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)
  tx = train_step.make_optimizer(config, params, None)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  step = train_step.make_train_step(graphdef, rest, family, tx, config, mesh, None, settings)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params),
           "rng": jax.eval_shape(lambda: jax.random.key(0))}
  dev = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  abstract = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=dev)
  with jax.sharding.use_abstract_mesh(abstract):
    text = jax.jit(step).trace(state, batch).lower(lowering_platforms=("tpu",)).as_text()
  return model, text


@pytest.mark.parametrize("name", ["siglip_demo", "clipa_demo", "eva02_demo", "pe_core_demo",
                                  *TOWER_DEMOS])
def test_towers_lower_for_tpu(name):
  config = demo_config(name)
  config.dtype = "bfloat16"
  batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.uint8),
           "tokens": jax.ShapeDtypeStruct((8, 16), jnp.int32)}
  model, text = lower_for_tpu(config, batch)
  assert "bf16" in text and len(text) > 10000
  if name in TOWER_DEMOS:
    assert type(model).__name__ == {"resnet_demo": "ResNetCLIP", "convnext_demo": "ConvNeXtCLIP",
                                    "vitamin_demo": "ViTaminCLIP",
                                    "mobileclip_demo": "MobileCLIP"}[name]
  elif "eva" in name or "pe_core" in name:  # timm's Eva trunk: rotary positions, EVA02 SwiGLU
    assert model.config.vision.rope and (model.config.vision.pool == "map") == ("pe" in name)
  else:
    assert (model.visual.attn_pool is not None) == (name == "siglip_demo")


def test_coca_train_step_lowers_for_tpu():
  """CoCa's family step (contrastive + caption loss through the multimodal decoder) on
  abstract parameters, lowered for TPU in bf16."""
  config = importlib.import_module("configs.coca_demo").get_config()
  config.dtype = "bfloat16"
  length = config.get("context_length") or 76
  batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.uint8),
           "tokens": jax.ShapeDtypeStruct((8, length), jnp.int32)}
  model, text = lower_for_tpu(config, batch)
  assert type(model).__name__ == "CoCa" and "bf16" in text and len(text) > 10000


def test_unknown_architecture_names_the_nearest_one(tmp_path):
  with pytest.raises(ValueError) as e:
    zoo.create("ViT-B-16-SigLIP2-999")
  assert str(e.value) == ("Unknown model 'ViT-B-16-SigLIP2-999' (did you mean "
                          "'ViT-B-16-SigLIP2'?); see zoo.list_models()")
  with pytest.raises(ValueError, match=r"did you mean 'ViT-B-32'\?"):
    zoo.create("vit-b-32")  # case-insensitive
  with pytest.raises(hub.PretrainedError, match=r"did you mean 'ViT-SO400M-14-SigLIP2'\?"):
    zoo.create("ViT-SO400M-14-SigLIP-2", pretrained="webli")
  # the record of a checkpoint written by a zoo with an architecture class this one lacks
  # (refused before any weight is read)
  saved = tmp_path / "ckpt"
  saved.mkdir()
  (saved / model_dir.CONFIG_FILE).write_text(json.dumps({
      "format_version": model_dir.FORMAT_VERSION, "model_class": "zoo.models.clip.CLIPP",
      "config_class": "zoo.models.configs.CLIPConfig",
      "model_config": configs.get_model_config("test-tiny").to_dict()}))
  with pytest.raises(ValueError) as e:
    zoo.load(saved)
  assert "\n" not in str(e.value)
  assert "'zoo.models.clip.CLIPP'" in str(e.value) and "did you mean 'CLIP'?" in str(e.value)
  # at the command line: one line, exit 2, before the (here empty) weight file is read
  (tmp_path / "w.safetensors").write_bytes(b"")
  proc = run("-m", "zoo.convert", "from-open-clip", "--model", "ViT-B-16-SigLIP2-999",
             "--input", str(tmp_path / "w.safetensors"), "--output", str(tmp_path / "out"))
  err = lines(proc.stderr)
  assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
  assert "Unknown model 'ViT-B-16-SigLIP2-999' (did you mean 'ViT-B-16-SigLIP2'?)" in err[0]


def naflex_config():
  c = demo_config("siglip2_naflex_demo")
  c.naflex.max_patches = 12  # 32 px renders, 8 px patches: crops of 1 to 12 patches
  return c


def test_siglip2_naflex_demo_trains_through_the_loop_with_bucketed_batches(tmp_path):
  """configs/siglip2_naflex_demo.py through loop.train: batches of crops at their own aspect
  ratios (different spatial shapes), padded to a bucketed length with the mask marking the
  real patches; 3 finite steps."""
  seen = []

  def record(batch):
    seen.append({k: np.array(v) for k, v in batch.items()})
    return batch

  summary = loop.train(naflex_config(), str(tmp_path), stop_after=3, batch_fn=record)
  assert summary["step"] == 3 and np.all(np.isfinite(summary["losses"])), summary["losses"]
  shapes = set()
  for b in seen:
    n = b["patches"].shape[1]
    rows, cols = b["spatial_shapes"].T
    assert b["patches"].shape == (8, n, 192) and b["patch_mask"].shape == (8, n)
    np.testing.assert_array_equal(b["patch_mask"].sum(1), rows * cols)
    assert (rows * cols).max() <= 12 and n == min(12, 1 << (int((rows * cols).max()) - 1).bit_length())
    assert not b["patches"][~b["patch_mask"]].any()
    shapes |= set(map(tuple, b["spatial_shapes"].tolist()))
  assert len(shapes) > 1, shapes


def test_naflex_tower_lowers_for_tpu():
  config = naflex_config()
  config.dtype = "bfloat16"
  batch = {"patches": jax.ShapeDtypeStruct((8, 12, 192), jnp.float32),
           "patch_mask": jax.ShapeDtypeStruct((8, 12), jnp.bool_),
           "spatial_shapes": jax.ShapeDtypeStruct((8, 2), jnp.int32),
           "tokens": jax.ShapeDtypeStruct((8, 16), jnp.int32)}
  model, text = lower_for_tpu(config, batch)
  assert "bf16" in text and len(text) > 10000 and model.config.vision.naflex


def test_naflex_family_refuses_a_fixed_resolution_model():
  config = demo_config("siglip2_demo")
  config.family = "naflex"
  family = families.get("naflex")
  with pytest.raises(errors.UserError, match="needs a NaFlex image tower"):
    nnx.eval_shape(lambda: family.build_model(config, family.settings(config)))
