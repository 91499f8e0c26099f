"""Keep freed host memory for reuse, so XLA:CPU's per-step buffers stop page-faulting.

Every execution of a compiled step allocates one temporary buffer for its intermediates
(3.6 GB for a ViT-B-32 batch-32 train step) from an XLA worker thread. glibc serves a request
that large with a fresh mmap and unmaps it on free, so each step faults every page back in:
880k minor faults and 2-3 s of kernel time per step on 2 cores, 8-11 s on a VM whose freed
pages went back to the host. `retain_freed_memory` sets glibc's malloc to serve every thread
from one heap, never through mmap, and never to trim the heap: the buffer freed by one step
is the buffer of the next (0 faults). The process keeps its peak host memory, as PyTorch's
caching allocators do. Entry points call it before JAX starts its thread pools.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import MutableMapping

# mallopt(3) parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# The settings, in order: one arena (worker threads allocate from the main heap, which can
# hold a multi-GB chunk; a thread arena cannot and falls back to mmap), no mmap for large
# chunks, no trimming of the heap's top (-1 disables it, see mallopt(3)).
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
OPT_OUT_ENV = "ZOO_RETAIN_HOST_MEMORY"


def retain_freed_memory(environ: MutableMapping[str, str] | None = None) -> bool:
  """Applies SETTINGS with mallopt; returns whether they were applied.

  A no-op (False) off glibc Linux, when `ZOO_RETAIN_HOST_MEMORY=0`, or where mallopt refuses
  a setting. Call it before the first JAX computation: arenas that worker threads already
  hold are not merged back.
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT_ENV, "1") == "0" or platform.system() != "Linux":
    return False
  if platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
