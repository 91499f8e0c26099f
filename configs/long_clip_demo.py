"""Long-CLIP on the embedded demo data (CPU, minutes): stretch a tiny CLIP to 248 tokens and
fine-tune it with primary-component matching on the demo's long captions.

  # a CLIP to start from: any zoo.save directory of a 77-token model of `c.model`, e.g. the
  # one bench/long_clip_demo.py pre-trains, or a `zoo.save(trainer.model(), DIR)` of a demo run
  python train.py --config configs/long_clip_demo.py --workdir runs/long_clip_demo \
      --config.init_from=DIR
  python eval.py --config configs/long_clip_demo.py --workdir runs/long_clip_demo

Without init_from the fresh model is stretched and trained from scratch (still runs). The demo's
long captions start with the short caption and carry every distinguishing detail (background,
positions, other shapes) after token ~149, beyond what a 77-token tower reads.
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "long_clip"
  c.model = "test-tiny"  # 32 px, 2 + 2 layers: the long-caption text tower is the cost on CPU
  c.init_from = ""
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 3e-4
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 150
  c.log_every = 10
  c.data.size = 8000
  c.data.eval_size = 500
  # zero-shot, short-caption and long-caption retrieval (the long captions tokenized at 248)
  c.data.eval_sets = "zeroshot,retrieval,retrieval_long"
  c.long_clip = base.long_clip()
  c.long_clip.components = 8  # of the 32-d embedding (Long-CLIP: 32 of 512 / 768)
  return c
