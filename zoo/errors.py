"""What every zoo command line shares: one-line errors, quiet logging, clean Ctrl-C.

`run(main, prog=...)` wraps a command's main: a user error (`UserError`, a bad checkpoint, a
missing file, a bad value) prints one `PROG: error: ...` line on stderr and exits 2 (`report`
does the same for a command that returns its exit code); Ctrl-C prints one line and exits 130;
a diverged run (`Diverged`) prints one line and exits 1. The traceback is shown only with
`--verbosity=1` (absl commands) or `ZOO_DEBUG=1`. `quiet_logging()` silences other libraries'
INFO lines unless `--verbosity` is given and prints zoo's own log lines above any progress bar.
Message helpers shared by the API and the commands: `unknown_key` / `check_keys` (an unknown
config key, with a "did you mean"), `did_you_mean` (the nearest known name), `capped` (a long listing cut to its first lines + a count),
`OutputExists` (says `overwrite=True` in Python, `--overwrite` on a command line).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from typing import Any, Callable, Iterable, NoReturn, Sequence

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130


class UserError(Exception):
  """Bad input (flags, config values, paths, weight files): one line, exit code 2. The library's
  own input errors (a bad checkpoint or weight file) derive from it and from ValueError."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors (a missing or bad flag) are `UserError`s: one `PROG: error:`
  line and exit code 2, like every other zoo error; `--help` prints the usage as usual."""

  def error(self, message: str) -> NoReturn:
    raise UserError(f"{message} (see {self.prog} --help)")


class Diverged(RuntimeError):
  """Training produced a non-finite loss or gradient norm (the run stopped, nothing saved)."""


class OutputExists(FileExistsError):
  """An output exists and overwriting was not asked for. The message names the Python argument
  (`overwrite=True`); on a command line (`one_line`) it names the flag (`--overwrite`)."""

  def __init__(self, path: str, *, what: str = "directory"):
    super().__init__(f"{path} already exists; pass overwrite=True or pick a new {what}")
    self.path = path
    self.cli_message = f"{path} already exists; pass --overwrite or pick a new {what}"


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during a run, with where it stopped (`message` is the one line to print)."""

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message


def unknown_key(key: str, valid: Iterable[str], where: str) -> ValueError:
  """The one-line error for a key not in `valid`: `unknown WHERE key 'KEY' (did you mean
  'CLOSEST'?); valid keys: ...` (`where` e.g. "config", "config.data", "model override")."""
  valid = sorted(valid)
  close = difflib.get_close_matches(key, valid, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ValueError(f"unknown {where} key {key!r}{hint}; valid keys: {', '.join(valid)}")


def did_you_mean(name: str, known: Iterable[str]) -> str:
  """' (did you mean 'CLOSEST'?)' for the known name nearest to `name` (case-insensitive
  difflib), or '' when none is close."""
  by_lower = {k.lower(): k for k in known}
  close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
  return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def check_keys(given: Iterable[str], valid: Iterable[str], where: str) -> None:
  """Raises `unknown_key` for the first (sorted) key of `given` that is not in `valid`."""
  valid = set(valid)
  bad = sorted(set(given) - valid)
  if bad:
    raise unknown_key(bad[0], valid, where)


def capped(lines: Sequence[str], limit: int = 5, indent: str = "  ") -> list[str]:
  """At most `limit` of `lines`, then `... and N more`. Lines are grouped by their first word
  (e.g. missing / mis-shaped / unexpected) and taken from each group in turn, so every kind of
  problem shows among the first lines; within a group the order is kept."""
  groups: dict[str, list[str]] = {}
  for line in lines:
    groups.setdefault(line.split(maxsplit=1)[0] if line.strip() else "", []).append(line)
  queues = list(groups.values())
  mixed = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
  if len(mixed) <= limit:
    return mixed
  return [*mixed[:limit], f"{indent}... and {len(mixed) - limit} more"]


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


# What a command reports as a user error (one line, exit 2) rather than a crash.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
    PermissionError, ValueError, KeyError)


def one_line(e: BaseException) -> str:
  """The message of `e` for a command line, on one line (a KeyError's quotes dropped,
  continuation lines joined; an `OutputExists` names the --overwrite flag)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else getattr(e, "cli_message", str(e))
  text = str(text) or type(e).__name__
  parts = [" ".join(part.split()) for part in text.splitlines() if part.strip()]
  out = parts[0] if parts else ""
  for part in parts[1:]:  # a listing after "...:" continues the sentence; lines become clauses
    out += (" " if out.endswith((":", ";", ",")) else "; ") + part
  return out


def report(e: BaseException, prog: str) -> int:
  """Prints `PROG: error: MESSAGE` (one line) for the user error `e`; returns exit code 2.
  With ZOO_DEBUG=1 / --verbosity=1 it re-raises instead (the traceback)."""
  if debug():
    raise e
  generic = not isinstance(e, (UserError, OSError))
  hint = " (ZOO_DEBUG=1 shows the traceback)" if generic else ""
  print(f"{prog}: error: {one_line(e)}{hint}", file=sys.stderr)
  return EXIT_USER_ERROR


def run(main: Callable[..., Any], *args: Any, prog: str | None = None) -> Any:
  """Calls `main(*args)`; turns user errors, divergence and Ctrl-C into one line + exit code."""
  prog = prog or os.path.basename(sys.argv[0])
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
  except USER_ERRORS as e:
    sys.exit(report(e, prog))
