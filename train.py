"""Train a zoo model: python train.py --config configs/demo.py --workdir runs/demo [--config.k=v]

Restarting with the same --workdir resumes from the latest complete checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from zoo import eval_lib, train_lib

  config = _CONFIG.value
  train_lib.maybe_initialize_distributed(config)
  result = train_lib.train(config, _WORKDIR.value)
  if result["eval"] and result["trainer"] is not None:
    import jax

    if jax.process_index() == 0:
      print(eval_lib.format_table(result["eval"]))
  logging.info("finished at step %d", result["step"])


if __name__ == "__main__":
  from zoo.config_utils import parse_flags

  app.run(main, flags_parser=parse_flags)
