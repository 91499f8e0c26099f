"""`python -m zoo.convert <subcommand> ...`: see zoo.convert.cli (and --help)."""

import sys

from zoo import errors
from zoo.convert.cli import COMMANDS, main
from zoo.convert.io import TORCH_SUFFIXES, read_state_dict, write_safetensors

__all__ = ["COMMANDS", "TORCH_SUFFIXES", "main", "read_state_dict", "write_safetensors"]

if __name__ == "__main__":
  errors.quiet_logging()
  sys.exit(errors.run(main, prog="python -m zoo.convert"))
