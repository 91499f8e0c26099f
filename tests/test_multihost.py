"""Two processes on 127.0.0.1 (4 CPU devices each) train exactly like one 8-device process."""

import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from tests.test_train_sharding import MESHES, run

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  port = portpicker.pick_unused_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(tmp_path / f"{i}.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
    assert p.returncode == 0, out[-3000:]
  losses = [json.load(open(tmp_path / f"{i}.json")) for i in range(2)]
  np.testing.assert_allclose(losses[0], losses[1], atol=0)
  single, _ = run(MESHES["data2_fsdp4"])
  np.testing.assert_allclose(losses[0], single, atol=1e-5)
