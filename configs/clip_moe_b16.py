"""CLIP-MoE ViT-B/16 by Diversified Multiplet Upcycling (arXiv 2409.19291) from a dense CLIP.

  python train.py --config configs/clip_moe_b16.py --workdir runs/clip_moe_b16 \
      --config.init_from=DENSE_DIR --config.data.shards='/data/captions/{00000..00999}.tar'

DENSE_DIR is a zoo.save directory of a dense ViT-B-16 (e.g. `python -m zoo.convert
from-open-clip ...` of OpenAI's weights; set model_overrides.quick_gelu for OpenAI weights).
The run is the `moe` family's recipe (zoo.families.moe.dmu), every phase a train-loop run:

  stage 1..4  workdir/dmu/stage_s: FFNs of the dense model fine-tuned (everything else frozen);
              stage 1 with the plain contrastive loss, stage s >= 2 with negatives only inside
              the joint k-means clusters (4 per stage) of stages 1..s-1's features
  MoE         workdir: the 4 stage FFNs become the experts of top-2 MoE FFNs in every block of
              both towers (as CLIP-MoE); the routers are trained with contrastive + 0.01 x
              load-balancing + 0.001 x z-loss, experts and the rest frozen

Following CLIP-MoE: 4 experts, top-2, normalized top-k gates, dropless routing, router-only
final phase. Step counts and learning rates are our choices for a ~10M-pair caption set, not
the paper's. Expert parallelism: mesh.expert=4 puts one expert of every MoE layer per device
group; tokens move with all-to-all.
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "moe"
  c.model = "ViT-B-16"
  c.init_from = ""  # the dense CLIP to upcycle (required in practice)
  c.batch_size = 4096
  c.total_steps = 5000  # router phase
  c.warmup_steps = 200
  c.lr = 1e-4
  c.weight_decay = 0.1
  c.b2 = 0.98
  c.eps = 1e-6
  c.grad_clip = 1.0
  c.dtype = "auto"  # float32 on CPU, bfloat16 on accelerators
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.eval_every = 2500
  c.log_every = 50
  c.mesh.data = 1
  c.mesh.expert = 4  # one expert per device group; --config.mesh.expert=1 on fewer devices
  c.mesh.fsdp = -1
  c.loss.impl = "auto"  # xla on CPU, pallas on accelerators
  c.data.name = "webdataset"
  c.data.shards = ""
  c.moe = base.moe()
  c.moe.num_experts = 4
  c.moe.top_k = 2
  c.moe.layers = "all"
  c.moe.dropless = True
  c.moe.balance_weight = 0.01
  c.moe.z_weight = 0.001
  c.moe.trainable = "router"
  c.moe.dmu.stages = 4
  c.moe.dmu.steps_per_stage = 2500
  c.moe.dmu.lr = 1e-5
  c.moe.dmu.clusters = 4
  c.moe.dmu.kmeans_samples = 65536
  c.moe.dmu.cluster_on = "both"
  c.moe.dmu.cross_cluster_weight = 0.0
  c.moe.dmu.init = "base"
  return c
