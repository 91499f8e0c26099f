"""MetaCLIP 2 "worldwide" at demo size, trained from scratch on the embedded demo data on a CPU.

ViT-H-14-worldwide's architecture (class-token image tower, causal text tower pooled at the
first end-of-text id) narrowed to 64 wide x 2 layers. CLIP's BPE vocabulary (end of text 49407)
stands in for the 900k XLM-V one, so it runs offline.

python train.py --config configs/metaclip2_demo.py --workdir runs/metaclip2_demo
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.model = "ViT-H-14-worldwide"
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=64, vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2),
      text=dict(width=64, layers=2, heads=2, vocab_size=49408, context_length=32, eos_id=49407)))
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
