"""The `data` section of a run's config: every key with its default and why."""

from __future__ import annotations

import ml_collections

from speechjax.data import features as features_lib


def default_data_config() -> ml_collections.ConfigDict:
  """Every data / augmentation / pipeline key, with defaults (placed under config.data)."""
  c = ml_collections.ConfigDict()
  # Where the data is: a TFDS data_dir (dataset under data_dir/name/<version>)
  # or a dataset folder itself. Splits may also be manifest paths (*.jsonl).
  c.name = "spoken_commands"
  c.data_dir = "data/spoken_commands/tfds"
  c.train_split = "train"
  c.eval_split = "dev"
  c.test_split = "test"
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
  # A frozen pretrained encoder's states, computed once for the train split
  # and read back by every step (speechjax.data.encoder_cache); the encoder
  # must not train and audio augmentation must be off. encoder_cache_dir ''
  # = <workdir>/encoder_cache; runs sharing a folder share the states.
  c.cache_encoder_states = False
  c.encoder_cache_dir = ""
  # Prompts and tasks.
  c.template = "plain"  # plain | llama2 | chatml
  c.tasks = ("asr",)  # registered tasks (speechjax.data.tasks): asr, translate, classify, instruct, ...
  c.task_weights = (1.0,)
  c.eval_task = ""  # '' = the first of tasks
  c.translation_language = "French"
  c.add_bos = True
  # Text-only LM pretraining (model.kind='lm'): the train split's answers in
  # every task's prompts, audio slot empty, unless lm_examples names a function
  # 'package.module:function' that builds the examples (speechjax.data.text_lm).
  c.lm_examples = ""
  # A JSONL of text-only records (text, translation, label) to pretrain the LM
  # on instead of the train split's transcripts; '' = the train split.
  c.lm_text_manifest = ""
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
  a.noise_color = "white"  # white | pink
  a.spec_augment = False  # time and frequency masks on the log-mel features
  a.freq_masks = 2
  a.freq_mask_width = 27
  a.time_masks = 2
  a.time_mask_width = 40
  a.time_mask_max_fraction = 0.2
  return c
