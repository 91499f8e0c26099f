"""ProCLIP stage 2: contrastive tuning of the image tower against the stage-1 LLM embedder,
regularized by self-distillation to a frozen copy of the initial image tower.

  python train.py --config configs/proclip_stage2.py --workdir runs/proclip2 \
      --config.init_from=runs/proclip1/model
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "llm2clip"
  c.model = "test-tiny"
  c.init_from = ""  # the stage-1 model (zoo.save directory)
  c.context_length = 256
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 5e-4
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 150
  c.data.size = 8000
  c.data.eval_size = 500
  c.data.eval_sets = "retrieval_long"
  c.llm2clip = base.llm2clip()
  c.llm2clip.stage = "self_distill"
  c.llm2clip.adapter_blocks = 1
  c.llm2clip.adapter_expansion = 8.0
  c.llm2clip.self_distill_weight = 1.0
  c.llm2clip.loss_form = "released"  # ProCLIP's training/train.py sums
  return c
