"""ProCLIP stage 1: text-only distillation of a CLIP text encoder into the LLM embedder + adapter.

The LLM (here the tiny demo one; a real one through --config.llm2clip.text_checkpoint) and its
ProCLIP adapter (1 residual block, expansion 8) learn the teacher CLIP's normalized text
embeddings of the same captions: instance alignment (cosine) + embedding-structure alignment
(MSE of the batch similarity matrices). The image tower is copied from the teacher
(`init_from`) and stays frozen; then run configs/proclip_stage2.py with init_from = this run.

  python train.py --config configs/proclip_stage1.py --workdir runs/proclip1 \
      --config.llm2clip.teacher=DIR --config.init_from=DIR   # DIR: a zoo.save CLIP of c.model
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "llm2clip"
  c.model = "test-tiny"
  c.context_length = 256
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 0
  c.data.size = 8000
  c.data.eval_size = 500
  c.data.eval_sets = "retrieval_long"
  c.llm2clip = base.llm2clip()
  c.llm2clip.stage = "distill_text"
  c.llm2clip.teacher = ""  # required: the CLIP whose text encoder is distilled
  c.llm2clip.loss_form = "released"  # ProCLIP's training/train.py sums
  c.llm2clip.long_captions = False  # the teacher reads 77 tokens: distil on the short captions
  c.llm2clip.adapter_blocks = 1
  c.llm2clip.adapter_expansion = 8.0
  c.llm2clip.instance_weight = 1.0
  c.llm2clip.structure_weight = 1.0
  return c
