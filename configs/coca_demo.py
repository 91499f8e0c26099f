"""Tiny CoCa trained from scratch on the embedded demo data on a CPU: contrastive + captioning
loss (open_clip's CoCaLoss weights), then zero-shot / retrieval eval as CLIP.

python train.py --config configs/coca_demo.py --workdir runs/coca_demo
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "coca"
  c.model = "coca-demo-tiny"
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 150
  c.log_every = 10
  c.data.size = 20000
  c.data.eval_size = 480
  c.coca = base.coca()
  return c
