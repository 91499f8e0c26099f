"""Microsoft's released LLM2CLIP checkpoints by name, offline, and the LLM's own tokenizer.

A Hugging Face cache written here holds, under the released repo ids, a tiny image+adapter repo
(transformers' CLIPVisionModel keys + `visual_projection` + `text_adapter` TextProj + logit_scale,
as pytorch_model.bin) and a tiny Llama repo (config.json, model.safetensors, a byte-level BPE
tokenizer.json trained here with Llama 3's special tokens). The features of
`zoo.create_model_and_transforms('LLM2CLIP-Openai-B-16', 'llama3_8b_cc')` are checked against
an independent torch computation of the released code's math: LLM2Vec (microsoft/LLM2CLIP
llm2clip/llm2vec/llm2vec.py: Llama 3 Instruct template, left padding, bidirectional attention,
mean over the caption's tokens) -> L2 normalize -> TextProj (llm2clip/eva_clip/model.py), and
CLIPVisionModel's pooled output -> visual_projection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from configs import llm2clip_demo
from zoo import families, tokenizers as zoo_tokenizers
from zoo.convert import llm2clip as llm2clip_convert
from zoo.families import llm2clip as family
from zoo.train import loop
from zoo.weights import model_dir, pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")
st_save = pytest.importorskip("safetensors.torch").save

IMAGE_REPO = "microsoft/LLM2CLIP-Openai-B-16"
LLM_REPO = "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CAPTIONS = ["A photo of a red cat sitting on a wooden table.",
            "  Two dogs run across a green field under a cloudy sky  ",
            "a plate"]
LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, max_position_embeddings=128, rms_norm_eps=1e-5, head_dim=8,
             rope_theta=500000.0, model_type="llama",
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=32))
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
EMBED, BLOCKS = 24, 2


def put_repo(hf_home, repo_id, files):
  """`files` (name -> bytes) as one snapshot of `repo_id` in huggingface_hub's cache layout."""
  base = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
  rev = hashlib.sha1(repo_id.encode()).hexdigest()
  os.makedirs(os.path.join(base, "refs"), exist_ok=True)
  with open(os.path.join(base, "refs", "main"), "w") as f:
    f.write(rev)
  for name, data in files.items():
    blob = os.path.join(base, "blobs", hashlib.sha256(data).hexdigest())
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    with open(blob, "wb") as f:
      f.write(data)
    link = os.path.join(base, "snapshots", rev, name)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  return os.path.join(base, "snapshots", rev)


