"""The audio files under a folder, as `speechjax transcribe --input=DIR` takes them.

Standard library only, so a process that only lists a folder (the PyTorch
side of bench/transcribe_bench.py) pays for no JAX import.
"""

from __future__ import annotations

import os

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")


def find_audio_files(folder: str, *, required: bool = False) -> list[str]:
  """Audio files under `folder`, recursively, in a stable (sorted) order;
  `required`: a folder without any is refused too."""
  if not os.path.isdir(folder):
    raise ValueError(f"--input={folder!r} is not a folder")
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    found.extend(os.path.join(root, name) for name in sorted(files) if name.lower().endswith(AUDIO_SUFFIXES))
  if required and not found:
    raise ValueError(f"--input={folder!r} holds no audio files ({' '.join(AUDIO_SUFFIXES)})")
  return found
