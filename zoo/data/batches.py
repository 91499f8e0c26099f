"""Host batches from a grain stream of samples: `DataIterator` drops and counts unusable samples
(`Skipped`), stacks the rest (`collate`) and keeps the stream position for exact resume.

With grain worker processes the stream arrives in chunks of consecutive samples (`pack_chunk`:
one message per chunk instead of one per sample); the iterator unpacks them and still counts
its position in samples, and `stream_state` / `worker_state` translate grain's per-worker
positions, so a state saved with threads resumes with processes and the other way round.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from zoo import transforms

log = logging.getLogger("zoo.data")


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Marker for a sample that could not be used; the batching iterator counts it."""

  reason: str
  key: str
  detail: str = ""


def collate(samples: Sequence[Mapping[str, np.ndarray]],
            ragged: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
  """Stacks the samples' fields; a `ragged` field (field -> its longest allowed length, e.g.
  NaFlex patches) is zero-padded to `transforms.bucket_length` of the batch's longest."""
  ragged = ragged or {}
  out = {}
  for k in samples[0]:
    rows = [np.asarray(s[k]) for s in samples]
    if k in ragged:
      n = transforms.bucket_length(max(len(r) for r in rows), ragged[k])
      rows = [np.pad(r, [(0, n - len(r))] + [(0, 0)] * (r.ndim - 1)) for r in rows]
    out[k] = np.stack(rows)
  return out


def pack_chunk(items: Sequence[Any]) -> tuple[list, dict[str, Any]]:
  """Consecutive stream elements (samples or Skipped) -> (markers, fields): one message per
  chunk from a worker process instead of one per sample. A field's rows are stacked where their
  shapes agree (a list otherwise); markers hold the Skipped elements and None for samples."""
  rows = [x for x in items if not isinstance(x, Skipped)]
  fields: dict[str, Any] = {}
  for k in (rows[0] if rows else {}):
    values = [np.asarray(r[k]) for r in rows]
    same = all(v.shape == values[0].shape for v in values)
    fields[k] = np.stack(values) if same else values
  return [x if isinstance(x, Skipped) else None for x in items], fields


def unpack_chunk(chunk: tuple[list, dict[str, Any]]) -> list[Any]:
  markers, fields = chunk
  out, j = [], 0
  for m in markers:
    if m is None:
      out.append({k: v[j] for k, v in fields.items()})
      j += 1
    else:
      out.append(m)
  return out


def stream_state(state: Mapping[str, Any]) -> dict[str, Any]:
  """grain's iterator state as the position in the sample stream ({"next_index": n}): with
  worker processes (mp_prefetch) grain reports one position per worker (worker k reads elements
  k, k+W, ...; their sum is the stream's), so a checkpoint resumes with any number of workers."""
  workers = state.get("iterators_in_use_states")
  if workers is not None and not state.get("future_states") and not any(state.get("exhausted", ())):
    return {"next_index": sum(int(w["next_index"]) for w in workers)}
  return dict(state)


def worker_state(state: Mapping[str, Any], processes: int) -> dict[str, Any]:
  """The inverse of `stream_state` for `processes` worker processes (0: the state unchanged)."""
  if not processes or set(state) != {"next_index"}:
    return dict(state)
  n, w = int(state["next_index"]), int(processes)
  return {"next_index_in_cycle": n % w, "next_index_in_datasets": w,
          "iterators_in_use_indices": list(range(w)),
          "iterators_in_use_states": [{"next_index": (n - k + w - 1) // w} for k in range(w)],
          "exhausted": [0] * w, "future_states": {}}


class DataIterator(Iterator[dict]):
  """Host-local batches from a grain sample iterator; skips and counts unusable samples.

  `skipped` is the number of samples dropped so far (in the batches returned), also by reason
  in `skipped_by_reason`. `get_state()` / `set_state()` cover the grain position and the
  counts, so a restored iterator continues exactly where the saved one was.
  """

  def __init__(self, dataset: grain.IterDataset, batch_size: int, *, max_consecutive_skips: int,
               description: str = "", ragged: Mapping[str, int] | None = None,
               processes: int = 0, chunk: int = 1):
    self._dataset = dataset
    self._processes = int(processes)
    # chunk > 1: the dataset yields `pack_chunk`s of `chunk` consecutive elements; this iterator
    # hands them out one by one and keeps the position in elements (`_pos`).
    self._chunk = int(chunk)
    self._rows: list = []
    self._offset = 0
    self._pos = 0
    self._ragged = dict(ragged or {})
    self._it = iter(dataset)
    self.batch_size = int(batch_size)
    self._max_skips = int(max_consecutive_skips)
    self.description = description
    self.skipped = 0
    self.skipped_by_reason: dict[str, int] = {}

  def __iter__(self) -> "DataIterator":
    return self

  def _count_skip(self, item: Skipped) -> None:
    self.skipped += 1
    self.skipped_by_reason[item.reason] = self.skipped_by_reason.get(item.reason, 0) + 1
    if self.skipped <= 10 or self.skipped % 1000 == 0:
      log.warning("data: skipped sample %s (%s) — %d skipped so far", item.key,
                  item.detail or item.reason, self.skipped)

  def __next__(self) -> dict[str, np.ndarray]:
    items: list[dict] = []
    consecutive = 0
    while len(items) < self.batch_size:
      item = self._next_element()
      if isinstance(item, Skipped):
        self._count_skip(item)
        consecutive += 1
        if consecutive > self._max_skips:
          raise RuntimeError(f"data: {consecutive} samples in a row could not be used "
                             f"({self.skipped_by_reason}) in {self.description}; check the data")
        continue
      consecutive = 0
      items.append(item)
    return collate(items, self._ragged)

  def _next_element(self) -> Any:
    if self._chunk == 1:
      return next(self._it)
    while self._offset >= len(self._rows):
      start = self._pos - self._pos % self._chunk  # a restored position may be mid-chunk
      self._rows, self._offset = unpack_chunk(next(self._it)), self._pos - start
    item = self._rows[self._offset]
    self._offset += 1
    self._pos += 1
    return item

  def get_state(self) -> dict[str, Any]:
    grain_state = (stream_state(self._it.get_state()) if self._chunk == 1
                   else {"next_index": self._pos})
    return {"grain": grain_state, "skipped": int(self.skipped),
            "skipped_by_reason": dict(self.skipped_by_reason)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or "grain" not in state:
      raise ValueError(f"data iterator state must be a dict with a 'grain' entry, got {state!r:.200}")
    grain_state = state["grain"]
    if self._chunk > 1:
      if set(grain_state) != {"next_index"}:
        raise ValueError(f"data iterator state {grain_state!r:.200} is not a stream position")
      self._pos = int(grain_state["next_index"])
      self._rows, self._offset = [], 0
      grain_state = {"next_index": self._pos // self._chunk}
    self._it.set_state(worker_state(grain_state, self._processes))
    self.skipped = int(state.get("skipped", 0))
    self.skipped_by_reason = {str(k): int(v) for k, v in dict(state.get("skipped_by_reason", {})).items()}

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
