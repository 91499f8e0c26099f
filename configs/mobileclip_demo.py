"""MobileCLIP (a FastViT-MCi image tower in its train-time, unfused form) at demo size, trained
from scratch on the embedded demo data on a CPU: one block per stage, widths 8-32, 32 px.
Batch-norm statistics stay frozen (running statistics, not trained).

python train.py --config configs/mobileclip_demo.py --workdir runs/mobileclip_demo
"""

from configs import base


def get_config():
  return base.tower_demo("MobileCLIP-S1", dict(
      embed_dim=32, vision=dict(image_size=32, layers=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32)),
      text=dict(width=32, layers=1, heads=2, vocab_size=49408, context_length=32)), tokenizer="clip")
