"""Every command a user can run: with a missing input it fails (non-zero, one line naming the
input), never exits 0 having done nothing; modules with a `main` are runnable (a __main__
guard), and the removed 0.1.0 command modules are gone rather than silent."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

from tests import cli_run, source_ast

ROOT = pathlib.Path(__file__).resolve().parents[1]

MISSING = "/nonexistent/zoo-input"
COMMANDS = {
    "train.py": ["train.py", "--config", f"{MISSING}.py", "--workdir", "{tmp}/w"],
    "eval.py --checkpoint": ["eval.py", "--checkpoint", MISSING],
    "eval.py --workdir": ["eval.py", "--workdir", MISSING],
    "zoo.convert from-open-clip": ["-m", "zoo.convert", "from-open-clip", "--model", "ViT-B-32",
                                   "--input", f"{MISSING}.safetensors", "--output", "{tmp}/o"],
    "zoo.convert from-long-clip": ["-m", "zoo.convert", "from-long-clip", "--input", MISSING,
                                   "--output", "{tmp}/o"],
    "zoo.convert from-clip-moe": ["-m", "zoo.convert", "from-clip-moe", "--input", MISSING,
                                  "--output", "{tmp}/o"],
    "zoo.convert push": ["-m", "zoo.convert", "push", "--input", MISSING, "--repo", "a/b",
                         "--dry-run"],
    "zoo.data.embed_cache": ["-m", "zoo.data.embed_cache", "--model", MISSING, "--shards",
                             f"{MISSING}/*.tar", "--out", "{tmp}/c"],
}
REMOVED = ["zoo.long_clip", "zoo.moe", "zoo.region", "zoo.multilingual"]


def test_missing_input_fails_with_one_line(tmp_path):
  """All commands at once (each in its own process, started together: one import cost)."""
  procs = {name: cli_run.popen(*[a.format(tmp=tmp_path) for a in args])
           for name, args in COMMANDS.items()}
  procs.update({f"-m {m}": cli_run.popen("-m", m, "from-long-clip", "--input", MISSING,
                                         "--output", str(tmp_path / "x")) for m in REMOVED})
  failures = []
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    lines = cli_run.lines(err)
    if proc.returncode == 0 or not lines:
      failures.append(f"{name}: exit {proc.returncode}, stderr {err[-300:]!r}")
    elif name in [n for n in COMMANDS] and (proc.returncode != 2 or len(lines) != 1
                                            or "zoo-input" not in lines[0]):
      failures.append(f"{name}: exit {proc.returncode}, stderr lines {lines[:4]}")
  assert not failures, "\n".join(failures)
  assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def _defines_main_without_guard(path: pathlib.Path) -> bool:
  tree = source_ast.parse(path)
  has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
  guarded = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
  return has_main and not guarded


@pytest.mark.parametrize("package", ["zoo", "kernels"])
def test_modules_with_main_are_runnable(package):
  """A module with a top-level `main` runs it under `python -m` (no silent exit 0)."""
  bad = [str(p.relative_to(ROOT)) for p in sorted((ROOT / package).rglob("*.py"))
         if _defines_main_without_guard(p)]
  assert not bad, bad


def test_documented_command_modules_have_help():
  """`python -m zoo.convert --help` and `python -m zoo.data.embed_cache --help` print usage."""
  for module in ("zoo.convert", "zoo.data.embed_cache"):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=cli_run.env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), (module, r.stderr[-500:])


def test_pretrained_without_network_fails_fast_in_one_line(tmp_path):
  """No network and no HF_HUB_OFFLINE: one error naming HF_HUB_OFFLINE=1 and local files, without
  huggingface_hub's retries (its endpoint here is a closed local port) or repeated warnings."""
  code = "import zoo; zoo.create('ViT-B-32', pretrained='openai')"
  env = cli_run.env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
  env.pop("HF_HUB_OFFLINE", None)
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert "PretrainedError" in last and "HF_HUB_OFFLINE=1" in last and "local file" in last, last
  assert "Retrying" not in r.stderr and "thrown while requesting" not in r.stderr, r.stderr[-2000:]


def test_usage_errors_are_one_line():
  """A missing required flag: one `PROG: error:` line pointing at --help, exit code 2."""
  procs = {"zoo.convert": cli_run.popen("-m", "zoo.convert", "from-open-clip", "--model", "x"),
           "zoo.data.embed_cache": cli_run.popen("-m", "zoo.data.embed_cache", "--model", "x")}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    lines = cli_run.lines(err)
    assert proc.returncode == 2 and len(lines) == 1, (name, proc.returncode, err[-500:])
    assert lines[0].startswith(f"python -m {name}: error: ") and "--help" in lines[0], lines
