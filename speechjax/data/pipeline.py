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
  * Featurization (JAX log-mel, jit per bucket shape), augmentation and
    tokenization run per batch on grain's prefetch threads (`worker_threads`);
    batches come out in order whatever the thread timing, and all randomness
    comes from a generator seeded by (seed, batch index).
  * Per-host sharding: batches are planned globally, the same on every host,
    and process i feeds rows [i*b, (i+1)*b) of each one (b = batch_size //
    process_count; grain ShardByJaxProcess gives i). That contiguous block is
    where jax.make_array_from_process_local_data puts a process' rows, so the
    global batch is the one a single process would train on, and every host
    pads to the same bucket (the global batch's), so local shapes agree.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from speechjax.data import audio as audio_lib
from speechjax.data import augment
from speechjax.data import features as features_lib
from speechjax.data import tasks as tasks_lib
from speechjax.data.builders import manifest as manifest_builder

BATCH_KEYS = ('features', 'feature_mask', 'input_ids', 'attention_mask', 'targets', 'target_mask',
              'class_labels', 'audio_seconds', 'example_mask')
_TASK_BITS = {
    'asr': 0,
    'translate': manifest_builder.HAS_TRANSLATION,
    'classify': manifest_builder.HAS_LABEL,
    'instruct': manifest_builder.HAS_INSTRUCTION
}


def default_data_config() -> ml_collections.ConfigDict:
  """Every data / augmentation / pipeline key, with defaults (placed under config.data)."""
  c = ml_collections.ConfigDict()
  # Where the data is: a TFDS data_dir (dataset under data_dir/name/<version>)
  # or a dataset folder itself. Splits may also be manifest paths (*.jsonl).
  c.name = 'spoken_commands'
  c.data_dir = 'data/spoken_commands/tfds'
  c.train_split = 'train'
  c.eval_split = 'dev'
  c.test_split = 'test'
  # Batching and shapes. batch_size is global (split over processes).
  c.batch_size = 16
  c.eval_batch_size = 16
  c.audio_buckets_seconds = (5.0, 10.0, 20.0, 30.0)
  c.token_buckets = (64, 128, 256, 512)
  c.max_audio_seconds = 30.0
  c.length_grouping_window = 32  # batches per sort window; 0 = no length grouping
  c.num_epochs = 0  # 0 = repeat forever
  # Features: Whisper log-mel. hop_length 160 (10 ms) is what released Whisper
  # encoders expect; an encoder trained from scratch may read 320 (20 ms),
  # half the frames and about half the encoder's compute.
  c.n_mels = 80
  c.hop_length = features_lib.HOP_LENGTH
  # Prompts and tasks.
  c.template = 'plain'  # plain | llama2 | chatml
  c.tasks = ('asr',)  # asr | translate | classify | instruct
  c.task_weights = (1.0,)
  c.eval_task = ''  # '' = the first of tasks
  c.translation_language = 'French'
  c.add_bos = True
  # Text-only LM pretraining (model.kind='lm'): what fills the audio slot of
  # each prompt. 'empty' trains the answers alone (a prior over answers);
  # 'transcript' puts the transcript's tokens where the audio will go, so the
  # LM learns each task as a function of the slot's content (copy, translate,
  # classify) and the speech stage only has to make audio read like text.
  # lm_slot_noise: chance per slot token of a substitution, a deletion or a
  # repeat (one third each), so the LM learns to read an imperfect slot.
  c.lm_audio_slot = 'empty'
  c.lm_slot_noise = 0.0
  # > 0: the slot is always this many tokens, the transcript then the pad
  # token (the layout of a 'ctc_compress' projector's fixed-size output).
  c.lm_slot_length = 0
  # Extra ASR examples of random word sequences, as a fraction of the text
  # examples: copying is then the only way to predict them.
  c.lm_random_copy = 0.0
  # A JSONL of text-only records (text, translation, label) to pretrain the LM
  # on instead of the train split's transcripts; '' = the train split.
  c.lm_text_manifest = ''
  # Determinism and throughput.
  c.seed = 0
  c.worker_threads = 2
  c.prefetch_batches = 4
  c.shard_by_process = True
  # Augmentation (training only).
  a = c.augment = ml_collections.ConfigDict()
  a.speed = False  # speed perturbation (resampling), one factor drawn per example
  a.speed_factors = (0.9, 1.0, 1.1)
  a.noise = False  # additive Gaussian noise at an SNR drawn from noise_snr_db
  a.noise_prob = 0.5
  a.noise_snr_db = (10.0, 30.0)
  a.noise_color = 'white'  # white | pink
  a.spec_augment = False  # time and frequency masks on the log-mel features
  a.freq_masks = 2
  a.freq_mask_width = 27
  a.time_masks = 2
  a.time_mask_width = 40
  a.time_mask_max_fraction = 0.2
  return c


def _get(config, key, default=None):
  if isinstance(config, Mapping):
    return config.get(key, default)
  return config.get(key, default) if hasattr(config, 'get') else getattr(config, key, default)


def hop_length(config) -> int:
  return features_lib.check_hop_length(_get(config, 'hop_length', features_lib.HOP_LENGTH))


def bucket_sizes_samples(config) -> tuple[int, ...]:
  seconds = sorted(float(s) for s in _get(config, 'audio_buckets_seconds', (30.0,)))
  align = 2 * hop_length(config)  # even frame counts suit the stride-2 encoder
  return tuple(int(math.ceil(s * audio_lib.SAMPLE_RATE / align)) * align for s in seconds)


def smallest_fitting(value: int, buckets: Sequence[int]) -> int | None:
  for bucket in buckets:
    if value <= bucket:
      return bucket
  return None


def shard_options_from_config(config) -> grain.sharding.ShardOptions:
  if _get(config, 'shard_by_process', True):
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)
  return grain.sharding.NoSharding()


