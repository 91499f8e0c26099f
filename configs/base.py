"""Keys every training config has, with defaults; experiment files override them.

Pure data: configs import only this module and ml_collections. "auto" values (dtype,
loss.impl) are resolved by the train loop for the backend it runs on. The family sections
(`long_clip()`, `moe()`, `region()`, `multilingual()`) equal the defaults of each family's
`Settings` in zoo/families (a test checks it).
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
      # A TFDS zero-shot eval set ("" name = none); needs `pip install -e ".[tfds]"`.
      tfds=ml_collections.ConfigDict(dict(name="", split="test", data_dir="", size=0,
                                          image_key="image", label_key="label")),
  ))
  # LoRA (zoo.models.lora): rank > 0 trains only adapters on the kernels matching `targets`.
  c.peft = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="", adapter_from="",
                                          language=""))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="",  # "host:port"; "" = single process (or ZOO_* env variables)
      num_processes=0,
      process_id=-1,
  ))
  return c


def long_clip() -> ml_collections.ConfigDict:
  """`config.long_clip` (zoo.families.long_clip.Settings): Long-CLIP's numbers."""
  return ml_collections.ConfigDict(dict(
      context_length=248,  # text positions after stretching
      keep=20,  # leading positions kept bit-identical (and frozen)
      components=32,  # principal components of the coarse image feature
      short_weight=1.0,  # weight of the coarse-image <-> short-caption term
      renormalize_coarse=False,  # Long-CLIP uses the PCA reconstruction as is
      freeze_kept_positions=True,  # no gradient into positions [0, keep)
  ))


def moe() -> ml_collections.ConfigDict:
  """`config.moe` (zoo.families.moe.Settings) with `config.moe.dmu` (DMUSettings)."""
  c = ml_collections.ConfigDict(dict(
      num_experts=4,
      top_k=2,
      capacity_factor=1.25,  # only with dropless=False, in training steps
      dropless=True,  # False: capacity routing in training; evaluation is always dropless
      normalize_gates=True,
      layers="every_other",  # all | every_other | last:N | none | 1,3 | "vision:SPEC;text:SPEC"
      router_init_std=0.02,
      balance_weight=0.01,  # load-balancing loss weight
      z_weight=0.001,  # router z-loss weight
      mode="moe",  # moe | dense_ffn (a DMU stage: dense model, FFNs trained)
      trainable="all",  # all | router | moe (router + experts) | ffn (every FFN, dense or MoE)
      expert_checkpoints="",  # comma-separated zoo.save dirs, one dense model per expert (DMU)
      cross_cluster_weight=0.0,  # for batches with a `cluster` field (DMU stages)
  ))
  c.dmu = ml_collections.ConfigDict(dict(
      stages=0,  # FFN copies fine-tuned by the DMU driver (= experts); 0 = plain MoE run
      steps_per_stage=1000,
      lr=1e-5,  # stage fine-tuning learning rate
      clusters=4,  # k-means clusters per stage (stage s >= 2 uses the joint labels so far)
      kmeans_samples=4096,  # samples whose features are clustered at each stage
      kmeans_iters=50,
      cluster_on="both",  # image | text | both (concatenated normalized features)
      cross_cluster_weight=0.0,  # weight of cross-cluster negatives in stage losses
      init="base",  # each stage starts from: base (the dense model) | previous (stage s-1)
  ))
  return c


def region() -> ml_collections.ConfigDict:
  """`config.region` (zoo.families.region.Settings)."""
  return ml_collections.ConfigDict(dict(
      image_text_weight=1.0,  # CLIP / SigLIP image-text loss
      region_weight=1.0,  # region <-> region-caption contrastive loss
      same_caption_positive=True,  # identical region captions are positives, not negatives
      grounding_weight=0.0,  # > 0: build the grounding head, add text -> box regression
      grounding_l1=1.0,
      grounding_giou=1.0,
      tic_weight=0.0,  # > 0: FG-CLIP 2's textual intra-modal contrastive term
      trainable="all",  # all | region (prompter / grounding head only)
      # region head architecture (RegionConfig) when not fine-tuning a RegionCLIP checkpoint
      roi_size=4,
      sampling_ratio=0,
      width=0,
      heads=0,
      layers=1,
      mlp_ratio=4.0,
      box_frequencies=8,
      residual_pool=True,
  ))


def multilingual() -> ml_collections.ConfigDict:
  """`config.multilingual` (zoo.families.multilingual.Settings)."""
  return ml_collections.ConfigDict(dict(
      teacher="",  # zoo.save directory of the English CLIP (required)
      tokenizer="",  # the student's sentencepiece .model (XLM-R ids); "" = the demo vocabulary
      mse_weight=1.0,  # M-CLIP: MSE between student and teacher embeddings
      contrastive_weight=0.0,  # text-text InfoNCE, student(translation) vs teacher(English)
      contrastive_scale=20.0,  # its fixed logit scale (inverse temperature)
      train="text",  # text (the whole student text tower) | text_projection
  ))


def vit_s16_student() -> ml_collections.ConfigDict:
  """`config.model_overrides` turning ViT-B-16 into a ViT-S/16-sized CLIP (width 384, 6 heads,
  12 layers in both towers, 384-d embedding): the student of the B/16 distillation recipes."""
  return ml_collections.ConfigDict(dict(
      embed_dim=384, vision=dict(width=384, heads=6, layers=12),
      text=dict(width=384, heads=6, layers=12)))


def distill() -> ml_collections.ConfigDict:
  """`config.distill` (zoo.families.distill.Settings)."""
  return ml_collections.ConfigDict(dict(
      teacher="",  # zoo.save directory of the teacher CLIP (required)
      image_feature_weight=1.0,  # image tower: student (through its head) vs teacher
      text_feature_weight=1.0,  # text tower: the same
      feature_loss="cosine",  # cosine (mean 1 - cos) | mse (mean squared error, normalized)
      logit_weight=1.0,  # KL(teacher || student) of the batch softmaxes, both directions
      contrastive_weight=1.0,  # the student's own CLIP loss
      block_size=256,  # rows per block of the logit distillation (impl xla / pallas)
      # the teacher's embeddings come from the shards (KEY.teacher_{image,text,scale}.npy,
      # python -m zoo.data.embed_cache); `teacher` then only supplies the teacher's config
      teacher_cache=False,
  ))
