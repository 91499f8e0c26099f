"""CLIPA at demo size, trained from scratch on the embedded demo data on a CPU.

ViT-L-14-CLIPA's architecture (no ln_pre, mean-pooled patch tokens with the final LayerNorm
after pooling, text pooled at its last token) narrowed to 64 wide x 2 layers. CLIP's BPE
vocabulary stands in for CLIPA's BERT one, so it runs offline.

python train.py --config configs/clipa_demo.py --workdir runs/clipa_demo
"""

from configs import base


def get_config():
  return base.tower_demo("ViT-L-14-CLIPA", dict(
      embed_dim=64, vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2),
      text=dict(width=64, layers=2, heads=2, vocab_size=49408, context_length=32)), tokenizer="clip")