def eligible_indices(info, task_list: Sequence[str], weights: Sequence[float] | None = None,
                     max_seconds: float | None = None) -> np.ndarray:
  """Indices of examples that have the fields of at least one task (with weight > 0)
  and, with max_seconds, are not longer than that."""
  weights = weights if weights is not None else [1.0] * len(task_list)
  ok = np.zeros(info.fields.shape, bool)
  for task, weight in zip(task_list, weights):
    if task not in _TASK_BITS:
      raise ValueError(f'Unknown task {task!r} in data.tasks; valid: {tuple(_TASK_BITS)}')
    if weight > 0:
      bits = _TASK_BITS[task]
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
          f'{len(self.indices)} training examples is less than one global batch of '
          f'{self.global_batch_size}; lower data.batch_size.')
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
      order = np.concatenate([c[np.argsort(self.lengths[c], kind='stable')] for c in chunks])
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

  def make_host_batch(self, maker: 'BatchMaker', batch_index: int) -> dict[str, Any]:
    """This host's rows of global batch k. The whole global batch is made (so
    the bucket, hence every host's shapes, and the per-batch random draws are
    those of the global batch) and then cut."""
    indices = self.global_batch(batch_index)
    batch = maker(indices, np.ones(len(indices), np.float32), batch_index)
    return take_rows(batch, self.rows) if self.global_batch_size != self.batch_size else batch


