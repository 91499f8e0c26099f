"""PE-Core at demo size, trained from scratch on the embedded demo data on a CPU.

PE-Core-B-16's architecture (timm's Eva trunk as Perception Encoder uses it: 2-D rotary positions, LayerNorm before the blocks, attention pooling) narrowed to 64 wide x 2 layers at 64 px. CLIP's BPE vocabulary is the released model's
own.

python train.py --config configs/pe_core_demo.py --workdir runs/pe_core_demo
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.model = "PE-Core-B-16"
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=64,
      vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2, mlp_dim=172),
      text=dict(width=64, layers=2, heads=2, context_length=32)))
  c.context_length = 32
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 150
  c.log_every = 10
  c.data.size = 20000
  c.data.eval_size = 480
  c.data.image_dtype = "uint8"
  return c
