"""Random-access sources the pipeline reads, and what it needs to know about them.

Any object with `__len__` and `__getitem__(i) -> dict` works (a TFDS
`as_data_source()` split, a list of dicts, `ManifestSource`). Records hold
'audio' (int16 or float32 [samples] at 16 kHz) and text fields (str or
bytes). `SourceInfo` carries per-example lengths and field bits so batches
can be planned (length grouping, task eligibility) without decoding audio.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any

from absl import logging
import numpy as np

from speechjax.data import audio as audio_lib
from speechjax.data import fields as fields_lib
from speechjax.data import validate


@dataclasses.dataclass
class SourceInfo:
  num_samples: np.ndarray  # int64 [N]
  fields: np.ndarray  # int32 [N], fields_lib.field_bits (layout: field_names())
  label_names: tuple[str, ...] = ()
  num_skipped: int = 0
  # The lines left out when the source was built or read (validate.Skipped:
  # file, line number, reason); `record_skipped` writes them to RUN/skipped.jsonl.
  skipped: list = dataclasses.field(default_factory=list)


def scan_info(source, label_names: Sequence[str] | None = None) -> SourceInfo:
  """Reads every record once (slow for big datasets; TFDS metadata avoids it)."""
  num_samples, fields, labels = [], [], set()
  for i in range(len(source)):
    record = source[i]
    num_samples.append(int(np.asarray(record["audio"]).size))
    fields.append(fields_lib.field_bits(record))
    label = record.get("label")
    label = label.decode("utf-8") if isinstance(label, bytes) else label
    if label:
      labels.add(str(label))
  return SourceInfo(np.asarray(num_samples, np.int64), np.asarray(fields, np.int32),
                    tuple(label_names) if label_names is not None else tuple(sorted(labels)))


def tfds_split(dataset_dir: str, split: str, name: str | None = None):
  """(source, SourceInfo) for a split of a dataset built by our builders.

  Falls back to scanning records when the dataset lacks our metadata.
  """
  from speechjax.data.builders import manifest as manifest_builder  # pylint: disable=import-outside-toplevel
  builder = manifest_builder.open_dataset(dataset_dir, name)
  source = builder.as_data_source(split=split)
  metadata = dict(builder.info.metadata or {})
  if split in metadata.get("num_samples", {}):
    info = SourceInfo(np.asarray(metadata["num_samples"][split], np.int64),
                      fields_lib.split_field_bits(metadata, split),
                      tuple(metadata.get("label_names", ())),
                      int(metadata.get("num_skipped", {}).get(split, 0)),
                      built_skipped(dataset_dir, split, name))
    if info.num_samples.size != len(source):
      raise ValueError(f"{dataset_dir}: metadata lists {info.num_samples.size} examples for split "
                       f"{split!r} but the data holds {len(source)}; rebuild the dataset.")
    return source, info
  logging.warning("%s has no per-example metadata for %r; scanning %d records.", dataset_dir, split,
                  len(source))
  return source, scan_info(source)


def built_skipped(dataset_dir: str, split: str, name: str | None = None) -> list[validate.Skipped]:
  """The lines the builder of a dataset left out of `split` (its skipped.jsonl)."""
  from speechjax.data.builders import manifest as manifest_builder  # pylint: disable=import-outside-toplevel
  path = os.path.join(manifest_builder.resolve_dataset_dir(dataset_dir, name), "skipped.jsonl")
  if not os.path.exists(path):
    return []
  known = {f.name for f in dataclasses.fields(validate.Skipped)}
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [validate.Skipped(**{k: v for k, v in row.items() if k in known})
          for row in rows if row.get("split", split) == split]


def record_skipped(workdir: str, skipped) -> str:
  """Adds `skipped` (validate.Skipped) to WORKDIR/skipped.jsonl, each line once:
  a line already listed (same file, line number and id) is not listed again,
  so a run that resumes, or scores the file it trained on, does not double it.
  Returns the file's path."""
  path = os.path.join(workdir, "skipped.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
  seen = {validate.skip_key(row) for row in rows}
  for item in skipped:
    if validate.skip_key(item) not in seen:
      seen.add(validate.skip_key(item))
      rows.append(item.to_json())
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)
  return path


