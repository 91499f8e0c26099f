"""MaPLe with the paper's hyper-parameters: OpenAI ViT-B/16 frozen, 2 context tokens from
"a photo of a", prompts in the first 9 layers of both towers, 16 shots of the base classes,
SGD lr 0.0035 (momentum 0.9, weight decay 5e-4), batch 4, 5 epochs with one warm-up epoch,
cosine decay; evaluated base-to-novel. `total_steps` is 5 epochs of ImageNet's 500 base
classes x 16 shots (8000 images / 4 = 2000 steps an epoch): set it for another dataset
(e.g. Caltech101: 50 base classes -> 5 x 200 = 1000 steps), as `--config.data.dataset=NAME`.

  python train.py --config configs/maple_vit_b16.py --workdir runs/maple_imagenet \
      --config.data.dataset=imagenet1k --config.data.data_root=/data --config.seed=1
  # CoOp / CoCoOp on the same protocol: --config.prompt.method=coop (n_ctx 4 from the phrase)
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "prompt"
  c.model = "ViT-B-16-quickgelu"  # OpenAI weights use QuickGELU
  c.init_from = "pretrained:ViT-B-16/openai"
  c.dtype = "auto"
  c.seed = 1  # the papers average seeds 1, 2, 3
  c.batch_size = 4
  c.total_steps = 10000  # 5 epochs of 8000 images (ImageNet base, 16 shots) at batch 4
  c.warmup_steps = 2000  # one epoch
  c.optimizer = "sgd"
  c.lr = 0.0035
  c.end_lr = 0.0
  c.weight_decay = 5e-4
  c.grad_clip = 0.0
  c.mesh.data, c.mesh.fsdp = -1, 1  # a batch of 4: data parallel over up to 4 chips
  c.checkpoint_every = 2000
  c.eval_every = 10000
  c.log_every = 50
  c.data.update(base.fewshot_data())
  c.data.dataset = "imagenet1k"  # a classification benchmark by name, or demo / folder
  c.data.shots = 16
  c.data.subsample = "base"
  c.data.random_resized_crop_scale = (0.08, 1.0)
  c.data.hflip = True
  c.data.num_threads = 8
  c.prompt = base.prompt()
  c.prompt.method = "maple"
  c.prompt.n_ctx = 2
  c.prompt.ctx_init = "a photo of a"
  c.prompt.depth = 9
  c.prompt.eval_batch_size = 100
  return c
