"""SigLIP 2 at demo size, trained from scratch on the embedded demo data on a CPU.

ViT-B-16-SigLIP2's architecture (SigLIP's towers and sigmoid loss, tanh-GELU in both towers)
narrowed to 64 wide x 2 layers, at a fixed resolution (configs/siglip2_naflex_demo.py trains
the variable-resolution NaFlex form). CLIP's BPE vocabulary stands in for the 256k Gemma one,
so it runs offline.

python train.py --config configs/siglip2_demo.py --workdir runs/siglip2_demo
"""

from configs import base


def get_config():
  return base.tower_demo("ViT-B-16-SigLIP2", dict(
      embed_dim=64, vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2),
      text=dict(width=64, layers=2, heads=2, vocab_size=49408, context_length=32)), tokenizer="clip")
