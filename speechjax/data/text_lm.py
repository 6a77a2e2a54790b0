"""Text-only batches for pretraining the decoder LLM (`model.kind='lm'`).

The LM reads the answers of the configured dataset (transcripts, translations,
labels, instruction targets, summaries, spoken-QA answers: the fields of every
registered task), or of a JSONL of texts (`data.lm_text_manifest`),
wrapped in the same prompts the speech LLM will use, so it knows each task's
format before it ever hears audio. By default the audio slot of each prompt is
empty; `data.lm_examples` names a function that builds the examples instead
(what goes in the slot, extra examples), e.g. a project's own data recipe:

    c.data.lm_examples = "my_project.lm_data:text_lm_examples"

    def text_lm_examples(records, tokenizer, data_cfg, tasks=None) -> list[np.ndarray]:
      ...  # token ids of prompt + answer + EOS, one array per example
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import importlib

import grain
import numpy as np

from speechjax.data import batching, sources, validate
from speechjax.data import prompts as prompts_lib
from speechjax.data import tasks as tasks_lib

ExampleBuilder = Callable[..., list[np.ndarray]]


def text_record_keys() -> tuple[str, ...]:
  """The fields a text record keeps: those of every registered task, then 'id'.
  Read from the registry, so a task's answers reach the LM (its prompt format
  learnt) whichever fields it reads: summary, question and answer as much as
  text, translation and label."""
  fields = (f for name in tasks_lib.task_names() for f in tasks_lib.get_task(name).fields)
  return tuple(dict.fromkeys(fields)) + ("id",)


def text_records(source) -> list[dict]:
  """The text fields of every example of a data source."""
  records, keys = [], text_record_keys()
  for i in range(len(source)):
    example = source[i]  # decodes the whole example, audio included: once per record
    records.append({k: example.get(k) for k in keys})
  return records


def read_text_manifest(path: str) -> list[dict]:
  """Text-only records (JSON lines with `text` and optionally `translation`,
  `label`): extra LM pretraining text, e.g. a domain's sentences that have no
  audio. A line that is not a JSON object with a non-empty `text` is refused
  with its file and line number: a silently shorter LM corpus would go unnoticed."""
  records, keys = [], text_record_keys()
  for line_number, record, raw in validate.read_manifest(path):
    text = record.get("text") if record is not None else None
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{path}:{line_number}: expected a JSON object with a non-empty 'text', "
                       f"got {raw[:80]!r}")
    records.append({k: record.get(k) for k in keys})
  if not records:
    raise ValueError(f"{path}: no text records (data.lm_text_manifest)")
  return records


def prompt_builder(tokenizer, data_cfg) -> prompts_lib.PromptBuilder:
  return prompts_lib.PromptBuilder(tokenizer, data_cfg.template, data_cfg.translation_language,
                                 bool(data_cfg.add_bos))


def text_example(prompts: prompts_lib.PromptBuilder, record: dict, task: str, slot_ids: Sequence[int],
                 instruction_index: int) -> np.ndarray:
  """Prompt with `slot_ids` where the audio goes + answer + EOS, as int32 ids."""
  return np.asarray(prompts.prompt_ids_with_text_slot(record, task, list(slot_ids), instruction_index)
                    + prompts.answer_ids(record, task, instruction_index), np.int32)


def text_lm_examples(records: Iterable[dict], tokenizer, data_cfg,
                     tasks: Sequence[str] | None = None) -> list[np.ndarray]:
  """Every (record, task it supports, instruction) with an empty audio slot."""
  prompts = prompt_builder(tokenizer, data_cfg)
  several = [t for t in tuple(tasks or data_cfg.tasks) if tasks_lib.get_task(t).multi_audio]
  if several:
    raise ValueError(f"data.tasks: {several} read several audio clips per example, which a text-only "
                     "LM (model.kind='lm') has no slots for; pretrain on the one-clip tasks")
  return [text_example(prompts, record, task, [], k)
          for record in records
          for task in tasks_lib.supported_tasks(record, tuple(tasks or data_cfg.tasks))
          for k in range(prompts.num_instructions(task))]


def example_builder(data_cfg) -> ExampleBuilder:
  """The function `data.lm_examples` names ('package.module:function'), or
  `text_lm_examples` when it is empty."""
  spec = str(data_cfg.get("lm_examples", "") or "")
  if not spec:
    return text_lm_examples
  module_name, _, name = spec.partition(":")
  if not module_name or not name:
    raise ValueError(f"data.lm_examples={spec!r}: expected 'package.module:function' (or '' for "
                     "prompts with an empty audio slot)")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"data.lm_examples={spec!r}: cannot import {module_name!r} ({e})") from e
  builder = getattr(module, name, None)
  if not callable(builder):
    raise ValueError(f"data.lm_examples={spec!r}: {module_name} has no function {name!r}")
  return builder


def pad_text_batch(seqs: list[np.ndarray], buckets: Sequence[int], pad_id: int,
                   example_mask: np.ndarray | None = None) -> dict:
  """Right-padded ids to the smallest fitting token bucket, next-token targets and masks."""
  longest = max(len(s) for s in seqs)
  length = batching.smallest_fitting(longest, buckets) or max(buckets)
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


class CheckpointableIterator:
  """A grain iterator behind the trainer's get_state / set_state interface."""

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


