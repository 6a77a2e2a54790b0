"""The configs a run was started with, and the check that a resumed run trains
what its checkpoint was trained with.

Each start of a run writes its resolved config to `W/config.<step>.json`, the
step it starts from (0 for a new run, the restored step on resume), and
`W/config.json` is the latest start. An older record is never overwritten: a
second start from the same step with another config is written to
`config.<step>-<n>.json`.

On resume the new config is compared with the record of the start that trained
the checkpoint. Keys that change what is trained (model, data, optimizer, LoRA,
train mode, seed, mesh rules, ...) must match, unless the run says
`resume_policy="allow_changes"`; the keys in `MAY_CHANGE_ON_RESUME` change only
how long a run goes, what it logs, when it evaluates or saves, and where it
caches, and may change freely. This module imports nothing heavy, so the sweep
uses the same list to decide whether a folder holds a run of the same config.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)

RESUME_POLICIES = ("strict", "allow_changes")

# The one list of config keys a resumed run may change (fnmatch patterns over
# dotted keys). Everything else is part of what the checkpoint was trained with.
MAY_CHANGE_ON_RESUME = (
    # How long the run goes: extending a run is the point of resuming it. With a
    # decaying schedule the learning rate from the resumed step on follows the
    # new length; the steps already taken are unchanged.
    "train.num_steps",
    "train.max_bad_steps",  # a stopping rule, not part of the state
    "logging.*",  # what is written where (TensorBoard, W&B, progress bar, cadence)
    # When and how dev is scored. eval.metric and eval.mode are not here: the
    # early-stopping record in the checkpoint holds the best value of that metric.
    "eval.every_steps", "eval.max_batches", "eval.patience", "eval.task_metrics",
    "eval.max_examples", "eval.tasks", "eval.classify_with", "eval.decode.*",
    "checkpoint.*",  # when and how state is saved, not what is saved
    "compile_cache_dir", "data.encoder_cache_dir",  # where compiled programs and encoder states are cached
    "resume_policy",
    # The device layout: a checkpoint restores onto any mesh and the step computes
    # the same values (up to float summation order). The rules are not here.
    "mesh.shape", "mesh.dcn_shape",
    "data.worker_threads", "data.prefetch_batches",  # read-ahead, not which examples
    "data.eval_batch_size", "data.eval_split", "data.test_split", "data.eval_task",  # scoring only
)

_RECORD = re.compile(r"^config\.(\d+)(?:-(\d+))?\.json$")


class ConfigChangedError(ValueError):
  """A resumed run's config differs from its checkpoint's in a key that changes
  what is trained."""


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists and tuples compare equal (JSON makes lists)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
  return out


def may_change(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in MAY_CHANGE_ON_RESUME)


def trained_state_part(config: dict) -> dict[str, Any]:
  """The flat keys of a resolved config that decide what is trained."""
  return {k: v for k, v in flatten(config).items() if not may_change(k)}


_ABSENT = "<absent>"


def differences(recorded: dict, current: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
  """[(key, recorded value, current value)] over the keys that decide what is
  trained. A key the record lacks (a run started before the key existed)
  counts as its value in `defaults` (the base config), since a new key's
  default keeps the behaviour it had before."""
  old, new = trained_state_part(recorded), trained_state_part(current)
  base = flatten(defaults) if defaults else {}
  out = []
  for key in sorted(set(old) | set(new)):
    before = old.get(key, base.get(key, _ABSENT))
    after = new.get(key, base.get(key, _ABSENT))
    if before != after:
      out.append((key, before, after))
  return out


def _records(workdir: str) -> list[tuple[int, int, str]]:
  """(start step, repeat, path) of every start record, oldest first."""
  found = []
  for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
    match = _RECORD.match(name)
    if match:
      found.append((int(match.group(1)), int(match.group(2) or 1), os.path.join(workdir, name)))
  return sorted(found)


def record_for_step(workdir: str, step: int) -> str | None:
  """The record of the start that trained the checkpoint of `step`: the newest
  start from a step before it. `W/config.json` alone (a run from before start
  records) stands for its only start."""
  earlier = [path for start, _, path in _records(workdir) if start < step]
  if earlier:
    return earlier[-1]
  if not _records(workdir) and os.path.exists(os.path.join(workdir, "config.json")):
    return os.path.join(workdir, "config.json")
  return None


def check_resume(workdir: str, current: dict, step: int, policy: str,
                 defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
  """Compares `current` (a resolved config dict) with the record of the start
  that trained checkpoint `step`. Raises ConfigChangedError naming every
  changed key under the strict policy; logs them loudly under allow_changes.
  Returns the differences."""
  if policy not in RESUME_POLICIES:
    raise ValueError(f"resume_policy={policy!r}; valid: {', '.join(RESUME_POLICIES)}")
  path = record_for_step(workdir, step)
  if path is None:
    log.warning("%s holds a checkpoint at step %d but no record of the config it was trained "
                "with; resuming without comparing configs", workdir, step)
    return []
  with open(path) as f:
    recorded = json.load(f)
  changed = differences(recorded, current, defaults)
  if not changed:
    return []
  lines = "\n".join(f"  {key}: {before!r} (checkpoint) -> {after!r} (now)"
                    for key, before, after in changed)
  if policy == "allow_changes":
    log.warning("RESUMING STEP %d OF %s WITH A CHANGED CONFIG (resume_policy=allow_changes); "
                "these keys differ from %s:\n%s", step, workdir, os.path.basename(path), lines)
    return changed
  raise ConfigChangedError(
      f"{workdir} holds a checkpoint at step {step} trained with another config "
      f"({path}); these keys differ:\n{lines}\n"
      f"Keys that may change on resume: {', '.join(MAY_CHANGE_ON_RESUME)}.\n"
      "To train a new run, use another --workdir; to resume with these changes anyway "
      "(e.g. the data or a model folder only moved), pass --config.resume_policy=allow_changes.")


def _write_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def record_start(workdir: str, config_json: str, step: int) -> str:
  """Writes the config of a start from `step` (config.<step>.json, or
  config.<step>-<n>.json when that record holds another config) and
  config.json; returns the record's path. A workdir with only config.json
  (from before start records) keeps it as config.0.json."""
  os.makedirs(workdir, exist_ok=True)
  latest = os.path.join(workdir, "config.json")
  if not _records(workdir) and os.path.exists(latest):
    with open(latest) as f:
      _write_atomically(os.path.join(workdir, "config.0.json"), f.read())
  repeats = [(n, path) for start, n, path in _records(workdir) if start == step]
  if repeats:
    with open(repeats[-1][1]) as f:
      if f.read() == config_json:  # a restart from the same step with the same config
        _write_atomically(latest, config_json)
        return repeats[-1][1]
  n = repeats[-1][0] + 1 if repeats else 1
  path = os.path.join(workdir, f"config.{step}.json" if n == 1 else f"config.{step}-{n}.json")
  _write_atomically(path, config_json)
  _write_atomically(latest, config_json)
  return path
