"""LLM2CLIP's first stage on the demo data: caption-contrastive tuning of the tiny LLM (text only).

LLM2CLIP starts from an LLM already made a caption embedder: it fine-tunes the LLM on pairs of
captions of the same image (in-batch negatives), then freezes it. Here the tiny random-init,
bidirectional, mean-pooled LLM ("llm-tiny") reads each training sample's long caption (anchor)
and its `detail_caption` (positive: the same scene's details in other words, without the long
caption's generic preamble); InfoNCE at temperature 0.05. Full fine-tuning (the LLM is random
and tiny: there is no pretrained knowledge for LoRA to keep; --config.llm2clip.lora_rank=8 for
LoRA). No image tower or adapter is trained. Then the CLIP stage loads the tuned LLM, frozen:

  python train.py --config configs/llm2clip_cc_demo.py --workdir runs/llm2clip_cc
  python train.py --config configs/llm2clip_demo.py --workdir runs/llm2clip_demo \
      --config.llm2clip.text_init=runs/llm2clip_cc/model
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "llm2clip"
  c.model = "test-tiny"  # the CLIP BPE tokenizer (its image tower is not used in this stage)
  c.context_length = 256  # the demo's long captions are 178-198 BPE tokens
  c.batch_size = 64
  c.total_steps = 200
  c.warmup_steps = 20
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.checkpoint_every = 200
  c.eval_every = 0
  c.log_every = 20
  c.data.size = 8000
  c.data.eval_size = 64
  c.llm2clip = base.llm2clip()
  c.llm2clip.stage = "caption_contrastive"
  c.llm2clip.text_model = "llm-tiny"
  c.llm2clip.positive = "detail_caption"
  c.llm2clip.cc_temperature = 0.05
  c.llm2clip.lora_rank = 0  # full fine-tuning of the tiny LLM
  return c
