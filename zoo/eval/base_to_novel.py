"""The base-to-novel table of prompt learning over many runs: python -m zoo.eval.base_to_novel.

python -m zoo.eval.base_to_novel RUN [RUN ...] [--json OUT]

Each RUN is a workdir (or an eval.py output directory) whose metrics.json holds the prompt
family's `DATASET/base_accuracy` and `DATASET/novel_accuracy`; its last record with them is read.
The runs of one dataset (its seeds) are averaged; per dataset the table gives the mean base and
novel accuracy and their harmonic mean, and an `average` row over the datasets does the same
with the datasets' means, as CoCoOp and MaPLe report the 11-dataset x 3-seed protocol.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from zoo import errors
from zoo.eval import report
from zoo.families.prompt import harmonic_mean

BASE, NOVEL = "base_accuracy", "novel_accuracy"


def run_results(run: str) -> dict[str, tuple[float, float]]:
  """{dataset: (base, novel)} of the last metrics.json record of `run` that has them."""
  if not os.path.isdir(run):
    raise errors.UserError(f"{run}: no such directory (a workdir or eval output with "
                           f"{report.METRICS_FILE})")
  for record in reversed(report.read_metrics(run)):
    out = {key[:-len(BASE) - 1]: (float(v), float(record[key[:-len(BASE)] + NOVEL]))
           for key, v in record.items()
           if key.endswith("/" + BASE) and key[:-len(BASE)] + NOVEL in record}
    if out:
      return out
  raise errors.UserError(f"{run}/{report.METRICS_FILE}: no DATASET/{BASE} and DATASET/{NOVEL} "
                         "(a prompt-family run evaluated with data.subsample=base)")


def table(runs: Sequence[str]) -> list[dict[str, Any]]:
  """Rows {dataset, runs, base, novel, hm} sorted by dataset, then the `average` row."""
  per_dataset: dict[str, list[tuple[float, float]]] = {}
  for run in runs:
    for dataset, pair in run_results(run).items():
      per_dataset.setdefault(dataset, []).append(pair)
  rows = []
  for dataset in sorted(per_dataset):
    pairs = per_dataset[dataset]
    base = sum(b for b, _ in pairs) / len(pairs)
    novel = sum(n for _, n in pairs) / len(pairs)
    rows.append({"dataset": dataset, "runs": len(pairs), "base": base, "novel": novel,
                 "hm": harmonic_mean(base, novel)})
  base = sum(r["base"] for r in rows) / len(rows)
  novel = sum(r["novel"] for r in rows) / len(rows)
  rows.append({"dataset": "average", "runs": sum(r["runs"] for r in rows), "base": base,
               "novel": novel, "hm": harmonic_mean(base, novel)})
  return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
  width = max(len(r["dataset"]) for r in rows)
  lines = [f"{'dataset':<{width}} {'runs':>4} {'base':>6} {'novel':>6} {'HM':>6}"]
  lines += [f"{r['dataset']:<{width}} {r['runs']:>4} {100 * r['base']:>6.2f} "
            f"{100 * r['novel']:>6.2f} {100 * r['hm']:>6.2f}" for r in rows]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = errors.ArgumentParser(prog="python -m zoo.eval.base_to_novel",
                            description=__doc__.splitlines()[0])
  p.add_argument("runs", nargs="+", help="workdirs / eval outputs with metrics.json")
  p.add_argument("--json", default=None, help="also write the rows (fractions) to this file")
  args = p.parse_args(argv)
  rows = table(args.runs)
  print(format_rows(rows))
  if args.json:
    with open(args.json + ".tmp", "w") as f:
      json.dump(rows, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
  return 0


if __name__ == "__main__":
  sys.exit(errors.run(main, prog="python -m zoo.eval.base_to_novel"))
