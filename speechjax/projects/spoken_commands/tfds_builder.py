"""TFDS builder for the synthetic spoken-command corpus written by `synth.py`.

The corpus folder (wavs + train/dev/test.jsonl) is the builder's manual dir;
examples are read exactly like any manifest (same checks, same features), so
the TFDS dataset and the manifests always agree.

    python -m speechjax.projects.spoken_commands.synth --out=data/spoken_commands   # does both steps
    build_spoken_commands('data/spoken_commands')                # TFDS step only
"""

from __future__ import annotations

from collections.abc import Sequence
import os

from speechjax.data.builders import manifest

SPLITS = ("train", "dev", "test")


class SpokenCommands(manifest.ManifestDataset, skip_registration=True):
  """Splits from `corpus_dir/<split>.jsonl` for each of `splits` that exists."""

  name = "spoken_commands"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Make the corpus with "
                                  "`python -m speechjax.projects.spoken_commands.synth --out=DIR`.")

  def __init__(self, *, corpus_dir: str, splits: Sequence[str] = SPLITS, **kwargs):
    manifests = {split: os.path.join(corpus_dir, f"{split}.jsonl") for split in splits}
    manifests = {split: path for split, path in manifests.items() if os.path.exists(path)}
    if not manifests:
      raise FileNotFoundError(f"No train/dev/test.jsonl in {corpus_dir}. "
                              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    super().__init__(manifests=manifests, **kwargs)


def build_spoken_commands(corpus_dir: str, data_dir: str | None = None, *,
                          name: str = "spoken_commands", splits: Sequence[str] = SPLITS,
                          num_workers: int = 2, overwrite: bool = True) -> str:
  """Builds `data_dir/name/1.0.0/` (data_dir defaults to corpus_dir/tfds); returns it."""
  if name == SpokenCommands.name:
    cls = SpokenCommands
  else:
    cls = manifest.builder_class(name, SpokenCommands)
  data_dir = data_dir or os.path.join(corpus_dir, "tfds")
  # Utterances need a transcript, dialogues (the quick corpus's `turns` lines) their turns.
  builder = cls(corpus_dir=corpus_dir, splits=splits, data_dir=data_dir, max_seconds=30.0,
                num_workers=num_workers, tasks=("asr", "dialogue"))
  return manifest.prepare(builder, overwrite=overwrite)
