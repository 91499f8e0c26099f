"""M-CLIP-style teacher-student distillation at full size: an XLM-R text tower learns a frozen
English CLIP text tower's embeddings of captions from their translations (MSE), so the image
tower of the teacher works with ~100 languages.

  # 1. the English teacher as a zoo.save directory (OpenAI / open_clip weights):
  python -m zoo.convert from-open-clip --model ViT-L-14-quickgelu --input vit_l14.safetensors \
      --output ckpt/clip_l14
  # 2. the student: teacher image tower + XLM-R large (HF weights) + fresh projection, or an
  #    M-CLIP release (transformer.* + LinearTransformation.*) to continue from:
  python -m zoo.convert build-mclip --teacher ckpt/clip_l14 --text xlm-roberta-large/ \
      --tokenizer xlm-roberta-large/sentencepiece.bpe.model --output ckpt/mclip_l14_init
  # 3. distill on WebDataset shards whose KEY.json holds {"captions": {"en": ..., "de": ...}}:
  python train.py --config configs/mclip_distill.py --workdir runs/mclip \
      --config.multilingual.teacher=ckpt/clip_l14 --config.init_from=ckpt/mclip_l14_init \
      --config.multilingual.tokenizer=xlm-roberta-large/sentencepiece.bpe.model \
      --config.data.shards='/data/captions-{00000..00999}.tar'
  # 4. Babel-ImageNet: its own label / prompt files over ImageNet-1k from TFDS:
  python eval.py --config configs/mclip_distill.py --workdir runs/mclip \
      --config.data.tfds.name=imagenet2012 --config.data.tfds.split=validation \
      --config.data.babel_labels=babel_imagenet.json --config.data.babel_prompts=babel_prompts.json \
      --config.data.babel_languages=EN,DE,FR,ZH  # a subset; "" = every language of the file
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "multilingual"
  c.model = "xlm-roberta-large"
  c.dtype = "bfloat16"
  c.multilingual = base.multilingual()
  c.multilingual.teacher = ""  # required
  # required: XLM-R's sentencepiece.bpe.model ("" would be the demo vocabulary)
  c.multilingual.tokenizer = "xlm-roberta-large/sentencepiece.bpe.model"
  c.multilingual.mse_weight = 1.0
  c.multilingual.contrastive_weight = 0.0
  c.batch_size = 512
  c.total_steps = 100_000
  c.warmup_steps = 1000
  c.lr = 5e-5
  c.weight_decay = 0.01
  c.checkpoint_every = 2000
  c.eval_every = 10_000
  c.data.name = "webdataset"
  # The caption languages to draw from (codes as in the shards' KEY.json "captions").
  c.data.languages = "en,de,fr,es,it,pt,nl,pl,ru,uk,tr,ar,fa,hi,bn,zh,ja,ko,vi,id,th,sw"
  c.data.eval_sets = ""
  c.peft.targets = r"^text/blocks/.*/(attn/(qkv|out)_kernel|mlp/fc[12]/kernel)$"
  return c
