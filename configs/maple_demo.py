"""MaPLe on the embedded demo data (CPU, minutes): deep language prompts in both layers of a
frozen tiny CLIP's text tower, coupled by one Linear per layer to vision prompts, 8 shots of
each base class; tested on base and novel classes (see configs/coop_demo.py).

  python train.py --config configs/maple_demo.py --workdir runs/maple_demo --config.init_from=DIR
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "prompt"
  c.model = "test-tiny"  # 32 px, 2 + 2 layers: prompts in both (depth 2)
  c.init_from = ""
  c.batch_size = 8
  c.total_steps = 60
  c.warmup_steps = 5
  c.lr = 2e-3
  c.weight_decay = 0.0
  c.grad_clip = 0.0
  c.checkpoint_every = 60
  c.eval_every = 60
  c.log_every = 10
  c.data.update(base.fewshot_data())
  c.data.dataset = "demo"
  c.data.shots = 8
  c.data.pool_size = 1200
  c.data.eval_size = 480
  c.data.random_resized_crop_scale = (0.9, 1.0)  # as the demo CLIP's pre-training
  c.prompt = base.prompt()
  c.prompt.method = "maple"
  c.prompt.n_ctx = 2  # MaPLe: 2 context tokens from "a photo of a" (the rest stays fixed)
  c.prompt.ctx_init = "a photo of a"
  c.prompt.depth = 2
  return c
