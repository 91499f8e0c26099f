"""Evaluate a zoo model: zero-shot classification, retrieval (and each family's own evals).

python eval.py --workdir runs/demo                 # latest training checkpoint of a workdir
python eval.py --checkpoint runs/demo/model        # a zoo.save() directory
python eval.py --config configs/clip_vit_b16.py --pretrained ViT-B-16/laion2b_s34b_b88k
python eval.py --pretrained ViT-B-16-SigLIP/webli --datasets imagenet1k,mscoco_captions
Both read the config stored with the model; `--config FILE [--config.k=v]` replaces it (the
eval data, e.g. for a converted checkpoint). Metrics go to `--output`/metrics.json (one record
per evaluated step): by default the workdir, DIR-eval beside a --checkpoint DIR, or
runs/eval/NAME for --pretrained (which needs --config, released weights carrying no data
config, unless --datasets names the benchmarks). Text goes through the model's own tokenizer
(the one saved with it) unless the config names one.
Benchmarks by name: `--datasets imagenet1k,cifar10,mscoco_captions` (or --config.eval.datasets;
zoo.data.benchmarks lists them) from `--data_root` / $ZOO_DATA / the Hugging Face cache; their
results also go to benchmarks.jsonl in CLIP_benchmark's format, one table per task.
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
_DATASETS = flags.DEFINE_string(
    "datasets", None, "Benchmarks by name, comma-separated (imagenet1k,cifar10,mscoco_captions, "
    "imagenet1k:it, NAME=DIR): evaluates only these (replaces --config.eval.datasets).")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Where downloaded benchmarks live (default: "
                                 "--config.eval.data_root, else $ZOO_DATA).")
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
  import ml_collections

  from zoo import errors, families
  from zoo.data import eval_sets as eval_data
  from zoo.eval import report, source
  from zoo.families import base
  from zoo.train import loop
  from zoo.weights import model_dir as model_dir_lib

  config = _CONFIG.value
  if config is None and _PRETRAINED.value and _DATASETS.value is not None:
    from configs import base as config_base  # benchmarks by name need no data config

    config = config_base.base_config()
  src = source.open_model(workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value,
                          pretrained=_PRETRAINED.value, config=config)
  config, model, mesh, step, what = src.config, src.model, src.mesh, src.step, src.label
  out_dir = _output_dir(src.model_dir)
  family = families.get(config.get("family", "clip"))
  tokenizer = None
  if src.model_dir and not config.get("tokenizer", ""):  # the model's own (SigLIP: sentencepiece)
    tokenizer = model_dir_lib.load_tokenizer(src.model_dir,
                                             context_length=config.get("context_length") or None)
  if tokenizer is None:
    tokenizer = loop.make_tokenizer(config, model)
  ev = config.get("eval") or {}
  root = _DATA_ROOT.value or ev.get("data_root", "")
  if _DATASETS.value is not None:
    mc = model.config
    eval_sets = eval_data.benchmark_eval_sets(
        _DATASETS.value, data_root=root, split=ev.get("split", "test") or "test",
        size=int(ev.get("size", 0) or 0), image_size=mc.vision.image_size, mean=mc.image_mean,
        std=mc.image_std)
  else:
    if _DATA_ROOT.value and ev.get("datasets"):
      config = ml_collections.ConfigDict(config.to_dict())
      config.eval.data_root = root
    eval_sets = loop.build_eval_sets(config, model, tokenizer)
  if not eval_sets and type(family).evaluate is base.Family.evaluate:
    raise errors.UserError(
        "nothing to evaluate: no eval set is configured; name benchmarks with --datasets "
        "imagenet1k,cifar10,mscoco_captions (or --config.eval.datasets=...), or give data: "
        "--config.data.eval_shards=SHARDS (webdataset retrieval), --config.data.eval_sets=... "
        "(demo), --config.data.tfds.name=NAME")
  metrics = loop.run_eval(model, config, tokenizer, eval_sets, mesh, family)
  if jax.process_index() == 0:
    name = _PRETRAINED.value or ""
    records = report.benchmark_records(
        metrics, eval_sets, model=name.rpartition("/")[0] or str(config.get("model", "")),
        pretrained=name.rpartition("/")[2] or os.path.abspath(src.model_dir or _WORKDIR.value))
    os.makedirs(out_dir, exist_ok=True)
    langs = report.language_records(metrics)  # Babel-style per-language zero-shot
    path = report.append_metrics(out_dir, step, {**metrics, "per_language": langs}
                                 if langs else metrics, merge=bool(_WORKDIR.value))
    done = {f"{n}/" for n, spec in eval_sets.items() if spec.get("benchmark")}
    rest = {k: v for k, v in metrics.items() if not any(k.startswith(d) for d in done)}
    if rest or not records:
      print(report.format_table(rest, title=what))
    if langs:
      print(report.format_language_table(langs, title="per-language zero-shot"))
    if records:
      print(report.format_benchmark_tables(records))
      jsonl = report.write_benchmark_records(out_dir, records, step if _WORKDIR.value else None)
      print(f"benchmark results (CLIP_benchmark format) written to {jsonl}")
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
