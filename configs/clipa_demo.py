"""CLIPA at demo size, trained from scratch on the embedded demo data on a CPU.

ViT-L-14-CLIPA's architecture (no ln_pre, mean-pooled patch tokens with the final LayerNorm
after pooling, text pooled at its last token) narrowed to 64 wide x 2 layers. CLIP's BPE
vocabulary stands in for CLIPA's BERT one, so it runs offline.

python train.py --config configs/clipa_demo.py --workdir runs/clipa_demo
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.model = "ViT-L-14-CLIPA"
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
