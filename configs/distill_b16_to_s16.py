"""Distill a CLIP ViT-B/16 into a ViT-S/16 student (TinyCLIP / DC-CLIP scale) on WebDataset shards.

Student: ViT-B-16 narrowed to width 384 (6 heads, 12 layers) in both towers with a 384-d
embedding; linear heads map it to the teacher's 512 for feature distillation. The logit
distillation runs blockwise (pallas / xla), never building the 32k x 32k batch softmax.

  python -m zoo.convert from-open-clip --model ViT-B-16 --input vit_b16.safetensors \
      --output ckpt/clip_b16
  python train.py --config configs/distill_b16_to_s16.py --workdir runs/distill_s16 \
      --config.distill.teacher=ckpt/clip_b16 \
      --config.data.shards='/data/laion400m/{00000..41455}.tar'

The same student in DC-CLIP's two stages (feature distillation from a teacher cache, then
contrastive alignment): configs/dcclip_b16_to_s16_stage1.py and _stage2.py.
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "distill"
  c.model = "ViT-B-16"
  c.model_overrides = base.vit_s16_student()
  c.dtype = "auto"  # float32 on CPU, bfloat16 on accelerators
  c.batch_size = 32768
  c.total_steps = 100_000
  c.warmup_steps = 2000
  c.lr = 5e-4
  c.weight_decay = 0.2
  c.grad_clip = 0.0
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.eval_every = 10000
  c.log_every = 50
  c.loss.impl = "auto"  # xla on CPU, pallas on accelerators
  c.data.name = "webdataset"
  c.data.shards = ""
  c.distill = base.distill()
  c.distill.teacher = ""  # required: the teacher's zoo.save directory
  c.distill.feature_loss = "cosine"
  c.distill.image_feature_weight = 1.0
  c.distill.text_feature_weight = 1.0
  c.distill.logit_weight = 1.0
  c.distill.contrastive_weight = 1.0
  c.distill.block_size = 1024
  return c
