"""ConvNeXt (convnext_base's architecture, timm trunk + linear head) at demo size, trained
from scratch on the embedded demo data on a CPU: one block per stage, widths 8-64, 32 px.

python train.py --config configs/convnext_demo.py --workdir runs/convnext_demo
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.model = "convnext_base"
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=32, vision=dict(image_size=32, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
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
