"""ViTamin (ViTamin-S's architecture: MBConv stages, then GeGLU transformer blocks) at demo
size, trained from scratch on the embedded demo data on a CPU: one block per MBConv stage,
a 32-wide 1-layer ViT, 32 px.

python train.py --config configs/vitamin_demo.py --workdir runs/vitamin_demo
"""

from configs import base


def get_config():
  return base.tower_demo("ViTamin-S", dict(
      embed_dim=32, vision=dict(image_size=32, stem_width=8, dims=(8, 16), depths=(1, 1), width=32, layers=1, heads=2),
      text=dict(width=32, layers=1, heads=2, vocab_size=49408, context_length=32)), tokenizer="clip")
