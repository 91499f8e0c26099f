"""Evaluate a zoo model: zero-shot classification, retrieval (and each family's own evals).

python eval.py --workdir runs/demo                 # latest training checkpoint of a workdir
python eval.py --checkpoint runs/demo/model        # a zoo.save() directory
python eval.py --config configs/clip_vit_b16.py --pretrained ViT-B-16/laion2b_s34b_b88k
Both read the config stored with the model; `--config FILE [--config.k=v]` replaces it (the
eval data, e.g. for a converted checkpoint). Metrics go to `--output`/metrics.json (one record
per evaluated step): by default the workdir, DIR-eval beside a --checkpoint DIR, or
runs/eval/NAME for --pretrained (which needs --config: released weights carry no data config).
"""

import os
import re

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file (default: the config stored with the model).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (evaluates its latest checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A zoo.save() directory to evaluate.")
_PRETRAINED = flags.DEFINE_string("pretrained", None,
                                  "Released weights to evaluate: NAME/TAG or hf-hub:ORG/REPO.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for metrics.json (default: the workdir, "
                              "or DIR-eval beside --checkpoint DIR).")


def _output_dir(model_dir: str | None) -> str:
  from zoo import errors

  if _OUTPUT.value:
    out = _OUTPUT.value
  elif _WORKDIR.value:
    out = _WORKDIR.value
  elif _PRETRAINED.value:
    out = os.path.join("runs", "eval", re.sub(r"[^A-Za-z0-9._-]+", "_", _PRETRAINED.value))
  else:
    out = os.path.normpath(model_dir) + "-eval"
  if model_dir and os.path.commonpath([os.path.abspath(out), os.path.abspath(model_dir)]) == \
      os.path.abspath(model_dir):
    raise errors.UserError(f"--output {out} is inside the model directory {model_dir}; pick "
                        "another folder")
  return out


def evaluate() -> None:
  import jax

  from zoo import families
  from zoo.eval import report, source
  from zoo.train import loop

  src = source.open_model(workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value,
                          pretrained=_PRETRAINED.value, config=_CONFIG.value)
  config, model, mesh, step, what = src.config, src.model, src.mesh, src.step, src.label
  out_dir = _output_dir(src.model_dir)
  family = families.get(config.get("family", "clip"))
  tokenizer = loop.make_tokenizer(config, model)
  eval_sets = loop.build_eval_sets(config, model, tokenizer)
  metrics = loop.run_eval(model, config, tokenizer, eval_sets, mesh, family)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    records = report.language_records(metrics)  # Babel-style per-language zero-shot
    path = report.append_metrics(out_dir, step, {**metrics, "per_language": records}
                                   if records else metrics, merge=bool(_WORKDIR.value))
    print(report.format_table(metrics, title=what))
    if records:
      print(report.format_language_table(records, title="per-language zero-shot"))
    print(f"metrics written to {path} ({what})")


def main(argv):
  del argv
  from zoo import errors
  from zoo.train import host_memory

  errors.quiet_logging()
  host_memory.retain_freed_memory()  # before JAX's first step: no per-step page faults
  errors.run(evaluate, prog="eval.py")


if __name__ == "__main__":
  from zoo.train.config_files import parse_flags

  app.run(main, flags_parser=parse_flags)
