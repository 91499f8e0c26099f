"""ModifiedResNet (RN50's architecture) at demo size, trained from scratch on the embedded
demo data on a CPU: 3-conv stem, one anti-aliased bottleneck per stage, width 8, attention
pooling, on 32 px. Batch-norm statistics stay frozen (running statistics, not trained).

python train.py --config configs/resnet_demo.py --workdir runs/resnet_demo
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.model = "RN50"
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=32, vision=dict(image_size=32, layers=(1, 1, 1, 1), width=8),
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
