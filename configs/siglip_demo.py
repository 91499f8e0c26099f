"""SigLIP at demo size, trained from scratch on the embedded demo data (rendered shapes) on a CPU.

ViT-B-16-SigLIP's architecture (sigmoid loss with a learned bias, no class token, MAP-head
pooling, bidirectional text tower pooled at its last token) narrowed to 64 wide x 2 layers.
CLIP's BPE vocabulary stands in for SigLIP's 32k sentencepiece one, so it runs offline.

python train.py --config configs/siglip_demo.py --workdir runs/siglip_demo
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.model = "ViT-B-16-SigLIP"
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=64, vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2),
      text=dict(width=64, layers=2, heads=2, vocab_size=49408, context_length=32)))
  c.tokenizer = "clip"
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
