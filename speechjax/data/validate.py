"""Manifest reading and bad-input checks, shared by dataset builders and eval.

A manifest is JSONL, one utterance a line (see DESIGN.md):
    {"audio": "a.wav", "text": "turn on the lights", "label": ..., ...}
Relative audio paths resolve against the manifest's folder.

Every line either becomes a clean example (float32 mono 16 kHz audio, strings
for the text fields) or a `Skipped` record with a reason from `SKIP_REASONS`.
Builders write the skipped ones to `skipped.jsonl` beside the dataset; nothing
that fails a check reaches training.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
import dataclasses
import json
import os
from typing import Any

import numpy as np

from speechjax.data import audio as audio_lib

# Shorter clips give no or one feature frame (10 ms hop): nothing to learn from,
# and an all-masked row in a batch.
MIN_SECONDS = 0.1

# Text fields every example keeps whatever its tasks; `text_fields()` adds the
# fields of every registered task (a plugin task's 'emotion' included).
METADATA_FIELDS = ("speaker", "id")

SKIP_REASONS = (
    "invalid_utf8",  # the line holds bytes that are not UTF-8
    "invalid_json",  # the line is not a JSON object
    "missing_audio_field",  # no "audio" key
    "audio_not_found",  # the file does not exist
    "unreadable_audio",  # soundfile cannot decode it (corrupt, not audio)
    "empty_audio",  # zero samples
    "non_finite_audio",  # NaN or inf samples
    "too_short",  # under min_seconds
    "too_long",  # over max_seconds
    "missing_text",  # no "text" (or another required field) key / null
    "empty_text",  # text (or another required field) is blank
)


@dataclasses.dataclass
class Skipped:
  """One manifest line left out of a dataset, and why."""
  reason: str
  detail: str
  manifest: str = ""
  line: int = 0
  id: str = ""
  audio: str = ""
  split: str = ""

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def text_fields() -> tuple[str, ...]:
  """The text fields an example read from a manifest keeps: the manifest fields
  of every registered task (speechjax.data.tasks), then METADATA_FIELDS."""
  from speechjax.data import tasks as tasks_lib

  task_fields = [f for name in tasks_lib.task_names() for f in tasks_lib.get_task(name).fields]
  return tuple(dict.fromkeys(task_fields + list(METADATA_FIELDS)))


def resolve_audio_path(path: str, manifest_dir: str) -> str:
  path = os.path.expanduser(path)
  return path if os.path.isabs(path) else os.path.normpath(os.path.join(manifest_dir, path))


def check_audio(audio: np.ndarray, *, max_seconds: float | None, min_seconds: float = MIN_SECONDS,
                sample_rate: int = audio_lib.SAMPLE_RATE) -> tuple[str, str] | None:
  """(reason, detail) when decoded audio is unusable, else None."""
  if audio.size == 0:
    return "empty_audio", "the file holds no samples"
  bad = ~np.isfinite(audio)
  if bad.any():
    return "non_finite_audio", f"{int(bad.sum())} of {audio.size} samples are NaN or inf"
  seconds = audio.size / sample_rate
  if max_seconds and seconds > max_seconds:
    return "too_long", f"{seconds:.2f} s > max_seconds={max_seconds}"
  if seconds < min_seconds:
    return "too_short", f"{seconds:.3f} s < min_seconds={min_seconds}"
  return None


def as_text(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def check_fields(record: dict[str, Any], required: Sequence[str]) -> tuple[str, str] | None:
  for field in required:
    if field not in record or record[field] is None:
      return "missing_text", f'no "{field}" field'
    if not as_text(record[field]).strip():
      return "empty_text", f'"{field}" is empty'
  return None


def load_example(
    record: dict[str, Any], manifest_dir: str, *, max_seconds: float | None = 30.0,
    min_seconds: float = MIN_SECONDS, required_fields: Sequence[str] = ("text",)
) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
  """Decodes and checks one manifest record.

  Returns (example, None) with example = {'audio': float32 [samples] at 16 kHz,
  'audio_path': resolved path, 'duration': seconds, and every `text_fields()`
  key as a str ('' when absent)},
  or (None, (reason, detail)).
  """
  if record.get("turns") is not None:
    return _load_dialogue(record, manifest_dir, max_seconds=max_seconds, min_seconds=min_seconds,
                          required_fields=required_fields)
  problem = check_fields(record, required_fields)
  if problem:
    return None, problem
  if not record.get("audio"):
    return None, ("missing_audio_field", 'no "audio" field')
  path = resolve_audio_path(str(record["audio"]), manifest_dir)
  if not os.path.exists(path):
    return None, ("audio_not_found", f"{path} does not exist")
  try:
    if max_seconds:
      # Reject over-long files from the header before decoding hours of audio.
      _, seconds = audio_lib.audio_info(path)
      if seconds > max_seconds:
        return None, ("too_long", f"{seconds:.2f} s > max_seconds={max_seconds}")
    audio = audio_lib.load_audio(path)
  except audio_lib.AudioError as e:
    return None, ("unreadable_audio", str(e))
  problem = check_audio(audio, max_seconds=max_seconds, min_seconds=min_seconds)
  if problem:
    return None, problem
  example = {field: as_text(record.get(field)).strip() for field in text_fields()}
  example["audio"] = audio
  example["audio_path"] = path
  example["duration"] = audio.size / audio_lib.SAMPLE_RATE
  return example, None


def _load_dialogue(record, manifest_dir: str, *, max_seconds, min_seconds, required_fields):
  """A dialogue line ("turns", speechjax.data.dialogue): each clip decoded and
  checked against max_seconds / min_seconds (a bad one skips the line, naming
  its turn), the clips joined in order, the turns stored as the 'dialogue'
  field with each clip's `samples` in place of its path; 'audio_paths' lists
  the files."""
  from speechjax.data import dialogue

  try:
    turns = dialogue.check_turns(record.get("turns"))
  except dialogue.DialogueError as e:
    return None, ("invalid_dialogue", str(e))
  clips, paths = [], []
  for i, turn in enumerate(turns):
    if "audio" not in turn:
      continue
    path = resolve_audio_path(turn.pop("audio"), manifest_dir)
    if not os.path.exists(path):
      return None, ("audio_not_found", f"turn {i}: {path} does not exist")
    try:
      audio = audio_lib.load_audio(path)
    except audio_lib.AudioError as e:
      return None, ("unreadable_audio", f"turn {i}: {e}")
    problem = check_audio(audio, max_seconds=max_seconds, min_seconds=min_seconds)
    if problem:
      return None, (problem[0], f"turn {i} ({path}): {problem[1]}")
    turn["samples"] = int(audio.size)
    clips.append(audio)
    paths.append(path)
  merged = {**record, dialogue.FIELD: json.dumps(turns, ensure_ascii=False)}
  problem = check_fields(merged, required_fields)
  if problem:
    return None, problem
  example = {field: as_text(merged.get(field)).strip() for field in text_fields()}
  joined = np.concatenate(clips).astype(np.float32)
  example.update(audio=joined, audio_path=paths[0], audio_paths=paths,
                 duration=joined.size / audio_lib.SAMPLE_RATE)
  return example, None


def read_manifest_lines(path: str) -> Iterator[tuple[int, dict[str, Any] | None, str, str]]:
  """Yields (line_number, record or None, raw line, reason) for every non-blank
  line; reason is '' for a JSON object, else 'invalid_utf8' or 'invalid_json'.
  A line with bytes that are not UTF-8 spoils that line only."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Manifest not found: {path}")
  with open(path, "rb") as f:
    for line_number, data in enumerate(f, start=1):
      try:
        line = data.decode("utf-8")
      except UnicodeDecodeError:
        yield line_number, None, data.decode("utf-8", "backslashreplace").rstrip("\r\n"), "invalid_utf8"
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      record = record if isinstance(record, dict) else None
      yield line_number, record, line.rstrip("\r\n"), "" if record is not None else "invalid_json"


