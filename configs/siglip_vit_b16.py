"""SigLIP ViT-B/16 (sigmoid loss with learned bias) on WebDataset shards.

Batch 32k, AdamW (β2 0.98, wd 0.2 on matrices only), warmup + cosine, logit scale <= 100. Needs a
sentencepiece tokenizer: --config.tokenizer=/path/to/spiece.model
"""

from configs import base


def get_config():
  c = base.base_config()
  c.model = "ViT-B-16-SigLIP"
  c.tokenizer = ""  # path to the 32k sentencepiece model (SigLIP's c4_en vocabulary)
  c.batch_size = 32768
  c.total_steps = 400_000
  c.warmup_steps = 2000
  c.lr = 1e-3
  c.weight_decay = 0.2
  c.b2 = 0.98
  c.eps = 1e-6
  c.grad_clip = 1.0
  c.dtype = "auto"  # float32 on CPU, bfloat16 on accelerators
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.eval_every = 10000
  c.log_every = 50
  c.loss.impl = "auto"  # xla on CPU, pallas on accelerators
  c.data.name = "webdataset"
  c.data.shards = ""
  return c
