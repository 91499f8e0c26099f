"""LLM2CLIP on the embedded demo data (CPU, minutes): the test-tiny image tower trained against a
tiny random-init, frozen, bidirectional LLM (zoo.models.llm "llm-tiny", 2 layers, 64 wide, CLIP
BPE ids) that reads the demo's long captions (~200 tokens; context 256 here, 512 by default).

  python train.py --config configs/llm2clip_demo.py --workdir runs/llm2clip_demo
  python eval.py --workdir runs/llm2clip_demo

LLM2CLIP proper starts from an LLM made a caption embedder first: run
configs/llm2clip_cc_demo.py, then add --config.llm2clip.text_init=RUN/model (bench/llm2clip_demo.py
does both). With a real LLM: --config.llm2clip.text_checkpoint=DIR (a Hugging Face Llama / Qwen directory)
and a tokenizer for it; with cached LLM embeddings --config.llm2clip.text_cache=True and
webdataset shards from `python -m zoo.data.embed_cache --text_model`.
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "llm2clip"
  c.model = "test-tiny"  # the image tower (and the CLIP BPE tokenizer) of this model
  c.context_length = 256  # the demo's long captions are 178-198 BPE tokens
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 150
  c.log_every = 10
  c.data.size = 8000
  c.data.eval_size = 500
  c.data.eval_sets = "retrieval_long"
  c.llm2clip = base.llm2clip()
  c.llm2clip.text_model = "llm-tiny"
  c.llm2clip.adapter_blocks = 4  # LLM2CLIP's adapter: 4 residual blocks, expansion 2
  c.llm2clip.adapter_expansion = 2.0
  return c
