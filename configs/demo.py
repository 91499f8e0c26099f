"""Tiny CLIP trained from scratch on the embedded demo data (rendered shapes) on a CPU.

python train.py --config configs/demo.py --workdir runs/demo
"""

from configs import base


def get_config():
  c = base.base_config()
  c.model = "demo-tiny"
  c.context_length = 32  # demo captions are short; the model reads up to 77
  # 250 steps of 64 (16k scenes, each seen once): held-out zero-shot top-1 >= 0.6 in about half
  # the train-step FLOPs of the earlier 300 x 128 schedule; one eval, at the end.
  c.batch_size = 64
  c.total_steps = 250
  c.warmup_steps = 25
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.checkpoint_every = 125
  c.eval_every = 250
  c.log_every = 10
  c.data.size = 40000
  c.data.eval_size = 480
  # Demo captions hold <= 17 tokens: each batch's text runs on 24 positions, not 32 (same
  # features and gradients: causal tower, EOT pooling; zoo.train.text_lengths).
  c.data.text_lengths = "auto"
  c.data.image_dtype = "uint8"  # pixels batched as bytes, normalized in the train step
  return c
