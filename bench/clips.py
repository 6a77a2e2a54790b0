"""A folder of audio clips and the JSONL transcripts written for it, shared by
the subprocesses of bench/transcribe_bench.py. Standard library only, so no
pipeline's process start pays for another's imports."""

from __future__ import annotations

import json
import os

# What `speechjax transcribe --input=DIR` picks up (speechjax.transcribe.AUDIO_SUFFIXES).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")


def audio_files(folder: str) -> list[str]:
  """Audio files under `folder`, recursively, in speechjax's (sorted) order."""
  if not os.path.isdir(folder):
    raise ValueError(f"--input={folder!r} is not a folder")
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    found.extend(os.path.join(root, n) for n in sorted(files) if n.lower().endswith(AUDIO_SUFFIXES))
  if not found:
    raise ValueError(f"--input={folder!r} holds no audio files ({' '.join(AUDIO_SUFFIXES)})")
  return found


def write_transcripts(path: str, paths: list[str], texts: list[str]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for audio, text in zip(paths, texts, strict=True):
      f.write(json.dumps({"audio": audio, "text": text}) + "\n")


def read_transcripts(path: str) -> dict[str, str]:
  """{audio path: text} of a JSONL written by any of the pipelines."""
  with open(path, encoding="utf-8") as f:
    return {r["audio"]: r["text"] for r in map(json.loads, filter(str.strip, f))}