def read_manifest(path: str) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
  """Yields (line_number, record or None, raw line); blank lines are ignored."""
  for line_number, record, raw, _ in read_manifest_lines(path):
    yield line_number, record, raw


def iter_manifest_examples(path: str, *, max_seconds: float | None = 30.0,
                           min_seconds: float = MIN_SECONDS,
                           required_fields: Sequence[str] = ("text",),
                           skipped: list[Skipped] | None = None,
                           split: str = "") -> Iterator[dict[str, Any]]:
  """Clean examples of a manifest, appending a `Skipped` to `skipped` for each bad line."""
  manifest_dir = os.path.dirname(os.path.abspath(path))
  stem = os.path.splitext(os.path.basename(path))[0]
  for line_number, record, raw, reason in read_manifest_lines(path):
    if record is None:
      if skipped is not None:
        detail = "not UTF-8" if reason == "invalid_utf8" else "not a JSON object"
        skipped.append(Skipped(reason, f"{detail}: {raw[:80]!r}", path, line_number, split=split))
      continue
    example, problem = load_example(record, manifest_dir, max_seconds=max_seconds,
                                    min_seconds=min_seconds, required_fields=required_fields)
    if problem:
      if skipped is not None:
        skipped.append(
            Skipped(problem[0], problem[1], path, line_number, as_text(record.get("id")),
                    as_text(record.get("audio")), split))
      continue
    if not example["id"]:
      example["id"] = f"{stem}-{line_number:06d}"
    yield example


def summarize(skipped: Sequence[Skipped]) -> dict[str, int]:
  return dict(sorted(collections.Counter(s.reason for s in skipped).items()))


def skip_key(item: Skipped | dict[str, Any]) -> tuple[str, int, str]:
  """What makes a skipped line the same line: its file, line number and id
  (an instruction file's line may hold several turns)."""
  get = item.get if isinstance(item, dict) else lambda k: getattr(item, k)
  return os.path.abspath(get("manifest") or ""), int(get("line") or 0), str(get("id") or "")


def write_skipped(path: str, skipped: Sequence[Skipped]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for item in skipped:
      f.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")


class AllExamplesSkippedError(ValueError):
  """Every line of a manifest failed the checks."""


def raise_if_all_skipped(manifest: str, num_kept: int, skipped: Sequence[Skipped]) -> None:
  if num_kept:
    return
  mine = [s for s in skipped if s.manifest == manifest]
  examples = "; ".join(f"line {s.line}: {s.reason} ({s.detail})" for s in mine[:3])
  raise AllExamplesSkippedError(
      f'Every example of manifest {manifest} was skipped ({len(mine)} lines, reasons '
      f'{summarize(mine)}): {examples or "the manifest is empty"}')
