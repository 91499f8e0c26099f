"""MobileCLIP (a FastViT-MCi image tower in its train-time, unfused form) at demo size, trained
from scratch on the embedded demo data on a CPU: one block per stage, widths 8-32, 32 px.
Batch-norm statistics stay frozen (running statistics, not trained).

python train.py --config configs/mobileclip_demo.py --workdir runs/mobileclip_demo
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.model = "MobileCLIP-S1"
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=32, vision=dict(image_size=32, layers=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32)),
      text=dict(width=32, layers=1, heads=2, vocab_size=49408, context_length=32)))
  c.tokenizer = "clip"
  c.context_length = 32
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
  c.data.image_dtype = "uint8"
  return c
