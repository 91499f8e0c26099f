"""`parse(path)`: a source file's AST, parsed with the cyclic collector held off.

CPython 3.11 (before 3.11.8) keeps the AST builder's recursion depth in one per-interpreter
slot. A finalizer run by the collector in the middle of `ast.parse` (asyncio's "Task exception
was never retrieved", whose traceback formatting parses source for its carets) resets that
slot, and the outer parse fails with "SystemError: AST constructor recursion depth mismatch".
Pausing the collector for the parse keeps those finalizers out of it (they run later)."""

from __future__ import annotations

import ast
import gc
import pathlib


def parse(path: pathlib.Path | str) -> ast.Module:
  source = pathlib.Path(path).read_text()
  enabled = gc.isenabled()
  gc.disable()
  try:
    return ast.parse(source)
  finally:
    if enabled:
      gc.enable()
