"""Running train.py / eval.py / python -m zoo.* in a subprocess, as a user would (CLI tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny run of the demo config: test-tiny model, batch 8, 4 steps, checkpoints every 2.
TINY = ("--config", "configs/demo.py", "--config.model=test-tiny", "--config.context_length=16",
        "--config.batch_size=8", "--config.total_steps=4", "--config.warmup_steps=1",
        "--config.data.size=64", "--config.data.eval_size=16", "--config.checkpoint_every=2",
        "--config.eval_every=4", "--config.log_every=1")


def env(devices: int = 1, **extra: str) -> dict[str, str]:
  out = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
  out.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out.update(extra)
  return out


def run(*args: str, devices: int = 1, timeout: float = 900,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """`python ARGS...` from the repository root ("train.py ...", "-m zoo.convert ...")."""
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(devices, **(extra_env or {})),
                        capture_output=True, text=True, timeout=timeout)


def _default_sigint() -> None:
  # A shell starts background jobs with SIGINT ignored and children inherit that; a user's
  # terminal delivers Ctrl-C to a foreground train.py, so the child gets the default handler.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(*args: str, devices: int = 1, extra_env: dict[str, str] | None = None,
          **kwargs) -> subprocess.Popen:
  """`python ARGS...` started in the background (e.g. to send it signals), as a user would."""
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(devices, **(extra_env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_default_sigint, **kwargs)


def lines(text: str) -> list[str]:
  """Non-empty lines, progress-bar redraws (carriage returns) removed."""
  out = []
  for line in text.splitlines():
    line = line.rsplit("\r", 1)[-1].strip()
    if line and not line.startswith(("train:", "encode ")):
      out.append(line)
  return out


def strict_json_lines(path: str) -> list[dict]:
  """Every line of a JSONL file, parsed strictly (NaN / Infinity are errors)."""
  def refuse(name):
    raise ValueError(f"{path}: non-standard JSON constant {name}")

  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f if line.strip()]


def train_losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in strict_json_lines(os.path.join(workdir, "train_log.jsonl"))
          if r["prefix"] == "train"}
