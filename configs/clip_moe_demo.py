"""CLIP-MoE on the embedded demo data (CPU, minutes): DMU-upcycle a tiny CLIP to 4 experts.

  # a dense CLIP to start from: any zoo.save directory of `c.model`, e.g. the model/ export of
  python train.py --config configs/demo.py --workdir runs/demo --config.model=test-tiny
  python train.py --config configs/clip_moe_demo.py --workdir runs/clip_moe_demo \
      --config.init_from=runs/demo/model
  python eval.py --config configs/clip_moe_demo.py --workdir runs/clip_moe_demo

The run (zoo.families.moe.dmu): 4 stages fine-tune FFN copies (stage 1 plain contrastive, stages
2-4 within the joint k-means clusters of the earlier stages, 4 clusters each) in
runs/clip_moe_demo/dmu/stage_s, then a top-2 MoE over every other block of both towers with the
4 stage FFNs as experts trains its routers in runs/clip_moe_demo. Without init_from the stages
start from a random CLIP (still runs). bench/moe_demo.py compares this with dense training.
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "moe"
  c.model = "test-tiny"  # 32 px, 2 + 2 blocks
  c.init_from = ""
  c.context_length = 32
  c.batch_size = 64
  c.total_steps = 100  # router phase
  c.warmup_steps = 10
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 100
  c.log_every = 10
  c.data.size = 8000
  c.data.eval_size = 500
  c.moe = base.moe()
  c.moe.num_experts = 4
  c.moe.top_k = 2
  c.moe.layers = "every_other"
  c.moe.dropless = True  # as CLIP-MoE; set False + capacity_factor to drop over capacity
  c.moe.trainable = "router"
  c.moe.dmu.stages = 4
  c.moe.dmu.steps_per_stage = 50
  c.moe.dmu.lr = 3e-4
  c.moe.dmu.clusters = 4
  c.moe.dmu.kmeans_samples = 1024
  c.moe.dmu.kmeans_iters = 30
  return c
