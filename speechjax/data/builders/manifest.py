"""TFDS builder for JSONL manifests, writing array_record without TensorFlow.

    dataset_dir = build_manifest_dataset(
        {'train': 'train.jsonl', 'dev': 'dev.jsonl'}, data_dir='/data/tfds',
        name='my_corpus')
    source = load_data_source(dataset_dir, 'train')   # random access, grain-ready
    source[0] -> {'audio': int16 [samples], 'text': b'...', 'label': b'...', ...}

TensorFlow is not installed: audio is an int16 `tfds.features.Tensor` (not
`tfds.features.Audio`) and text fields are `tfds.features.Text`; with
`file_format='array_record'` both the writer and `as_data_source()` run on
numpy only (checked with tensorflow-datasets 4.9.10).

Examples keep manifest order (`disable_shuffling`, integer keys) so index i of
a split is its i-th clean line; grain shuffles at read time. Each built dataset
also holds, in `info.metadata` (metadata.json):
    sample_rate, label_names (sorted labels over all splits),
    num_samples[split] (per example, for length bucketing without reading audio),
    field_names, fields[split] (per example bitmask: bit i set when field_names[i] is non-empty),
    num_skipped[split], skip_reasons[split],
and `skipped.jsonl` lists every line that failed a check in `validate.py`.

Which text fields an example stores, and which of them the field bits record,
follow the registered tasks (`speechjax.data.tasks`): every field some task
needs, plus 'speaker' and 'id'. The fields every line must have follow the
tasks the dataset is built for (`fields_required_by(tasks)`): 'text' for ASR,
'label' and no 'text' for a classification-only manifest.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
import concurrent.futures
import contextlib
import glob
import json
import os
import sys
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from speechjax.data import audio as audio_lib
from speechjax.data import validate
from speechjax.data.fields import field_bits, field_names, fields_required_by, stored_fields

VERSION = "1.0.0"
class AudioTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared generation: records -> checked, 16 kHz int16 examples + metadata.

  Subclasses implement `_split_records()`: {split: iterable of
  (source_name, line_number, record_dict)} where record_dict has manifest keys
  and an absolute or source-relative "audio" path.
  """

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {
      str(VERSION): "Audio as int16 16 kHz, text fields, per-example lengths in metadata."
  }

  def __init__(self, *, max_seconds: float | None = 30.0, min_seconds: float = validate.MIN_SECONDS,
               tasks: Sequence[str] = ("asr",), required_fields: Sequence[str] | None = None,
               num_workers: int = 4, **kwargs):
    """Every line must have `required_fields` (default: `fields_required_by(tasks)`)."""
    self._max_seconds = max_seconds
    self._min_seconds = min_seconds
    self._required_fields = tuple(
        fields_required_by(tasks) if required_fields is None else required_fields)
    self._stored_fields = stored_fields()
    self._num_workers = max(1, int(num_workers))
    self.skipped: list[validate.Skipped] = []
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description="Speech with transcripts (and optional labels, translations, instructions).",
        features=tfds.features.FeaturesDict({
            # Raw bytes: an Int64List proto of samples is ~5x slower to write and read.
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                          encoding=tfds.features.Encoding.BYTES),
            "duration": tfds.features.Tensor(shape=(), dtype=np.float32),
            **{field: text for field in self._stored_fields},
        }),
        metadata=tfds.core.MetadataDict(sample_rate=audio_lib.SAMPLE_RATE),
        disable_shuffling=True,
    )

  @abc.abstractmethod
  def _split_records(self) -> dict[str, Any]:
    """{split: iterable of (source name, line number, record dict or None)}."""

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
        split: self._generate_examples(split, records)
        for split, records in self._split_records().items()
    }

  def _load(self, item):
    source, line_number, record = item
    example, problem = validate.load_example(record, os.path.dirname(os.path.abspath(source)),
                                             max_seconds=self._max_seconds,
                                             min_seconds=self._min_seconds,
                                             required_fields=self._required_fields)
    if example is not None:  # exactly the stored text fields, whichever tasks are registered
      text = {f: validate.as_text(example.get(f, record.get(f))).strip()
              for f in self._stored_fields}
      example = {key: value for key, value in example.items() if key not in validate.text_fields()}
      example.update(text)
    return source, line_number, record, example, problem

  def _checked(self, records, split: str):
    """Loads records on a thread pool (soundfile and soxr release the GIL), in order."""

    def chunks():
      chunk = []
      for item in records:
        if item[2] is None:  # unparsable manifest line
          self.skipped.append(
              validate.Skipped("invalid_json", "not a JSON object", item[0], item[1], split=split))
          continue
        chunk.append(item)
        if len(chunk) == 64 * self._num_workers:
          yield chunk
          chunk = []
      if chunk:
        yield chunk

    with concurrent.futures.ThreadPoolExecutor(self._num_workers) as pool:
      for chunk in chunks():
        for source, line_number, record, example, problem in pool.map(self._load, chunk):
          if problem:
            self.skipped.append(
                validate.Skipped(problem[0], problem[1], source, line_number,
                                 validate.as_text(record.get("id")),
                                 validate.as_text(record.get("audio")), split))
            continue
          if not example["id"]:
            example["id"] = f"{os.path.splitext(os.path.basename(source))[0]}-{line_number:06d}"
          yield source, example

  def _generate_examples(self, split: str, records) -> Iterator[tuple[int, dict[str, Any]]]:
    num_samples, fields, labels = [], [], set()
    kept_per_source: dict[str, int] = {}

    def tracked(records):
      for item in records:
        kept_per_source.setdefault(item[0], 0)
        yield item

    for index, (source, example) in enumerate(self._checked(tracked(records), split)):
      kept_per_source[source] += 1
      audio = audio_lib.float_to_int16(example.pop("audio"))
      example.pop("audio_path")
      example.pop("audio_paths", None)  # a dialogue's clips (its turns keep their lengths)
      num_samples.append(int(audio.size))
      fields.append(field_bits(example))
      if example.get("label"):
        labels.add(example["label"])
      yield index, {**example, "audio": audio, "duration": np.float32(example["duration"])}
    # A manifest whose every line is bad is almost always a wrong path or
    # format: fail loudly, naming it, rather than train on the other sources.
    for source, kept in sorted(kept_per_source.items()):
      validate.raise_if_all_skipped(source, kept, self.skipped)
    if not num_samples:
      raise validate.AllExamplesSkippedError(f"Split {split!r} of {self.name} has no examples.")
    metadata = self.info.metadata
    metadata.setdefault("num_samples", {})[split] = num_samples
    metadata["field_names"] = list(field_names())
    metadata.setdefault("fields", {})[split] = fields
    mine = [s for s in self.skipped if s.split == split]
    metadata.setdefault("num_skipped", {})[split] = len(mine)
    metadata.setdefault("skip_reasons", {})[split] = validate.summarize(mine)
    metadata["label_names"] = sorted(set(metadata.get("label_names", [])) | labels)
    if mine:
      logging.warning("%s: skipped %d examples of split %s: %s", self.name, len(mine), split,
                      validate.summarize(mine))

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    # self.data_dir is the temporary directory here, renamed into place on success.
    validate.write_skipped(os.path.join(self.data_dir, "skipped.jsonl"), self.skipped)


