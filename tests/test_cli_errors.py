"""User errors on the command lines: one line on stderr, exit code 2, no traceback (unless
ZOO_DEBUG=1); Ctrl-C stops a run cleanly."""

import os
import signal
import time

import pytest

from tests.cli_run import TINY, lines, popen, run
from zoo.train import checkpoints


def assert_one_line(proc, *needles):
  err = lines(proc.stderr)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(err) == 1, err
  for needle in needles:
    assert needle in err[0], err
  return err[0]


def test_eval_missing_and_empty_checkpoint(tmp_path):
  assert_one_line(run("eval.py", "--checkpoint", str(tmp_path / "nope")), "no such directory")
  assert_one_line(run("eval.py", "--checkpoint", str(tmp_path)), "zoo_config.json is missing")
  assert_one_line(run("eval.py", "--workdir", str(tmp_path)), "no complete checkpoint")
  assert_one_line(run("eval.py"), "pass one of --workdir")


@pytest.mark.parametrize("override,needle", [
    ("--config.family=nope", "unknown config.family 'nope'"),
    ("--config.model=nope", "Unknown model 'nope'"),
    ("--config.data.name=nope", "unknown data.name 'nope'"),
    ("--config.batch_size=0", "config.batch_size must be a positive integer"),
    ("--config.mesh.data=16", "does not fit the 1 device"),
    ("--config.resume_policy=maybe", "config.resume_policy='maybe'"),
    ("--config.nope=1", "unknown config key 'nope'"),
])
def test_train_user_errors(tmp_path, override, needle):
  assert_one_line(run("train.py", *TINY, "--workdir", str(tmp_path / "w"), override), needle)


def test_debug_shows_traceback(tmp_path):
  proc = run("train.py", *TINY, "--workdir", str(tmp_path / "w"), "--config.model=nope",
             extra_env={"ZOO_DEBUG": "1"})
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_convert_refused_pickle(tmp_path):
  torch = pytest.importorskip("torch")

  import argparse

  path = str(tmp_path / "model.pt")  # a pickled object torch.load(weights_only=True) refuses
  torch.save({"w": torch.zeros(2), "obj": argparse.Namespace(a=1)}, path)
  msg = assert_one_line(run("-m", "zoo.convert", "from-open-clip", "--model", "test-tiny",
                            "--input", path, "--output", str(tmp_path / "out")),
                        "pickles the object argparse.Namespace")
  assert "weights_only=False" not in msg


def test_ctrl_c_stops_cleanly(tmp_path):

  workdir = tmp_path / "w"
  proc = popen("train.py", *TINY, "--workdir", str(workdir), "--config.total_steps=500",
               "--config.eval_every=0", "--config.checkpoint_every=2")
  log = workdir / "train_log.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if log.exists() and sum(1 for _ in open(log)) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  last = lines(stderr)[-1]
  assert last.startswith("train.py: interrupted after step"), lines(stderr)
  steps = checkpoints.complete_steps(workdir / "checkpoints")
  assert steps and f"latest complete checkpoint: step {steps[-1]}" in last
  # Only complete steps (and no half-written directory) are left behind.
  assert sorted(os.listdir(workdir / "checkpoints")) == sorted(map(str, steps))
