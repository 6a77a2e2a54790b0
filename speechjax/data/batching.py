"""Batches of one shape bucket: which examples form a batch (BatchPlanner),
and how a batch is read, featurized for the encoder and tokenized
(BatchMaker). The iterators in `pipeline.py` drive these on grain's threads;
see its docstring for the design (plans as a pure function of the seed,
length grouping, buckets, per-host rows)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
import math
import threading
import types
from typing import Any

import grain
import numpy as np

from speechjax.data import audio as audio_lib
from speechjax.data import augment, encoder_cache
from speechjax.data import dialogue as dialogue_lib
from speechjax.data import features as features_lib
from speechjax.data import fields as fields_lib
from speechjax.data import prompts as prompts_lib
from speechjax.data import tasks as tasks_lib
from speechjax.data.config import default_data_config

AUDIO_INPUT_KINDS = ("mel", "wave")


def config_value(config, key, default=None):
  """`config[key]` for a ConfigDict, a dict or an object with that attribute."""
  if isinstance(config, Mapping):
    return config.get(key, default)
  return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def hop_length(config) -> int:
  return features_lib.check_hop_length(config_value(config, "hop_length", features_lib.HOP_LENGTH))


def audio_input_from_config(config, audio_input=None):
  """`audio_input` checked, or the log-mel input the data config describes."""
  if audio_input is None:
    return types.SimpleNamespace(kind="mel", sample_rate=audio_lib.SAMPLE_RATE,
                                 n_mels=int(config_value(config, "n_mels", 80)),
                                 hop_length=hop_length(config), normalize=False)
  kind = getattr(audio_input, "kind", None)
  if kind not in AUDIO_INPUT_KINDS:
    raise ValueError(f'audio_input.kind={kind!r}; valid: {", ".join(AUDIO_INPUT_KINDS)}')
  if int(audio_input.sample_rate) != audio_lib.SAMPLE_RATE:
    raise ValueError(f"audio_input.sample_rate={audio_input.sample_rate}: the data sources hold "
                     f"{audio_lib.SAMPLE_RATE} Hz audio")
  if kind == "mel":
    features_lib.check_hop_length(int(audio_input.hop_length))
  return audio_input


def bucket_sizes_samples(config, audio_input=None) -> tuple[int, ...]:
  """Audio bucket sizes in samples: frame-aligned for log-mel input (an even
  frame count suits a stride-2 encoder), whole samples for wave input."""
  audio_input = audio_input_from_config(config, audio_input)
  seconds = sorted(float(s) for s in config_value(config, "audio_buckets_seconds", (30.0,)))
  align = 2 * int(audio_input.hop_length) if audio_input.kind == "mel" else 1
  return tuple(int(math.ceil(s * audio_lib.SAMPLE_RATE / align)) * align for s in seconds)


def encoder_features(padded: np.ndarray, lengths: np.ndarray,
                     audio_input) -> tuple[np.ndarray, np.ndarray]:
  """(features, feature_mask) of right-padded 16 kHz waves [B, S] with `lengths`
  valid samples, as `audio_input` says: log-mel [B, n_mels, F] + frame mask, or
  samples [B, S] (normalised per utterance when asked) + sample mask."""
  if audio_input.kind == "wave":
    return features_lib.waves_with_mask(padded, lengths, normalize=bool(audio_input.normalize))
  features, feature_mask = features_lib.log_mel_with_mask(padded, lengths,
                                                          n_mels=int(audio_input.n_mels),
                                                          hop_length=int(audio_input.hop_length))
  return np.array(features), np.asarray(feature_mask, np.int32)


def input_frames(samples: int, audio_input) -> int:
  """Encoder input frames of a `samples`-long padded bucket: mel frames or samples."""
  if audio_input.kind == "wave":
    return int(samples)
  return int(features_lib.num_frames(int(samples), int(audio_input.hop_length)))


def read_options(config) -> grain.ReadOptions:
  """Grain's threads and read-ahead for a training iterator (data.worker_threads,
  data.prefetch_batches). Grain's own default (16 threads, 500 batches ahead)
  keeps a core busy reading ahead on an endless dataset: on 2 cores that is
  half the machine taken from the training step."""
  return grain.ReadOptions(num_threads=int(config_value(config, "worker_threads", 2)),
                           prefetch_buffer_size=int(config_value(config, "prefetch_batches", 4)))


def smallest_fitting(value: int, buckets: Sequence[int]) -> int | None:
  for bucket in buckets:
    if value <= bucket:
      return bucket
  return None


def shard_options_from_config(config) -> grain.sharding.ShardOptions:
  if config_value(config, "shard_by_process", True):
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)
  return grain.sharding.NoSharding()


def eligible_indices(info, task_list: Sequence[str], weights: Sequence[float] | None = None,
                     max_seconds: float | None = None) -> np.ndarray:
  """Indices of examples that have the fields of at least one task (with weight > 0)
  and, with max_seconds, are not longer than that."""
  weights = weights if weights is not None else [1.0] * len(task_list)
  ok = np.zeros(info.fields.shape, bool)
  for task, weight in zip(task_list, weights):
    if task not in tasks_lib.TASK_REGISTRY:
      raise ValueError(f"Unknown task {task!r} in data.tasks; registered: {tasks_lib.task_names()}")
    if weight > 0:
      # Imported here: it imports tensorflow_datasets (~0.3 s), which decoding never needs.
      bits = fields_lib.task_mask(task)
      ok |= (info.fields & bits) == bits
  if max_seconds:
    ok &= info.num_samples <= max_seconds * audio_lib.SAMPLE_RATE
  return np.flatnonzero(ok)


class BatchPlanner:
  """Which source indices make batch k (pure function of seed and epoch).

  The plan is global: `global_batch(k)` is the same on every host whatever the
  number of hosts. `batch_size` is the per-host size; this host's share of a
  global batch is its `rows` (a contiguous block, in process order).
  """

  def __init__(self, indices: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int,
               window: int, shard: grain.sharding.ShardOptions):
    self.indices = np.asarray(indices, np.int64)
    self.lengths = np.asarray(lengths, np.int64)
    self.batch_size, self.seed, self.window = batch_size, seed, window
    self.global_batch_size = batch_size * shard.shard_count
    self.rows = slice(shard.shard_index * batch_size, (shard.shard_index + 1) * batch_size)
    self.batches_per_epoch = len(self.indices) // self.global_batch_size
    if self.batches_per_epoch == 0:
      raise ValueError(
          f"data.batch_size={self.global_batch_size}: the split has only {len(self.indices)} usable "
          f"training examples, less than one batch; use data.batch_size <= {len(self.indices)}.")
    self._lock = threading.Lock()
    self._epoch_cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

  def global_epoch(self, epoch: int) -> np.ndarray:
    """[batches_per_epoch, global_batch_size] source indices (every host's rows)."""
    with self._lock:
      if epoch in self._epoch_cache:
        return self._epoch_cache[epoch]
    rng = np.random.default_rng([self.seed, 7, epoch])
    order = self.indices[rng.permutation(len(self.indices))]
    size = self.global_batch_size
    usable = self.batches_per_epoch * size
    if self.window > 0:
      span = self.window * size
      chunks = [order[i:i + span] for i in range(0, len(order), span)]
      order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
      batches = order[:usable].reshape(self.batches_per_epoch, size)
      batches = batches[rng.permutation(self.batches_per_epoch)]
    else:
      batches = order[:usable].reshape(self.batches_per_epoch, size)
    with self._lock:
      self._epoch_cache[epoch] = batches
      while len(self._epoch_cache) > 2:
        self._epoch_cache.popitem(last=False)
    return batches

  def epoch(self, epoch: int) -> np.ndarray:
    """[batches_per_epoch, batch_size] source indices of this host's rows."""
    return self.global_epoch(epoch)[:, self.rows]

  def global_batch(self, batch_index: int) -> np.ndarray:
    epoch, k = divmod(int(batch_index), self.batches_per_epoch)
    return self.global_epoch(epoch)[k]

  def __call__(self, batch_index: int) -> np.ndarray:
    return self.global_batch(batch_index)[self.rows]

  def make_host_batch(self, maker: BatchMaker, batch_index: int) -> dict[str, Any]:
    """This host's rows of global batch k. The whole global batch is made (so
    the bucket, hence every host's shapes, and the per-batch random draws are
    those of the global batch) and then cut."""
    indices = self.global_batch(batch_index)
    batch = maker(indices, np.ones(len(indices), np.float32), batch_index)
    return take_rows(batch, self.rows) if self.global_batch_size != self.batch_size else batch


def take_rows(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
  """Rows of a made batch: arrays and '_meta' lists are cut; '_stats' stay
  those of the whole (global) batch."""
  out = {key: value[rows] for key, value in batch.items() if not key.startswith("_")}
  if "_stats" in batch:
    out["_stats"] = batch["_stats"]
  if "_meta" in batch:
    out["_meta"] = {key: values[rows] for key, values in batch["_meta"].items()}
  return out


class BatchMaker:
  """source indices -> one Batch (numpy) plus '_stats' and optional '_meta'."""

  def __init__(self, source, info, prompts: prompts_lib.PromptBuilder,
               num_audio_tokens: Callable[[int], int], config, *, train: bool,
               task: str | None = None, generate: bool = False, audio_input=None,
               encoder_states=None):
    self.source, self.info, self.prompts = source, info, prompts
    # An EncoderStateCache (data/encoder_cache.py): batches carry the stored
    # states of a frozen encoder instead of its input features.
    self.encoder_states = encoder_states
    self.num_audio_tokens = num_audio_tokens
    self.train, self.task, self.generate = train, task, generate
    self.seed = int(config_value(config, "seed", 0))
    self.audio_input = audio_input_from_config(config, audio_input)
    self.audio_buckets = bucket_sizes_samples(config, self.audio_input)
    self.token_buckets = tuple(sorted(int(t) for t in config_value(config, "token_buckets", (256,))))
    self.tasks = tuple(config_value(config, "tasks", ("asr",)))
    self.weights = tuple(float(w) for w in config_value(config, "task_weights", (1.0,) * len(self.tasks)))
    aug = config_value(config, "augment", None)
    self.aug = {
        key: default if aug is None else config_value(aug, key, default)
        for key, default in default_data_config().augment.items()
    }
    self.label_ids = {name: i for i, name in enumerate(info.label_names)}
    if encoder_states is not None and train:
      on = [key for key in ("noise", "spec_augment") if self.aug[key]]
      if on:
        raise ValueError(f"data.cache_encoder_states stores the encoder's states once, but data.augment "
                         f"turns on {', '.join(on)} (new values every step): turn them off or the cache")
      wanted = tuple(float(f) for f in self.aug["speed_factors"]) if self.aug["speed"] else (1.0,)
      if tuple(encoder_states.speed_factors) != wanted:
        raise ValueError(f"the encoder-state cache {encoder_states.folder} holds speed factors "
                         f"{encoder_states.speed_factors}, the config asks for {wanted}")
    if train and self.aug["spec_augment"] and self.audio_input.kind != "mel":
      raise ValueError("data.augment.spec_augment masks log-mel features, but the encoder reads "
                       f"{self.audio_input.kind!r} input; turn spec_augment off")

  def _features(self, padded: np.ndarray, lengths: np.ndarray,
                rng) -> tuple[np.ndarray, np.ndarray]:
    """encoder_features, then SpecAugment on log-mel features when training asks for it."""
    features, feature_mask = encoder_features(padded, lengths, self.audio_input)
    if self.train and self.aug["spec_augment"]:
      for row in range(len(padded)):
        features[row] = augment.spec_augment(features[row], int(feature_mask[row].sum()), rng,
                                             num_freq_masks=self.aug["freq_masks"],
                                             freq_mask_width=self.aug["freq_mask_width"],
                                             num_time_masks=self.aug["time_masks"],
                                             time_mask_width=self.aug["time_mask_width"],
                                             max_time_fraction=self.aug["time_mask_max_fraction"])
    return features, feature_mask

  def _audio(self, record, rng) -> np.ndarray:
    return self._augmented(audio_lib.int16_to_float(np.asarray(record["audio"])), rng)

  def _augmented(self, wave: np.ndarray, rng) -> np.ndarray:
    if self.train and self.aug["speed"]:
      wave, _ = augment.random_speed(wave, rng, self.aug["speed_factors"])
    if self.train and self.aug["noise"] and rng.random() < self.aug["noise_prob"]:
      wave, _ = augment.random_noise(wave, rng, self.aug["noise_snr_db"], self.aug["noise_color"])
    return wave

  def _choose_task(self, record, rng) -> tuple[str, int]:
    if dialogue_lib.is_dialogue(record):  # its audio is several clips: no other task reads it
      return "dialogue", 0
    if not self.train:
      return self.task, 0
    task = tasks_lib.sample_task(record, self.tasks, self.weights, rng)
    if task is None:  # only reachable with a source whose info disagrees with its records
      raise ValueError(
          f'Example {record.get("id")!r} has fields for none of the tasks {self.tasks}')
    return task, int(rng.integers(self.prompts.num_instructions(task)))

  def __call__(self, indices: np.ndarray, example_mask: np.ndarray,
               batch_index: int) -> dict[str, Any]:
    rng = np.random.default_rng([self.seed, 11, int(batch_index)])
    records = [self.source[int(i)] for i in indices]
    if any(dialogue_lib.is_dialogue(r) for r in records):
      return self._segmented_batch(indices, records, example_mask, rng)
    cache = self.encoder_states
    if cache is not None:  # stored states: one copy per example (a speed factor when training)
      copies = [int(rng.integers(cache.num_copies)) if self.train else 0 for _ in records]
      lengths = np.array([cache.num_samples(int(i), c) for i, c in zip(indices, copies)], np.int64)
    else:
      waves = [self._audio(r, rng) for r in records]
      lengths = np.array([w.size for w in waves], np.int64)
    samples = smallest_fitting(int(lengths.max()), self.audio_buckets) or self.audio_buckets[-1]
    truncated_audio = int((lengths > samples).sum())
    lengths = np.minimum(lengths, samples)
    if cache is not None:
      frames = input_frames(samples, self.audio_input)
      audio_arrays = encoder_cache.cached_states(cache, indices, copies, frames)
    else:
      padded = np.zeros((len(waves), samples), np.float32)
      for row, wave in enumerate(waves):
        padded[row, :lengths[row]] = wave[:lengths[row]]
      features, feature_mask = self._features(padded, lengths, rng)
      frames = features.shape[-1]  # encoder inputs: mel frames or samples
      audio_arrays = {"features": features, "feature_mask": feature_mask}
    num_audio = int(self.num_audio_tokens(frames))

    chosen = [self._choose_task(r, rng) for r in records]
    if self.generate:
      rows = [{
          "input_ids": np.asarray(self.prompts.prompt_ids(r, t, num_audio, k), np.int32)
      } for r, (t, k) in zip(records, chosen)]
    else:
      rows = [
          self.prompts.training_example(r, t, num_audio, k) for r, (t, k) in zip(records, chosen)
      ]
    return self._finish(records, rows, chosen, audio_arrays, lengths, samples, truncated_audio, example_mask)

  def _segmented_batch(self, indices, records, example_mask, rng) -> dict[str, Any]:
    """A batch holding dialogues (speechjax.data.dialogue): S audio segments per
    row (S = the most clips of a row, rounded up to a power of two, so few
    shapes compile), each padded to the bucket of the longest clip; a row's
    empty segments come first. features [B, S, ...], feature_mask [B, S, F];
    from stored states (data.cache_encoder_states) encoder_states [B, S, N, D],
    encoder_state_mask [B, S, N]."""
    cache = self.encoder_states
    if cache is not None:  # one stored copy per clip (a speed factor when training)
      copies = [[int(rng.integers(cache.num_copies)) if self.train else 0 for _ in range(cache.num_clips(int(i)))]
                for i in indices]
      sizes = [[cache.num_samples(int(i), c, k) for k, c in enumerate(row)] for i, row in zip(indices, copies)]
    else:
      waves = [[self._augmented(piece, rng) for piece in
                dialogue_lib.user_clips(record, audio_lib.int16_to_float(np.asarray(record["audio"])))]
               for record in records]
      sizes = [[piece.size for piece in row] for row in waves]
    segments = 1 << max(0, (max(len(row) for row in sizes) - 1).bit_length())
    samples = smallest_fitting(max(max(row) for row in sizes), self.audio_buckets) or self.audio_buckets[-1]
    lengths = np.zeros((len(records), segments), np.int64)
    for row, row_sizes in enumerate(sizes):  # empty segments first (PromptBuilder.dialogue_ids)
      lengths[row, segments - len(row_sizes):] = np.minimum(row_sizes, samples)
    truncated_audio = sum(size > samples for row in sizes for size in row)
    if cache is not None:
      frames = input_frames(samples, self.audio_input)
      audio_arrays = encoder_cache.cached_segments(cache, indices, copies, segments, frames)
    else:
      padded = np.zeros((len(records), segments, samples), np.float32)
      for row, row_waves in enumerate(waves):
        first = segments - len(row_waves)
        for k, piece in enumerate(row_waves):
          n = lengths[row, first + k]
          padded[row, first + k, :n] = piece[:n]
      flat_features, flat_mask = self._features(padded.reshape(-1, samples), lengths.reshape(-1), rng)
      flat_features[lengths.reshape(-1) == 0] = 0.0  # empty segments: no statistics of nothing
      frames = flat_features.shape[-1]
      audio_arrays = {"features": flat_features.reshape((len(records), segments) + flat_features.shape[1:]),
                      "feature_mask": flat_mask.reshape((len(records), segments) + flat_mask.shape[1:])}
    num_audio = int(self.num_audio_tokens(frames))
    chosen = [self._choose_task(r, rng) for r in records]
    rows = []
    for record, (task, k) in zip(records, chosen):
      if task == "dialogue":
        rows.append(self.prompts.dialogue_ids(dialogue_lib.turns_of(record), num_audio, segments,
                                              generate=self.generate))
        continue
      empty = [tasks_lib.AUDIO_PLACEHOLDER_ID] * (num_audio * (segments - 1))
      if self.generate:
        rows.append({"input_ids": np.asarray(empty + self.prompts.prompt_ids(record, task, num_audio, k),
                                             np.int32)})
        continue
      row = self.prompts.training_example(record, task, num_audio, k)
      pad = np.full(len(empty), self.prompts.pad_id, np.int32)
      rows.append({"input_ids": np.concatenate([np.asarray(empty, np.int32), row["input_ids"]]),
                   "targets": np.concatenate([pad, row["targets"]]),
                   "target_mask": np.concatenate([np.zeros(len(empty), np.float32), row["target_mask"]]),
                   "prompt_length": np.int32(len(empty) + int(row["prompt_length"]))})
    return self._finish(records, rows, chosen, audio_arrays, lengths.sum(axis=1), samples * segments,
                        truncated_audio, example_mask)

  def _finish(self, records, rows, chosen, audio_arrays, lengths, samples: int, truncated_audio: int,
              example_mask) -> dict[str, Any]:
    """Token arrays in their bucket, the audio, labels, statistics and metadata of a batch."""
    longest = max(len(row["input_ids"]) for row in rows)
    length = smallest_fitting(longest, self.token_buckets) or self.token_buckets[-1]
    batch = self._token_arrays(rows, length, records)
    batch.update(audio_arrays)
    batch["class_labels"] = np.array(
        [self.label_ids.get(tasks_lib.as_text(r.get("label")).strip(), -1) for r in records],
        np.int32)
    batch["audio_seconds"] = (lengths / audio_lib.SAMPLE_RATE).astype(np.float32)
    batch["example_mask"] = np.asarray(example_mask, np.float32)
    valid = example_mask > 0
    num_valid = max(1, int(valid.sum()))
    real_tokens = float(batch["attention_mask"][valid].sum())
    batch["_stats"] = {
        "audio_padding_fraction": 1.0 - float(lengths[valid].sum()) / (num_valid * samples),
        "token_padding_fraction": 1.0 - real_tokens / (num_valid * length),
        "audio_seconds": float(batch["audio_seconds"][valid].sum()),
        "truncated_audio": truncated_audio,
        "truncated_tokens": int(sum(len(r["input_ids"]) > length for r in rows)),
    }
    batch["_meta"] = {
        "id": [tasks_lib.as_text(r.get("id")) for r in records],
        "task": [t for t, _ in chosen],
        "reference": [tasks_lib.answer_text(r, t) for r, (t, _) in zip(records, chosen)],
        "text": [tasks_lib.as_text(r.get("text")) for r in records],
        "label": [tasks_lib.as_text(r.get("label")) for r in records],
    }
    return batch

  def _token_arrays(self, rows, length: int, records) -> dict[str, np.ndarray]:
    pad = self.prompts.pad_id
    size = len(rows)
    input_ids = np.full((size, length), pad, np.int32)
    attention = np.zeros((size, length), np.int32)
    targets = np.full((size, length), pad, np.int32)
    target_mask = np.zeros((size, length), np.float32)
    for row, (item, record) in enumerate(zip(rows, records)):
      ids = item["input_ids"]
      prompt_length = int(item.get("prompt_length", len(ids)))
      if prompt_length > length:
        name = tasks_lib.as_text(record.get("id"))
        raise ValueError(
            f"The prompt of example {name!r} takes {prompt_length} tokens (audio slots included) "
            f"but the largest of data.token_buckets={tuple(self.token_buckets)} is {length}; add a "
            f"bucket of at least {prompt_length} to data.token_buckets.")
      n = min(len(ids), length)
      if self.generate:  # left padding: every prompt ends where generation starts
        input_ids[row, length - n:] = ids[:n]
        attention[row, length - n:] = 1
      else:
        input_ids[row, :n] = ids[:n]
        attention[row, :n] = 1
        targets[row, :n] = item["targets"][:n]
        target_mask[row, :n] = item["target_mask"][:n]
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "targets": targets,
        "target_mask": target_mask
    }
