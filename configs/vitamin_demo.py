"""ViTamin (ViTamin-S's architecture: MBConv stages, then GeGLU transformer blocks) at demo
size, trained from scratch on the embedded demo data on a CPU: one block per MBConv stage,
a 32-wide 1-layer ViT, 32 px.

python train.py --config configs/vitamin_demo.py --workdir runs/vitamin_demo
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.model = "ViTamin-S"
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=32, vision=dict(image_size=32, stem_width=8, dims=(8, 16), depths=(1, 1), width=32, layers=1, heads=2),
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
