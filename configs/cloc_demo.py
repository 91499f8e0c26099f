"""Region-aligned heads (CLOC-style) on the embedded demo data, CPU-sized (minutes).

  # a CLIP to start from: any zoo.save directory of a `c.model` (region-tiny) CLIP, e.g. the
  # base the bench pre-trains (the whole bench takes ~4 min on 2 CPU cores):
  python bench/region_demo.py --save_base runs/region_tiny_base
  python train.py --config configs/cloc_demo.py --workdir runs/cloc_demo \
      --config.init_from=runs/region_tiny_base
  python eval.py --config configs/cloc_demo.py --workdir runs/cloc_demo

The demo scenes carry a box and a caption ("a red circle") per object; region classification
(24 colour-shape classes, over the held-out `regions` split's boxes) and region <-> caption
retrieval appear in eval.py's table as regions/top1, regions/text_to_region_recall@1, ...
Without init_from the whole model trains from scratch (still runs).
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "region"
  c.model = "region-tiny"  # zoo.models.region registers it: 64 px, patch 8 (8 x 8 grid), 2 + 2 layers
  c.init_from = ""
  c.context_length = 32  # demo captions (and region captions) are short
  c.batch_size = 64
  c.total_steps = 200
  c.warmup_steps = 20
  c.lr = 3e-4
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 100
  c.log_every = 10
  c.data.size = 20000
  c.data.eval_size = 300
  c.data.max_regions = 4
  c.data.eval_sets = "zeroshot,retrieval,regions"
  c.region = base.region()
  c.region.roi_size = 4  # 4 x 4 bins, 2 x 2 samples each: one sample per patch
  c.region.layers = 1
  c.region.width = 64
  return c
