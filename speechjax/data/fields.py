"""Which text fields a dataset example has, as an int32 bitmask per example.

A built dataset (speechjax.data.builders) stores each example's non-blank
text fields as bits (`field_bits`); the pipeline reads them to decide which
examples a task can use (`task_mask`) without reading the examples. The
layout follows the registered tasks (speechjax.data.tasks): bit i is
`field_names()[i]`. Nothing here imports TFDS, so reading a built dataset's
field bits costs no TFDS import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from speechjax.data import tasks as tasks_lib

# Text fields an example stores whatever its tasks.
METADATA_FIELDS = ("speaker", "id")
# Field bits of datasets built before metadata named its fields: label,
# translation, prompt-and-target; 'text' was required, so every example had it.
_LEGACY_BITS = ((1, ("label",)), (2, ("translation",)), (4, ("prompt", "target")))
_MAX_FIELDS = 31  # bits of the int32 `fields` array

# Grows only, so a field keeps its bit for the life of the process even when a
# task is registered after some SourceInfo was made.
_bit_order: list[str] = []


def task_fields(tasks: Sequence[str] | None = None) -> tuple[str, ...]:
  """The manifest fields of `tasks` (default: every registered task), in order, once each."""
  names = tasks_lib.task_names() if tasks is None else tasks
  return tuple(dict.fromkeys(f for name in names for f in tasks_lib.get_task(name).fields))


def stored_fields() -> tuple[str, ...]:
  """Text fields a built example holds: its possible tasks' fields, then 'speaker' and 'id'."""
  return task_fields() + tuple(f for f in METADATA_FIELDS if f not in task_fields())


def fields_required_by(tasks: Sequence[str]) -> tuple[str, ...]:
  """Fields every line must have for `tasks`: those all of the tasks need.

  ('asr',) -> ('text',); ('classify',) -> ('label',); ('asr', 'classify') -> ():
  each example is then used for the tasks it has the fields of.
  """
  if not tasks:
    raise ValueError('fields_required_by needs at least one task; registered: '
                     f'{", ".join(tasks_lib.task_names())}')
  needed = [set(tasks_lib.get_task(name).fields) for name in tasks]
  return tuple(f for f in task_fields(tasks) if all(f in n for n in needed))


def field_names() -> tuple[str, ...]:
  """The fields `field_bits` records, bit i for field_names()[i]."""
  _bit_order.extend(f for f in task_fields() if f not in _bit_order)
  if len(_bit_order) > _MAX_FIELDS:
    raise ValueError(f"The registered tasks need {len(_bit_order)} manifest fields; the per-example "
                     f"field bits hold at most {_MAX_FIELDS}: {_bit_order}")
  return tuple(_bit_order)


def field_mask(fields: Sequence[str]) -> int:
  """The bits of `fields` (each a field of some registered task)."""
  names = field_names()
  unknown = [f for f in fields if f not in names]
  if unknown:
    raise ValueError(f"No registered task uses the manifest field(s) {unknown}; known: {names}")
  return sum(1 << names.index(f) for f in dict.fromkeys(fields))


def task_mask(task: str) -> int:
  """Bits an example's `field_bits` must all have for `task`."""
  return field_mask(tasks_lib.get_task(task).fields)


def field_bits(example: Mapping[str, Any]) -> int:
  """Bitmask of the example's non-blank fields (layout: `field_names()`)."""
  return sum(1 << i for i, f in enumerate(field_names()) if tasks_lib.as_text(example.get(f)).strip())


def split_field_bits(metadata: Mapping[str, Any], split: str) -> np.ndarray:
  """int32 [N] field bits of a built split, in this process' `field_names()` layout."""
  stored = np.asarray(metadata["fields"][split], np.int64)
  names = field_names()
  out = np.zeros(stored.shape, np.int64)
  if "field_names" in metadata:
    pairs = [(1 << i, (f,)) for i, f in enumerate(metadata["field_names"])]
  else:
    pairs = list(_LEGACY_BITS)
    if "text" in names:
      out |= 1 << names.index("text")
  for bit, fields in pairs:
    for f in fields:
      if f in names:
        out |= np.where(stored & bit, 1 << names.index(f), 0)
  return out.astype(np.int32)
