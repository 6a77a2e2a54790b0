"""Nested-dict parameter trees as flat {path: leaf} tables, the one way the
package flattens them: by name (converters, LoRA merge, freezing patterns,
optimizer masks, shardings) and back.

    flatten({"a": {"b": 1}})            -> {("a", "b"): 1}
    flatten({"a": {"b": 1}}, sep="/")   -> {"a/b": 1}
    unflatten({"a/b": 1}, sep="/")      -> {"a": {"b": 1}}
    path_names(path)  # a jax tree path (tree_map_with_path) -> ("a", "b")

Only mappings are descended into, so boxed (logically partitioned) values,
lazily read tensors and None stay leaves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def flatten(tree: Mapping[str, Any] | None, sep: str | None = None,
            prefix: tuple[str, ...] = ()) -> dict:
  out = {}
  for key, value in (tree or {}).items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      out.update(flatten(value, None, path))
    else:
      out[path] = value
  return out if sep is None else {sep.join(path): value for path, value in out.items()}


def unflatten(flat: Mapping, sep: str | None = None) -> dict:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    keys = path.split(sep) if sep is not None else path
    node = tree
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


def path_names(path) -> tuple[str, ...]:
  """The dict keys of a jax tree path (attribute and index steps, such as a
  box's `.value`, are skipped)."""
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
