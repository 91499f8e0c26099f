"""ModifiedResNet (RN50's architecture) at demo size, trained from scratch on the embedded
demo data on a CPU: 3-conv stem, one anti-aliased bottleneck per stage, width 8, attention
pooling, on 32 px. Batch-norm statistics stay frozen (running statistics, not trained).

python train.py --config configs/resnet_demo.py --workdir runs/resnet_demo
"""

from configs import base


def get_config():
  return base.tower_demo("RN50", dict(
      embed_dim=32, vision=dict(image_size=32, layers=(1, 1, 1, 1), width=8),
      text=dict(width=32, layers=1, heads=2, vocab_size=49408, context_length=32)), tokenizer="clip")
