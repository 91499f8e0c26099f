"""`python -m zoo.convert <subcommand> ...`: see zoo.convert.cli (and --help)."""

import sys

from zoo import errors
from zoo.convert import cli

if __name__ == "__main__":
  errors.quiet_logging()
  sys.exit(errors.run(cli.run, prog="python -m zoo.convert"))
