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
  "adapter", "top1"}] in metric order."""
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
