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


def text_lm_examples(records: Iterable[dict], tokenizer, data_cfg, tasks=None) -> list[np.ndarray]:
  """Every (record, task, instruction) as prompt + answer + EOS token ids.

  The audio slot holds nothing (`data.lm_audio_slot='empty'`) or the
  record's transcript tokens ('transcript', with `data.lm_slot_noise`).
  """
  slot_kind = data_cfg.get("lm_audio_slot", "empty")
  if slot_kind not in LM_AUDIO_SLOTS:
    raise ValueError(f"data.lm_audio_slot={slot_kind!r}; valid: {LM_AUDIO_SLOTS}")
  noise = float(data_cfg.get("lm_slot_noise", 0.0))
  prompts = tasks_lib.PromptBuilder(tokenizer, data_cfg.template, data_cfg.translation_language,
                                    bool(data_cfg.add_bos))
  records = list(records)
  slots = [[] for _ in records]
  if slot_kind == "transcript":
    # Exactly the tokens of the ASR answer: transcribing is then copying.
    slots = [prompts.answer_ids(r, "asr")[:-1] if tasks_lib.supports(r, "asr") else [] for r in records]
  pool = np.asarray(sorted({t for s in slots for t in s}) or [0], np.int64)
  rng = np.random.default_rng([int(data_cfg.get("seed", 0)), 23])
  out = []
  for record, slot in zip(records, slots):
    for task in tasks_lib.supported_tasks(record, tuple(tasks or data_cfg.tasks)):
      for k in range(prompts.num_instructions(task)):
        filled = noisy_slot(slot, noise, pool, rng) if noise > 0 else slot
        out.append(np.asarray(prompts.prompt_ids_with_text_slot(record, task, filled, k)
                              + prompts.answer_ids(record, task, k), np.int32))
  return out


def _text_records(source) -> list[dict]:
  keys = ("text", "translation", "label", "prompt", "target", "id")
  return [{k: source[i].get(k) for k in keys} for i in range(len(source))]


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
  train_seqs = text_lm_examples(_text_records(train_source), tokenizer, data_cfg)
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

  vocab = bundle.model_config.vocab
  data_cfg = config.data
  train_source, train_info = sources.open_source(data_cfg, data_cfg.train_split)
  dev_source, dev_info = sources.open_source(data_cfg, data_cfg.eval_split, train_info.label_names)
  max_len = int(config.data.get("ctc_max_label_length", 128))

  def add_labels(batch, texts):
    labels = np.zeros((len(texts), max_len), np.int32)
    label_mask = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      ids = ctc.encode_text(text, vocab)[:max_len]
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
