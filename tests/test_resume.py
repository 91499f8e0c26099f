"""Exact resume: 20 steps straight == 12 steps, SIGKILL, restart, the rest; and the config
check on resume (refuse / continue / restart) through train.py."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.cli_run import TINY, lines, run, strict_json_lines
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

  from zoo.eval import source

  config = resume_config()
  config.mesh.fsdp = -1  # this process has 8 devices: restore onto a different mesh than saved
  a = source.open_model(workdir=str(straight), config=config)
  model_a, step_a = a.model, a.step
  b = source.open_model(workdir=str(resumed), config=config)
  model_b, step_b = b.model, b.step
  assert step_a == step_b == 20
  from flax import nnx

  for x, y in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- config on resume
# Through the command line: the finished tiny run is resumed with other values.

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("resume") / "run")
  proc = run("train.py", *TINY, "--workdir", workdir, "--config.eval_every=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _copy(src, tmp_path):
  import shutil

  dst = str(tmp_path / "run")
  shutil.copytree(src, dst)
  return dst


def test_resume_refuses_changed_config(finished_run):
  stored = open(os.path.join(finished_run, "config.json")).read()
  proc = run("train.py", *TINY, "--workdir", finished_run, "--config.eval_every=0",
             "--config.batch_size=16", "--config.total_steps=6")
  assert proc.returncode == 2, proc.stderr[-3000:]
  err = lines(proc.stderr)
  assert len(err) == 1 and "Traceback" not in proc.stderr, err
  assert "batch_size: 8 -> 16" in err[0] and "total_steps: 4 -> 6" in err[0], err
  assert "resume_policy=continue" in err[0] and "resume_policy=restart" in err[0]
  assert open(os.path.join(finished_run, "config.json")).read() == stored


def test_resume_continue_extends_schedule_keeping_its_past(finished_run, tmp_path):
  from zoo.train import run_config

  workdir = _copy(finished_run, tmp_path)
  proc = run("train.py", *TINY, "--workdir", workdir, "--config.eval_every=0",
             "--config.total_steps=6", "--config.resume_policy=continue")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any("resume_policy=continue at step 4: total_steps: 4 -> 6" in x
             for x in lines(proc.stderr)), proc.stderr[-3000:]
  lr = {r["step"]: r["lr"] for r in strict_json_lines(os.path.join(workdir, "train_log.jsonl"))
        if r["prefix"] == "train"}
  assert sorted(lr) == [1, 2, 3, 4, 5, 6]
  old = run_config.warmup_cosine(1e-3, 1, 4)  # demo lr, warmup_steps=1, the first total_steps
  new = run_config.warmup_cosine(1e-3, 1, 6)
  for step in (1, 2, 3, 4):  # logged before the change (lr of the step's update, index step-1)
    np.testing.assert_allclose(lr[step], float(old(step - 1)), rtol=1e-6)
  for step in (5, 6):
    np.testing.assert_allclose(lr[step], float(new(step - 1)), rtol=1e-6)
  stored = json.load(open(os.path.join(workdir, "config.json")))
  assert stored["total_steps"] == 6 and stored["schedule_history"][0]["until"] == 4
  # The stored schedule keeps the past: steps before 4 follow the first schedule.
  sched = run_config.schedule(stored)
  np.testing.assert_allclose([float(sched(s)) for s in range(6)],
                             [float(old(s)) for s in range(4)] + [float(new(s)) for s in (4, 5)],
                             rtol=1e-6)


def test_resume_restart_moves_old_run_aside(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  proc = run("train.py", *TINY, "--workdir", workdir, "--config.eval_every=0",
             "--config.batch_size=16", "--config.total_steps=2", "--config.resume_policy=restart")
  assert proc.returncode == 0, proc.stderr[-3000:]
  old = os.path.join(workdir, "previous", "1")
  assert sorted(os.listdir(os.path.join(old, "checkpoints"))) == ["2", "4"]
  assert json.load(open(os.path.join(old, "config.json")))["batch_size"] == 8
  assert json.load(open(os.path.join(workdir, "config.json")))["batch_size"] == 16
  steps = [r["step"] for r in strict_json_lines(os.path.join(workdir, "train_log.jsonl"))]
  assert steps == [1, 2]  # a new run from step 0


def test_config_changes_ignore_placement_and_logging():
  from zoo.train import run_config

  a = resume_config()
  b = resume_config()
  b.mesh.fsdp = 4
  b.log_every = 7
  b.checkpoint_every = 3
  b.data.eval_size = 5
  assert run_config.changes(a, b) == []
  b.seed = 1
  b.data.size = 10
  assert run_config.changes(a, b) == [("data.size", 200, 10), ("seed", 0, 1)]