class ManifestDataset(AudioTextBuilder, skip_registration=True):
  """Splits from JSONL manifests: ManifestDataset(manifests={'train': 'a.jsonl'}, data_dir=...)."""

  def __init__(self, *, manifests: Mapping[str, str | Sequence[str]] | None = None, **kwargs):
    self._manifests = {
        split: ([paths] if isinstance(paths, (str, os.PathLike)) else list(paths))
        for split, paths in (manifests or {}).items()
    }
    super().__init__(**kwargs)

  def _split_records(self):
    if not self._manifests:
      raise ValueError(f"{type(self).__name__} needs manifests={{split: path}} to build a dataset.")
    return {
        split: _manifest_records([os.path.abspath(p) for p in paths])
        for split, paths in self._manifests.items()
    }


def _manifest_records(paths: Sequence[str]):
  for path in paths:
    for line_number, record, _ in validate.read_manifest(path):
      yield path, line_number, record


def builder_class(name: str,
                  base: type[AudioTextBuilder] = ManifestDataset) -> type[AudioTextBuilder]:
  """A builder class whose TFDS name (the folder under data_dir) is `name`."""
  if not name.replace("_", "").isalnum() or not name[0].isalpha() or name.lower() != name:
    raise ValueError(f"Dataset name must be snake_case letters/digits, got {name!r}")
  class_name = "".join(part.capitalize() for part in name.split("_"))
  return type(class_name, (base,), {"name": name, "__module__": __name__}, skip_registration=True)


