"""Orbax checkpoints: the last K steps, and the best one by the dev metric.

A checkpoint holds three items, so tools that only need weights can read just
one of them:

    trainable   the trained weights (LoRA, projector, ...), as a pytree
    train_state optimizer state, step, RNG and fault counters
    meta        JSON: data-iterator state, best metric, early-stopping counters

Orbax writes into a temporary folder and renames it when the save is complete,
so a run killed mid-save never leaves a half-written checkpoint behind; the
folder is simply not a checkpoint yet. A checkpoint damaged after the fact (a
file truncated or deleted on disk) is skipped on restore: the newest readable
one is restored, and the damaged one is moved to `W/checkpoints/unreadable/`
so that the step is saved again when the run gets there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _manager(directory: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  # Each manager's barriers get their own names. Orbax names its cross-process
  # barriers by operation only, and "last" and "best" save the same step at
  # once: with shared names, the main thread of one manager and the save thread
  # of the other meet at one barrier on one process, and under load the
  # processes pair them differently and wait forever.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=f"speechjax_{os.path.basename(directory)}"))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("trainable", "train_state", "meta"))


def _abstract(tree):
  """ShapeDtypeStructs carrying each leaf's sharding, so a restore places every
  array straight onto the (possibly different) current mesh."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpoints:
  """`W/checkpoints/last` keeps the newest `keep` steps, `W/checkpoints/best`
  the single best by the configured metric."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    root = os.path.join(workdir, "checkpoints")
    self.root = root
    self.last = _manager(os.path.join(root, "last"), keep, async_save)
    self.best = _manager(os.path.join(root, "best"), 1, async_save)

  @staticmethod
  def _args(state: dict, meta: dict):
    train_state = {k: v for k, v in state.items() if k != "trainable"}
    return ocp.args.Composite(
        trainable=ocp.args.StandardSave(state["trainable"]),
        train_state=ocp.args.StandardSave(train_state),
        meta=ocp.args.JsonSave(meta))

  def save(self, state: dict, meta: dict, *, best: bool = False) -> bool:
    """Saves the step of `state` unless a checkpoint of that step exists (a
    preemption at a checkpoint step lands here a second time); returns whether
    it saved."""
    step = int(jax.device_get(state["step"]))
    saved = step not in self.last.all_steps()
    if saved:
      self.last.save(step, args=self._args(state, meta), force=True)
    if best and step not in self.best.all_steps():
      self.best.save(step, args=self._args(state, meta), force=True)
    return saved

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def _restore_step(self, target_state: dict, step: int) -> tuple[dict, dict]:
    train_target = {k: v for k, v in target_state.items() if k != "trainable"}
    restored = self.last.restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(_abstract(target_state["trainable"])),
        train_state=ocp.args.StandardRestore(_abstract(train_target)),
        meta=ocp.args.JsonRestore()))
    return {"trainable": restored["trainable"], **restored["train_state"]}, dict(restored["meta"])

  def restore(self, target_state: dict, step: int | None = None) -> tuple[dict, dict]:
    """Restores onto the shardings of `target_state` (arrays or abstract).
    Without `step`: the newest checkpoint every process can read; an unreadable
    one is logged (step and error), moved aside, and the next older one tried."""
    if step is not None:
      state, meta = self._restore_step(target_state, step)
      log.info("restored checkpoint at step %d", step)
      return state, meta
    failures = []
    for candidate in sorted(self.last.all_steps(), reverse=True):
      try:
        state, meta = self._restore_step(target_state, candidate)
        error = None
      except Exception as e:  # pylint: disable=broad-except
        state, meta, error = None, None, e
      if _all_processes_succeeded(error is None):
        if failures:
          log.warning("restored checkpoint at step %d, the newest readable one", candidate)
        else:
          log.info("restored checkpoint at step %d", candidate)
        return state, meta
      reason = f"{type(error).__name__}: {error}" if error is not None else "unreadable on another process"
      log.warning("checkpoint at step %d is unreadable, skipped (%s)", candidate, reason[:2000])
      failures.append((candidate, reason))
      self._set_aside(candidate)
    raise RuntimeError(f"no readable checkpoint under {self.root}: " + "; ".join(
        f"step {s}: {r[:500]}" for s, r in failures))

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's folder (process 0 moves,
    every process reloads), so a later save of that step is not skipped."""
    if jax.process_index() == 0:
      source = os.path.join(self.root, "last", str(step))
      target = os.path.join(self.root, "unreadable", f"last-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      if os.path.isdir(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target)
        log.warning("moved the unreadable checkpoint of step %d to %s", step, target)
    _sync("speechjax_checkpoint_set_aside")
    self.last.reload()

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    """Waits for in-flight saves and stops orbax's background threads. Every
    process calls it at the same point of the run, before jax.distributed shuts
    down (the saves end in a cross-process barrier)."""
    self.last.close()
    self.best.close()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _all_processes_succeeded(ok: bool) -> bool:
  """Whether every process restored its part: they must agree on the step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def restore_trainable(workdir: str, target_trainable, which: str = "best") -> tuple[Any, dict, int]:
  """Reads only the trained weights (and meta) of the best checkpoint, or the
  latest when no best was kept (or it cannot be read). For evaluate /
  transcribe / export. An unreadable checkpoint is logged and the next older
  one read; nothing is moved."""
  root = os.path.join(workdir, "checkpoints")
  failures = []
  for name in ((which, "last") if which == "best" else (which,)):
    directory = os.path.join(root, name)
    if not os.path.isdir(directory):
      continue
    manager = ocp.CheckpointManager(os.path.abspath(directory),
                                    item_names=("trainable", "train_state", "meta"))
    try:
      for step in sorted(manager.all_steps(), reverse=True):
        try:
          restored = manager.restore(step, args=ocp.args.Composite(
              trainable=ocp.args.StandardRestore(_abstract(target_trainable)),
              meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except
          log.warning("checkpoint %s/%d is unreadable, skipped (%s: %s)", name, step,
                      type(e).__name__, str(e)[:500])
          failures.append(f"{name}/{step}: {type(e).__name__}")
          continue
        return restored["trainable"], dict(restored["meta"]), step
    finally:
      manager.close()
  unreadable = f"; unreadable: {', '.join(failures)}" if failures else ""
  raise FileNotFoundError(f"no readable checkpoint under {root} (looked in {which!r} and "
                          f"'last'){unreadable}")
