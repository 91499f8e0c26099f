"""`python -m zoo.convert <subcommand> ...`: see zoo.convert.cli (and --help)."""

import sys

from zoo import cli as run_cli
from zoo.convert.cli import COMMANDS, main
from zoo.convert.io import TORCH_SUFFIXES, read_state_dict, write_safetensors

__all__ = ["COMMANDS", "TORCH_SUFFIXES", "main", "read_state_dict", "write_safetensors"]

if __name__ == "__main__":
  run_cli.quiet_logging()
  sys.exit(run_cli.run(main, prog="python -m zoo.convert"))
