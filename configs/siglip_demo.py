"""SigLIP at demo size, trained from scratch on the embedded demo data (rendered shapes) on a CPU.

ViT-B-16-SigLIP's architecture (sigmoid loss with a learned bias, no class token, MAP-head
pooling, bidirectional text tower pooled at its last token) narrowed to 64 wide x 2 layers.
CLIP's BPE vocabulary stands in for SigLIP's 32k sentencepiece one, so it runs offline.

python train.py --config configs/siglip_demo.py --workdir runs/siglip_demo
"""

from configs import base


def get_config():
  return base.tower_demo("ViT-B-16-SigLIP", dict(
      embed_dim=64, vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2),
      text=dict(width=64, layers=2, heads=2, vocab_size=49408, context_length=32)), tokenizer="clip")
