"""TFDS builder for a local LibriSpeech copy (no download; the folder is the manual dir).

Expected layout, as the openslr tarballs unpack:

    <manual_dir>/<split dir>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <manual_dir>/<split dir>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

with split dirs such as train-clean-100 or dev-clean (a `LibriSpeech/` level
above them is also accepted). TFDS split names cannot hold '-', so each split
folder's name with '_' for '-' names its split: train_clean_100,
train_clean_360, train_other_500, dev_clean, dev_other, test_clean, test_other
(`split_name`); `splits` takes either spelling. Transcripts are lowercased by
default so answers look like ordinary text to an LLM tokenizer.

    python -m speechjax.data.build librispeech --manual_dir=/data/LibriSpeech \
        --data_dir=/data/tfds [--splits=train_clean_100,dev_clean,test_clean]
    dataset_dir = build_librispeech('/data/LibriSpeech', data_dir='/data/tfds')
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import os
import re

from speechjax.data.builders import manifest

KNOWN_SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other",
                "test-clean", "test-other")


def split_name(directory: str) -> str:
  """'train-clean-100' -> 'train_clean_100', 'dev-clean' -> 'dev_clean'."""
  return re.sub(r"\W", "_", directory)


def split_directory(split: str) -> str:
  """'train_clean_100' or 'train-clean-100' -> 'train-clean-100' (the folder name)."""
  return split.replace("_", "-")


def find_root(manual_dir: str) -> str:
  """The folder that directly holds the split directories."""
  for candidate in (manual_dir, os.path.join(manual_dir, "LibriSpeech")):
    if os.path.isdir(candidate) and any(
        os.path.isdir(os.path.join(candidate, s)) for s in KNOWN_SPLITS):
      return candidate
  raise FileNotFoundError(
      f'No LibriSpeech split folders ({", ".join(KNOWN_SPLITS)}) in {manual_dir} or '
      f'{os.path.join(manual_dir, "LibriSpeech")}')


def iter_split(split_dir: str, lowercase: bool = True) -> Iterator[tuple[str, int, dict]]:
  """(transcript file, line, manifest-style record) for every utterance, sorted."""
  for speaker in sorted(os.listdir(split_dir), key=_numeric_key):
    speaker_dir = os.path.join(split_dir, speaker)
    if not os.path.isdir(speaker_dir):
      continue
    for chapter in sorted(os.listdir(speaker_dir), key=_numeric_key):
      chapter_dir = os.path.join(speaker_dir, chapter)
      transcript = os.path.join(chapter_dir, f"{speaker}-{chapter}.trans.txt")
      if not os.path.exists(transcript):
        continue
      with open(transcript, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
          if not line.strip():
            continue
          utt_id, _, text = line.strip().partition(" ")
          yield transcript, line_number, {
              "audio": os.path.join(chapter_dir, f"{utt_id}.flac"),
              "text": text.lower() if lowercase else text,
              "speaker": speaker,
              "id": utt_id,
          }


def _numeric_key(name: str):
  return (0, int(name)) if name.isdigit() else (1, name)


class Librispeech(manifest.AudioTextBuilder, skip_registration=True):
  """LibriSpeech from `manual_dir`; `splits` limits which split folders are read."""

  name = "librispeech"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Unpack the LibriSpeech tarballs from openslr.org/12 and pass the "
      "folder holding train-clean-100/, dev-clean/, ... as manual_dir.")

  def __init__(self, *, manual_dir: str, splits: Sequence[str] | None = None,
               lowercase: bool = True, **kwargs):
    self._root = find_root(manual_dir)
    available = [s for s in KNOWN_SPLITS if os.path.isdir(os.path.join(self._root, s))]
    wanted = [split_directory(s) for s in splits] if splits else available
    unknown = [s for s in wanted if s not in KNOWN_SPLITS]
    if unknown:
      raise ValueError(f'Unknown LibriSpeech split(s) {[split_name(s) for s in unknown]}; valid: '
                       f'{", ".join(split_name(s) for s in KNOWN_SPLITS)}')
    missing = [s for s in wanted if s not in available]
    if missing:
      raise FileNotFoundError(f"LibriSpeech split folders {missing} not found in {self._root} "
                              f"(found {available})")
    self._split_dirs = wanted
    self._lowercase = lowercase
    kwargs.setdefault("max_seconds", 36.0)  # the longest LibriSpeech utterance is ~35 s
    super().__init__(**kwargs)

  def _split_records(self):
    return {
        split_name(d): iter_split(os.path.join(self._root, d), self._lowercase)
        for d in self._split_dirs
    }


def build_librispeech(manual_dir: str, data_dir: str, *, splits: Sequence[str] | None = None,
                      max_seconds: float | None = 36.0, num_workers: int = 4,
                      overwrite: bool = False) -> str:
  """Builds `data_dir/librispeech/1.0.0/`; returns that folder."""
  builder = Librispeech(manual_dir=manual_dir, splits=splits, data_dir=data_dir,
                        max_seconds=max_seconds, num_workers=num_workers)
  return manifest.prepare(builder, overwrite=overwrite)
