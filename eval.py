from zoo import families
from zoo.eval import report
from zoo.train import checkpoints, distributed

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


def _stored_config(source: str):
  """The training config stored with the model in `source`, as a ConfigDict, for evaluation."""
  import ml_collections

  from zoo import errors
  from zoo.train import run_config
  from zoo.weights import model_dir as checkpoint

  if _WORKDIR.value:
    stored = run_config.read_stored(source)
    where = os.path.join(source, run_config.CONFIG_FILE)
  else:
    stored = checkpoint.read_record(source).get("config")
    where = os.path.join(source, checkpoint.CONFIG_FILE)
  if not isinstance(stored, dict) or "data" not in stored or "model" not in stored:
    raise errors.UserError(f"{where} holds no training config (a converted or hand-saved model?); "
                        "pass --config configs/FILE.py to say which data to evaluate on")
  config = ml_collections.ConfigDict(stored)
  if "distributed" in config:
    config.distributed.coordinator_address = ""  # the training job's; ZOO_* still apply
  return config


def _eval_mesh(config):
  """The config's mesh, or all devices on `fsdp` when it does not fit this job's devices."""
  from zoo.models import sharding

  try:
    return sharding.mesh_from_config(config.mesh)
  except ValueError:
    return sharding.make_mesh(data=1, fsdp=-1, tensor=1, expert=1)


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

  from zoo import errors
  from zoo.train import loop
  from zoo.weights import model_dir as checkpoint, pretrained

  sources = [s for s in (_WORKDIR.value, _CHECKPOINT.value, _PRETRAINED.value) if s]
  if len(sources) != 1:
    raise errors.UserError("pass one of --workdir DIR (its latest training checkpoint), "
                        "--checkpoint DIR (a zoo.save directory) or --pretrained NAME/TAG")
  source = sources[0]
  if _PRETRAINED.value:
    if _CONFIG.value is None:
      raise errors.UserError("--pretrained needs --config configs/FILE.py (the eval data; released "
                          "weights carry no training config)")
    distributed.maybe_initialize_distributed(_CONFIG.value)  # before the conversion touches JAX
    source = pretrained.checkpoint_dir(_PRETRAINED.value)  # download + convert once, cached
  if not os.path.isdir(source):
    raise errors.UserError(f"{'--workdir' if _WORKDIR.value else '--checkpoint'} {source}: no such "
                        "directory")
  steps = checkpoints.complete_steps(os.path.join(source, "checkpoints"))
  if _WORKDIR.value and not steps:
    raise errors.UserError(f"--workdir {source} holds no complete checkpoint (under "
                        f"{os.path.join(source, 'checkpoints')}); train first")
  if not _WORKDIR.value:
    checkpoint.read_record(source)  # one-line error for an empty / incomplete directory
  config = _CONFIG.value if _CONFIG.value is not None else _stored_config(source)
  if not _PRETRAINED.value:  # (done above for --pretrained)
    distributed.maybe_initialize_distributed(config)  # before anything touches a JAX backend
  if _WORKDIR.value:
    mesh = _eval_mesh(config)
    model, step = loop.restore_model(config, source, steps[-1], mesh), steps[-1]
    what, model_dir = f"step {step}", None
  else:
    model, _, _ = checkpoint.load(source)
    mesh = _eval_mesh(config)
    step = int(checkpoint.read_record(source).get("step") or 0)
    what, model_dir = f"model {source}" + (f", trained {step} steps" if step else ""), source
    if _PRETRAINED.value:
      what = f"pretrained {_PRETRAINED.value}"
  out_dir = _output_dir(model_dir)
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
