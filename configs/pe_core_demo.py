"""PE-Core at demo size, trained from scratch on the embedded demo data on a CPU.

PE-Core-B-16's architecture (timm's Eva trunk as Perception Encoder uses it: 2-D rotary
positions, LayerNorm before the blocks, attention pooling) narrowed to 64 wide x 2 layers at 64
px. CLIP's BPE vocabulary is the released model's own.

python train.py --config configs/pe_core_demo.py --workdir runs/pe_core_demo
"""

from configs import base


def get_config():
  return base.tower_demo("PE-Core-B-16", dict(
      embed_dim=64,
      vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2, mlp_dim=172),
      text=dict(width=64, layers=2, heads=2, context_length=32)))
