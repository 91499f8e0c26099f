"""Train a zoo model: python train.py --config configs/demo.py --workdir runs/demo [--config.k=v]

Restarting with the same --workdir resumes from the latest complete checkpoint (the config
must match the stored one; see config.resume_policy). A finished workdir re-prints its final
table. Errors are one line (exit 2; ZOO_DEBUG=1 or --verbosity=1 shows the traceback); a
diverged run stops with exit code 1; Ctrl-C stops cleanly (exit 130).
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def _check_workdir(workdir: str) -> None:
  """A --workdir that is, or lies under, a regular file is a one-line error (not Errno 17)."""
  from zoo import errors

  path = os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if os.path.isdir(path):
    return
  if path == os.path.abspath(workdir):
    raise errors.UserError(f"--workdir {workdir} is a file, not a directory; pass a new directory "
                           "or a run's workdir (e.g. runs/demo)")
  raise errors.UserError(f"--workdir {workdir}: {path} is a file, not a directory; pass a "
                         "workdir that does not lie under a file (e.g. runs/demo)")


def train() -> None:
  from zoo.eval import report
  from zoo.train import distributed, loop

  config = _CONFIG.value
  _check_workdir(_WORKDIR.value)
  distributed.maybe_initialize_distributed(config)  # before anything touches a JAX backend
  result = loop.train(config, _WORKDIR.value)
  import jax

  if jax.process_index() == 0:
    if result["eval"]:
      print(report.format_table(result["eval"], title=f"step {result['step']}"))
    logging.getLogger("zoo.train").info("finished at step %d; model: %s/model", result["step"],
                                        _WORKDIR.value.rstrip("/"))


def main(argv):
  del argv
  from zoo import errors
  from zoo.train import host_memory

  errors.quiet_logging()
  host_memory.retain_freed_memory()  # before JAX's first step: no per-step page faults
  errors.run(train, prog="train.py")


if __name__ == "__main__":
  from zoo.train.config_files import parse_flags

  app.run(main, flags_parser=parse_flags)
