"""Exact resume: 20 steps straight == 12 steps, SIGKILL, restart, the rest."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.train_utils import tiny_config

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")


def resume_config():
  c = tiny_config()
  c.total_steps = 20
  c.checkpoint_every = 5
  c.keep_checkpoints = 3
  c.batch_size = 8
  c.context_length = 16
  c.mesh.data = 2
  c.mesh.fsdp = 2
  c.data.size = 200
  c.data.eval_size = 32
  c.model_overrides.vision = dict(image_size=32)
  return c


def run_worker(workdir, kill_after):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, WORKER, str(workdir), str(kill_after)], env=env,
                        capture_output=True, text=True, timeout=900)
  return proc


def logged_losses(workdir):
  losses = {}
  with open(os.path.join(workdir, "train_log.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("prefix") == "train":
        losses[rec["step"]] = rec["loss"]
  return losses


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  proc = run_worker(straight, 0)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_worker(resumed, 12)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  proc = run_worker(resumed, 0)
  assert proc.returncode == 0, proc.stderr[-3000:]

  a, b = logged_losses(straight), logged_losses(resumed)
  assert sorted(a) == list(range(1, 21))
  for step in range(1, 21):
    assert a[step] == b[step], (step, a[step], b[step])

  from zoo import train_lib

  config = resume_config()
  config.mesh.fsdp = -1  # this process has 8 devices: restore onto a different mesh than saved
  model_a, step_a, _ = train_lib.load_for_eval(config, workdir=str(straight))
  model_b, step_b, _ = train_lib.load_for_eval(config, workdir=str(resumed))
  assert step_a == step_b == 20
  from flax import nnx

  for x, y in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