def host_rows(data_cfg) -> slice:
  """This host's block of rows of a global batch of data.batch_size (every host
  builds the same global batches; see speechjax.data.pipeline: per-host sharding)."""
  batch_size = int(data_cfg.batch_size)
  shard = batching.shard_options_from_config(data_cfg)
  if batch_size % shard.shard_count:
    raise ValueError(f"data.batch_size={batch_size} is not divisible by {shard.shard_count} processes")
  per_host = batch_size // shard.shard_count
  return slice(shard.shard_index * per_host, (shard.shard_index + 1) * per_host)


def shuffled_batches(items: Sequence, data_cfg, make_batch: Callable[[list], dict]) -> CheckpointableIterator:
  """Endless shuffled global batches of in-memory `items` (make_batch(list of
  items) -> batch dict), this host's rows of each, resumable."""
  rows = host_rows(data_cfg)
  dataset = (grain.MapDataset.source(items).seed(int(data_cfg.seed)).shuffle().repeat()
             .batch(int(data_cfg.batch_size), drop_remainder=True,
                    batch_fn=lambda chunk: batching.take_rows(make_batch(list(chunk)), rows)))
  return CheckpointableIterator(iter(dataset.to_iter_dataset(batching.read_options(data_cfg))))


def text_lm_batches(config, tokenizer) -> tuple[CheckpointableIterator, Callable[[int], Iterable[dict]]]:
  """(endless shuffled train batches, max_batches -> dev batches) for an LM run."""
  if tokenizer is None:
    raise ValueError("model.kind='lm' needs model.tokenizer (an HF tokenizer folder)")
  data_cfg = config.data
  build_examples = example_builder(data_cfg)
  train_source, _ = sources.open_source(data_cfg, data_cfg.train_split)
  dev_source, _ = sources.open_source(data_cfg, data_cfg.eval_split)
  if data_cfg.get("lm_text_manifest"):
    # Replaces the paired transcripts: a text corpus is normally a superset of them.
    train_records = read_text_manifest(data_cfg.lm_text_manifest)
  else:
    train_records = text_records(train_source)
  train_seqs = build_examples(train_records, tokenizer, data_cfg)
  dev_seqs = build_examples(text_records(dev_source), tokenizer, data_cfg)
  if not train_seqs or not dev_seqs:
    raise ValueError(f"no LM examples for data.tasks={tuple(data_cfg.tasks)} in the "
                     f"{'train' if not train_seqs else 'dev'} records")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  buckets = tuple(sorted(int(t) for t in data_cfg.token_buckets))
  batch_size = int(data_cfg.batch_size)
  rows = host_rows(data_cfg)
  train = shuffled_batches(train_seqs, data_cfg, lambda seqs: pad_text_batch(seqs, buckets, pad))

  def dev_batches(max_batches: int):
    n = len(dev_seqs) // batch_size if not max_batches else min(max_batches, -(-len(dev_seqs) // batch_size))
    for k in range(max(n, 1)):
      chunk = dev_seqs[k * batch_size:(k + 1) * batch_size]
      mask = np.zeros(batch_size, np.float32)
      mask[:len(chunk)] = 1
      chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
      yield batching.take_rows(pad_text_batch(chunk, buckets, pad, mask), rows)

  return train, dev_batches
