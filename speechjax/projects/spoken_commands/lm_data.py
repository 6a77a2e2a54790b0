"""The demo's text-LM examples: the transcript in the audio slot, with noise and random copies.

The demo's speech LLM keeps its LM frozen, so the LM must already do each task
as a function of what its audio slot holds. Its pretraining text therefore puts
the transcript's tokens where the audio will go, and the library's text-LM
data reads the examples from here through the config hook

    c.data.lm_examples = "speechjax.projects.spoken_commands.lm_data:text_lm_examples"

with these keys of `config.data` (added by configs/demo.py):

    lm_audio_slot   'empty' (answers alone) or 'transcript' (the transcript's tokens
                    in the slot: transcribing is then copying)
    lm_slot_noise   chance per slot token of a substitution, a deletion or a repeat
                    (one third each), so the LM learns to read an imperfect slot
    lm_slot_length  > 0: the slot is always this many tokens, the transcript then the
                    pad token (the layout of a 'ctc_compress' projector's output)
    lm_random_copy  extra ASR examples of random word strings, as a fraction of the
                    examples: copying is then the only way to predict them
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from speechjax.data import prompts as prompts_lib
from speechjax.data import tasks as tasks_lib
from speechjax.data import text_lm

LM_AUDIO_SLOTS = ("empty", "transcript")
HOOK = "speechjax.projects.spoken_commands.lm_data:text_lm_examples"


def noisy_slot(ids: list[int], noise: float, pool: np.ndarray, rng: np.random.Generator) -> list[int]:
  """Each token, with probability `noise`, is replaced by a token drawn from
  `pool`, dropped, or said twice (one third each)."""
  out = []
  for token in ids:
    if rng.random() >= noise:
      out.append(token)
      continue
    kind = rng.integers(3)
    if kind == 0:
      out.append(int(pool[rng.integers(len(pool))]))
    elif kind == 2:
      out += [token, token]
  return out


def fixed_length_slot(ids: list[int], length: int, fill_id: int) -> list[int]:
  """`ids` cut or filled with `fill_id` to exactly `length` tokens: the layout
  of a fixed-size audio slot (projector kind 'ctc_compress'), where the k-th
  answer token sits a constant distance after the k-th slot token."""
  return list(ids[:length]) + [fill_id] * max(0, length - len(ids))


def text_lm_examples(records: Iterable[dict], tokenizer, data_cfg,
                     tasks: Sequence[str] | None = None) -> list[np.ndarray]:
  """Every (record, task, instruction) as prompt + answer + EOS token ids, the
  slot filled as `data.lm_audio_slot`, `lm_slot_noise` and `lm_slot_length`
  say, plus `lm_random_copy` random-word ASR examples."""
  slot_kind = data_cfg.get("lm_audio_slot", "empty")
  if slot_kind not in LM_AUDIO_SLOTS:
    raise ValueError(f"data.lm_audio_slot={slot_kind!r}; valid: {LM_AUDIO_SLOTS}")
  noise = float(data_cfg.get("lm_slot_noise", 0.0))
  slot_length = int(data_cfg.get("lm_slot_length", 0))
  task_names = tuple(tasks or data_cfg.tasks)
  prompts = text_lm.prompt_builder(tokenizer, data_cfg)
  records = list(records)
  slots = [[] for _ in records]
  if slot_kind == "transcript":
    # Exactly the tokens of the ASR answer: transcribing is then copying.
    slots = [prompts.transcript_ids(r) if tasks_lib.supports(r, "asr") else [] for r in records]
  pool = np.asarray(sorted({t for s in slots for t in s}) or [0], np.int64)
  rng = np.random.default_rng([int(data_cfg.get("seed", 0)), 23])
  out = []
  for record, slot in zip(records, slots):
    for task in tasks_lib.supported_tasks(record, task_names):
      for k in range(prompts.num_instructions(task)):
        filled = noisy_slot(slot, noise, pool, rng) if noise > 0 else slot
        out.append(_slot_example(prompts, record, task, filled, k, slot_length))
  copies = int(round(float(data_cfg.get("lm_random_copy", 0.0)) * len(out)))
  if copies and slot_kind == "transcript" and "asr" in task_names:
    out += random_copy_examples(records, copies, prompts, slot_length, rng)
  return out


def random_copy_examples(records, count: int, prompts: prompts_lib.PromptBuilder, slot_length: int,
                         rng: np.random.Generator) -> list[np.ndarray]:
  """ASR examples whose transcript is a random sequence of the corpus' words:
  no sentence prior predicts them, so the only way to lower their loss is to
  read the slot, which is what a frozen LM under a speech encoder must do."""
  words = sorted({w for r in records for w in str(r.get("text") or "").split()})
  lengths = [len(str(r.get("text") or "").split()) for r in records]
  out = []
  for _ in range(count):
    n = int(rng.integers(max(1, min(lengths)), max(lengths) + 1))
    record = {"text": " ".join(words[i] for i in rng.integers(len(words), size=n))}
    k = int(rng.integers(prompts.num_instructions("asr")))
    out.append(_slot_example(prompts, record, "asr", prompts.transcript_ids(record, k), k, slot_length))
  return out


def _slot_example(prompts, record, task: str, slot: list[int], instruction_index: int,
                  slot_length: int) -> np.ndarray:
  """Prompt with `slot` in the audio's place (filled to slot_length if set) + answer + EOS."""
  if slot_length:
    slot = fixed_length_slot(slot, slot_length, prompts.pad_id)
  return text_lm.text_example(prompts, record, task, slot, instruction_index)
