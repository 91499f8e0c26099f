"""What every zoo command line shares: one-line errors, quiet logging, clean Ctrl-C.

`run(main)` wraps a command's main: a user error (`UserError`, a bad checkpoint, a missing
file, a bad value) prints one `error: ...` line on stderr and exits 2; Ctrl-C prints one line
and exits 130; a diverged run (`Diverged`) prints one line and exits 1. The traceback is shown
only with `--verbosity=1` (absl commands) or `ZOO_DEBUG=1`. `quiet_logging()` silences other
libraries' INFO lines (Orbax, absl, tensorboardX) unless `--verbosity` is given, and prints
zoo's own log lines above any progress bar (never on the bar's line).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130


class UserError(Exception):
  """Bad input from the command line (flags, config values, paths): one line, exit code 2."""


class Diverged(RuntimeError):
  """Training produced a non-finite loss or gradient norm (the run stopped, nothing saved)."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during a run, with where it stopped (`message` is the one line to print)."""

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message


def _verbosity() -> int | None:
  """absl's --verbosity when given on the command line, else None."""
  try:
    from absl import flags

    flag = flags.FLAGS["verbosity"]
    return int(flag.value) if flag.present else None
  except (KeyError, flags.Error, ImportError):  # not an absl program, or flags not parsed
    return None


def debug() -> bool:
  """Tracebacks wanted: ZOO_DEBUG=1 or --verbosity >= 1."""
  return os.environ.get("ZOO_DEBUG", "") not in ("", "0") or (_verbosity() or 0) >= 1


class _AboveProgressBar(logging.Handler):
  """Writes records with tqdm.write, so they land above a progress bar, not on its line."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      from tqdm import tqdm

      tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # noqa: BLE001 - logging must never raise
      self.handleError(record)


def quiet_logging() -> None:
  """Third-party INFO off (unless --verbosity/ZOO_DEBUG asks); zoo's INFO lines always shown."""
  zoo_log = logging.getLogger("zoo")
  if not any(isinstance(h, _AboveProgressBar) for h in zoo_log.handlers):
    handler = _AboveProgressBar()
    handler.setFormatter(logging.Formatter("%(message)s"))
    zoo_log.addHandler(handler)
  zoo_log.setLevel(logging.DEBUG if debug() else logging.INFO)
  zoo_log.propagate = False
  if _verbosity() is None and not debug():
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("absl", "orbax", "tensorboardX", "jax", "grain"):
      logging.getLogger(name).setLevel(logging.WARNING)
    try:
      from absl import logging as absl_logging

      absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
      pass


def _user_error_types() -> tuple[type[BaseException], ...]:
  from zoo.weights.layout import CheckpointError

  return (UserError, CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError,
          ValueError, KeyError)


def one_line(e: BaseException) -> str:
  """The message of `e` on one line (a KeyError's quotes dropped, continuation lines joined)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  text = str(text) or type(e).__name__
  return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def run(main: Callable[..., Any], *args: Any, prog: str | None = None) -> Any:
  """Calls `main(*args)`; turns user errors, divergence and Ctrl-C into one line + exit code."""
  prog = prog or os.path.basename(sys.argv[0])
  hint = "" if debug() else " (ZOO_DEBUG=1 shows the traceback)"
  try:
    return main(*args)
  except SystemExit:
    raise
  except Interrupted as e:
    if debug():
      raise
    print(f"{prog}: {e.message}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except KeyboardInterrupt:
    if debug():
      raise
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except Diverged as e:
    if debug():
      raise
    print(f"{prog}: {one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)
  except _user_error_types() as e:
    if debug():
      raise
    from zoo.weights.layout import CheckpointError

    generic = not isinstance(e, (UserError, CheckpointError, OSError))
    print(f"{prog}: error: {one_line(e)}{hint if generic else ''}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
