"""Evaluate a zoo model: zero-shot classification, retrieval (and each family's own evals).

python eval.py --config configs/demo.py --workdir runs/demo     # latest training checkpoint
python eval.py --config configs/demo.py --checkpoint DIR        # a zoo.save() directory
python eval.py --config configs/clip_vit_b16.py --pretrained ViT-B-16/laion2b_s34b_b88k
Writes DIR/metrics.json (one record per evaluated step) and prints a table.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (evaluates its latest checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A zoo.save() directory to evaluate.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "Released weights, NAME/TAG or hf-hub:ORG/REPO.")
flags.mark_flag_as_required("config")


def main(argv):
  del argv
  import os

  import jax

  from zoo import eval_lib, pretrained, train_lib

  config = _CONFIG.value
  if not (_WORKDIR.value or _CHECKPOINT.value or _PRETRAINED.value):
    raise app.UsageError("pass --workdir (latest training checkpoint), --checkpoint DIR or "
                         "--pretrained NAME/TAG")
  train_lib.maybe_initialize_distributed(config)
  ckpt = _CHECKPOINT.value or (pretrained.checkpoint_dir(_PRETRAINED.value)
                               if _PRETRAINED.value else None)
  model, step, out_dir = train_lib.load_for_eval(config, workdir=_WORKDIR.value, checkpoint=ckpt)
  family = train_lib.get_family(config.get("family", "clip"))
  tokenizer = train_lib.make_tokenizer(config, model)
  eval_sets = train_lib.build_eval_sets(config, model, tokenizer)
  mesh = train_lib.sharding.mesh_from_config(config.mesh)
  metrics = train_lib.run_eval(model, config, tokenizer, eval_sets, mesh, family)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    records = eval_lib.language_records(metrics)  # Babel-style per-language zero-shot
    eval_lib.append_metrics(out_dir, step, {**metrics, "per_language": records} if records else metrics)
    print(eval_lib.format_table(metrics))
    if records:
      print(eval_lib.format_language_table(records, title="per-language zero-shot"))
    print(f"metrics written to {os.path.join(out_dir, 'metrics.json')} (step {step})")


if __name__ == "__main__":
  from zoo.config_utils import parse_flags

  app.run(main, flags_parser=parse_flags)