def take_rows(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
  """Rows of a made batch: arrays and '_meta' lists are cut; '_stats' stay
  those of the whole (global) batch."""
  out = {key: value[rows] for key, value in batch.items() if not key.startswith('_')}
  if '_stats' in batch:
    out['_stats'] = batch['_stats']
  if '_meta' in batch:
    out['_meta'] = {key: values[rows] for key, values in batch['_meta'].items()}
  return out


class BatchMaker:
  """source indices -> one Batch (numpy) plus '_stats' and optional '_meta'."""

  def __init__(self, source, info, prompts: tasks_lib.PromptBuilder,
               num_audio_tokens: Callable[[int], int], config, *, train: bool,
               task: str | None = None, generate: bool = False):
    self.source, self.info, self.prompts = source, info, prompts
    self.num_audio_tokens = num_audio_tokens
    self.train, self.task, self.generate = train, task, generate
    self.seed = int(_get(config, 'seed', 0))
    self.n_mels = int(_get(config, 'n_mels', 80))
    self.hop_length = hop_length(config)
    self.audio_buckets = bucket_sizes_samples(config)
    self.token_buckets = tuple(sorted(int(t) for t in _get(config, 'token_buckets', (256,))))
    self.tasks = tuple(_get(config, 'tasks', ('asr',)))
    self.weights = tuple(float(w) for w in _get(config, 'task_weights', (1.0,) * len(self.tasks)))
    aug = _get(config, 'augment', None)
    self.aug = {
        key: default if aug is None else _get(aug, key, default)
        for key, default in default_data_config().augment.items()
    }
    self.label_ids = {name: i for i, name in enumerate(info.label_names)}

  def _audio(self, record, rng) -> np.ndarray:
    wave = audio_lib.int16_to_float(np.asarray(record['audio']))
    if self.train and self.aug['speed']:
      wave, _ = augment.random_speed(wave, rng, self.aug['speed_factors'])
    if self.train and self.aug['noise'] and rng.random() < self.aug['noise_prob']:
      wave, _ = augment.random_noise(wave, rng, self.aug['noise_snr_db'], self.aug['noise_color'])
    return wave

  def _choose_task(self, record, rng) -> tuple[str, int]:
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
    waves = [self._audio(r, rng) for r in records]
    lengths = np.array([w.size for w in waves], np.int64)
    samples = smallest_fitting(int(lengths.max()), self.audio_buckets) or self.audio_buckets[-1]
    truncated_audio = int((lengths > samples).sum())
    lengths = np.minimum(lengths, samples)
    padded = np.zeros((len(waves), samples), np.float32)
    for row, wave in enumerate(waves):
      padded[row, :lengths[row]] = wave[:lengths[row]]
    features, feature_mask = features_lib.log_mel_with_mask(padded, lengths, n_mels=self.n_mels,
                                                            hop_length=self.hop_length)
    features, feature_mask = np.array(features), np.asarray(feature_mask, np.int32)
    if self.train and self.aug['spec_augment']:
      for row in range(len(waves)):
        features[row] = augment.spec_augment(features[row], int(feature_mask[row].sum()), rng,
                                             num_freq_masks=self.aug['freq_masks'],
                                             freq_mask_width=self.aug['freq_mask_width'],
                                             num_time_masks=self.aug['time_masks'],
                                             time_mask_width=self.aug['time_mask_width'],
                                             max_time_fraction=self.aug['time_mask_max_fraction'])
    frames = features.shape[-1]
    num_audio = int(self.num_audio_tokens(frames))

    chosen = [self._choose_task(r, rng) for r in records]
    if self.generate:
      rows = [{
          'input_ids': np.asarray(self.prompts.prompt_ids(r, t, num_audio, k), np.int32)
      } for r, (t, k) in zip(records, chosen)]
    else:
      rows = [
          self.prompts.training_example(r, t, num_audio, k) for r, (t, k) in zip(records, chosen)
      ]
    longest = max(len(row['input_ids']) for row in rows)
    length = smallest_fitting(longest, self.token_buckets) or self.token_buckets[-1]
    batch = self._token_arrays(rows, length, records)
    batch.update(features=features, feature_mask=feature_mask)
    batch['class_labels'] = np.array(
        [self.label_ids.get(tasks_lib.as_text(r.get('label')).strip(), -1) for r in records],
        np.int32)
    batch['audio_seconds'] = (lengths / audio_lib.SAMPLE_RATE).astype(np.float32)
    batch['example_mask'] = np.asarray(example_mask, np.float32)
    valid = example_mask > 0
    num_valid = max(1, int(valid.sum()))
    real_tokens = float(batch['attention_mask'][valid].sum())
    batch['_stats'] = {
        'audio_padding_fraction': 1.0 - float(lengths[valid].sum()) / (num_valid * samples),
        'token_padding_fraction': 1.0 - real_tokens / (num_valid * length),
        'audio_seconds': float(batch['audio_seconds'][valid].sum()),
        'truncated_audio': truncated_audio,
        'truncated_tokens': int(sum(len(r['input_ids']) > length for r in rows)),
    }
    batch['_meta'] = {
        'id': [tasks_lib.as_text(r.get('id')) for r in records],
        'task': [t for t, _ in chosen],
        'reference': [tasks_lib.answer_text(r, t) for r, (t, _) in zip(records, chosen)],
        'text': [tasks_lib.as_text(r.get('text')) for r in records],
        'label': [tasks_lib.as_text(r.get('label')) for r in records],
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
      ids = item['input_ids']
      prompt_length = int(item.get('prompt_length', len(ids)))
      if prompt_length > length:
        name = tasks_lib.as_text(record.get('id'))
        raise ValueError(
            f'The prompt of example {name!r} takes {prompt_length} tokens (audio slots included) '
            f'but the largest token bucket is {length}; raise data.token_buckets.')
      n = min(len(ids), length)
      if self.generate:  # left padding: every prompt ends where generation starts
        input_ids[row, length - n:] = ids[:n]
        attention[row, length - n:] = 1
      else:
        input_ids[row, :n] = ids[:n]
        attention[row, :n] = 1
        targets[row, :n] = item['targets'][:n]
        target_mask[row, :n] = item['target_mask'][:n]
    return {
        'input_ids': input_ids,
        'attention_mask': attention,
        'targets': targets,
        'target_mask': target_mask
    }


class TrainIterator:
  """Endless training batches with checkpointable state and running input stats."""

  def __init__(self, iterator, planner: BatchPlanner):
    self._iterator = iterator
    self.planner = planner
    self._window: list[dict[str, float]] = []

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._window.append(batch.pop('_stats'))
    batch.pop('_meta')
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
        for key in ('audio_padding_fraction', 'token_padding_fraction')
    }
    out['audio_seconds_per_batch'] = float(np.mean([w['audio_seconds'] for w in window]))
    out['truncated_examples'] = float(
        sum(w['truncated_audio'] + w['truncated_tokens'] for w in window))
    return out

  def close(self) -> None:
    close = getattr(self._iterator, 'close', None)
    if close:
      close()


def _read_options(config) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=int(_get(config, 'worker_threads', 2)),
                           prefetch_buffer_size=int(_get(config, 'prefetch_batches', 4)))


