"""Keys every training config has, with defaults; experiment files override them.

Pure data: configs import only this module and ml_collections (this module reads the
family and LoRA defaults from zoo, where they are defined once). "auto" values (dtype,
loss.impl) are resolved by the train loop for the backend it runs on. The family sections
(`long_clip()`, `moe()`, `region()`, `multilingual()`, `distill()`) are read from each
family's `Settings` in zoo/families, the one copy of their defaults.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = "clip"  # clip | long_clip | moe | region | multilingual
  c.model = "demo-tiny"  # a zoo.list_models() name
  c.model_overrides = ml_collections.ConfigDict()  # CLIPConfig fields, e.g. {"quick_gelu": True}
  c.init_from = ""  # a zoo.save() directory to fine-tune from ("" = random init)
  c.tokenizer = ""  # "" = the model's own tokenizer
  c.context_length = 0  # 0 = the model's context length
  c.dtype = "auto"  # compute dtype: auto = float32 on CPU, bfloat16 on accelerators; params fp32
  c.remat = "none"  # gradient checkpointing of each residual block: none | block | full
  # batch-norm statistics of ResNet / MobileCLIP towers: frozen (running statistics, never
  # updated) | update (torch's train mode: batch statistics, running ones updated and saved)
  c.batch_norm = "frozen"
  c.seed = 0

  c.batch_size = 128  # global, over all hosts and devices
  c.grad_accum = 1  # micro-batches per step (negatives are per micro-batch)
  c.total_steps = 1000
  c.warmup_steps = 100
  c.lr = 5e-4
  c.end_lr = 0.0
  c.b1 = 0.9
  c.b2 = 0.98
  c.eps = 1e-6
  c.weight_decay = 0.2  # not on biases, norms, embeddings, logit scale/bias
  c.grad_clip = 1.0  # global norm; 0 = off
  c.max_logit_scale = 100.0

  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.eval_every = 500  # 0 = no evaluation during training
  c.log_every = 10
  # On resume with a changed config: "check" refuses, "continue" trains on with the new
  # values, "restart" starts a new run (the old one moves to workdir/previous/<n>).
  c.resume_policy = "check"

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  # auto (xla on CPU, pallas on accelerators) | reference | xla | pallas
  # label_smoothing: softmax CE target 1 - eps on the pair, eps / (B - 1) on each negative;
  # schedule constant | linear | cosine: eps decays to label_smoothing_end over total_steps
  c.loss = ml_collections.ConfigDict(dict(impl="auto", label_smoothing=0.0,
                                          label_smoothing_end=0.0,
                                          label_smoothing_schedule="constant"))

  c.data = ml_collections.ConfigDict(dict(
      name="demo",  # demo | webdataset
      size=20000,  # demo: number of training scenes
      shards="",  # webdataset: glob or comma-separated list of .tar files
      eval_shards="",  # webdataset: retrieval eval shards
      random_resized_crop_scale=(0.9, 1.0),
      random_resized_crop_ratio=(3 / 4, 4 / 3),
      hflip=False,  # off: demo captions name left / right
      captions="random",  # random: one of KEY.txt, KEY.txt_1, ... per step (seeded) | first
      max_regions=4,  # boxes per sample (region heads)
      min_box_visible=0.5,  # a box keeps this fraction inside the crop or is dropped
      languages="",  # multilingual: comma-separated codes ("" = the demo's 8)
      render_size=0,  # demo: render scenes at this size (0 = the model's image size)
      eval_size=1000,
      eval_sets="zeroshot,retrieval",  # demo: + retrieval_long, regions, multilingual
      # Babel-ImageNet files, unchanged ({"DE": [[indices], [names]]}, {"DE": ["...{}..."]}):
      # per-language zero-shot on the demo's images or the data.tfds set (e.g. imagenet2012).
      babel_labels="",
      babel_prompts="",
      babel_languages="",  # "DE,FR,...": Babel per-language eval only for these ("" = all)
      babel_en="auto",  # English as Babel's paper: openai (OpenAI ImageNet names + 80 templates)
      # | file (the label file's EN) | auto (openai when the classes index ImageNet-1k)
      language_adapters="",  # "AR=dir,SW=dir": zoo.models.lora adapters used for those languages
      num_threads=2,
      # > 0: that many grain worker processes (each with num_threads threads) load the samples;
      # the same batches and resumable state as threads alone (docs/data.md).
      worker_processes=0,
      image_dtype="float32",  # uint8: pixels batched and moved as bytes, normalized on device
      # host: PIL resizes each crop (torchvision's bytes); device (with image_dtype uint8): the
      # host only decodes and crops into a resize_canvas-sided uint8 canvas (0: max(512, twice
      # the image size); a larger crop is resized on the host) and the train step resizes.
      resize="host",
      resize_canvas=0,
      # WebDataset JPEGs decoded at 1/2, 1/4 or 1/8 size when the crop keeps >= image_size
      # pixels a side (libjpeg's DCT scaling: faster, changes pixels; docs/data.md)
      jpeg_draft=False,
      # Text-length trimming (causal CLIP text towers only): each batch's tokens cut to the
      # smallest of these lengths holding its longest caption, e.g. "16,32,48,77" | auto | "" (off)
      text_lengths="",
      # A TFDS zero-shot eval set ("" name = none); needs `pip install -e ".[tfds]"`.
      tfds=ml_collections.ConfigDict(dict(name="", split="test", data_dir="", size=0,
                                          image_key="image", label_key="label")),
  ))
  # Benchmarks by name (zoo.data.benchmarks): "imagenet1k,cifar10,mscoco_captions,imagenet1k:it"
  # (NAME=DIR or NAME=hf-hub:ORG/REPO for one set's own copy), read from data_root (default
  # $ZOO_DATA) or the Hugging Face cache; size > 0: only the first `size` images of each.
  c.eval = ml_collections.ConfigDict(dict(datasets="", data_root="", split="test", size=0))
  # LoRA (zoo.models.lora): rank > 0 trains only adapters on the kernels matching `targets`;
  # the defaults are zoo.weights.adapters.default_settings (their one copy).
  from zoo.weights import adapters

  c.peft = adapters.default_settings()
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="",  # "host:port"; "" = single process (or ZOO_* env variables)
      num_processes=0,
      process_id=-1,
  ))
  return c


def tower_demo(model: str, overrides: dict, tokenizer: str = "") -> ml_collections.ConfigDict:
  """A family's demo run: `model` narrowed by `overrides` (model_overrides), trained from scratch
  on the embedded demo data for 300 steps of 64 at 32 tokens (the per-family configs/*_demo.py
  share this schedule); `tokenizer` "clip" stands in for a hub vocabulary offline."""
  c = base_config()
  c.model = model
  c.model_overrides = ml_collections.ConfigDict(overrides)
  if tokenizer:
    c.tokenizer = tokenizer
  c.context_length = 32
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.checkpoint_every = 100
  c.eval_every = 150
  c.log_every = 10
  c.data.size = 20000
  c.data.eval_size = 480
  c.data.image_dtype = "uint8"
  return c


def long_clip() -> ml_collections.ConfigDict:
  """`config.long_clip`: the defaults of zoo.families.long_clip.Settings (their one copy)."""
  from zoo.families import long_clip

  return long_clip.default_settings()


def moe() -> ml_collections.ConfigDict:
  """`config.moe` with `config.moe.dmu`: the defaults of zoo.families.moe Settings / DMUSettings."""
  from zoo.families.moe import family as moe_family

  return moe_family.default_settings()


def region() -> ml_collections.ConfigDict:
  """`config.region`: the defaults of zoo.families.region.Settings."""
  from zoo.families.region import family as region_family

  return region_family.default_settings()


def multilingual() -> ml_collections.ConfigDict:
  """`config.multilingual`: the defaults of zoo.families.multilingual.Settings."""
  from zoo.families import multilingual

  return multilingual.default_settings()


def vit_s16_student() -> ml_collections.ConfigDict:
  """`config.model_overrides` turning ViT-B-16 into a ViT-S/16-sized CLIP (width 384, 6 heads,
  12 layers in both towers, 384-d embedding): the student of the B/16 distillation recipes."""
  return ml_collections.ConfigDict(dict(
      embed_dim=384, vision=dict(width=384, heads=6, layers=12),
      text=dict(width=384, heads=6, layers=12)))


def distill() -> ml_collections.ConfigDict:
  """`config.distill`: the defaults of zoo.families.distill.Settings."""
  from zoo.families import distill

  return distill.default_settings()


def llm2clip() -> ml_collections.ConfigDict:
  """`config.llm2clip`: the defaults of zoo.families.llm2clip.Settings."""
  from zoo.families import llm2clip

  return llm2clip.default_settings()


def prompt() -> ml_collections.ConfigDict:
  """`config.prompt`: the defaults of zoo.families.prompt.Settings (CoOp / CoCoOp / MaPLe)."""
  from zoo.families import prompt as prompt_family

  return prompt_family.default_settings()


def coca() -> ml_collections.ConfigDict:
  """`config.coca`: the defaults of zoo.families.coca.Settings (CoCa's loss weights)."""
  from zoo.families import coca as coca_family

  return coca_family.default_settings()


def naflex() -> ml_collections.ConfigDict:
  """`config.naflex`: the defaults of zoo.families.naflex.Settings (SigLIP 2 NaFlex)."""
  from zoo.families import naflex as naflex_family

  return naflex_family.default_settings()


def fewshot_data() -> dict:
  """The `config.data` keys of few-shot data (`data.name="fewshot"`, zoo.data.fewshot's defaults)."""
  from zoo.families import prompt as prompt_family

  return prompt_family.data_defaults()
