"""LLM text towers: Llama 3 / Qwen2 / Qwen3 parity with transformers (right padding), the HF
layout round trip, sharded safetensors read shard by shard, bad-input errors, pooling,
bidirectional attention, bf16 params, remat, and the 8B tower's per-chip memory on v5e:4x4."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import zoo.convert
from zoo.convert import llm as llm_convert
from zoo.convert.io import WeightFileError
from zoo.models import llm, lora

SMALL = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
             rms_norm_eps=1e-6)
CONFIGS = {
    "llama": dict(SMALL, head_dim=16, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
    "qwen2": dict(SMALL, rope_theta=10000.0),
    "qwen3": dict(SMALL, head_dim=32, rope_theta=1000000.0),  # head_dim != hidden / heads
}
MAX_DIFF = {}


def _torch_model(kind, seed=0):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaModel),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2Model),
         "qwen3": (transformers.Qwen3Config, transformers.Qwen3Model)}[kind]
  cfg = cls[0](**CONFIGS[kind])
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = cls[1](cfg).eval()
  with torch.no_grad():  # jitter every tensor: norms start at 1 and biases at 0
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return torch, cfg, model


def _batch(vocab, lengths=(12, 7, 3), seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (len(lengths), max(lengths))).astype(np.int32)
  mask = (np.arange(max(lengths))[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids * mask, mask  # right padding with id 0


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
  torch, cfg, model = _torch_model(request.param)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return request.param, torch, cfg, model, sd


def test_parity_with_transformers(pair):
  kind, torch, cfg, model, sd = pair
  tower = zoo.convert.from_hf(sd, cfg.to_dict())
  assert isinstance(tower, llm.LLM) and tower.config.model_type == kind
  assert tower.config.qk_norm == (kind == "qwen3") and tower.config.qkv_bias == (kind == "qwen2")
  assert (tower.config.rope_scaling is not None) == (kind == "llama")
  ids, mask = _batch(cfg.vocab_size)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  got = np.asarray(tower(jnp.asarray(ids), jnp.asarray(mask)))
  diff = float(np.abs(got - ref)[mask.astype(bool)].max())
  MAX_DIFF[kind] = diff
  print(f"parity {kind}: max |zoo - transformers| = {diff:.2e}")
  assert diff <= 1e-4
  # pooling: mean over the mask and the last real token
  real = mask.astype(bool)
  mean = np.stack([ref[i][real[i]].mean(0) for i in range(len(ids))])
  np.testing.assert_allclose(np.asarray(llm.pool(jnp.asarray(ref), jnp.asarray(mask), "mean")),
                             mean, atol=1e-5)
  last = np.stack([ref[i][real[i].sum() - 1] for i in range(len(ids))])
  np.testing.assert_allclose(np.asarray(llm.pool(jnp.asarray(ref), jnp.asarray(mask), "last")),
                             last, atol=0)
  # back to the HF layout, bitwise; a *ForCausalLM state dict ("model." + lm_head) loads too
  back = zoo.convert.to_hf(tower)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  causal_lm = {f"model.{k}": v for k, v in sd.items()}
  causal_lm["lm_head.weight"] = sd["embed_tokens.weight"]
  tower2 = zoo.convert.from_hf(causal_lm, cfg.to_dict())
  np.testing.assert_array_equal(np.asarray(tower2(jnp.asarray(ids), jnp.asarray(mask))), got)


def test_sharded_checkpoint_shard_by_shard(tmp_path, monkeypatch):
  _, cfg, model = _torch_model("llama", seed=1)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  keys = sorted(sd)
  parts = [keys[:len(keys) // 3], keys[len(keys) // 3: 2 * len(keys) // 3],
           keys[2 * len(keys) // 3:]]
  weight_map = {}
  for i, part in enumerate(parts):
    name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
    save_file({f"model.{k}": np.ascontiguousarray(sd[k]) for k in part}, tmp_path / name)
    weight_map.update({f"model.{k}": name for k in part})
  (tmp_path / llm_convert.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
  opened = []
  real_open = llm_convert.safe_open

  def spy(path, framework):
    opened.append(os.path.basename(path))
    return real_open(path, framework=framework)

  monkeypatch.setattr(llm_convert, "safe_open", spy)
  tower = llm_convert.load_pretrained(str(tmp_path))
  # one pass over the names, then each shard opened (and released) on its own, in order
  assert opened[3:] == sorted(set(weight_map.values()))
  back = zoo.convert.to_hf(tower)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  os.remove(tmp_path / "model-00002-of-00003.safetensors")
  with pytest.raises(WeightFileError, match=r"shard model-00002-of-00003.safetensors .* missing"):
    llm_convert.load_pretrained(str(tmp_path))


def test_bad_inputs():
  with pytest.raises(ValueError, match=r"'gpt2'.*supported: clip, siglip, siglip2, llama, qwen2, qwen3"):
    zoo.convert.from_hf({}, {"model_type": "gpt2"})
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    llm_convert.config_from_hf(dict(CONFIGS["qwen2"], model_type="qwen2",
                                    rope_scaling={"rope_type": "yarn", "factor": 2.0}))
  cfg = llm.text_config("llm-tiny", layers=1)
  sd = llm_convert.to_hf(llm.LLM(cfg, rngs=nnx.Rngs(0)))
  sd["layers.0.mlp.up_proj.weight"] = sd["layers.0.mlp.up_proj.weight"][:, :3]
  with pytest.raises(zoo.convert.StateDictError, match="mis-shaped layers.0.mlp.up_proj.weight"):
    llm_convert.from_hf(sd, cfg)


def test_bidirectional_bf16_remat_lora():
  cfg = llm.text_config("llm-tiny", vocab_size=50, layers=1)
  ids, mask = _batch(50, lengths=(6, 4))
  bi = llm.LLM(cfg, rngs=nnx.Rngs(0))
  causal = llm.LLM(llm.text_config("llm-tiny", vocab_size=50, layers=1, causal=True),
                   rngs=nnx.Rngs(0))
  x = np.asarray(bi(jnp.asarray(ids), jnp.asarray(mask)))
  c = np.asarray(causal(jnp.asarray(ids), jnp.asarray(mask)))
  changed = ids.copy()
  changed[0, 5] = (changed[0, 5] + 1) % 50 or 1
  x2 = np.asarray(bi(jnp.asarray(changed), jnp.asarray(mask)))
  c2 = np.asarray(causal(jnp.asarray(changed), jnp.asarray(mask)))
  assert np.abs(x2[0, 0] - x[0, 0]).max() > 1e-4  # bidirectional: token 0 sees token 5
  np.testing.assert_array_equal(c2[0, :5], c[0, :5])  # causal: it does not
  half = llm.LLM(llm.text_config("llm-tiny", vocab_size=50, layers=1, param_dtype="bfloat16"),
                 rngs=nnx.Rngs(0))
  dtypes = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(half, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  remat = llm.LLM(cfg, remat="full", rngs=nnx.Rngs(0))
  grad = nnx.jit(lambda m: nnx.grad(lambda m: jnp.sum(m.encode(jnp.asarray(ids)) ** 2))(m))
  g1, g2 = grad(bi), grad(remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
  paths = lora.apply_lora(bi, targets=r"self_attn/(q|v)_proj/kernel", rank=2, alpha=4)
  assert paths == ["layers/0/self_attn/q_proj/kernel", "layers/0/self_attn/v_proj/kernel"]
  np.testing.assert_array_equal(np.asarray(bi(jnp.asarray(ids), jnp.asarray(mask))), x)


def test_8b_memory_on_v5e_4x4():
  """An 8B Llama 3 tower in bf16 (jax.eval_shape: nothing allocated), fsdp=4 x tensor=4."""
  mesh = jax.sharding.AbstractMesh((1, 1, 4, 4), ("data", "expert", "fsdp", "tensor"))
  cfg = llm.text_config("llama3.1-8b", param_dtype="bfloat16")
  sizes = llm_convert.param_bytes(cfg, mesh)
  assert 7.49e9 < sizes["total"] / 2 < 7.51e9  # 8.03 B parameters less the 0.53 B lm_head
  assert sizes["per_device"] <= sizes["total"] / 16 * 1.01  # every large tensor is split 16 ways
  print(f"8B bf16: {sizes['total'] / 2**30:.2f} GiB total, "
        f"{sizes['per_device'] / 2**30:.2f} GiB per v5e chip (16 GiB HBM)")