def _tokenizer_json() -> bytes:
  """A byte-level BPE with Llama 3's special tokens; BOS added by the post-processor."""
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([c.lower() for c in CAPTIONS] * 3 + CAPTIONS + ["user"], trainer)
  tok.post_processor = hf_tokenizers.processors.TemplateProcessing(
      single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
  return tok.to_str().encode()


class LinearBlock(torch.nn.Module):  # llm2clip/eva_clip/model.py, as released
  def __init__(self, dim, expansion_factor):
    super().__init__()
    self.fn = torch.nn.Sequential(torch.nn.Linear(dim, int(expansion_factor * dim)),
                                  torch.nn.GELU(), torch.nn.Dropout(0.0),
                                  torch.nn.Linear(int(expansion_factor * dim), dim))
    self.ln = torch.nn.LayerNorm(dim)

  def forward(self, x):
    return x + self.fn(self.ln(x))


class Adapter(torch.nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.adaptor = torch.nn.Sequential(*[LinearBlock(dim, 2) for _ in range(BLOCKS)],
                                       torch.nn.LayerNorm(dim), torch.nn.Linear(dim, EMBED))

  def forward(self, x):  # TextProj.forward(l2_norm=True)
    return self.adaptor(torch.nn.functional.normalize(x, p=2, dim=-1))


def _jitter(*modules):
  torch.manual_seed(0)
  with torch.no_grad():
    for m in modules:
      for p in m.parameters():
        p.add_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  home = str(tmp_path_factory.mktemp("hf"))
  tok_bytes = _tokenizer_json()
  vocab = hf_tokenizers.Tokenizer.from_str(tok_bytes.decode()).get_vocab_size()
  llama_cfg = transformers.LlamaConfig(vocab_size=vocab, **{k: v for k, v in LLAMA.items()
                                                            if k != "model_type"})
  llama_cfg._attn_implementation = "eager"
  torch.manual_seed(1)
  llama = transformers.LlamaModel(llama_cfg).eval()
  vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
  projection = torch.nn.Linear(VISION["hidden_size"], EMBED, bias=False)
  adapter = Adapter(LLAMA["hidden_size"])
  _jitter(llama, vision, projection, adapter)
  vsd = vision.state_dict()  # transformers 5 names CLIPVisionModel's keys without the prefix
  image_sd = {**{k if k.startswith("vision_model.") else f"vision_model.{k}": v
                 for k, v in vsd.items()},
              **{f"visual_projection.{k}": v for k, v in projection.state_dict().items()},
              **{f"text_adapter.{k}": v for k, v in adapter.state_dict().items()},
              "logit_scale": torch.tensor(2.5)}
  buf = io.BytesIO()
  torch.save(image_sd, buf)
  put_repo(home, IMAGE_REPO, {
      "config.json": json.dumps({"architectures": ["LLM2CLIPModel"], "projection_dim": EMBED,
                                 "vision_config": VISION}).encode(),
      "pytorch_model.bin": buf.getvalue()})
  llm_dir = put_repo(home, LLM_REPO, {
      "config.json": json.dumps(dict(LLAMA, vocab_size=vocab)).encode(),
      "model.safetensors": st_save({k: v.contiguous() for k, v in llama.state_dict().items()}),
      "tokenizer.json": tok_bytes,
      "tokenizer_config.json": json.dumps({"bos_token": "<|begin_of_text|>",
                                           "eos_token": "<|eot_id|>"}).encode()})
  return home, llm_dir, tok_bytes, llama, vision, projection, adapter


def _llm2vec_reference(texts, tok_bytes, llama, adapter, pad_id):
  """LLM2Vec.encode (pooling 'mean', skip_instruction) then TextProj, in torch."""
  tok = hf_tokenizers.Tokenizer.from_str(tok_bytes.decode())
  prefix, suffix = llm2clip_convert.TEMPLATES["llama3-instruct"]
  rows, counts = [], []
  for t in texts:
    rows.append(tok.encode(prefix + t.strip() + suffix).ids)  # BOS from the post-processor
    counts.append(len(tok.encode(t.strip() + suffix, add_special_tokens=False).ids))
  length = max(map(len, rows))
  ids = torch.tensor([[pad_id] * (length - len(r)) + r for r in rows])  # left padding
  mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
  bidirectional = torch.zeros(len(rows), 1, length, length)  # LlamaBiModel: padding mask only
  bidirectional.masked_fill_(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
  with torch.no_grad():
    hidden = llama(input_ids=ids, attention_mask=bidirectional).last_hidden_state
    pooled = torch.stack([hidden[i, -n:].mean(0) for i, n in enumerate(counts)])
    return adapter(pooled).numpy()


def test_released_llm2clip_by_name_offline(release, monkeypatch):
  home, _, tok_bytes, llama, vision, projection, adapter = release
  monkeypatch.setenv("HF_HOME", home)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("ZOO_CACHE", raising=False)
  assert ("LLM2CLIP-Openai-L-14-336", "llama3_8b_cc") in zoo.list_pretrained()
  model, tok, preprocess = zoo.create_model_and_transforms("LLM2CLIP-Openai-B-16",
                                                           "llama3_8b_cc")
  c = model.config
  assert (c.adapter_blocks, c.adapter_expansion, c.embed_dim, c.adapter_l2_input) == (
      BLOCKS, 2.0, EMBED, True)
  assert not c.text.causal and c.text.pool == "mean" and c.text.context_length == 128  # 512 or fewer positions
  ref_tok = hf_tokenizers.Tokenizer.from_str(tok_bytes.decode())
  prefix = llm2clip_convert.TEMPLATES["llama3-instruct"][0]
  assert c.text.pool_skip == len(ref_tok.encode(prefix).ids) > 3  # BOS + the chat header
  assert float(model.logit_scale[...]) == pytest.approx(2.5)
  assert preprocess.resize_mode == "shortest"
  ids = tok(CAPTIONS)
  pad = c.text.pad_token_id
  assert pad == ref_tok.token_to_id("<|reserved_special_token_0|>")  # the EOS <|eot_id|> ends every caption: not the pad
  assert ids.shape == (3, 128) and ids[0, 0] == 0 and (ids[:, -1] == pad).all()
  ours = np.asarray(model.encode_text(ids))
  ref = _llm2vec_reference(CAPTIONS, tok_bytes, llama, adapter, pad)
  text_diff = float(np.abs(ours - ref).max())
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref_img = projection(vision(pixel_values=torch.from_numpy(
        images.transpose(0, 3, 1, 2))).pooler_output).numpy()
  image_diff = float(np.abs(np.asarray(model.encode_image(images)) - ref_img).max())
  print(f"LLM2CLIP release parity: text {text_diff:.2e}, image {image_diff:.2e}")
  assert text_diff < 1e-4 and image_diff < 1e-4
  with pytest.raises(ValueError, match="no vision_config"):  # an EVA02 release's config
    llm2clip_convert.config_from_hf({"projection_dim": EMBED}, {}, c.text)
  with pytest.raises(ValueError, match="reads 32-d LLM embeddings; the LLM gives 64"):
    llm2clip_convert.config_from_hf({"vision_config": VISION}, {
        f"text_adapter.adaptor.{k}": v for k, v in adapter.state_dict().items()},
        dataclasses.replace(c.text, width=64))
  # the converted cache (a zoo.save directory) restores the model and the LLM's tokenizer
  cache = pretrained.checkpoint_dir("LLM2CLIP-Openai-B-16/llama3_8b_cc")
  saved_tok = model_dir.load_tokenizer(cache)
  np.testing.assert_array_equal(saved_tok(CAPTIONS), ids)


def test_family_reads_the_llm_tokenizer_json(release):
  """`llm2clip.text_checkpoint` with a tokenizer.json: the train loop (and eval, embed_cache
  through the saved model) tokenize with the LLM's own vocabulary, template, EOS and pad."""
  _, llm_dir, tok_bytes, *_ = release
  config = llm2clip_demo.get_config()
  config.context_length = 32
  config.llm2clip.text_checkpoint = llm_dir
  config.llm2clip.llm2vec_template = "llama3-instruct"
  fam = family.FAMILY
  model = fam.build_model(config, fam.settings(config))
  assert model.config.tokenizer_format == "hf" and model.config.text.pool_skip > 3
  tok = loop.make_tokenizer(config, model)
  assert isinstance(tok, zoo_tokenizers.HFTokenizer) and tok.context_length == 32
  ids = tok(CAPTIONS)
  ref = hf_tokenizers.Tokenizer.from_str(tok_bytes.decode())
  row = ref.encode("<|start_header_id|>user<|end_header_id|>\n\na plate<|eot_id|>").ids
  np.testing.assert_array_equal(ids[2, :len(row)], row)
  assert tok.wrap_tokens == len(row) - len(ref.encode("a plate", add_special_tokens=False).ids)
  assert (ids[2, len(row):] == model.config.text.pad_token_id).all()
  # zoo.save / zoo.load keep it: test_released_llm2clip_by_name_offline's converted cache
  with pytest.raises(ValueError, match="llm2vec_template='gemma'"):
    dataclasses.replace(fam.settings(config), llm2vec_template="gemma")


def test_proclip_released_losses_equal_torch():
  """loss_form='released': ProCLIP's training/train.py terms (VisionXLab/ProCLIP): sum MSE of
  the normalized features + sum smooth-L1 between their pdist's; stage 2 adds both, weighted,
  for the image tower against its frozen copy."""
  rng = np.random.default_rng(0)
  s, t = (x / np.linalg.norm(x, axis=1, keepdims=True)
          for x in rng.normal(size=(2, 7, 3)).astype(np.float32))
  inst, struct = family.alignment_losses(jnp.asarray(s), jnp.asarray(t), "released")
  fn = torch.nn.functional
  ts, tt = torch.from_numpy(s), torch.from_numpy(t)
  d = (fn.pdist(ts) - fn.pdist(tt)).abs()
  assert (d > 1).any() and (d < 1).any()  # both branches of smooth-L1
  np.testing.assert_allclose(float(inst), float(fn.mse_loss(ts, tt, reduction="sum")), rtol=1e-5)
  np.testing.assert_allclose(float(struct), float(fn.smooth_l1_loss(
      fn.pdist(ts), fn.pdist(tt), reduction="sum")), rtol=1e-5)
  settings = family.Settings(stage="self_distill", loss_form="released", self_distill_weight=0.5)
  out = {"image_features": jnp.asarray(s), "image_teacher": jnp.asarray(t),
         "text_features": jnp.asarray(t[::-1].copy()), "logit_scale": jnp.asarray(10.0)}
  total, m = family.FAMILY.loss(out, {}, families.LossContext(settings, None, "reference"))
  np.testing.assert_allclose(float(m["self_distill"]), float(inst) + float(struct), rtol=1e-6)
  np.testing.assert_allclose(float(total), float(m["contrastive"]) + 0.5 * float(inst + struct),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="loss_form='mean'"):
    family.Settings(loss_form="mean")


EVA_REPO = "microsoft/LLM2CLIP-EVA02-L-14-336"
EVA_RENAMES = ((".mlp.norm.", ".mlp.ffn_ln."), (".attn.norm.", ".attn.inner_attn_ln."),
               (".mlp.fc1_g.", ".mlp.w1."), (".mlp.fc1_x.", ".mlp.w2."), (".mlp.fc2.", ".mlp.w3."))


def _eva_clip_rope(half_head_dim, pt_seq_len, ft_seq_len, theta=10000):
  """EVA-CLIP's VisionRotaryEmbeddingFast buffers (llm2clip/eva_clip/rope.py, freqs_for='lang')."""
  freqs = 1.0 / (theta ** (torch.arange(0, half_head_dim, 2)[:half_head_dim // 2].float()
                           / half_head_dim))
  t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
  freqs = torch.repeat_interleave(t[:, None] * freqs, 2, dim=-1)  # '... n -> ... (n r)', r=2
  n = ft_seq_len
  freqs = torch.cat([freqs[:, None, :].expand(n, n, -1), freqs[None, :, :].expand(n, n, -1)], -1)
  return freqs.cos().reshape(n * n, -1), freqs.sin().reshape(n * n, -1)


def _eva_release(adapter):
  """A tiny EVA02 release in EVA-CLIP's CustomCLIP layout (llm2clip/eva_clip: `visual.*`
  EVAVisionTransformer with subln + naiveswiglu, its rope buffers (EVA-CLIP's formula) in the
  tower and in every block's attention, `text.text_adaptor.*` TextProj, logit_scale), and a timm EVA02 reference
  tower loaded from it by timm's own EVA-CLIP filter (strict), as timm's EVA02 CLIP trunks are
  built (eva02_*_clip_*: separate q/k/v, SwiGLU, sub-LN, rotary with a 16x16 reference grid)."""
  timm_eva = pytest.importorskip("timm.models.eva")
  kw = dict(img_size=56, patch_size=14, embed_dim=128, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3,
            qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
            use_rot_pos_emb=True, ref_feat_shape=(16, 16), global_pool="token",
            num_classes=EMBED)
  torch.manual_seed(2)
  source = timm_eva.Eva(**kw).eval()
  _jitter(source)
  native = {}
  for k, v in source.state_dict().items():
    k = f"visual.{k}"
    for timm_name, eva_name in EVA_RENAMES:
      k = k.replace(timm_name, eva_name)
    native[k] = v
  rope = _eva_clip_rope(half_head_dim=32, pt_seq_len=16, ft_seq_len=4)
  for prefix in ["visual."] + [f"visual.blocks.{i}.attn." for i in range(2)]:
    native.update({f"{prefix}rope.freqs_{n}": t.clone() for n, t in zip(("cos", "sin"), rope)})
  native.update({f"text.text_{k}": v for k, v in adapter.state_dict().items()})
  native["logit_scale"] = torch.tensor(3.0)
  reference = timm_eva.Eva(**kw).eval()
  reference.load_state_dict(timm_eva.checkpoint_filter_fn(native, reference), strict=True)
  return native, reference


def test_released_llm2clip_eva02_by_name_offline(release, monkeypatch):
  home, _, tok_bytes, llama, _, _, adapter = release
  native, reference = _eva_release(adapter)
  buf = io.BytesIO()
  torch.save(native, buf)
  put_repo(home, EVA_REPO, {"LLM2CLIP-EVA02-L-14-336.pt": buf.getvalue()})
  monkeypatch.setenv("HF_HOME", home)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("ZOO_CACHE", raising=False)
  assert ("LLM2CLIP-EVA02-B-16", "llama3_8b_cc") in zoo.list_pretrained()
  model, tok, _ = zoo.create_model_and_transforms("LLM2CLIP-EVA02-L-14-336", "llama3_8b_cc")
  c = model.config
  v = c.vision
  assert (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_dim, v.rope_ref) == (
      56, 14, 128, 2, 2, int(128 * 4 * 2 / 3), 16)
  assert (c.embed_dim, c.adapter_blocks, c.adapter_l2_input) == (EMBED, BLOCKS, True)
  assert type(c).from_dict(json.loads(json.dumps(c.to_dict()))) == c
  assert float(model.logit_scale[...]) == pytest.approx(3.0)
  images = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)
  with torch.no_grad():
    ref_img = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  image_diff = float(np.abs(np.asarray(model.encode_image(images)) - ref_img).max())
  ids = tok(CAPTIONS)
  ref = _llm2vec_reference(CAPTIONS, tok_bytes, llama, adapter, c.text.pad_token_id)
  text_diff = float(np.abs(np.asarray(model.encode_text(ids)) - ref).max())
  print(f"LLM2CLIP EVA02 release parity: text {text_diff:.2e}, image {image_diff:.2e}")
  assert text_diff < 1e-4 and image_diff < 1e-4
  # bad checkpoints: StateDictError naming the key (EVA-CLIP's name)
  tower = model.text
  extra = dict(native, **{"visual.blocks.0.attn.relative_position_bias_table": torch.zeros(3)})
  with pytest.raises(ValueError, match="relative_position_bias_table") as e:
    llm2clip_convert.from_llm2clip_eva(extra, tower)
  assert "unexpected visual.blocks.0.attn.relative_position_bias_table" in str(e.value)
  bad_rope = dict(native, **{"visual.blocks.1.attn.rope.freqs_sin": torch.zeros(16, 64)})
  with pytest.raises(ValueError, match=r"visual\.blocks\.1\.attn\.rope\.freqs_sin: the rotary"):
    llm2clip_convert.from_llm2clip_eva(bad_rope, tower)
  missing = {k: val for k, val in native.items() if k != "visual.cls_token"}
  with pytest.raises(ValueError, match="no key 'visual.cls_token'"):
    llm2clip_convert.from_llm2clip_eva(missing, tower)
  missing = {k: val for k, val in native.items() if k != "visual.blocks.1.mlp.w3.weight"}
  with pytest.raises(ValueError, match=r"visual\.blocks\.1\.mlp\.w3\.weight"):
    llm2clip_convert.from_llm2clip_eva(missing, tower)
