"""When a run stops early, decided the same way on every process: a signal
(preemption), agreed across processes at a step boundary, and a run of
non-finite steps, decided every step without stalling the device."""

from __future__ import annotations

import logging
import signal

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  pass


class Preemption:
  """SIGTERM / SIGINT set a flag; the loop checkpoints and exits cleanly at the
  next step boundary instead of dying mid-update."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside some test runners)
        pass
    return self

  def _handle(self, signum, frame):
    log.warning("received signal %d: checkpointing and stopping", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class StopAgreement:
  """Turns each process's stop flag into one decision that every process takes
  at the same step, so no process stops while another waits for it in a
  collective.

  Each step every process contributes its flag to a max over the mesh (a
  jitted reduce of one int per device), and reads the result of the previous
  step's reduce: the read waits only for work queued before the step just
  dispatched, so the host never stalls the device, and the stop comes one step
  after the signal. One process needs no agreement."""

  def __init__(self, mesh):
    self.needed = jax.process_count() > 1
    self._pending = None
    if self.needed:
      from jax.sharding import NamedSharding, PartitionSpec

      self._size = mesh.devices.size
      self._sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
      self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

  def should_stop(self, requested: bool) -> bool:
    if not self.needed:
      return requested
    decided = self._pending is not None and bool(int(jax.device_get(self._pending)))
    flags = jax.make_array_from_callback(
        (self._size,), self._sharding, lambda index: np.full((1,), int(requested), np.int32))
    self._pending = self._reduce(flags)
    return decided


class NonFiniteGuard:
  """Counts non-finite steps in a row from each step's `finite` metric and
  stops the run after `max_bad_steps` of them (0 = never). It reads a step's
  metrics after the next step is dispatched, so it never stalls the device and
  decides at most one step late; at a log step, where the metrics are fetched
  anyway, it decides on time."""

  def __init__(self, max_bad_steps: int, bad_in_a_row: int, workdir: str):
    self.max_bad_steps = int(max_bad_steps)
    self.bad_in_a_row = bad_in_a_row
    self.first_bad_step = None
    self.last_finite: tuple[int, float] | None = None
    self.workdir = workdir
    self._unread: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    self._unread.append((step, {"finite": metrics["finite"], "loss": metrics["loss"]}))

  def check(self, lag: int = 1) -> None:
    """Reads every step but the newest `lag`; raises NonFiniteLossError."""
    while len(self._unread) > lag:
      step, metrics = self._unread.pop(0)
      finite, loss = (float(v) for v in jax.device_get((metrics["finite"], metrics["loss"])))
      if finite:
        self.bad_in_a_row, self.first_bad_step, self.last_finite = 0, None, (step, loss)
        continue
      self.bad_in_a_row += 1
      if self.first_bad_step is None:
        self.first_bad_step = step - self.bad_in_a_row + 1
      if 0 < self.max_bad_steps <= self.bad_in_a_row:
        last = (f"the last finite loss was {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
                if self.last_finite else "no finite loss was seen since this run (re)started")
        raise NonFiniteLossError(
            f"{self.bad_in_a_row} consecutive steps had a non-finite loss or gradient (steps "
            f"{self.first_bad_step}-{step}, train.max_bad_steps={self.max_bad_steps}); {last}. "
            f"Weights were not updated by them and the last good checkpoint is intact in "
            f"{self.workdir}/checkpoints. Lower optim.lr, check the data, or use "
            f"model.dtype='bfloat16' instead of a narrower type.")
