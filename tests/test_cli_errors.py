"""User errors on the command lines: one line on stderr that starts with the command's name,
exit code 2, no traceback (unless ZOO_DEBUG=1); Ctrl-C stops a run cleanly."""

import os
import re
import signal
import time

import numpy as np
import pytest

from tests.cli_run import TINY, lines, popen, run
from zoo import errors
from zoo.train import checkpoints


def prog_of(proc) -> str:
  """The command's name as its error lines start: train.py, python -m zoo.convert, ..."""
  args = proc.args[1:]
  return f"python -m {args[1]}" if args[0] == "-m" else args[0]


def assert_one_line(proc, *needles):
  err = lines(proc.stderr)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(err) == 1, err
  assert err[0].startswith(f"{prog_of(proc)}: error: "), err
  for needle in needles:
    assert needle in err[0], err
  return err[0]


@pytest.fixture(scope="module")
def tiny_open_clip_file(tmp_path_factory):
  """test-tiny's weights in open_clip's layout (safetensors): a valid --input for convert."""
  import zoo
  from zoo.convert import io

  path = str(tmp_path_factory.mktemp("oc") / "tiny.safetensors")
  io.write_safetensors(zoo.convert.to_open_clip(zoo.create("test-tiny")), path)
  return path


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
    ("--config.lrr=1", "unknown config key 'lrr' (did you mean 'lr'?); valid keys: "),
    ("--config.data.nmae=x", "unknown config.data key 'nmae' (did you mean 'name'?)"),
])
def test_train_user_errors(tmp_path, override, needle):
  assert_one_line(run("train.py", *TINY, "--workdir", str(tmp_path / "w"), override), needle)


def test_unknown_keys_share_one_message():
  """Every unknown-key validator (config sections, model overrides) names the key, suggests the
  closest valid one and lists them all, on one line."""
  import ml_collections

  import zoo
  from zoo.families import base
  from zoo.families.long_clip import Settings

  with pytest.raises(ValueError) as e:
    zoo.create("test-tiny", embed_dmi=8)
  assert str(e.value).startswith("unknown model override key 'embed_dmi' (did you mean "
                                 "'embed_dim'?); valid keys: ")
  with pytest.raises(ValueError, match=r"unknown vision override key 'widht' \(did you mean "
                     r"'width'\?\)"):
    zoo.create("test-tiny", vision={"widht": 8})
  config = ml_collections.ConfigDict({"long_clip": {"contxt_length": 1}})
  with pytest.raises(ValueError, match=r"unknown config.long_clip key 'contxt_length' \(did you "
                     r"mean 'context_length'\?\)"):
    base.parse_section(config, "long_clip", Settings)
  with pytest.raises(ValueError) as e:
    zoo.create("test-tiny", zzz=1)  # nothing close: no suggestion
  assert "did you mean" not in str(e.value) and "\n" not in str(e.value)


def test_overwrite_names_the_argument_in_python_and_the_flag_on_the_command_line(tmp_path):
  import zoo

  (tmp_path / "m").mkdir()
  with pytest.raises(FileExistsError) as e:
    zoo.save(zoo.create("test-tiny"), str(tmp_path / "m"))
  assert "pass overwrite=True" in str(e.value)
  assert "pass --overwrite" in errors.one_line(e.value)


def test_train_workdir_is_a_file(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a workdir")
  assert_one_line(run("train.py", *TINY, "--workdir", str(afile)),
                  f"--workdir {afile} is a file, not a directory; pass a new directory")
  assert afile.read_text() == "not a workdir"


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


def test_convert_random_bytes_are_not_a_checkpoint(tmp_path):
  pytest.importorskip("torch")
  path = tmp_path / "x.pt"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  msg = assert_one_line(run("-m", "zoo.convert", "from-open-clip", "--model", "ViT-B-32",
                            "--input", str(path), "--output", str(tmp_path / "out")),
                        f"{path} is not a PyTorch checkpoint (torch.load with weights_only=True "
                        "failed: ")
  assert msg.count("weights_only") == 1 and "weights_only=False" not in msg, msg
  assert not (tmp_path / "out").exists()


def test_convert_existing_output_names_the_flag(tmp_path, tiny_open_clip_file):
  out = tmp_path / "out"
  out.mkdir()
  msg = assert_one_line(run("-m", "zoo.convert", "from-open-clip", "--model", "test-tiny",
                            "--input", tiny_open_clip_file, "--output", str(out)),
                        f"{out} already exists; pass --overwrite")
  assert "overwrite=True" not in msg


def test_convert_wrong_architecture_lists_the_first_problems(tmp_path, tiny_open_clip_file):
  msg = assert_one_line(run("-m", "zoo.convert", "from-open-clip", "--model", "ViT-B-32",
                            "--input", tiny_open_clip_file, "--output", str(tmp_path / "out")),
                        "state dict does not match zoo model 'ViT-B-32' (", " more")
  # the count, then the first five problems (each kind shows) and how many were left out
  total = int(re.search(r"\((\d+) problems;", msg).group(1))
  assert f"... and {total - 5} more" in msg and msg.count("mis-shaped") <= 5, msg
  assert len(msg) < 1000, msg


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