def prepare(builder: tfds.core.DatasetBuilder, overwrite: bool = False) -> str:
  """download_and_prepare quietly; returns the dataset folder."""
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD
          if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  tfds.disable_progress_bar()  # per-example bars flood logs; we log a summary instead
  # TFDS prints its banner to stdout; keep stdout for the callers' own output (JSON).
  with contextlib.redirect_stdout(sys.stderr):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return os.fspath(builder.data_dir)


def build_manifest_dataset(manifests: Mapping[str, str | Sequence[str]], data_dir: str,
                           name: str = "manifest_dataset", *, max_seconds: float | None = 30.0,
                           min_seconds: float = validate.MIN_SECONDS,
                           tasks: Sequence[str] = ("asr",),
                           required_fields: Sequence[str] | None = None, num_workers: int = 4,
                           overwrite: bool = False) -> str:
  """Builds `data_dir/name/1.0.0/` from {split: manifest path(s)}; returns that folder.

  Lines must have the fields all of `tasks` need (or `required_fields` when given).
  Raises validate.AllExamplesSkippedError naming the manifest when every line
  of one is bad.
  """
  builder = builder_class(name)(manifests=manifests, data_dir=data_dir, max_seconds=max_seconds,
                                min_seconds=min_seconds, tasks=tasks,
                                required_fields=required_fields, num_workers=num_workers)
  return prepare(builder, overwrite=overwrite)


def resolve_dataset_dir(path: str, name: str | None = None) -> str:
  """A folder holding dataset_info.json: `path` itself, or the newest `path/name/<version>`."""
  candidates = [path] + ([os.path.join(path, name)] if name else [])
  for candidate in candidates:
    if os.path.exists(os.path.join(candidate, "dataset_info.json")):
      return candidate
    versions = sorted(
        glob.glob(os.path.join(candidate, "*", "dataset_info.json")),
        key=lambda p: tfds.core.Version(os.path.basename(os.path.dirname(p)))
        if _is_version(os.path.basename(os.path.dirname(p))) else tfds.core.Version("0.0.0"))
    if versions:
      return os.path.dirname(versions[-1])
  found = available_datasets(path)
  raise FileNotFoundError(f"No TFDS dataset (dataset_info.json) under {path}" +
                          (f" or {os.path.join(path, name)}" if name else "") +
                          (f"; datasets there: {', '.join(found)}" if found else
                           "; build one with `python -m speechjax.data.build SOURCE ...`"))


def available_datasets(data_dir: str) -> list[str]:
  """Names of the datasets built under a TFDS data_dir (folders holding <version>/dataset_info.json)."""
  return sorted({os.path.basename(os.path.dirname(os.path.dirname(p)))
                 for p in glob.glob(os.path.join(glob.escape(data_dir), "*", "*", "dataset_info.json"))})


def split_names(dataset_dir: str, name: str | None = None) -> list[str]:
  """The splits of a built dataset, sorted."""
  return sorted(open_dataset(dataset_dir, name).info.splits)


def _is_version(text: str) -> bool:
  try:
    tfds.core.Version(text)
    return True
  except ValueError:
    return False


def open_dataset(dataset_dir: str, name: str | None = None) -> tfds.core.DatasetBuilder:
  return tfds.builder_from_directory(resolve_dataset_dir(dataset_dir, name))


def load_data_source(dataset_dir: str, split: str, name: str | None = None):
  """grain-compatible random-access source of one split (records as dicts of numpy/bytes)."""
  return open_dataset(dataset_dir, name).as_data_source(split=split)


def dataset_metadata(dataset_dir: str, name: str | None = None) -> dict[str, Any]:
  builder = open_dataset(dataset_dir, name)
  return dict(builder.info.metadata or {})


def read_skipped(dataset_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(resolve_dataset_dir(dataset_dir), "skipped.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
