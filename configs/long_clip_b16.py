"""Long-CLIP ViT-B/16: fine-tune OpenAI's CLIP ViT-B/16 to read 248 tokens (the paper's recipe).

Long-CLIP (arXiv 2403.15378; recipe from its train/train.md): ShareGPT4V's ~1M (image, long
caption) pairs, the short caption being the long caption's first sentence; global batch 2048,
lr 1e-6 (the paper's table has a typo), 6 epochs, 200 warm-up steps, AdamW b1 0.9, b2 0.999,
eps 1e-8, weight decay 1e-2; positions stretched 77 -> 248 keeping the first 20; PCA with 32
components; loss = long + 1.0 * short.

  # 1. OpenAI weights -> zoo checkpoint (QuickGELU architecture)
  python -m zoo.convert from-open-clip --model ViT-B-16-quickgelu --input ViT-B-16.safetensors \
      --output ckpt/openai_vit_b16
  # 2. fine-tune (WebDataset shards: KEY.jpg, KEY.txt = long caption, KEY.json {"short_caption": ...}
  #    optional, else the first sentence)
  python train.py --config configs/long_clip_b16.py --workdir runs/long_clip_b16 \
      --config.init_from=ckpt/openai_vit_b16 --config.data.shards='/data/sharegpt4v/{00000..00999}.tar'
  # 3. export for PyTorch (Long-CLIP's longclip.load reads the .pt)
  python -m zoo.convert to-long-clip --input DIR --output longclip-B.pt
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "long_clip"
  c.model = "ViT-B-16-quickgelu"  # OpenAI weights use QuickGELU
  c.init_from = ""  # REQUIRED: a converted CLIP checkpoint (zoo.save directory), see above
  c.batch_size = 2048
  c.total_steps = 6 * 1_000_000 // 2048  # 6 epochs of ~1M pairs
  c.warmup_steps = 200
  c.lr = 1e-6
  c.end_lr = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 1e-2
  c.grad_clip = 0.0
  c.dtype = "auto"  # float32 on CPU, bfloat16 on accelerators
  c.checkpoint_every = 500
  c.eval_every = 500
  c.log_every = 20
  c.loss.impl = "auto"  # xla on CPU, pallas on accelerators
  c.data.name = "webdataset"
  c.data.shards = ""
  c.long_clip = base.long_clip()  # 248 positions, keep 20, 32 components, weight 1
  return c
