r"""The prompt layout: (example, task) to token ids for a tokenizer and chat format.

A training example is laid out as

    [bos] chat_prefix  instruction-before-<audio>  [AUDIO_PLACEHOLDER_ID] * A
          instruction-after-<audio>  chat_suffix | answer_prefix answer  EOS

where A = num_audio_tokens(num_feature_frames) and the model swaps the
placeholders for projected audio frames. `targets` is `input_ids` shifted
left and `target_mask` is 1 on the positions whose target is an answer token
or the EOS, so the loss covers exactly the answer. A generation prompt is the
same ids up to '|'. Chat formats: 'plain', 'llama2' ([INST] ... [/INST]),
'chatml' (<|im_start|>user ... <|im_end|><|im_start|>assistant).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import threading
from typing import Any

import numpy as np

from speechjax.data import dialogue as dialogue_lib
from speechjax.data.tasks import AUDIO_PLACEHOLDER, AUDIO_PLACEHOLDER_ID, answer_text, as_text, get_task

# (user prefix, text after the user turn, text before the answer)
CHAT_FORMATS = {
    "plain": ("", "\n", ""),
    "llama2": ("[INST] ", " [/INST]", " "),
    "chatml": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", ""),
}


def _encode(tokenizer, text: str) -> list[int]:
  if not text:
    return []
  # A fast tokenizer's Rust backend gives the same ids without the ~50 us of
  # Python wrapping per call (LM pretraining tokenizes ~10^5 prompts).
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None and not getattr(tokenizer, "split_special_tokens", False):
    return backend.encode(text, add_special_tokens=False).ids
  return list(tokenizer.encode(text, add_special_tokens=False))


@dataclasses.dataclass
class PromptBuilder:
  """Turns (example, task) into token ids for a tokenizer and chat format.

  Works with any HF tokenizer (`encode(text, add_special_tokens=False)`,
  `eos_token_id`, optional `bos_token_id`). Prompt pieces of the fixed
  instructions are tokenized once and cached.
  """
  tokenizer: Any
  template: str = "plain"
  language: str = "French"
  add_bos: bool = True
  instructions: Mapping[str, Sequence[str]] | None = None

  def __post_init__(self):
    if self.template not in CHAT_FORMATS:
      raise ValueError(f"Unknown chat template {self.template!r}; valid: {tuple(CHAT_FORMATS)}")
    if self.tokenizer.eos_token_id is None:
      raise ValueError("The tokenizer has no eos_token_id; the answer needs an end token.")
    self.instructions = dict(self.instructions or {})  # per-task overrides of the registered texts
    self._cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    self._answers: dict[tuple[str, str], list[int]] = {}
    self._lock = threading.Lock()

  @property
  def eos_id(self) -> int:
    return int(self.tokenizer.eos_token_id)

  @property
  def pad_id(self) -> int:
    pad = getattr(self.tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else self.eos_id)

  def num_instructions(self, task: str) -> int:
    spec = get_task(task)
    if spec.instruction_field or spec.multi_audio:
      return 1
    return len(self.instructions.get(task) or spec.instructions)

  def instruction(self, example: Mapping[str, Any], task: str, index: int = 0) -> str:
    """The user message with its <audio> placeholder."""
    spec = get_task(task)
    if spec.multi_audio:
      raise ValueError(f"task {task!r} lays out its own turns (several audio clips): build its tokens "
                       "with PromptBuilder.dialogue_ids, not a single-audio prompt")
    if spec.instruction_field:
      prompt = as_text(example.get(spec.instruction_field)).strip()
      return prompt if AUDIO_PLACEHOLDER in prompt else f"{AUDIO_PLACEHOLDER}\n{prompt}"
    texts = self.instructions.get(task) or spec.instructions
    return texts[index].replace("{language}", self.language)

  def _pieces(self, user: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the audio placeholder (BOS and chat wrapping included)."""
    with self._lock:
      cached = self._cache.get((self.template, user))
    if cached is not None:
      return cached
    if user.count(AUDIO_PLACEHOLDER) != 1:
      raise ValueError(f"An instruction needs exactly one {AUDIO_PLACEHOLDER}: {user!r}")
    prefix, suffix, _ = CHAT_FORMATS[self.template]
    before, after = user.split(AUDIO_PLACEHOLDER)
    bos = getattr(self.tokenizer, "bos_token_id", None)
    head = ([int(bos)] if self.add_bos and bos is not None else []) + _encode(
        self.tokenizer, prefix + before)
    tail = _encode(self.tokenizer, after + suffix)
    with self._lock:
      if len(self._cache) < 4096:  # instruct prompts are open-ended; bound the cache
        self._cache[(self.template, user)] = (head, tail)
    return head, tail

  def prompt_ids(self, example: Mapping[str, Any], task: str, num_audio_tokens: int,
                 instruction_index: int = 0) -> list[int]:
    head, tail = self._pieces(self.instruction(example, task, instruction_index))
    return head + [AUDIO_PLACEHOLDER_ID] * int(num_audio_tokens) + tail

  def prompt_ids_with_text_slot(self, example: Mapping[str, Any], task: str, slot_ids: Sequence[int],
                                instruction_index: int = 0) -> list[int]:
    """The prompt with token ids (e.g. a transcript) where the audio goes: what
    a text-only LM is pretrained and probed on."""
    head, tail = self._pieces(self.instruction(example, task, instruction_index))
    return head + list(slot_ids) + tail

  def transcript_ids(self, example: Mapping[str, Any], instruction_index: int = 0) -> list[int]:
    """The transcript's tokens as the ASR answer has them, without EOS: what a
    text-slot LM copies and a token-level CTC head predicts."""
    return self.answer_ids(example, "asr", instruction_index)[:-1]

  def answer_ids(self, example: Mapping[str, Any], task: str,
                 instruction_index: int = 0) -> list[int]:
    """Answer + EOS, tokenized as it would be right after the prompt.

    The text after the audio is tokenized jointly with the answer, so the
    answer's first token is the one the tokenizer makes in context (e.g.
    'Ġturn' after a space for byte-level BPE, '▁turn' for SentencePiece);
    when the joint tokens do not start with the cached prompt tail (a merge
    across the boundary), the answer is tokenized on its own.
    """
    user = self.instruction(example, task, instruction_index)
    after = user.split(AUDIO_PLACEHOLDER)[1]
    _, suffix, answer_prefix = CHAT_FORMATS[self.template]
    _, tail = self._pieces(user)
    answer = answer_prefix + answer_text(example, task)
    key = (after + suffix, answer)
    with self._lock:
      ids = self._answers.get(key)
    if ids is None:
      joint = _encode(self.tokenizer, after + suffix + answer)
      if tail and joint[:len(tail)] == tail:
        ids = joint[len(tail):]
      else:
        ids = _encode(self.tokenizer, answer)
      with self._lock:
        if len(self._answers) < 65536:  # answers repeat across epochs, tasks and instructions
          self._answers[key] = ids
    return ids + [self.eos_id]

  def dialogue_ids(self, turns: Sequence[Mapping[str, Any]], num_audio_tokens: int, num_segments: int, *,
                   generate: bool) -> dict[str, np.ndarray]:
    """Token ids of a dialogue's turns (speechjax.data.dialogue: layout in its
    docstring): input_ids with `num_segments` * `num_audio_tokens`
    placeholders, the empty segments' first; without `generate` also targets,
    target_mask (1 where the next token is an assistant answer token or its
    EOS) and prompt_length (up to the last answer); with `generate` the ids
    stop where the last answer starts."""
    num_clips = sum(dialogue_lib.has_audio_turn(t) for t in turns)
    if num_clips > num_segments:
      raise dialogue_lib.DialogueError(f"a dialogue with {num_clips} audio turns in a batch of "
                                       f"{num_segments} segments")
    prefix, suffix, answer_prefix = CHAT_FORMATS[self.template]
    slot = [AUDIO_PLACEHOLDER_ID] * int(num_audio_tokens)
    ids: list[int] = slot * (num_segments - num_clips)  # masked: their segments hold no audio
    supervised: list[bool] = [False] * len(ids)
    bos = getattr(self.tokenizer, "bos_token_id", None)
    if self.add_bos and bos is not None:
      ids.append(int(bos))
      supervised.append(False)
    # Llama 2's chat template opens every [INST] turn with BOS, the first and each later one.
    bos_each_turn = self.template == "llama2" and self.add_bos and bos is not None
    prompt_length = 0
    for i, turn in enumerate(turns):
      if turn["role"] == "user" and i > 0 and bos_each_turn:
        ids.append(int(bos))
        supervised.append(False)
      if turn["role"] == "user":
        # Text around the audio is tokenized in one piece per side: prefix, then
        # the turn's text after its audio and the chat suffix.
        after = (f"\n{turn['text']}" if turn["text"] else "") + suffix
        if dialogue_lib.has_audio_turn(turn):
          pieces = [_encode(self.tokenizer, prefix), slot, _encode(self.tokenizer, after)]
        else:
          pieces = [_encode(self.tokenizer, prefix + turn["text"] + suffix)]
        for piece in pieces:
          ids += piece
          supervised += [False] * len(piece)
        continue
      if i == len(turns) - 1:
        prompt_length = len(ids)
        if generate:
          break
      answer = _encode(self.tokenizer, answer_prefix + turn["text"]) + [self.eos_id]
      ids += answer
      supervised += [True] * len(answer)
    input_ids = np.asarray(ids, np.int32)
    if generate:
      return {"input_ids": input_ids}
    targets = np.append(input_ids[1:], self.pad_id).astype(np.int32)
    targets[targets < 0] = self.pad_id
    # Position t predicts token t+1: supervised where token t+1 belongs to an answer.
    target_mask = np.append(np.asarray(supervised[1:], np.float32), 0.0).astype(np.float32)
    return {"input_ids": input_ids, "targets": targets, "target_mask": target_mask,
            "prompt_length": np.int32(prompt_length)}

  def training_example(self, example: Mapping[str, Any], task: str, num_audio_tokens: int,
                       instruction_index: int = 0) -> dict[str, np.ndarray]:
    """Unpadded input_ids, targets (shifted left, placeholders -> pad) and target_mask."""
    prompt = self.prompt_ids(example, task, num_audio_tokens, instruction_index)
    answer = self.answer_ids(example, task, instruction_index)
    input_ids = np.asarray(prompt + answer, np.int32)
    targets = np.append(input_ids[1:], self.pad_id).astype(np.int32)
    targets[targets < 0] = self.pad_id
    target_mask = np.zeros(input_ids.shape, np.float32)
    target_mask[len(prompt) - 1:len(input_ids) - 1] = 1.0
    return {
        "input_ids": input_ids,
        "targets": targets,
        "target_mask": target_mask,
        "prompt_length": np.int32(len(prompt))
    }


def build_training_example(tokenizer, example: Mapping[str, Any], task: str,
                           num_feature_frames: int, num_audio_tokens: Callable[[int], int], *,
                           template: str = "plain", instruction_index: int = 0,
                           language: str = "French", add_bos: bool = True) -> dict[str, np.ndarray]:
  """(a) Token ids of prompt-with-audio-slots + answer + EOS, with targets and target_mask."""
  builder = PromptBuilder(tokenizer, template, language, add_bos)
  return builder.training_example(example, task, num_audio_tokens(num_feature_frames),
                                  instruction_index)


def build_generation_prompt(tokenizer, example: Mapping[str, Any], task: str,
                            num_feature_frames: int, num_audio_tokens: Callable[[int], int], *,
                            template: str = "plain", instruction_index: int = 0,
                            language: str = "French", add_bos: bool = True) -> np.ndarray:
  """(b) The ids up to where the answer starts, for decoding."""
  builder = PromptBuilder(tokenizer, template, language, add_bos)
  return np.asarray(
      builder.prompt_ids(example, task, num_audio_tokens(num_feature_frames), instruction_index),
      np.int32)
