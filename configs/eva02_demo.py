"""EVA02 at demo size, trained from scratch on the embedded demo data on a CPU.

EVA02-B-16's architecture (timm's Eva trunk: 2-D rotary positions, SwiGLU with sub-LN, class-
token pooling) narrowed to 64 wide x 2 layers at 64 px. CLIP's BPE vocabulary is the released
model's own.

python train.py --config configs/eva02_demo.py --workdir runs/eva02_demo
"""

from configs import base


def get_config():
  return base.tower_demo("EVA02-B-16", dict(
      embed_dim=64,
      vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2, mlp_dim=172),
      text=dict(width=64, layers=2, heads=2, context_length=32)))
