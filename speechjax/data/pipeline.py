"""Grain input pipeline: random-access source -> bucketed, featurized, tokenized batches.

    source, info = sources.open_source(config.data, 'train')
    train = make_train_iterator(source, info, tokenizer, num_audio_tokens, config.data)
    batch = next(train)              # numpy arrays named in BATCH_KEYS, fixed shapes per bucket
    state = train.get_state()        # JSON-able; set_state(state) resumes exactly
    train.stats()                    # padding fractions, audio seconds per batch

Design:
  * The unit of work is a batch *plan* (which source indices form batch k).
    Plans are a pure function of (seed, epoch, host shard), so the grain
    iterator state is one integer and a restored run sees the same batches.
  * Length grouping: each epoch is shuffled, cut into windows of
    `length_grouping_window` batches, sorted by length inside a window and the
    batches shuffled again, so batches hold similar lengths without a global sort.
  * Shapes: audio is padded to the smallest of `audio_buckets_seconds` that
    fits, tokens to the smallest of `token_buckets`; a run compiles at most
    |audio buckets| x |token buckets| programs.
  * Featurization, augmentation and tokenization run per batch on grain's
    prefetch threads (`worker_threads`);
    batches come out in order whatever the thread timing, and all randomness
    comes from a generator seeded by (seed, batch index).
  * Features are what the encoder reads, given as an `audio_input` (any object
    with the attributes of speechjax.models.encoders.AudioInput: kind,
    sample_rate, n_mels, hop_length, normalize): 'mel' gives JAX log-mel
    features [B, n_mels, F] (jit per bucket shape) and a frame mask; 'wave'
    gives the samples [B, S], zero-mean unit-variance per utterance over its
    real samples when `normalize`, and a sample mask. Without one, the
    log-mel settings of the data config (n_mels, hop_length) apply. With a
    frozen encoder's stored states (data.cache_encoder_states, training only),
    batches carry `encoder_states` [B, N, D] and `encoder_state_mask` [B, N]
    instead of features (speechjax.data.encoder_cache).
  * Per-host sharding: batches are planned globally, the same on every host,
    and process i feeds rows [i*b, (i+1)*b) of each one (b = batch_size //
    process_count; grain ShardByJaxProcess gives i). That contiguous block is
    where jax.make_array_from_process_local_data puts a process' rows, so the
    global batch is the one a single process would train on, and every host
    pads to the same bucket (the global batch's), so local shapes agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import functools
from typing import Any

import grain
import numpy as np

from speechjax.data import prompts as prompts_lib
from speechjax.data.batching import (
  BatchMaker,
  BatchPlanner,
  config_value,
  eligible_indices,
  read_options,
  shard_options_from_config,
  take_rows,
)

BATCH_KEYS = ("features", "feature_mask", "input_ids", "attention_mask", "targets", "target_mask",
              "class_labels", "audio_seconds", "example_mask")


class EndOfData(StopIteration):
  """The training data ran out: data.num_epochs > 0 passes were all read. A
  StopIteration, so `for batch in train` ends cleanly; `next(train)` raises it
  with a message naming the epochs and what to change."""


class TrainIterator:
  """Training batches (endless, or data.num_epochs passes) with checkpointable
  state and running input stats."""

  def __init__(self, iterator, planner: BatchPlanner, num_epochs: int = 0):
    self._iterator = iterator
    self.planner = planner
    self.num_epochs = int(num_epochs)
    self._window: list[dict[str, float]] = []

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._iterator)
    except StopIteration:
      per_epoch = self.planner.batches_per_epoch
      raise EndOfData(
          f"the training data ended after data.num_epochs={self.num_epochs} epochs of {per_epoch} "
          f"batches ({self.num_epochs * per_epoch} batches); to train longer, raise data.num_epochs "
          f"or set it to 0 (repeat forever), or lower train.num_steps to at most "
          f"{self.num_epochs * per_epoch}") from None
    self._window.append(batch.pop("_stats"))
    batch.pop("_meta")
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._iterator.set_state(dict(state))

  def stats(self) -> dict[str, float]:
    """Means over the batches since the last call (padding fractions, audio seconds per batch)."""
    window, self._window = self._window, []
    if not window:
      return {}
    out = {
        key: float(np.mean([w[key] for w in window]))
        for key in ("audio_padding_fraction", "token_padding_fraction")
    }
    out["audio_seconds_per_batch"] = float(np.mean([w["audio_seconds"] for w in window]))
    out["truncated_examples"] = float(
        sum(w["truncated_audio"] + w["truncated_tokens"] for w in window))
    return out

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close:
      close()


def make_train_iterator(source, info, tokenizer, num_audio_tokens: Callable[[int], int], config, *,
                        shard_options: grain.sharding.ShardOptions | None = None,
                        audio_input=None, encoder_states=None) -> TrainIterator:
  """Shuffled, length-grouped, augmented training batches (forever, or num_epochs).
  `audio_input`: what the encoder reads (see the module docstring; None = log-mel).
  `encoder_states`: an EncoderStateCache; batches then carry the stored
  states (encoder_states, encoder_state_mask) instead of features."""
  shard = shard_options or shard_options_from_config(config)
  task_list = tuple(config_value(config, "tasks", ("asr",)))
  weights = tuple(config_value(config, "task_weights", (1.0,) * len(task_list)))
  batch_size = int(config_value(config, "batch_size", 16))
  if batch_size % shard.shard_count:
    raise ValueError(
        f"data.batch_size={batch_size} is not divisible by {shard.shard_count} processes; use a "
        f"multiple of {shard.shard_count}")
  usable = eligible_indices(info, task_list, weights, config_value(config, "max_audio_seconds", None))
  planner = BatchPlanner(usable, info.num_samples, batch_size // shard.shard_count,
                         int(config_value(config, "seed", 0)),
                         int(config_value(config, "length_grouping_window", 32)), shard)
  maker = BatchMaker(source, info, _prompt_builder(tokenizer, config), num_audio_tokens, config,
                     train=True, audio_input=audio_input, encoder_states=encoder_states)
  epochs = int(config_value(config, "num_epochs", 0))
  if epochs < 0:
    raise ValueError(f"data.num_epochs={epochs}; valid: 0 (repeat forever) or a number of passes > 0")
  total = planner.batches_per_epoch * epochs if epochs > 0 else 2**62
  dataset = grain.MapDataset.range(total).map(lambda k: planner.make_host_batch(maker, k))
  return TrainIterator(iter(dataset.to_iter_dataset(read_options(config))), planner, max(epochs, 0))


class EvalIterator:
  """One ordered pass; the last batch is padded with example_mask 0.

  Yields Batch dicts, or (batch, meta) with `with_metadata` where meta has
  per-row 'id', 'task', 'reference' (the expected answer), 'text', 'label'.
  `generate=True` gives prompt-only, left-padded input_ids for decoding.
  """

  def __init__(self, source, info, tokenizer, num_audio_tokens, config, *, task: str | None = None,
               generate: bool = False, with_metadata: bool = False, max_batches: int = 0,
               batch_size: int | None = None,
               shard_options: grain.sharding.ShardOptions | None = None, audio_input=None):
    shard = shard_options or shard_options_from_config(config)
    self.task = task or config_value(config, "eval_task", "") or tuple(config_value(config, "tasks", ("asr",)))[0]
    everything = np.arange(len(info.num_samples))
    usable = eligible_indices(info, (self.task,), max_seconds=config_value(config, "max_audio_seconds",
                                                                   None))
    # Bad inputs left out when the source was built or read, plus examples
    # without this task's fields or longer than data.max_audio_seconds.
    self.num_skipped = int(getattr(info, "num_skipped", 0)) + len(everything) - len(usable)
    self.batch_size = int(batch_size or
                          config_value(config, "eval_batch_size", config_value(config, "batch_size", 16)))
    if shard.shard_count > 1:
      self.batch_size = max(1, self.batch_size // shard.shard_count)
    # Global batches in dataset order; this host feeds its block of rows of
    # each (as in training), so every host runs the same steps with the same shapes.
    self.global_batch_size = self.batch_size * shard.shard_count
    self._rows = slice(shard.shard_index * self.batch_size,
                       (shard.shard_index + 1) * self.batch_size)
    self.num_batches = -(-len(usable) // self.global_batch_size)
    if max_batches:
      self.num_batches = min(self.num_batches, int(max_batches))
    position = np.arange(min(len(usable), self.num_batches * self.global_batch_size))
    position %= self.global_batch_size
    self.num_examples = int(((position >= self._rows.start) & (position < self._rows.stop)).sum())
    self._indices = usable
    # A host with no example of its own still runs every step, on padding rows.
    self._filler = int(usable[0]) if len(usable) else 0
    self._maker = BatchMaker(source, info, _prompt_builder(tokenizer, config), num_audio_tokens,
                             config, train=False, task=self.task, generate=generate,
                             audio_input=audio_input)
    self._with_metadata = with_metadata
    self._config = config

  def __len__(self) -> int:
    return self.num_batches

  @property
  def host_rows(self) -> slice:
    """The rows of each global batch this host feeds (all of them on one host)."""
    return slice(self._rows.start, self._rows.stop) if self.global_batch_size != self.batch_size \
        else slice(0, self.batch_size)

  def _batch(self, k: int):
    size = self.global_batch_size
    rows = self._indices[k * size:(k + 1) * size]
    mask = np.zeros(size, np.float32)
    mask[:len(rows)] = 1.0
    fill = rows[-1] if len(rows) else self._filler
    rows = np.concatenate([rows, np.full(size - len(rows), fill, np.int64)])
    batch = self._maker(rows, mask, k)
    return take_rows(batch, self._rows) if size != self.batch_size else batch

  def __iter__(self) -> Iterator[Any]:
    if self.num_batches == 0:
      return
    dataset = grain.MapDataset.range(self.num_batches).map(self._batch)
    for batch in dataset.to_iter_dataset(read_options(self._config)):
      batch.pop("_stats")
      meta = batch.pop("_meta")
      if self._with_metadata:
        valid = int(batch["example_mask"].sum())
        yield batch, {key: values[:valid] for key, values in meta.items()}
      else:
        yield batch


def make_eval_iterator(source, info, tokenizer, num_audio_tokens, config, **kwargs) -> EvalIterator:
  return EvalIterator(source, info, tokenizer, num_audio_tokens, config, **kwargs)


@functools.lru_cache(maxsize=8)
def _cached_prompt_builder(tokenizer, template, language, add_bos):
  return prompts_lib.PromptBuilder(tokenizer, template, language, add_bos)


def _prompt_builder(tokenizer, config) -> prompts_lib.PromptBuilder:
  template = config_value(config, "template", "plain")
  language = config_value(config, "translation_language", "French")
  add_bos = bool(config_value(config, "add_bos", True))
  try:
    return _cached_prompt_builder(tokenizer, template, language, add_bos)
  except TypeError:  # unhashable tokenizer
    return prompts_lib.PromptBuilder(tokenizer, template, language, add_bos)
