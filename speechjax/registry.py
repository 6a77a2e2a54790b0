"""A name -> entry table, the one shape every family of pluggable things shares.

speechjax keeps one registry per family (model families in
`speechjax.models.families`, audio encoders in `speechjax.models.encoders`,
projectors in `speechjax.models.projector`, tasks in `speechjax.data.tasks`).
Each entry is registered in one line next to its kind; code elsewhere looks
entries up by the name a config holds and never lists the names itself.

    ENCODERS = Registry("audio encoder")
    ENCODERS.register("whisper", EncoderSpec(...))
    spec = ENCODERS.get(config.model_type)   # unknown -> error listing the names
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Entries by name; `what` names the family in error messages."""

  def __init__(self, what: str):
    self.what = what
    self._entries: dict[str, T] = {}

  def register(self, name: str, entry: T, *, replace: bool = False) -> T:
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self.what} names are non-empty strings, got {name!r}")
    if name in self._entries and not replace:
      raise ValueError(f"{self.what} {name!r} is already registered; pass replace=True to "
                       "override it on purpose")
    self._entries[name] = entry
    return entry

  def unregister(self, name: str) -> None:
    self.get(name)
    del self._entries[name]

  def get(self, name: str) -> T:
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"unknown {self.what} {name!r}; registered: {', '.join(self.names())}") from None

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._entries))

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)
