"""Orbax checkpoints: the last K steps, and the best one by the dev metric.

A checkpoint holds three items, so tools that only need weights can read just
one of them:

    trainable   the trained weights (LoRA, projector, ...), as a pytree
    train_state optimizer state, step, RNG and fault counters
    meta        JSON: data-iterator state, best metric, early-stopping counters

Orbax writes into a temporary folder and renames it when the save is complete,
so a run killed mid-save never leaves a half-written checkpoint behind; the
folder is simply not a checkpoint yet.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _manager(directory: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
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
    self.last = _manager(os.path.join(root, "last"), keep, async_save)
    self.best = _manager(os.path.join(root, "best"), 1, async_save)

  @staticmethod
  def _args(state: dict, meta: dict):
    train_state = {k: v for k, v in state.items() if k != "trainable"}
    return ocp.args.Composite(
        trainable=ocp.args.StandardSave(state["trainable"]),
        train_state=ocp.args.StandardSave(train_state),
        meta=ocp.args.JsonSave(meta))

  def save(self, state: dict, meta: dict, *, best: bool = False, force: bool = False) -> None:
    step = int(jax.device_get(state["step"]))
    if step in self.last.all_steps() and not force:
      return
    self.last.save(step, args=self._args(state, meta), force=True)
    if best:
      self.best.save(step, args=self._args(state, meta), force=True)

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def restore(self, target_state: dict, step: int | None = None) -> tuple[dict, dict]:
    """Restores onto the shardings of `target_state` (arrays or abstract)."""
    step = self.last.latest_step() if step is None else step
    train_target = {k: v for k, v in target_state.items() if k != "trainable"}
    restored = self.last.restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(_abstract(target_state["trainable"])),
        train_state=ocp.args.StandardRestore(_abstract(train_target)),
        meta=ocp.args.JsonRestore()))
    state = {"trainable": restored["trainable"], **restored["train_state"]}
    log.info("restored checkpoint at step %d", step)
    return state, dict(restored["meta"])

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.last.close()
    self.best.close()


def restore_trainable(workdir: str, target_trainable, which: str = "best") -> tuple[Any, dict, int]:
  """Reads only the trained weights (and meta) of the best checkpoint, or the
  latest when no best was kept. For evaluate / transcribe / export."""
  root = os.path.join(workdir, "checkpoints")
  for name in ((which, "last") if which == "best" else (which,)):
    directory = os.path.join(root, name)
    if not os.path.isdir(directory):
      continue
    manager = ocp.CheckpointManager(os.path.abspath(directory),
                                    item_names=("trainable", "train_state", "meta"))
    step = manager.latest_step()
    if step is None:
      continue
    restored = manager.restore(step, args=ocp.args.Composite(
        trainable=ocp.args.StandardRestore(_abstract(target_trainable)),
        meta=ocp.args.JsonRestore()))
    manager.close()
    return restored["trainable"], dict(restored["meta"]), step
  raise FileNotFoundError(f"no checkpoint under {root} (looked in {which!r} and 'last')")
