"""Runs loop.train in its own process; optionally SIGKILLs itself after a given step."""

import os
import signal
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(workdir: str, kill_after: int) -> None:
  from tests.test_resume import resume_config
  from zoo.train import loop

  def maybe_kill(step: int) -> None:
    if kill_after and step == kill_after:
      os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

  loop.train(resume_config(), workdir, on_step_end=maybe_kill)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
