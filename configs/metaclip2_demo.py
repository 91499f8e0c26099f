"""MetaCLIP 2 "worldwide" at demo size, trained from scratch on the embedded demo data on a CPU.

ViT-H-14-worldwide's architecture (class-token image tower, causal text tower pooled at the
first end-of-text id) narrowed to 64 wide x 2 layers. CLIP's BPE vocabulary (end of text 49407)
stands in for the 900k XLM-V one, so it runs offline.

python train.py --config configs/metaclip2_demo.py --workdir runs/metaclip2_demo
"""

from configs import base


def get_config():
  return base.tower_demo("ViT-H-14-worldwide", dict(
      embed_dim=64, vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2),
      text=dict(width=64, layers=2, heads=2, vocab_size=49408, context_length=32, eos_id=49407)), tokenizer="clip")
