"""python -m zoo.plan: the train step compiled for a TPU topology with libtpu (no TPU needed).

Without libtpu (the Python 3.11 suite): one-line errors, libtpu missing naming the extra to
install. With libtpu (the Python 3.12 `versioned` run): the demo config's step compiled for one
v5e chip, its per-chip memory and FLOPs read back from the JSON, and a mesh that does not
divide the topology's chips.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests import cli_run

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
SMALL = ("--config", "configs/demo.py", "--config.model=test-tiny", "--config.context_length=16",
         "--config.batch_size=16")


def _plan(*args: str):
  return cli_run.run("-m", "zoo.plan", *args, timeout=600)


def _one_line_error(proc, *needles: str) -> None:
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("python -m zoo.plan: error:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  for needle in needles:
    assert needle in lines[0], lines[0]


GIB = 2**30


@pytest.mark.parametrize("memory, unit, first, most", [
    (lambda b: int(0.5 * GIB + b * 50e6 / 64), 64, 32768, 3),  # affine: the fit lands on it
    (lambda b: int(0.5 * GIB + b * 50e6 / 64), 64, 640, 3),  # ... from below as from above
    (lambda b: int(GIB + b * 30e6 / 8 + (b / 8) ** 2 * 2e5), 8, 320, 8),  # curved
    (lambda b: int(2 * GIB + -(-b // 64) * 64 * 3e6), 8, 16, 8),  # steps (tile padding)
    (lambda b: int(20 * GIB + b), 8, 16, 2),  # nothing fits
])
def test_max_batch_search_rests_on_a_fit_and_a_refusal(memory, unit, first, most):
  from zoo import plan

  hbm, seen = 16 * GIB, []

  def measure(batch):
    seen.append(batch)
    assert batch > 0 and batch % unit == 0, batch
    return memory(batch), memory(batch) <= hbm

  got = plan.max_batch_search(measure, hbm, unit, (first, memory(first), memory(first) <= hbm),
                              floor_bytes=GIB // 32)
  truth = max((b for b in range(unit, 10**6, unit) if memory(b) <= hbm), default=0)
  best = got["max_global_batch"]
  assert best == truth and got["confirmed"], (got, truth)
  compiled = {c["global_batch"]: c["fits"] for c in got["compiles"]}
  assert compiled[best + unit] is False and (best == 0 or compiled[best] is True), compiled
  assert len(seen) <= most, seen


def test_max_batch_search_without_the_refused_programs_bytes():
  from zoo import plan

  hbm, memory = 16 * GIB, lambda b: int(GIB + b * 30e6 / 8)
  measure = lambda b: (memory(b) if memory(b) <= hbm else -1, memory(b) <= hbm)  # -1: unknown
  got = plan.max_batch_search(measure, hbm, 8, (32768, -1, False))
  assert got["max_global_batch"] == max(b for b in range(8, 10**5, 8) if memory(b) <= hbm)
  assert got["confirmed"]


def test_unknown_topology_is_one_line():
  _one_line_error(_plan(*SMALL, "--topology", "v9x:2x2"), "unknown topology 'v9x:2x2'", "v5e")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed here, so its absence cannot be shown; "
                    "CI's Python 3.11 suite (no [tpu] extra) runs this")
def test_missing_libtpu_says_how_to_install():
  _one_line_error(_plan(*SMALL, "--topology", "v5e:2x2"), "libtpu", "pip install 'zoo[tpu]'")


NEEDS_LIBTPU = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu absent (pip install 'zoo[tpu]'); CI's Python 3.12 stage, which "
    "installs .[test,tpu], compiles these")


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  """The demo config's step (test-tiny, batch 16) planned for one v5e chip by the CLI, --json."""
  out = tmp_path_factory.mktemp("plan") / "plan.json"
  proc = _plan(*SMALL, "--topology", "v5e:1x1", "--json", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads(out.read_text())


@NEEDS_LIBTPU
def test_plan_compiles_the_train_step(tiny_plan):
  proc, got = tiny_plan
  assert "fits" in proc.stdout and "per chip" in proc.stdout, proc.stdout
  assert set(got) == {"fits", "per_chip_bytes", "hbm_bytes", "global_batch", "flops_per_step",
                      "topology"}
  assert got["fits"] is True and got["hbm_bytes"] == 16 << 30 and got["global_batch"] == 16
  assert 0 < got["per_chip_bytes"] < 1 << 30 and got["flops_per_step"] > 0
  assert got["topology"] == "v5e:1x1"


@NEEDS_LIBTPU
def test_max_batch_confirms_by_compiling(tiny_plan):
  """The search on real compiles: with the budget set to what batch 16 needs (the CLI's plan),
  16 is the answer, resting on that compile (fits) and batch 17's (one more image: refused)."""
  from zoo import plan
  from zoo.train import config_files

  config = config_files.load_config_file("configs/demo.py")
  with config.unlocked():
    config.model, config.context_length, config.batch_size = "test-tiny", 16, 16
  need = tiny_plan[1]["per_chip_bytes"]
  start = plan.Plan("v5e:1x1", 1, 16, True, need, need, 0, 0, 0, 0.0)
  got = plan.max_batch(config, "v5e:1x1", start)
  assert got["max_global_batch"] == 16 and got["confirmed"], got
  assert [(c["global_batch"], c["fits"]) for c in got["compiles"]] == [(16, True), (17, False)]
  assert got["compiles"][1]["per_chip_bytes"] > need


@NEEDS_LIBTPU
def test_mesh_not_dividing_the_chips_is_one_line():
  _one_line_error(_plan(*SMALL, "--topology", "v5e:2x2", "--config.mesh.data=3"),
                  "config.mesh on v5e:2x2 (4 chips)")
