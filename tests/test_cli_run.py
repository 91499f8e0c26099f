"""train.py / eval.py end to end on a tiny run: quiet logs, strict JSON logs, a finished workdir
re-prints its table, eval.py reads the stored config, a diverged run stops without saving."""

import json
import os
import stat

import numpy as np
import pytest

from tests.cli_run import TINY, lines, run, strict_json_lines, train_losses
from zoo.train import checkpoints


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  proc = run("train.py", *TINY, "--workdir", workdir, "--config.keep_checkpoints=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_quiet_run_and_workdir_contents(finished):
  workdir, proc = finished
  err = lines(proc.stderr)
  # zoo's own lines only: no absl/Orbax/tensorboardX INFO records ("I1202 12:00:00.0 ...").
  assert not [x for x in err if x[:1] in "IW" and x[1:5].isdigit()], err
  assert any("saving checkpoint" in x for x in err), err
  assert any(x.startswith("finished at step 4") for x in err), err
  assert len(err) <= 8, err
  assert "zeroshot/top1" in proc.stdout
  for name in ("tb", "train_log.jsonl", "metrics.json", "config.json", "model", "checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert stat.S_IMODE(os.stat(os.path.join(workdir, "metrics.json")).st_mode) & 0o044 == 0o044
  assert sorted(train_losses(workdir)) == [1, 2, 3, 4]  # logged every step, strict JSON
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]


def test_finished_workdir_reprints_table(finished):
  workdir, first = finished
  before = os.path.getmtime(os.path.join(workdir, "config.json"))
  proc = run("train.py", *TINY, "--workdir", workdir, "--config.keep_checkpoints=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = [x for x in first.stdout.splitlines() if "zeroshot/top1" in x and "│" in x]
  assert table and table[0] in proc.stdout
  assert any("already finished at step 4" in x for x in lines(proc.stderr))
  assert os.path.getmtime(os.path.join(workdir, "config.json")) == before  # not rewritten


def _final_eval(workdir):
  records = json.load(open(os.path.join(workdir, "metrics.json")))
  return {k: v for k, v in records[-1].items() if k != "step"}


def test_eval_workdir_and_checkpoint_use_stored_config(finished):
  workdir, _ = finished
  trained = _final_eval(workdir)
  proc = run("eval.py", "--workdir", workdir)  # no --config: the workdir's config.json
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _final_eval(workdir) == pytest.approx(trained, abs=1e-6)

  model_dir = os.path.join(workdir, "model")
  inside = sorted(os.listdir(model_dir))
  proc = run("eval.py", "--checkpoint", model_dir)  # no --config: the model's stored config
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(model_dir)) == inside  # nothing written into the model directory
  out = model_dir + "-eval"
  records = json.load(open(os.path.join(out, "metrics.json")))
  assert records[0]["step"] == 4
  assert {k: v for k, v in records[0].items() if k != "step"} == pytest.approx(trained, abs=1e-6)
  assert "trained 4 steps" in proc.stdout


def test_eval_refuses_nan_model(finished, tmp_path):
  import jax
  from flax import nnx

  import zoo
  from zoo.weights import model_dir as checkpoint

  workdir, _ = finished
  model, _, _ = zoo.load(os.path.join(workdir, "model"))
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x * np.nan, state))
  bad = str(tmp_path / "nan_model")
  config = checkpoint.read_record(os.path.join(workdir, "model"))["config"]
  checkpoint.save(model, bad, config)
  proc = run("eval.py", "--checkpoint", bad, "--output", str(tmp_path / "out"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  err = lines(proc.stderr)
  assert len(err) == 1 and "non-finite features" in err[0], err
  assert not os.path.exists(tmp_path / "out" / "metrics.json")


def test_diverged_run_keeps_only_good_checkpoints(finished, tmp_path):
  """lr=1e12 from step 4, a checkpoint every step: step 5's parameters are finite but their
  loss (step 6) is not; checkpoint 5 moves to diverged/, the stop line names step 4, the
  latest checkpoint left (what a restart resumes), and eval.py scores it with finite metrics."""
  import shutil

  src, _ = finished
  workdir = str(tmp_path / "run")
  shutil.copytree(src, workdir)
  model_record = open(os.path.join(workdir, "model", "zoo_config.json")).read()
  proc = run("train.py", *TINY, "--workdir", workdir, "--config.keep_checkpoints=2",
             "--config.checkpoint_every=1", "--config.total_steps=10", "--config.lr=1e12",
             "--config.eval_every=0", "--config.resume_policy=continue")
  assert proc.returncode == 1, proc.stderr[-3000:]
  err = lines(proc.stderr)
  diverged = [x for x in err if "diverged at step" in x]
  assert len(diverged) == 1 and "loss = nan" in diverged[0], err
  assert "Traceback" not in proc.stderr
  # The checkpoint whose parameters gave the NaN loss is moved aside, not left as the latest.
  aside = os.path.join(workdir, "diverged", "5")
  assert f"(from the parameters of step 5); checkpoint 5 moved to {aside}" in diverged[0], err
  assert checkpoints.is_complete_step(aside)
  steps = checkpoints.complete_steps(os.path.join(workdir, "checkpoints"))
  assert steps == [4] and "latest good checkpoint: step 4," in diverged[0], (steps, err)
  assert open(os.path.join(workdir, "model", "zoo_config.json")).read() == model_record
  records = strict_json_lines(os.path.join(workdir, "train_log.jsonl"))
  flagged = [r for r in records if r.get("nonfinite")]
  assert flagged and all(r[k] is None for r in flagged for k in r["nonfinite"])

  proc = run("eval.py", "--workdir", workdir, "--output", str(tmp_path / "eval"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.load(open(tmp_path / "eval" / "metrics.json"))[-1]
  assert record["step"] == 4 and len(record) > 1
  assert all(np.isfinite(v) for k, v in record.items() if k != "step"), record


def test_nan_scores_rank_last_in_every_metric():
  from zoo.eval import evaluator
  from zoo.families import multilingual as multilingual_family

  rng = np.random.default_rng(0)
  feats = rng.normal(size=(6, 4)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  labels = np.arange(6) % 3
  classifier = feats[:3].T.copy()
  nan_classifier = np.full_like(classifier, np.nan)
  zs = evaluator.zero_shot_metrics(feats, labels, nan_classifier)
  assert zs == {"top1": 0.0, "top5": 0.0, "mean_per_class_recall": 0.0}
  # One NaN class column: it never outranks a number, so the others score as without it.
  partial = classifier.copy()
  partial[:, 2] = np.nan
  ranks = evaluator.stable_ranks(feats @ partial, labels)  # noqa: SLF001 - the ranking itself
  assert (ranks[labels == 2] == 3).all()  # a NaN target is no hit at any k
  clean = evaluator.stable_ranks(feats @ classifier, labels)  # noqa: SLF001
  assert (ranks[labels != 2] <= clean[labels != 2]).all()  # NaNs never outrank a number
  r = evaluator.retrieval_metrics(np.full_like(feats, np.nan), feats, [[i] for i in range(6)],
                                 ks=(1,))
  assert r == {"image_retrieval_recall@1": 0.0, "text_retrieval_recall@1": 0.0}
  top1, n = multilingual_family.babel_zeroshot_language(feats, labels, [0, 1, 2], nan_classifier)
  assert (top1, n) == (0.0, 6)
