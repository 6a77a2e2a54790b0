"""Requests from concurrent page users, decoded together.

Each HTTP handler thread puts its request on a queue and waits on its own
future; one worker thread takes the first request, waits up to `wait_ms` for
more (at most `max_batch`), and decodes them as one batch: a model runs a
batch of 8 in about the time of one, and only one thread touches the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
import dataclasses
import queue
import threading
import time

import numpy as np


@dataclasses.dataclass
class Request:
  wave: np.ndarray  # 16 kHz mono float32
  task: str
  instruction: str = ""
  future: Future = dataclasses.field(default_factory=Future)


@dataclasses.dataclass(frozen=True)
class Answer:
  segments: list  # speechjax.transcriber.Segment, one per chunk
  decode_seconds: float  # wall time of the batch this request was decoded in
  batch_size: int  # requests decoded together


# (waves, tasks, instructions) -> each wave's segments; Transcriber.decode_waves
DecodeFn = Callable[[Sequence[np.ndarray], Sequence[str], Sequence[str]], list]


class BatchingQueue:
  """`submit(wave, task, instruction)` -> Future[Answer]; `close()` stops the worker."""

  def __init__(self, decode: DecodeFn, max_batch: int = 8, wait_ms: float = 10.0):
    if max_batch < 1:
      raise ValueError(f"BatchingQueue: max_batch={max_batch} must be at least 1")
    self.decode, self.max_batch, self.wait_seconds = decode, max_batch, wait_ms / 1000.0
    self._queue: queue.Queue[Request | None] = queue.Queue()
    self._worker = threading.Thread(target=self._run, name="speechjax-serve-batcher", daemon=True)
    self._worker.start()

  def submit(self, wave: np.ndarray, task: str, instruction: str = "") -> Future:
    if not self._worker.is_alive():
      raise RuntimeError("BatchingQueue is closed")
    request = Request(np.asarray(wave, np.float32), task, instruction)
    self._queue.put(request)
    return request.future

  def close(self) -> None:
    self._queue.put(None)
    self._worker.join(timeout=30)

  def _gather(self, first: Request) -> tuple[list[Request], bool]:
    """`first` plus what arrives within the wait; (batch, whether to stop after it)."""
    batch, deadline = [first], time.monotonic() + self.wait_seconds
    while len(batch) < self.max_batch:
      remaining = deadline - time.monotonic()
      try:
        item = self._queue.get(timeout=max(remaining, 0.0)) if remaining > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if item is None:
        return batch, True
      batch.append(item)
    return batch, False

  def _run(self) -> None:
    while True:
      first = self._queue.get()
      if first is None:
        return
      batch, stop = self._gather(first)
      start = time.perf_counter()
      try:
        results = self.decode([r.wave for r in batch], [r.task for r in batch], [r.instruction for r in batch])
      except Exception as e:  # every waiting page gets the error, and the worker lives on
        for request in batch:
          request.future.set_exception(e)
      else:
        seconds = time.perf_counter() - start
        for request, segments in zip(batch, results):
          request.future.set_result(Answer(segments, seconds, len(batch)))
      if stop:
        return
