"""SigLIP 2 NaFlex at demo size: variable resolution and aspect ratio, trained from scratch on
the embedded demo data on a CPU.

ViT-B-16-SigLIP2 with the NaFlex image tower (its 8 x 8 position grid resized per image),
narrowed to 64 wide x 2 layers. Each random-resized crop (aspect 1:2 to 2:1) keeps its aspect
and is resized to at most `naflex.max_patches` patches of 8 px (zoo.families.naflex); batches
are padded to a bucketed patch count. CLIP's BPE vocabulary stands in for the 256k Gemma one.

python train.py --config configs/siglip2_naflex_demo.py --workdir runs/siglip2_naflex_demo
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.family = "naflex"
  c.model = "ViT-B-16-SigLIP2"
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=64,
      vision=dict(image_size=64, patch_size=8, width=64, layers=2, heads=2, naflex=True),
      text=dict(width=64, layers=2, heads=2, vocab_size=49408, context_length=32)))
  c.naflex = base.naflex()
  c.naflex.max_patches = 48
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
  c.data.random_resized_crop_ratio = (0.5, 2.0)
  return c
