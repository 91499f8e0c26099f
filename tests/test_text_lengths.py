"""data.text_lengths: trimmed token batches give the untrimmed step's features, gradients and
updates; towers whose output reads the padding are refused (one line, exit 2 at the CLI)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import cli_run
from tests.train_utils import synthetic_batches, tiny_config
from zoo import losses
from zoo.models import clip as clip_lib
from zoo.train import loop, text_lengths


def test_parse_buckets():
  assert text_lengths.parse("", 77) == ()
  assert text_lengths.parse("auto", 77) == (8, 16, 24, 32, 48, 64, 77)
  assert text_lengths.parse("auto", 32) == (8, 16, 24, 32)
  assert text_lengths.parse("48,16, 32", 77) == (16, 32, 48, 77)
  with pytest.raises(ValueError, match="text_lengths='16,x'"):
    text_lengths.parse("16,x", 77)
  with pytest.raises(ValueError, match=r"\[1, context_length=32\]"):
    text_lengths.parse("16,64", 32)
  trim = text_lengths.Trim((8, 16, 32))
  tokens = synthetic_batches(1, 4, length=32)[0]["tokens"]
  tokens[:, 10:] = 0
  tokens[:, 9] = 49407  # longest caption: EOT at position 9 -> bucket 16
  out = trim({"tokens": tokens, "image": np.zeros(4)})
  assert out["tokens"].shape == (4, 16) and out["tokens"].flags.c_contiguous
  np.testing.assert_array_equal(out["tokens"], tokens[:, :16])


def _loss(model, images, tokens):
  out = model(images, tokens)
  return losses.clip_loss(out, {})[0], out


def test_trimmed_features_and_gradients_equal_untrimmed():
  """test-tiny (context 77): features, loss and every parameter gradient (positional embedding
  included: rows past the bucket get zero in both) of the trimmed batch equal the full one."""
  model = clip_lib.create("test-tiny", seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  batch = synthetic_batches(1, 8, length=77, seed=3)[0]
  tokens = batch["tokens"]
  tokens[:, 20:] = 0
  tokens[np.arange(8), np.argmax(tokens, -1)] = 0
  tokens[:, 19] = 49407  # every caption fits in 20 positions -> bucket 24
  trimmed = text_lengths.Trim(text_lengths.parse("auto", 77))({"tokens": tokens})["tokens"]
  assert trimmed.shape == (8, 24)

  @jax.jit
  def grads(p, images, toks):
    f = lambda p: _loss(nnx.merge(graphdef, p), images, toks)
    return jax.value_and_grad(f, has_aux=True)(p)

  (l_full, out_full), g_full = grads(params, batch["image"], jnp.asarray(tokens))
  (l_trim, out_trim), g_trim = grads(params, batch["image"], jnp.asarray(trimmed))
  np.testing.assert_allclose(out_trim["text_features"], out_full["text_features"], atol=1e-6)
  np.testing.assert_allclose(l_trim, l_full, rtol=1e-6)
  flat_full = jax.tree_util.tree_leaves_with_path(g_full)
  flat_trim = jax.tree_util.tree_leaves(g_trim)
  for (path, a), b in zip(flat_full, flat_trim):
    scale = float(jnp.max(jnp.abs(a))) + 1e-12
    np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  pos = g_full["text"]["positional_embedding"][...]
  assert float(jnp.max(jnp.abs(pos[24:]))) == 0.0 and float(jnp.max(jnp.abs(pos[:20]))) > 0


def test_refused_where_padding_matters():
  siglip = clip_lib.create("test-tiny-siglip", seed=0)
  with pytest.raises(ValueError, match="causal=False, pool='last'"):
    text_lengths.build("auto", siglip, ("image", "tokens"), 64)
  clip = clip_lib.create("test-tiny", seed=0)
  with pytest.raises(ValueError, match="batch field 'tokens'"):
    text_lengths.build("auto", clip, ("image", "long_tokens"), 77)
  assert text_lengths.build("", siglip, ("image", "tokens"), 64) is None


def test_loop_trains_with_auto_buckets(tmp_path):
  """The loop with data.text_lengths=auto on the demo data (uint8 pixels, normalized in the
  step: data.image_dtype): a few compiled shapes, finite loss."""
  config = tiny_config(**{"data.text_lengths": "auto", "data.size": 64, "total_steps": 3,
                          "data.image_dtype": "uint8"})
  config.context_length = 32
  result = loop.train(config, str(tmp_path / "run"))
  assert len(result["losses"]) == 3 and np.all(np.isfinite(result["losses"]))
  assert result["trainer"].step_fn._cache_size() <= 2


def test_cli_refuses_siglip_one_line(tmp_path):
  res = cli_run.run("train.py", *cli_run.TINY, "--config.model=test-tiny-siglip",
                    "--config.data.text_lengths=auto", "--workdir", str(tmp_path / "w"))
  assert res.returncode == 2, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert "text_lengths" in last and "pool='last'" in last, res.stderr[-2000:]