def make_train_iterator(source, info, tokenizer, num_audio_tokens: Callable[[int], int], config, *,
                        shard_options: grain.sharding.ShardOptions | None = None) -> TrainIterator:
  """Shuffled, length-grouped, augmented training batches (forever, or num_epochs)."""
  shard = shard_options or shard_options_from_config(config)
  task_list = tuple(_get(config, 'tasks', ('asr',)))
  weights = tuple(_get(config, 'task_weights', (1.0,) * len(task_list)))
  batch_size = int(_get(config, 'batch_size', 16))
  if batch_size % shard.shard_count:
    raise ValueError(
        f'data.batch_size={batch_size} is not divisible by {shard.shard_count} processes')
  usable = eligible_indices(info, task_list, weights, _get(config, 'max_audio_seconds', None))
  planner = BatchPlanner(usable, info.num_samples, batch_size // shard.shard_count,
                         int(_get(config, 'seed', 0)),
                         int(_get(config, 'length_grouping_window', 32)), shard)
  maker = BatchMaker(source, info, _prompt_builder(tokenizer, config), num_audio_tokens, config,
                     train=True)
  epochs = int(_get(config, 'num_epochs', 0))
  total = planner.batches_per_epoch * epochs if epochs > 0 else 2**62
  dataset = grain.MapDataset.range(total).map(lambda k: planner.make_host_batch(maker, k))
  return TrainIterator(iter(dataset.to_iter_dataset(_read_options(config))), planner)


class EvalIterator:
  """One ordered pass; the last batch is padded with example_mask 0.

  Yields Batch dicts, or (batch, meta) with `with_metadata` where meta has
  per-row 'id', 'task', 'reference' (the expected answer), 'text', 'label'.
  `generate=True` gives prompt-only, left-padded input_ids for decoding.
  """

  def __init__(self, source, info, tokenizer, num_audio_tokens, config, *, task: str | None = None,
               generate: bool = False, with_metadata: bool = False, max_batches: int = 0,
               batch_size: int | None = None,
               shard_options: grain.sharding.ShardOptions | None = None):
    shard = shard_options or shard_options_from_config(config)
    self.task = task or _get(config, 'eval_task', '') or tuple(_get(config, 'tasks', ('asr',)))[0]
    everything = np.arange(len(info.num_samples))
    usable = eligible_indices(info, (self.task,), max_seconds=_get(config, 'max_audio_seconds',
                                                                   None))
    # Bad inputs left out when the source was built or read, plus examples
    # without this task's fields or longer than data.max_audio_seconds.
    self.num_skipped = int(getattr(info, 'num_skipped', 0)) + len(everything) - len(usable)
    self.batch_size = int(batch_size or
                          _get(config, 'eval_batch_size', _get(config, 'batch_size', 16)))
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
                             config, train=False, task=self.task, generate=generate)
    self._with_metadata = with_metadata
    self._config = config

  def __len__(self) -> int:
    return self.num_batches

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
    for batch in dataset.to_iter_dataset(_read_options(self._config)):
      batch.pop('_stats')
      meta = batch.pop('_meta')
      if self._with_metadata:
        valid = int(batch['example_mask'].sum())
        yield batch, {key: values[:valid] for key, values in meta.items()}
      else:
        yield batch


def make_eval_iterator(source, info, tokenizer, num_audio_tokens, config, **kwargs) -> EvalIterator:
  return EvalIterator(source, info, tokenizer, num_audio_tokens, config, **kwargs)


@functools.lru_cache(maxsize=8)
def _cached_prompt_builder(tokenizer, template, language, add_bos):
  return tasks_lib.PromptBuilder(tokenizer, template, language, add_bos)


def _prompt_builder(tokenizer, config) -> tasks_lib.PromptBuilder:
  template = _get(config, 'template', 'plain')
  language = _get(config, 'translation_language', 'French')
  add_bos = bool(_get(config, 'add_bos', True))
  try:
    return _cached_prompt_builder(tokenizer, template, language, add_bos)
  except TypeError:  # unhashable tokenizer
    return tasks_lib.PromptBuilder(tokenizer, template, language, add_bos)
