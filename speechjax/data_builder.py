"""Config + model bundle -> the data a training run reads.

Speech kinds (speech_llm, ctc) read the configured dataset through the Grain
pipeline of speechjax.data; the text LM kind reads the answers of the same
dataset (transcripts, translations, labels) wrapped in the same prompts, so a
language model pretrained on it knows the formats the speech LLM will use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import grain
import numpy as np

from speechjax.data import pipeline, sources
from speechjax.data import tasks as tasks_lib


@dataclasses.dataclass
class RunData:
  train: Any  # iterator of numpy batches with get_state / set_state
  dev_batches: Callable[[int], Iterable[dict]]  # max_batches -> batches (loss)
  train_stats: Callable[[], dict]
  dev_source: Any = None
  dev_info: Any = None
  label_names: tuple[str, ...] = ()


def build(config, bundle) -> RunData:
  if bundle.kind == "lm":
    return _text_lm_data(config, bundle.tokenizer)
  if bundle.kind == "ctc":
    return _ctc_data(config, bundle)
  return _speech_data(config, bundle)


def _speech_data(config, bundle) -> RunData:
  data_cfg = config.data
  train_source, train_info = sources.open_source(data_cfg, data_cfg.train_split)
  dev_source, dev_info = sources.open_source(data_cfg, data_cfg.eval_split, train_info.label_names)
  train = pipeline.make_train_iterator(train_source, train_info, bundle.tokenizer,
                                       bundle.num_audio_tokens, data_cfg)

  def dev_batches(max_batches: int):
    return pipeline.make_eval_iterator(dev_source, dev_info, bundle.tokenizer, bundle.num_audio_tokens,
                                       data_cfg, max_batches=max_batches)

  return RunData(train, dev_batches, train.stats, dev_source, dev_info, tuple(train_info.label_names))


# ---------------------------------------------------------------- text LM

LM_AUDIO_SLOTS = ("empty", "transcript")


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


def text_lm_examples(records: Iterable[dict], tokenizer, data_cfg, tasks=None) -> list[np.ndarray]:
  """Every (record, task, instruction) as prompt + answer + EOS token ids.

  The audio slot holds nothing (`data.lm_audio_slot='empty'`) or the
  record's transcript tokens ('transcript', with `data.lm_slot_noise`),
  filled to `data.lm_slot_length` tokens when that is set.
  """
  slot_kind = data_cfg.get("lm_audio_slot", "empty")
  if slot_kind not in LM_AUDIO_SLOTS:
    raise ValueError(f"data.lm_audio_slot={slot_kind!r}; valid: {LM_AUDIO_SLOTS}")
  noise = float(data_cfg.get("lm_slot_noise", 0.0))
  slot_length = int(data_cfg.get("lm_slot_length", 0))
  prompts = tasks_lib.PromptBuilder(tokenizer, data_cfg.template, data_cfg.translation_language,
                                    bool(data_cfg.add_bos))
  records = list(records)
  slots = [[] for _ in records]
  if slot_kind == "transcript":
    # Exactly the tokens of the ASR answer: transcribing is then copying.
    slots = [prompts.transcript_ids(r) if tasks_lib.supports(r, "asr") else [] for r in records]
  pool = np.asarray(sorted({t for s in slots for t in s}) or [0], np.int64)
  rng = np.random.default_rng([int(data_cfg.get("seed", 0)), 23])
  out = []
  for record, slot in zip(records, slots):
    for task in tasks_lib.supported_tasks(record, tuple(tasks or data_cfg.tasks)):
      for k in range(prompts.num_instructions(task)):
        filled = noisy_slot(slot, noise, pool, rng) if noise > 0 else slot
        out.append(_slot_example(prompts, record, task, filled, k, slot_length))
  copies = int(round(float(data_cfg.get("lm_random_copy", 0.0)) * len(out)))
  if copies and slot_kind == "transcript" and "asr" in tuple(tasks or data_cfg.tasks):
    out += random_copy_examples(records, copies, prompts, slot_length, rng)
  return out


def random_copy_examples(records, count: int, prompts, slot_length: int,
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
  return np.asarray(prompts.prompt_ids_with_text_slot(record, task, slot, instruction_index)
                    + prompts.answer_ids(record, task, instruction_index), np.int32)


TEXT_RECORD_KEYS = ("text", "translation", "label", "prompt", "target", "id")


def _text_records(source) -> list[dict]:
  records = []
  for i in range(len(source)):
    example = source[i]  # decodes the whole example, audio included: once per record
    records.append({k: example.get(k) for k in TEXT_RECORD_KEYS})
  return records


def read_text_manifest(path: str) -> list[dict]:
  """Text-only records (JSON lines with `text` and optionally `translation`,
  `label`): extra LM pretraining text, e.g. a domain's sentences that have no
  audio. A line that is not a JSON object with a non-empty `text` is refused
  with its file and line number: a silently shorter LM corpus would go unnoticed."""
  from speechjax.data import validate  # pylint: disable=g-import-not-at-top

  records = []
  for line_number, record, raw in validate.read_manifest(path):
    text = record.get("text") if record is not None else None
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{path}:{line_number}: expected a JSON object with a non-empty 'text', "
                       f"got {raw[:80]!r}")
    records.append({k: record.get(k) for k in TEXT_RECORD_KEYS})
  if not records:
    raise ValueError(f"{path}: no text records (data.lm_text_manifest)")
  return records


def _pad_text_batch(seqs: list[np.ndarray], buckets, pad_id: int, example_mask=None) -> dict:
  longest = max(len(s) for s in seqs)
  length = pipeline.smallest_fitting(longest, buckets) or max(buckets)
  b = len(seqs)
  ids = np.full((b, length), pad_id, np.int32)
  mask = np.zeros((b, length), np.int32)
  for row, s in enumerate(seqs):
    s = s[:length]
    ids[row, :len(s)] = s
    mask[row, :len(s)] = 1
  targets = np.concatenate([ids[:, 1:], np.full((b, 1), pad_id, np.int32)], axis=1)
  target_mask = (mask * np.concatenate([mask[:, 1:], np.zeros((b, 1), np.int32)], axis=1)).astype(np.float32)
  if example_mask is not None:
    target_mask *= example_mask[:, None]
  return {"input_ids": ids, "attention_mask": mask, "targets": targets, "target_mask": target_mask,
          "example_mask": np.ones(b, np.float32) if example_mask is None else example_mask}


class _CheckpointableIterator:
  def __init__(self, iterator):
    self._iterator = iterator

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(dict(state))


def _text_lm_data(config, tokenizer) -> RunData:
  if tokenizer is None:
    raise ValueError("model.kind='lm' needs model.tokenizer (an HF tokenizer folder)")
  data_cfg = config.data
  train_source, _ = sources.open_source(data_cfg, data_cfg.train_split)
  dev_source, _ = sources.open_source(data_cfg, data_cfg.eval_split)
  if data_cfg.get("lm_text_manifest"):
    # Replaces the paired transcripts: a text corpus is normally a superset
    # of them (the demo's holds every train-partition sentence of the domain).
    train_records = read_text_manifest(data_cfg.lm_text_manifest)
  else:
    train_records = _text_records(train_source)
  train_seqs = text_lm_examples(train_records, tokenizer, data_cfg)
  dev_seqs = text_lm_examples(_text_records(dev_source), tokenizer, data_cfg)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  buckets = tuple(sorted(int(t) for t in data_cfg.token_buckets))
  batch_size = int(data_cfg.batch_size)
  # Global batches, the same on every host; each host feeds its block of rows
  # (see speechjax.data.pipeline: per-host sharding).
  shard = pipeline.shard_options_from_config(data_cfg)
  if batch_size % shard.shard_count:
    raise ValueError(f"data.batch_size={batch_size} is not divisible by {shard.shard_count} processes")
  per_host = batch_size // shard.shard_count
  rows = slice(shard.shard_index * per_host, (shard.shard_index + 1) * per_host)
  dataset = (grain.MapDataset.source(train_seqs).seed(int(data_cfg.seed)).shuffle().repeat()
             .batch(batch_size, drop_remainder=True,
                    batch_fn=lambda seqs: pipeline.take_rows(_pad_text_batch(list(seqs), buckets, pad),
                                                             rows)))
  train = _CheckpointableIterator(iter(dataset.to_iter_dataset()))

  def dev_batches(max_batches: int):
    n = len(dev_seqs) // batch_size if not max_batches else min(max_batches, -(-len(dev_seqs) // batch_size))
    for k in range(max(n, 1)):
      chunk = dev_seqs[k * batch_size:(k + 1) * batch_size]
      mask = np.zeros(batch_size, np.float32)
      mask[:len(chunk)] = 1
      chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
      yield pipeline.take_rows(_pad_text_batch(chunk, buckets, pad, mask), rows)

  return RunData(train, dev_batches, lambda: {})


# -------------------------------------------------------------------- CTC

def _ctc_data(config, bundle) -> RunData:
  from speechjax.models import ctc

  model_cfg = bundle.model_config
  data_cfg = config.data
  train_source, train_info = sources.open_source(data_cfg, data_cfg.train_split)
  dev_source, dev_info = sources.open_source(data_cfg, data_cfg.eval_split, train_info.label_names)
  max_len = int(config.data.get("ctc_max_label_length", 128))
  if model_cfg.vocab:
    def encode(text):
      return ctc.encode_text(text, model_cfg.vocab)
  else:
    # Exactly the tokens of the ASR answer (what the LLM writes, and what a
    # text-pretrained LM saw in its slot), shifted past the blank.
    prompts = tasks_lib.PromptBuilder(bundle.tokenizer, data_cfg.template,
                                      data_cfg.translation_language, bool(data_cfg.add_bos))

    def encode(text):
      return [i + 1 for i in prompts.transcript_ids({"text": text})] if text else []

  def add_labels(batch, texts):
    labels = np.zeros((len(texts), max_len), np.int32)
    label_mask = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      ids = encode(text)[:max_len]
      labels[row, :len(ids)] = ids
      label_mask[row, :len(ids)] = 1
    batch["ctc_labels"], batch["ctc_label_mask"] = labels, label_mask
    return batch

  train = _ctc_train_iterator(train_source, train_info, bundle.tokenizer, data_cfg, add_labels)

  def dev_batches(max_batches: int):
    it = pipeline.make_eval_iterator(dev_source, dev_info, bundle.tokenizer, lambda f: 0, data_cfg,
                                     max_batches=max_batches, with_metadata=True)
    for batch, meta in it:
      texts = list(meta["text"]) + [""] * (len(batch["example_mask"]) - len(meta["text"]))
      yield add_labels(batch, texts)

  return RunData(train, dev_batches, train.stats, dev_source, dev_info, tuple(train_info.label_names))


class _CTCTrainIterator(pipeline.TrainIterator):
  """The speech training iterator, with CTC labels made from each row's text."""

  def __init__(self, iterator, planner, add_labels):
    super().__init__(iterator, planner)
    self._add_labels = add_labels

  def __next__(self):
    batch = next(self._iterator)
    self._window.append(batch.pop("_stats"))
    return self._add_labels(batch, batch.pop("_meta")["text"])


def _ctc_train_iterator(source, info, tokenizer, data_cfg, add_labels):
  shard = pipeline.shard_options_from_config(data_cfg)
  batch_size = int(data_cfg.batch_size)
  if batch_size % shard.shard_count:
    raise ValueError(f"data.batch_size={batch_size} is not divisible by {shard.shard_count} processes")
  planner = pipeline.BatchPlanner(pipeline.eligible_indices(info, ("asr",)), info.num_samples,
                                  batch_size // shard.shard_count, int(data_cfg.seed),
                                  int(data_cfg.length_grouping_window), shard)
  # Transcripts only: the prompt is irrelevant to CTC, so make it zero audio slots.
  asr_only = dict(data_cfg.to_dict(), tasks=("asr",), task_weights=(1.0,))
  maker = pipeline.BatchMaker(source, info, pipeline._prompt_builder(tokenizer, asr_only),  # pylint: disable=protected-access
                              lambda f: 0, asr_only, train=True)
  dataset = grain.MapDataset.range(2 ** 62).map(lambda k: planner.make_host_batch(maker, k))
  return _CTCTrainIterator(iter(dataset.to_iter_dataset(pipeline._read_options(data_cfg))), planner,  # pylint: disable=protected-access
                           add_labels)
