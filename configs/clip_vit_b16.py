"""CLIP ViT-B/16 from scratch on WebDataset shards (open_clip's LAION-400M recipe).

Global batch 32k, AdamW (β2 0.98, eps 1e-6, wd 0.2 on matrices only), 2k warmup + cosine,
logit scale clamped at 100, bf16 compute on accelerators. Set the data:
  --config.data.shards='/data/laion400m/{00000..41455}.tar'
"""

from configs import base


def get_config():
  c = base.base_config()
  c.model = "ViT-B-16"
  c.batch_size = 32768
  c.total_steps = 400_000  # ~13B samples seen (32 epochs of 400M)
  c.warmup_steps = 2000
  c.lr = 5e-4
  c.weight_decay = 0.2
  c.b2 = 0.98
  c.eps = 1e-6
  c.grad_clip = 0.0
  c.dtype = "auto"  # float32 on CPU, bfloat16 on accelerators
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.eval_every = 10000
  c.log_every = 50
  c.mesh.data = 1
  c.mesh.fsdp = -1
  # Fused kernels on accelerators; the blockwise XLA form on CPU (interpret-mode Pallas is slow).
  c.loss.impl = "auto"  # xla on CPU, pallas on accelerators
  c.data.name = "webdataset"
  c.data.shards = ""
  c.data.random_resized_crop_scale = (0.9, 1.0)
  return c
