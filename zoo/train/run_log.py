"""What a training run writes and watches while it runs (process 0 writes).

`RunLogger`: the progress bar, TensorBoard scalars and `train_log.jsonl` (strict JSON,
non-finite values as null); `CtrlC`: Ctrl-C handling that lets a checkpoint write finish;
`check_finite` / `all_finite`: the divergence checks (`NonFinite`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import threading
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

Array = jax.Array
PyTree = Any


def finite_json(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Metrics with non-finite floats as None (strict JSON), and the names of those."""
  out, bad = {}, []
  for k, v in metrics.items():
    if isinstance(v, float) and not math.isfinite(v):
      out[k] = None
      bad.append(k)
    else:
      out[k] = v
  return out, bad


class RunLogger:
  """Progress bar, TensorBoard scalars and a JSONL log of train metrics (process 0 only)."""
  def __init__(self, workdir: str, total: int, start: int, enabled: bool):
    self.enabled = enabled
    self.bar = None
    self.tb = None
    self.jsonl = None
    if not enabled:
      return

    self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                    mininterval=0.5)
    try:
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:  # tensorboard is optional for logging
      self.tb = None
    self.jsonl = open(os.path.join(workdir, "train_log.jsonl"), "a")

  def scalars(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
    """TensorBoard scalars and one strict-JSON line (non-finite values: null, listed under
    "nonfinite")."""
    if not self.enabled:
      return
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
          continue  # in the JSONL log as null (tensorboardX would warn about each)
        # TensorBoard tag characters; tensorboardX would rename (and log each rename) itself.
        self.tb.add_scalar(re.sub(r"[^\w./-]", "_", f"{prefix}/{k}"), v, step)
    values, bad = finite_json(metrics)
    record = {"step": step, "prefix": prefix, **values, **({"nonfinite": bad} if bad else {})}
    self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self.jsonl.flush()

  def progress(self, n: int, postfix: Mapping[str, Any] | None = None) -> None:
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)
    elif self.enabled:
      print(text)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()


class CtrlC:
  """Ctrl-C during a run: KeyboardInterrupt at once, except inside `deferred()` (checkpoint
  writes), where the first Ctrl-C waits for the write to finish; a later one abandons it (an
  unfinished step is never listed or restored). Installed only in the main thread, over
  Python's default handler."""
  def __init__(self):
    self.presses = 0
    self.depth = 0
    self.pending = False
    self.previous = None
    self.silenced = False

  def __enter__(self) -> "CtrlC":
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
      self.previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGINT, self.previous)
    if self.silenced:
      logging.disable(logging.NOTSET)

  def _handle(self, signum, frame) -> None:
    self.presses += 1
    if self.depth and self.presses == 1:
      self.pending = True
      return
    if self.depth:  # abandoning a write: its library's error report is not news
      logging.disable(logging.CRITICAL)
      self.silenced = True
    raise KeyboardInterrupt

  def deferred(self):
    ctrl_c = self

    class _Deferred:
      def __enter__(self):
        ctrl_c.depth += 1

      def __exit__(self, *exc):
        ctrl_c.depth -= 1
        if not ctrl_c.depth and ctrl_c.pending and exc[0] is None:
          ctrl_c.pending = False
          raise KeyboardInterrupt

    return _Deferred()


class NonFinite(Exception):
  """Step `step` found `what` non-finite; the parameters after `params_step` steps are the bad
  ones (a step's loss and gradient come from the previous step's parameters)."""

  def __init__(self, step: int, what: str, params_step: int):
    super().__init__(what)
    self.step, self.what, self.params_step = step, what, params_step


def check_finite(step: int, metrics: Mapping[str, Any], logger: "RunLogger") -> None:
  """Raises NonFinite naming the step and metric when the loss or grad norm is not finite
  (after logging that step's metrics, non-finite ones as null); the parameters they came
  from are those of step `step - 1`."""
  values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
  bad = [f"{k} = {values[k]}" for k in ("loss", "grad_norm")
         if k in values and not math.isfinite(values[k])]
  if bad:
    logger.scalars(step, values)
    raise NonFinite(step, ", ".join(bad), params_step=step - 1)


@jax.jit
def all_finite(tree: PyTree) -> Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))
