"""DC-CLIP stage 1: a ViT-S/16 student learns a ViT-B/16 teacher's image and text embeddings.

Feature distillation only (cosine on normalized embeddings, both towers), read from a teacher
cache so the teacher runs once over the data, not every epoch:

  python -m zoo.data.embed_cache --model ckpt/clip_b16 \
      --shards '/data/laion400m/{00000..41455}.tar' --out /data/laion400m_b16_cache
  python train.py --config configs/dcclip_b16_to_s16_stage1.py --workdir runs/dcclip_stage1 \
      --config.distill.teacher=ckpt/clip_b16 \
      --config.data.shards='/data/laion400m_b16_cache/{00000..41455}.tar'

The teacher directory supplies only its config (embedding width, vocabulary, image mean/std).
runs/dcclip_stage1/model is the student alone: stage 2 (configs/dcclip_b16_to_s16_stage2.py)
starts from it.
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "distill"
  c.model = "ViT-B-16"
  c.model_overrides = base.vit_s16_student()
  c.dtype = "auto"  # float32 on CPU, bfloat16 on accelerators
  c.batch_size = 4096  # no batch softmax in this stage: the batch size is free
  c.total_steps = 60_000
  c.warmup_steps = 2000
  c.lr = 1e-3
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.eval_every = 10000
  c.log_every = 50
  c.data.name = "webdataset"
  c.data.shards = ""  # required: shards written by python -m zoo.data.embed_cache
  c.distill = base.distill()
  c.distill.teacher = ""  # required: the teacher's zoo.save directory (its config)
  c.distill.teacher_cache = True
  c.distill.feature_loss = "cosine"
  c.distill.image_feature_weight = 1.0
  c.distill.text_feature_weight = 1.0
  c.distill.logit_weight = 0.0
  c.distill.contrastive_weight = 0.0
  return c
