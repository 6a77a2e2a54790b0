r"""Spoken dialogue examples: several user turns with audio, assistant answers.

A manifest line of the `dialogue` task holds the turns in order:

    {"id": "d1", "turns": [
       {"role": "user", "audio": "a.wav"},
       {"role": "assistant", "text": "the kitchen lights are on"},
       {"role": "user", "audio": "b.wav", "text": "and now?"},
       {"role": "assistant", "text": "the kitchen lights are off"}]}

A user turn has audio, text or both (text after the audio); an assistant turn
has text; the last turn is the assistant answer that evaluation scores. When
read (builders and `--manifest` alike) the user clips are decoded, checked
and joined into the example's one `audio` array, and the turns are kept as
the `dialogue` text field, JSON with each audio turn's `samples` in place of
its path, so a built dataset stores a dialogue like any other example.

The model encodes each clip on its own (never across a turn boundary) and
places its audio tokens at its own turn's placeholders; the loss covers every
assistant turn's tokens and end token, nothing of the user turns. The token
layout, in the chat formats of `prompts.CHAT_FORMATS` (prefix, suffix, answer
prefix):

    [pad slots]  [bos] prefix user_1 suffix | answer_prefix answer_1 EOS  prefix user_2 suffix | ... EOS

where user_i is `<audio>` (A placeholders), `<audio>\n{text}` or `{text}`.
In the 'llama2' format each later user turn starts with its own [bos], as
Llama 2's chat template has it (`<s>[INST] u1 [/INST] a1 </s><s>[INST] u2 ...`). A
batch holding dialogues carries S audio segments per row (the most clips of
any row, rounded up to a power of two), each padded to one bucket, and
every row then holds S*A placeholders: a row with fewer clips puts the
placeholders of its empty segments first, attention-masked, so the k-th
placeholder of a row still takes the k-th projected frame of its segments in
order. A generation prompt stops where the last answer starts.

This module reads and checks turns; `validate` loads a dialogue line's clips,
`prompts.PromptBuilder.dialogue_ids` lays out its tokens and `batching` its
audio segments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
from typing import Any

import numpy as np

from speechjax.data import audio as audio_lib

ROLES = ("user", "assistant")
FIELD = "dialogue"  # the manifest / stored field holding the turns


class DialogueError(ValueError):
  """A dialogue that cannot be used; the message names the turn and field."""


def check_turns(turns: Any) -> list[dict[str, Any]]:
  """The turns as plain dicts ({'role', 'text', 'audio' or 'samples'}), or DialogueError."""
  if not isinstance(turns, list) or not turns:
    raise DialogueError(f'"turns" must be a non-empty list of turns, got {type(turns).__name__}')
  out = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, Mapping):
      raise DialogueError(f'turn {i} is a {type(turn).__name__}, not an object with "role"')
    role = turn.get("role")
    if role not in ROLES:
      raise DialogueError(f"turn {i}: role {role!r}; valid: {ROLES}")
    text = str(turn.get("text") or "").strip()
    has_audio = bool(turn.get("audio")) or int(turn.get("samples") or 0) > 0
    if role == "assistant" and (has_audio or not text):
      raise DialogueError(f"turn {i}: an assistant turn has text and no audio")
    if role == "user" and not (has_audio or text):
      raise DialogueError(f'turn {i}: a user turn needs "audio", "text" or both')
    if i and role == out[-1]["role"]:
      raise DialogueError(f"turns {i - 1} and {i} are both {role!r}: turns alternate")
    clean = {"role": role, "text": text}
    if turn.get("audio"):
      clean["audio"] = str(turn["audio"])
    if turn.get("samples"):
      clean["samples"] = int(turn["samples"])
    out.append(clean)
  if out[0]["role"] != "user" or out[-1]["role"] != "assistant":
    raise DialogueError("a dialogue starts with a user turn and ends with the assistant's answer")
  if not any(has_audio_turn(t) for t in out):
    raise DialogueError("no user turn has audio (a text-only chat is not a spoken dialogue)")
  return out


def has_audio_turn(turn: Mapping[str, Any]) -> bool:
  return turn["role"] == "user" and (bool(turn.get("audio")) or int(turn.get("samples") or 0) > 0)


def reload_audio(paths: Sequence[str]) -> np.ndarray:
  """The joined clips of a dialogue read again from its files (int16)."""
  return audio_lib.float_to_int16(np.concatenate([audio_lib.load_audio(p) for p in paths]))


def turns_of(example: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The stored turns of an example (FIELD, a JSON string or already a list)."""
  value = _decoded(example.get(FIELD))
  try:
    turns = json.loads(value) if isinstance(value, str) else value
  except json.JSONDecodeError as e:
    raise DialogueError(f"example {example.get('id')!r}: the {FIELD!r} field is not JSON ({e})") from None
  return check_turns(turns)


def answer(example: Mapping[str, Any]) -> str:
  """The last assistant turn: what evaluation scores."""
  if not example.get(FIELD):
    return ""
  return turns_of(example)[-1]["text"]


def clip_lengths(example: Mapping[str, Any]) -> list[int]:
  """Samples of each user clip, in order (they add up to the example's audio)."""
  return [int(t["samples"]) for t in turns_of(example) if has_audio_turn(t)]


def is_dialogue(example: Mapping[str, Any]) -> bool:
  """Whether an example holds turns: its audio is several clips joined."""
  return bool(_text(example.get(FIELD)).strip())


def user_clips(example: Mapping[str, Any], wave: np.ndarray) -> list[np.ndarray]:
  """The clips a model encodes one by one: a dialogue's user clips in order,
  cut from its joined audio `wave`; any other example's one clip."""
  if not is_dialogue(example):
    return [wave]
  return split_clips(wave, clip_lengths(example), _text(example.get("id")))


def _decoded(value: Any) -> Any:
  """A stored field as Python: a numpy scalar unwrapped, bytes decoded (TFDS gives either)."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _text(value: Any) -> str:
  value = _decoded(value)
  return "" if value is None else str(value)


def split_clips(audio: np.ndarray, lengths: Sequence[int], example_id: str = "") -> list[np.ndarray]:
  if sum(lengths) != audio.size:
    raise DialogueError(f"example {example_id!r}: its clips add up to {sum(lengths)} samples, its "
                        f"audio has {audio.size}")
  return np.split(audio, np.cumsum(lengths)[:-1])
