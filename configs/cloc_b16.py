"""CLOC-style region heads on CLIP ViT-B/16: fine-tune a converted CLIP with a box prompter.

CLOC (arXiv 2410.02746) trains CLIP plus a light prompter with the image-text loss and a
region-text contrastive loss over (box, region caption) pairs, optionally with text -> box
grounding. Here the towers start from OpenAI's ViT-B/16 and everything is fine-tuned; the
prompter (one 768-wide block over 7 x 7 RoIAlign bins of the 14 x 14 patch grid + a box token)
starts as the mean-pooled-patch baseline (`residual_pool`) and learns a correction.

  # 1. OpenAI weights -> zoo checkpoint (QuickGELU architecture)
  python -m zoo.convert from-open-clip --model ViT-B-16-quickgelu --input ViT-B-16.safetensors \
      --output ckpt/openai_vit_b16
  # 2. fine-tune on WebDataset shards with region annotations:
  #    KEY.jpg, KEY.txt (caption), KEY.json {"regions": [{"bbox": [x0, y0, x1, y1], "caption": ...}]}
  #    (bbox normalized to the image; boxes follow the random-resized crop, boxes that leave it
  #    are dropped)
  python train.py --config configs/cloc_b16.py --workdir runs/cloc_b16 \
      --config.init_from=ckpt/openai_vit_b16 --config.data.shards='/data/grit/{00000..01023}.tar'
  python eval.py --config configs/cloc_b16.py --workdir runs/cloc_b16
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "region"
  c.model = "ViT-B-16-quickgelu"  # OpenAI weights use QuickGELU
  c.init_from = ""  # REQUIRED: a converted CLIP checkpoint (zoo.save directory), see above
  c.batch_size = 4096
  c.total_steps = 20_000
  c.warmup_steps = 1000
  c.lr = 1e-5  # fine-tuning a trained CLIP (the fresh prompter is small and zero-started)
  c.end_lr = 0.0
  c.b1 = 0.9
  c.b2 = 0.98
  c.eps = 1e-6
  c.weight_decay = 0.1
  c.grad_clip = 1.0
  c.dtype = "auto"  # float32 on CPU, bfloat16 on accelerators
  c.checkpoint_every = 1000
  c.eval_every = 1000
  c.log_every = 50
  c.loss.impl = "auto"  # xla on CPU, pallas on accelerators
  c.data.name = "webdataset"
  c.data.shards = ""
  c.data.random_resized_crop_scale = (0.5, 1.0)
  c.data.max_regions = 8
  c.data.min_box_visible = 0.5
  c.region = base.region()
  c.region.roi_size = 7  # 7 x 7 bins x 2 x 2 samples = one sample per patch of the 14 x 14 grid
  c.region.width = 768
  c.region.layers = 1
  c.region.region_weight = 1.0
  c.region.grounding_weight = 1.0  # CLOC's text -> box term
  c.region.tic_weight = 0.0  # FG-CLIP 2's textual intra-modal term: set > 0 to enable
  return c
