"""Eval results on disk and on screen: `workdir/metrics.json` (one strict-JSON record per step,
written atomically: `append_metrics` / `read_metrics`), the metric table (`format_table`, rich
when installed) and the per-language zero-shot table (`language_records`,
`format_language_table`)."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

METRICS_FILE = "metrics.json"


def language_records(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Per-language records from `evaluate`'s flat metrics of babel_zeroshot sets:
  [{"set", "language", "prompts" ('translated' | 'english'), "num_classes", "num_images",
  "adapter", "top1"}] in metric order, plus "language_token" for NLLB tokenizers."""
  records: dict[tuple[str, str], dict[str, Any]] = {}
  for key, value in metrics.items():
    parts = key.split("/")
    if len(parts) != 3 or parts[2] != "translated_prompts":
      continue
    name, lang = parts[0], parts[1]
    get = lambda m: metrics.get(f"{name}/{lang}/{m}")  # noqa: E731
    records[(name, lang)] = {
        "set": name, "language": lang, "prompts": "translated" if value else "english",
        "num_classes": int(get("num_classes")), "num_images": int(get("num_images")),
        "adapter": bool(get("adapter")),
        "top1": None if get("top1") is None else float(get("top1"))}
    if get("language_token") is not None:  # NLLB: the language's own source token was set
      records[(name, lang)]["language_token"] = bool(get("language_token"))
  return list(records.values())


def format_language_table(records: Sequence[Mapping[str, Any]], *, title: str | None = None) -> str:
  """A plain-text per-language table (set, language, prompts, classes, images, top-1)."""
  head = (f"{'set':<14} {'language':<8} {'prompts':<10} {'adapter':<7} {'classes':>7} "
          f"{'images':>7} {'top1':>7}")
  lines = ([title] if title else []) + [head, "-" * len(head)]
  for r in records:
    top1 = "-" if r["top1"] is None else f"{r['top1']:.4f}"
    lines.append(f"{r['set']:<14} {r['language']:<8} {r['prompts']:<10} "
                 f"{'yes' if r.get('adapter') else 'no':<7} {r['num_classes']:>7} "
                 f"{r['num_images']:>7} {top1:>7}")
  return "\n".join(lines)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of `workdir/metrics.json`, sorted by step ([] when the file does not exist)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    try:
      records = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}); move it away to start a new metrics file") from e
  if not isinstance(records, list) or not all(isinstance(r, dict) and "step" in r for r in records):
    raise ValueError(f"{path}: expected a JSON list of records with a 'step' key")
  return records


