"""CoOp on the embedded demo data (CPU, minutes): learn 4 context vectors for a frozen tiny CLIP
from 8 shots of each base class (the first 12 of the 24 demo classes), then test on the base
and the 12 unseen novel classes (base-to-novel: base / novel accuracy and their harmonic mean).

  # the frozen CLIP: a zoo.save directory of a `c.model` CLIP trained on the demo data, e.g. the
  # one bench/prompt_demo.py trains (without init_from the CLIP is random: it still runs)
  python train.py --config configs/coop_demo.py --workdir runs/coop_demo --config.init_from=DIR
  # CoCoOp: --config.prompt.method=cocoop; MaPLe: configs/maple_demo.py
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "prompt"
  c.model = "test-tiny"  # 32 px, 2 + 2 layers
  c.init_from = ""
  c.batch_size = 8
  c.total_steps = 60
  c.warmup_steps = 5
  c.lr = 2e-3  # AdamW: the context lives at the token-embedding scale (~0.02)
  c.weight_decay = 0.0
  c.grad_clip = 0.0
  c.checkpoint_every = 60
  c.eval_every = 60
  c.log_every = 10
  c.data.update(base.fewshot_data())
  c.data.dataset = "demo"
  c.data.shots = 8
  c.data.pool_size = 1200  # demo scenes the shots are drawn from (about 50 per class)
  c.data.eval_size = 480  # test scenes (about 20 per class)
  c.data.random_resized_crop_scale = (0.9, 1.0)  # as the demo CLIP's pre-training
  c.prompt = base.prompt()
  c.prompt.method = "coop"
  c.prompt.n_ctx = 4
  c.prompt.ctx_init = "a photo of a"
  return c
