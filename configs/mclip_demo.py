"""Multilingual CLIP on the embedded demo data (CPU, minutes): distill an English CLIP's text
tower into a small XLM-R-style tower on (English, translated) demo captions.

  # an English teacher: any zoo.save directory of a CLIP, e.g. the demo run's export
  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/mclip_demo.py --workdir runs/mclip_demo \
      --config.multilingual.teacher=runs/demo/model
  python eval.py --config configs/mclip_demo.py --workdir runs/mclip_demo   # per-language table

  # a language-specific LoRA adapter for Arabic (held out of the distillation above):
  python train.py --config configs/mclip_demo.py --workdir runs/mclip_ar \
      --config.multilingual.teacher=runs/demo/model --config.init_from=runs/mclip_demo/model \
      --config.data.languages=ar --config.peft.rank=8 --config.peft.language=ar \
      --config.total_steps=300 --config.lr=1e-3
  python eval.py --config configs/mclip_demo.py --checkpoint runs/mclip_demo/model \
      --config.multilingual.teacher=runs/demo/model --config.data.language_adapters=AR=runs/mclip_ar/adapter

Only the student text tower trains (image tower, temperature and teacher frozen); the batch is
text only (`ml_tokens`: the caption in a language drawn per sample, `ml_en_tokens`: the
English caption for the teacher). bench/multilingual_demo.py runs all of this end to end.
"""

from configs import base


def get_config():
  c = base.base_config()
  c.family = "multilingual"
  c.model = "xlmr-demo"  # the student text tower (zoo.models.multilingual.list_text_models())
  c.context_length = 32  # demo captions are short (both towers read up to 77)
  c.multilingual = base.multilingual()
  c.multilingual.teacher = ""  # required: zoo.save directory of the English CLIP
  c.multilingual.mse_weight = 1.0
  c.multilingual.contrastive_weight = 0.1
  c.batch_size = 128
  c.total_steps = 1000
  c.warmup_steps = 50
  c.lr = 1e-3
  c.weight_decay = 0.01
  c.checkpoint_every = 500
  c.eval_every = 500
  c.log_every = 20
  c.data.size = 20000
  c.data.eval_size = 480
  # Distill on 7 demo languages; Arabic is held out (the low-resource stand-in for LoRA).
  c.data.languages = "en,de,fr,es,ru,zh,ja"
  c.data.eval_sets = "zeroshot,multilingual"
  c.peft.targets = r"^text/blocks/.*/(attn/(qkv|out)_kernel|mlp/fc[12]/kernel)$,^text/proj/kernel$"
  c.peft.alpha = 16.0
  return c