def _jsonable(value: Any) -> Any:
  """Plain python; a non-finite float becomes None (metrics.json stays strict JSON)."""
  if isinstance(value, (np.generic, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def append_metrics(workdir: str | os.PathLike, step: int, metrics: Mapping[str, Any], *,
                   merge: bool = False) -> str:
  """Writes `{"step": step, **metrics}` into `workdir/metrics.json` atomically; returns the path.

  One record per step, sorted by step: re-evaluating a step replaces its record (or, with
  `merge=True`, updates it with the new keys). Call from one process only (process 0).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, METRICS_FILE)
  step = int(step)
  new = {k: _jsonable(v) for k, v in metrics.items()}
  if "step" in new:
    raise ValueError("metrics must not contain a 'step' key; pass the step separately")
  records = {int(r["step"]): r for r in read_metrics(workdir)}
  record = {**records[step], **new} if merge and step in records else {"step": step, **new}
  record["step"] = step
  records[step] = record
  payload = json.dumps([records[s] for s in sorted(records)], indent=1)
  fd, tmp = tempfile.mkstemp(prefix=f".{METRICS_FILE}.", suffix=".tmp", dir=workdir)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a metrics file is for everyone
    with os.fdopen(fd, "w") as f:
      f.write(payload + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def format_table(metrics: Mapping[str, Any], *, title: str | None = None) -> str:
  """A two-column (metric, value) text table, rendered with rich."""
  rows = [(k, f"{float(v):.4f}" if isinstance(v, (int, float, np.number)) else str(v))
          for k, v in metrics.items()]
  table = Table(title=title)
  table.add_column("metric")
  table.add_column("value", justify="right")
  for k, v in rows:
    table.add_row(k, v)
  buf = io.StringIO()
  Console(file=buf, width=120, color_system=None, force_terminal=False).print(table)
  return buf.getvalue().rstrip("\n")


# ----------------------------------------------------------------------------- benchmarks

BENCHMARK_FILE = "benchmarks.jsonl"
# zoo metric -> CLIP_benchmark's name (zero-shot classification); retrieval names are the same.
_CB_NAMES = {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"}


def benchmark_records(metrics: Mapping[str, Any], eval_sets: Mapping[str, Mapping[str, Any]], *,
                      model: str, pretrained: str) -> list[dict[str, Any]]:
  """CLIP_benchmark's result records ({"dataset", "model", "pretrained", "task", "metrics",
  "language"}) of the eval sets that are benchmarks by name, in their order. As CLIP_benchmark:
  acc5 is None (its NaN) for fewer than 5 classes; `num_images` rides along outside metrics."""
  out = []
  for name, spec in eval_sets.items():
    meta = spec.get("benchmark") if isinstance(spec, Mapping) else None
    if not meta:
      continue
    got = {k[len(name) + 1:]: v for k, v in metrics.items() if k.startswith(name + "/")}
    if meta["task"] == "zeroshot_classification":
      vals = {_CB_NAMES[k]: got[k] for k in _CB_NAMES if k in got}
      if len(spec.get("class_names", ())) < 5:
        vals["acc5"] = None
    else:
      vals = {k: v for k, v in got.items() if "recall@" in k}
    out.append({"dataset": meta["dataset"], "model": model, "pretrained": pretrained,
                "task": meta["task"], "metrics": {k: _jsonable(v) for k, v in vals.items()},
                "language": meta["language"], "num_images": int(got.get("num_images", 0))})
  return out


def write_benchmark_records(out_dir: str | os.PathLike, records: Sequence[Mapping[str, Any]],
                            step: int | None = None) -> str:
  """Appends the records (one JSON object per line; with "step" when given) to
  out_dir/benchmarks.jsonl; returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, BENCHMARK_FILE)
  with open(path, "a", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps({**r, **({} if step is None else {"step": int(step)})},
                         ensure_ascii=False) + "\n")
  return path


def format_benchmark_tables(records: Sequence[Mapping[str, Any]]) -> str:
  """One table per task (a row per dataset/language, CLIP_benchmark's metric names) and an
  "average" row (the mean over the datasets; None values left out) when several ran."""
  tables = []
  for task in dict.fromkeys(r["task"] for r in records):
    rows = [r for r in records if r["task"] == task]
    cols = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    table = Table(title=task)
    for c in ["dataset", "language", "images", *cols]:  # image_retrieval_recall@5 -> image R@5
      table.add_column(c.replace("_retrieval_recall", " R"),
                       justify="left" if c in ("dataset", "language") else "right")
    fmt = lambda v: "-" if v is None else f"{float(v):.4f}"  # noqa: E731
    for r in rows:
      table.add_row(r["dataset"], r["language"], str(r.get("num_images", "")),
                    *[fmt(r["metrics"].get(c)) for c in cols])
    if len(rows) > 1:
      means = []
      for c in cols:
        vals = [r["metrics"][c] for r in rows if r["metrics"].get(c) is not None]
        means.append(fmt(np.mean(vals)) if vals else "-")
      table.add_row("average", "", str(sum(int(r.get("num_images", 0)) for r in rows)), *means)
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None, force_terminal=False).print(table)
    tables.append(buf.getvalue().rstrip("\n"))
  return "\n".join(tables)
