"""Two train.py processes on 127.0.0.1 (4 CPU devices each), started as the README says, train
exactly like one 8-device train.py: the same losses, evaluation and exported model."""

import json
import os

import numpy as np
import portpicker
import pytest

from tests.cli_run import TINY, popen, run, train_losses
from zoo.train import distributed

ARGS = (*TINY, "--config.total_steps=3", "--config.checkpoint_every=3", "--config.eval_every=3")


def _metrics(workdir):
  return {k: v for k, v in json.load(open(os.path.join(workdir, "metrics.json")))[-1].items()}


@pytest.mark.slow
def test_two_train_processes_match_one(tmp_path):
  port = portpicker.pick_unused_port()
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  # Process 0 is configured with flags, process 1 with the ZOO_* environment variables.
  procs = [
      popen("train.py", *ARGS, "--workdir", multi,
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", "--config.distributed.process_id=0",
            devices=4),
      popen("train.py", *ARGS, "--workdir", multi, devices=4,
            extra_env={"ZOO_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "ZOO_NUM_PROCESSES": "2",
                       "ZOO_PROCESS_ID": "1"}),
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=900))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  proc = run("train.py", *ARGS, "--workdir", single, devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]

  a, b = train_losses(multi), train_losses(single)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], atol=1e-5)
  ma, mb = _metrics(multi), _metrics(single)
  assert ma.keys() == mb.keys() and ma["step"] == 3
  np.testing.assert_allclose([ma[k] for k in sorted(ma)], [mb[k] for k in sorted(mb)], atol=1e-6)
  assert "zeroshot/top1" in outputs[0][0]  # process 0 prints the table
  assert os.path.isfile(os.path.join(multi, "model", "zoo_config.json"))


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, "SLURM"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, None),  # one task: a single process
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "4"},
     "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "TPU pod"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
])
def test_cluster_detection(monkeypatch, env, expected):

  for k in list(os.environ):
    if k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert distributed.cluster_environment() == expected


def test_incomplete_multihost_settings_are_one_line_errors(monkeypatch):
  from tests.train_utils import tiny_config
  from zoo import errors

  for k in ("ZOO_NUM_PROCESSES", "ZOO_PROCESS_ID", "ZOO_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  config = tiny_config(**{"distributed.coordinator_address": "127.0.0.1:1234"})
  with pytest.raises(errors.UserError, match="num_processes=0, process_id=-1"):
    distributed.maybe_initialize_distributed(config)
