"""TFDS builder for spoken-instruction data: several (instruction, answer) turns per clip.

The format (JSONL, one clip a line; `audio` relative to the file's folder or absolute):

    {"audio": "clips/a.flac", "id": "a", "speaker": "s1",
     "text": "turn on the lights",               # optional: transcript (asr task)
     "translation": "allume la lumière",         # optional: translation (translate task)
     "label": "lights_on",                       # optional: class (classify task)
     "turns": [{"instruction": "What does the speaker want?", "answer": "Light."},
               {"instruction": "Is the speaker polite?", "answer": "Not especially."}]}

`turns` is a list (possibly empty) of objects with non-blank string fields
`instruction` and `answer`; an instruction may place the audio itself with
`<audio>` (otherwise the audio comes first). This is the question-answer data
of SALMONN / Qwen2-Audio style recipes.

Each turn becomes one example for the `instruct` task: `prompt` = instruction,
`target` = answer, id `<clip id>-<turn index>`. The clip's own fields (text,
translation, label) go on its first example only, so a transcript is trained
on and scored once per clip however many turns the clip has; a clip without
turns gives one example holding only its own fields. Splits are named by the
files given (`--train=a.jsonl --dev=b.jsonl --test=c.jsonl`).

    python -m speechjax.data.build instructions --train=train.jsonl --dev=dev.jsonl \\
        --test=test.jsonl --data_dir=/data/tfds      # -> /data/tfds/speech_instructions/1.0.0/
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import os
from typing import Any

from speechjax.data import validate
from speechjax.data.builders import manifest

DEFAULT_NAME = "speech_instructions"
CLIP_FIELDS = ("text", "translation", "label")
TURN_KEYS = ("instruction", "answer")


def turn_records(path: str, line_number: int, record: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The examples (manifest-style records) of one clip line: one per turn."""
  turns = record.get("turns", [])
  where = f"{path}:{line_number}"
  if not isinstance(turns, list):
    raise ValueError(f"{where}: 'turns' must be a list of {{'instruction', 'answer'}} objects, "
                     f"got {type(turns).__name__}")
  stem = os.path.splitext(os.path.basename(path))[0]
  clip_id = validate.as_text(record.get("id")).strip() or f"{stem}-{line_number:06d}"
  shared = {"audio": record.get("audio"), "speaker": record.get("speaker", "")}
  own = {field: record[field] for field in CLIP_FIELDS if field in record}
  if not turns:
    return [{**shared, **own, "id": clip_id}]
  examples = []
  for index, turn in enumerate(turns):
    if not isinstance(turn, Mapping):
      raise ValueError(f"{where}: turn {index} must be an object with {TURN_KEYS}, got {turn!r}")
    blank = [k for k in TURN_KEYS if not isinstance(turn.get(k), str) or not turn[k].strip()]
    if blank:
      raise ValueError(f"{where}: turn {index} has no non-blank string field(s) {blank}; "
                       f"each turn needs {TURN_KEYS}")
    example = {**shared, "prompt": turn["instruction"], "target": turn["answer"],
               "id": f"{clip_id}-{index}"}
    if index == 0:
      example.update(own)
    examples.append(example)
  return examples


def iter_instruction_file(path: str) -> Iterator[tuple[str, int, dict | None]]:
  """(file, line number, record) for every turn of every clip line."""
  for line_number, record, _ in validate.read_manifest(path):
    if record is None:
      yield path, line_number, None
      continue
    for example in turn_records(path, line_number, record):
      yield path, line_number, example


class InstructionDataset(manifest.AudioTextBuilder, skip_registration=True):
  """Splits from instruction JSONL files: InstructionDataset(files={'train': 'a.jsonl'}, ...)."""

  def __init__(self, *, files: Mapping[str, str | Sequence[str]] | None = None, **kwargs):
    self._files = {
        split: ([paths] if isinstance(paths, (str, os.PathLike)) else list(paths))
        for split, paths in (files or {}).items()
    }
    # Turns after a clip's first hold only prompt/target; none is required of every example.
    kwargs.setdefault("required_fields", ())
    super().__init__(**kwargs)

  def _split_records(self):
    if not self._files:
      raise ValueError("InstructionDataset needs files={split: path} to build a dataset.")
    return {split: _records([os.path.abspath(p) for p in paths]) for split, paths in self._files.items()}


def _records(paths: Sequence[str]):
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"Instruction file {path} does not exist")
    yield from iter_instruction_file(path)


def build_instruction_dataset(files: Mapping[str, str | Sequence[str]], data_dir: str,
                              name: str = DEFAULT_NAME, *, max_seconds: float | None = 30.0,
                              num_workers: int = 4, overwrite: bool = False) -> str:
  """Builds `data_dir/name/1.0.0/` from {split: instruction JSONL path(s)}; returns that folder."""
  builder = manifest.builder_class(name, InstructionDataset)(
      files=files, data_dir=data_dir, max_seconds=max_seconds, num_workers=num_workers)
  return manifest.prepare(builder, overwrite=overwrite)
