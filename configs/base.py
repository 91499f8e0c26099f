"""Keys every training config has, with defaults; experiment files override them."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = "clip"  # clip | long_clip | moe | region | multilingual
  c.model = "demo-tiny"  # a zoo.list_models() name
  c.model_overrides = ml_collections.ConfigDict()  # CLIPConfig fields, e.g. {"quick_gelu": True}
  c.init_from = ""  # a zoo.save() directory to fine-tune from ("" = random init)
  c.tokenizer = ""  # "" = the model's own tokenizer
  c.context_length = 0  # 0 = the model's context length
  c.dtype = "float32"  # compute dtype; "bfloat16" on accelerators. Params stay float32.
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
  c.loss = ml_collections.ConfigDict(dict(impl="reference"))  # reference | xla | pallas

  c.data = ml_collections.ConfigDict(dict(
      name="demo",  # demo | webdataset
      size=20000,  # demo: number of training scenes
      shards="",  # webdataset: glob or comma-separated list of .tar files
      eval_shards="",  # webdataset: retrieval eval shards
      random_resized_crop_scale=(0.9, 1.0),
      random_resized_crop_ratio=(3 / 4, 4 / 3),
      hflip=False,  # off: demo captions name left / right
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
      language_adapters="",  # "AR=dir,SW=dir": zoo.peft adapters used for those languages
      num_threads=2,
      # A TFDS zero-shot eval set ("" name = none); needs `pip install -e ".[tfds]"`.
      tfds=ml_collections.ConfigDict(dict(name="", split="test", data_dir="", size=0,
                                          image_key="image", label_key="label")),
  ))
  # LoRA (zoo.peft): rank > 0 trains only adapters on the kernels matching `targets`.
  c.peft = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="", adapter_from="",
                                          language=""))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="",  # "host:port"; "" = single process (or ZOO_* env variables)
      num_processes=0,
      process_id=-1,
  ))
  return c