class ManifestSource:
  """A manifest read directly (no TFDS build), with the builders' bad-input checks.

  Every line is decoded and checked once at construction; bad lines are left
  out and listed in `.skipped`. Decoded audio is kept as int16 while the
  total stays under `cache_mb`, otherwise re-read on access.
  """

  def __init__(self, path: str, *, max_seconds: float | None = 30.0,
               min_seconds: float = validate.MIN_SECONDS,
               required_fields: Sequence[str] = ("text",), label_names: Sequence[str] | None = None,
               cache_mb: float = 1024.0):
    self.path = os.path.abspath(path)
    self.skipped: list[validate.Skipped] = []
    self._records: list[dict[str, Any]] = []
    cached_bytes, keep_cache = 0, True
    for example in validate.iter_manifest_examples(self.path, max_seconds=max_seconds,
                                                   min_seconds=min_seconds,
                                                   required_fields=required_fields,
                                                   skipped=self.skipped):
      audio = audio_lib.float_to_int16(example.pop("audio"))
      example["num_samples"] = audio.size
      cached_bytes += audio.nbytes
      keep_cache = keep_cache and cached_bytes <= cache_mb * 2**20
      example["audio"] = audio if keep_cache else None
      self._records.append(example)
    if not keep_cache:
      for record in self._records:
        record["audio"] = None
    validate.raise_if_all_skipped(self.path, len(self._records), self.skipped)
    labels = sorted({r["label"] for r in self._records if r["label"]})
    self.info = SourceInfo(
        np.asarray([r["num_samples"] for r in self._records], np.int64),
        np.asarray([fields_lib.field_bits(r) for r in self._records], np.int32),
        tuple(label_names) if label_names is not None else tuple(labels), len(self.skipped),
        list(self.skipped))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self._records[index])
    if record["audio"] is None:
      if record.get("audio_paths"):  # a dialogue: its clips joined again
        from speechjax.data import dialogue
        record["audio"] = dialogue.reload_audio(record["audio_paths"])
      else:
        record["audio"] = audio_lib.float_to_int16(audio_lib.load_audio(record["audio_path"]))
    return record


def _expand(path: str) -> str:
  return os.path.expandvars(os.path.expanduser(path))


def open_source(config, split: str, label_names: Sequence[str] | None = None):
  """(source, info) for a split of the configured dataset, or for a manifest path.

  A split ending in .jsonl is read directly as a manifest (e.g. `evaluate
  --manifest`); pass the training `label_names` so class ids agree.
  """
  split = _expand(split)
  if "+" in split:  # e.g. 'train_clean_100+train_clean_360+train_other_500'
    parts = [open_source(config, part, label_names) for part in split.split("+")]
    return ConcatSource([p[0] for p in parts]), concat_info([p[1] for p in parts])
  if split.endswith(".jsonl"):
    source = ManifestSource(split, max_seconds=config.get("max_audio_seconds", 30.0),
                            required_fields=fields_lib.fields_required_by(
                                tuple(config.get("tasks", ("asr",)))),
                            label_names=label_names)
    return source, source.info
  source, info = tfds_split(_expand(config.data_dir), split, config.get("name") or None)
  if label_names is not None:
    info.label_names = tuple(label_names)
  return source, info


class ConcatSource:
  """Several random-access sources read as one (indices run through them in order)."""

  def __init__(self, sources):
    self._sources = list(sources)
    self._starts = np.cumsum([0] + [len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    which = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._sources[which][index - int(self._starts[which])]


def concat_info(infos: Sequence[SourceInfo]) -> SourceInfo:
  labels = sorted({name for info in infos for name in info.label_names})
  return SourceInfo(np.concatenate([i.num_samples for i in infos]), np.concatenate([i.fields for i in infos]),
                    tuple(labels), sum(i.num_skipped for i in infos),
                    [s for i in infos for s in i.skipped])
