"""Distill the demo CLIP (configs/demo.py, 9.0M parameters) into a 1.9M-parameter student on CPU.

Student: demo-tiny narrowed (image tower 96 wide x 2 layers, text 32 wide x 2, 64-d embedding;
linear heads map it to the teacher's 128). Teacher: a zoo.save directory of the trained demo
CLIP, e.g. runs/demo/model from `python train.py --config configs/demo.py --workdir runs/demo`.

python train.py --config configs/distill_demo.py --workdir runs/distill_demo \
    --config.distill.teacher=runs/demo/model
"""

import ml_collections

from configs import base


def get_config():
  c = base.base_config()
  c.family = "distill"
  c.model = "demo-tiny"
  c.model_overrides = ml_collections.ConfigDict(dict(
      embed_dim=64, vision=dict(width=96, layers=2, heads=2),
      text=dict(width=32, layers=2, heads=1)))
  c.context_length = 32  # as configs/demo.py: the teacher read the same tokens
  c.batch_size = 128
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 150
  c.log_every = 10
  c.data.size = 40000
  c.data.eval_size = 480
  c.distill = base.distill()
  c.distill.teacher = ""  # required: the trained demo CLIP's zoo.save directory
  c.distill.feature_loss = "cosine"
  c.distill.image_feature_weight = 1.0
  c.distill.text_feature_weight = 1.0
  c.distill.logit_weight = 1.0
  c.distill.contrastive_weight = 1.0
  return c
