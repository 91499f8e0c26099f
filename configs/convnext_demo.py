"""ConvNeXt (convnext_base's architecture, timm trunk + linear head) at demo size, trained
from scratch on the embedded demo data on a CPU: one block per stage, widths 8-64, 32 px.

python train.py --config configs/convnext_demo.py --workdir runs/convnext_demo
"""

from configs import base


def get_config():
  return base.tower_demo("convnext_base", dict(
      embed_dim=32, vision=dict(image_size=32, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
      text=dict(width=32, layers=1, heads=2, vocab_size=49408, context_length=32)), tokenizer="clip")
