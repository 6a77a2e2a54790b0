"""A folder of audio clips and the JSONL transcripts written for it, shared by
the subprocesses of bench/transcribe_bench.py. Standard library (and the
standard-library-only speechjax.data.audio_files), so no pipeline's process
start pays for another's imports."""

from __future__ import annotations

import json

from speechjax.data.audio_files import find_audio_files


def audio_files(folder: str) -> list[str]:
  """Audio files under `folder`, in the order `speechjax transcribe --input` takes them."""
  return find_audio_files(folder, required=True)


def write_transcripts(path: str, paths: list[str], texts: list[str]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for audio, text in zip(paths, texts, strict=True):
      f.write(json.dumps({"audio": audio, "text": text}) + "\n")


def read_transcripts(path: str) -> dict[str, str]:
  """{audio path: text} of a JSONL written by any of the pipelines."""
  with open(path, encoding="utf-8") as f:
    return {r["audio"]: r["text"] for r in map(json.loads, filter(str.strip, f))}
