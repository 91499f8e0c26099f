"""DC-CLIP stage 2: contrastive alignment of the stage-1 ViT-S/16 student's two towers.

A plain CLIP run (family clip) starting from the stage-1 student, at a large batch through the
fused contrastive loss (never B x B), shorter and at a lower learning rate:

  python train.py --config configs/dcclip_b16_to_s16_stage2.py --workdir runs/dcclip_stage2 \
      --config.init_from=runs/dcclip_stage1/model \
      --config.data.shards='/data/laion400m/{00000..41455}.tar'
"""

from configs import base


def get_config():
  c = base.base_config()
  c.model = "ViT-B-16"
  c.model_overrides = base.vit_s16_student()
  c.init_from = "runs/dcclip_stage1/model"  # the stage-1 student (zoo.save directory)
  c.dtype = "auto"
  c.batch_size = 32768
  c.total_steps = 20_000
  c.warmup_steps = 1000
  c.lr = 2e-4
  c.weight_decay = 0.2
  c.grad_clip = 0.0
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.eval_every = 5000
  c.log_every = 50
  c.loss.impl = "auto"  # xla on CPU, pallas on accelerators
  c.data.name = "webdataset"
  c.data.shards = ""
  return c
