"""TFDS builder for CoVoST 2 speech translation (a local copy; no download).

CoVoST 2 ships translations as TSV files and takes its audio from Common Voice:

    <tsv_dir>/covost_v2.<src>_<tgt>.train.tsv   (also .dev.tsv, .test.tsv)
    <clips_dir>/clips/<path>                     Common Voice clips (mp3; wav/flac also read)

Each TSV has a header row naming at least the columns `path` (the clip's file
name), `sentence` (the transcript), `translation` and `client_id` (the
speaker); columns are tab-separated and unquoted (quotes are part of the text).
`clips_dir` may be the Common Voice language folder (holding `clips/`) or the
`clips/` folder itself. mp3 is decoded by soundfile (libsndfile >= 1.1 reads
MPEG layer III), so no extra package is needed.

Every example holds `text` (the source transcript), `translation`, `speaker`
(client_id) and `id` (the clip's name without extension), so a recipe can
train on the `translate` and `asr` tasks together. Splits are named as in the
file names: train, dev, test.

    python -m speechjax.data.build covost2 --tsv_dir=/data/covost2 \\
        --clips_dir=/data/cv-corpus-4/en --source_language=en --target_language=de \\
        --data_dir=/data/tfds          # -> /data/tfds/covost2_en_de/1.0.0/
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import csv
import os
import sys

from speechjax.data.builders import manifest

SPLITS = ("train", "dev", "test")
REQUIRED_COLUMNS = ("path", "sentence", "translation", "client_id")


def tsv_path(tsv_dir: str, source_language: str, target_language: str, split: str) -> str:
  return os.path.join(tsv_dir, f"covost_v2.{source_language}_{target_language}.{split}.tsv")


def find_clips(clips_dir: str) -> str:
  """The folder holding the clip files: `clips_dir/clips` or `clips_dir` itself."""
  nested = os.path.join(clips_dir, "clips")
  if os.path.isdir(nested):
    return nested
  if os.path.isdir(clips_dir):
    return clips_dir
  raise FileNotFoundError(f"CoVoST 2 clips folder {clips_dir} does not exist (expected the Common "
                          "Voice language folder holding clips/, or clips/ itself)")


def iter_tsv(path: str, clips: str) -> Iterator[tuple[str, int, dict]]:
  """(tsv file, line number, manifest-style record) for every row."""
  csv.field_size_limit(sys.maxsize)
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    missing = [c for c in REQUIRED_COLUMNS if c not in (header or [])]
    if missing:
      raise ValueError(f"{path}: header {header} lacks column(s) {missing}; a CoVoST 2 TSV has "
                       f"{', '.join(REQUIRED_COLUMNS)}")
    column = {name: header.index(name) for name in REQUIRED_COLUMNS}
    for line_number, row in enumerate(reader, start=2):
      if not row or not any(cell.strip() for cell in row):
        continue
      if len(row) < len(header):
        yield path, line_number, None  # recorded as an unparsable line
        continue
      clip = row[column["path"]].strip()
      yield path, line_number, {
          "audio": os.path.join(clips, clip),
          "text": row[column["sentence"]],
          "translation": row[column["translation"]],
          "speaker": row[column["client_id"]],
          "id": os.path.splitext(clip)[0],
      }


class Covost2(manifest.AudioTextBuilder, skip_registration=True):
  """CoVoST 2 <source>-><target> from local TSVs and Common Voice clips."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the CoVoST 2 TSVs (github.com/facebookresearch/covost) and the Common Voice "
      "release of the source language, and pass their folders as tsv_dir and clips_dir.")

  def __init__(self, *, tsv_dir: str, clips_dir: str, source_language: str = "en",
               target_language: str = "de", splits: Sequence[str] | None = None, **kwargs):
    wanted = list(splits) if splits else list(SPLITS)
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown:
      raise ValueError(f"Unknown CoVoST 2 split(s) {unknown}; valid: {', '.join(SPLITS)}")
    self._tsvs = {s: tsv_path(tsv_dir, source_language, target_language, s) for s in wanted}
    missing = [p for p in self._tsvs.values() if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"CoVoST 2 TSV file(s) not found: {missing}")
    self._clips = find_clips(clips_dir)
    kwargs.setdefault("required_fields", ("text", "translation"))
    kwargs.setdefault("tasks", ("translate", "asr"))
    super().__init__(**kwargs)

  def _split_records(self):
    return {split: iter_tsv(path, self._clips) for split, path in self._tsvs.items()}


def dataset_name(source_language: str, target_language: str) -> str:
  return f"covost2_{source_language}_{target_language}".lower()


def build_covost2(tsv_dir: str, clips_dir: str, data_dir: str, *, source_language: str = "en",
                  target_language: str = "de", splits: Sequence[str] | None = None,
                  name: str = "", max_seconds: float | None = 30.0, num_workers: int = 4,
                  overwrite: bool = False) -> str:
  """Builds `data_dir/<name>/1.0.0/` (name: covost2_<src>_<tgt>); returns that folder."""
  cls = manifest.builder_class(name or dataset_name(source_language, target_language), Covost2)
  builder = cls(tsv_dir=tsv_dir, clips_dir=clips_dir, source_language=source_language,
                target_language=target_language, splits=splits, data_dir=data_dir,
                max_seconds=max_seconds, num_workers=num_workers)
  return manifest.prepare(builder, overwrite=overwrite)
