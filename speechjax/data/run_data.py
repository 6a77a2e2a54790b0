"""Config + what the model reads -> the data a training run trains and evaluates on.

    bundle = speechjax.model_builder.build(config)
    data = build_run_data(config, bundle)
    Trainer(config, workdir, bundle=bundle, data=data)

`model` is any object with the four attributes the batches must fit (a
`speechjax.model_builder.ModelBundle` has them; the data layer never imports
the model code):

    kind              'speech_llm', 'lm', 'ctc' or 'text_classifier'
    tokenizer         the LLM's tokenizer (None for a character-CTC run)
    num_audio_tokens  encoder input frames -> audio slots in the prompt
    audio_input       what the encoder reads (kind 'mel' or 'wave', ...; None: log-mel
                      from the data config)

Speech kinds (speech_llm, ctc) read the configured dataset through the Grain
pipeline; the text LM kind reads its answers wrapped in the same prompts
(speechjax.data.text_lm); the text classifier reads `text` and `label`
(speechjax.data.text_classification).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import dataclasses
from typing import Any

import grain

from speechjax.data import (
  batching,
  ctc_labels,
  encoder_cache,
  pipeline,
  sources,
  text_classification,
  text_lm,
)

RUN_KINDS = ("speech_llm", "lm", "ctc", "text_classifier")


@dataclasses.dataclass
class RunData:
  train: Any  # iterator of numpy batches with get_state / set_state
  dev_batches: Callable[[int], Iterable[dict]]  # max_batches -> batches (loss)
  train_stats: Callable[[], dict]
  dev_source: Any = None
  dev_info: Any = None
  label_names: tuple[str, ...] = ()
  skipped: list = dataclasses.field(default_factory=list)  # bad lines of train + dev (validate.Skipped)


def build_run_data(config, model, *, frozen_encoder=None, cache_root: str = "") -> RunData:
  """`frozen_encoder` (with data.cache_encoder_states): an object with
  encode(features, feature_mask) -> (states, mask), output_length(frames) and
  a JSON-able `fingerprint`; the training split's states are stored under
  `cache_root` (data/encoder_cache.py) and training batches carry them."""
  kind = getattr(model, "kind", None)
  if kind not in RUN_KINDS:
    raise ValueError(f"model kind {kind!r} (model.kind); valid: {', '.join(RUN_KINDS)}")
  if kind == "lm":
    train, dev_batches = text_lm.text_lm_batches(config, model.tokenizer)
    return RunData(train, dev_batches, lambda: {})
  if kind == "text_classifier":
    _, train_info = sources.open_source(config.data, config.data.train_split)
    labels = tuple(train_info.label_names)
    train, dev_batches = text_classification.text_classifier_batches(config, model.tokenizer, labels)
    return RunData(train, dev_batches, lambda: {}, label_names=labels)
  audio_input = getattr(model, "audio_input", None)
  check_features_match(config.data, audio_input)
  states = None
  if config.data.get("cache_encoder_states", False):
    if frozen_encoder is None or not cache_root:
      raise ValueError("data.cache_encoder_states needs the frozen encoder and a cache folder "
                       "(speechjax.train.build_trainer passes both)")
    states = lambda source, info: _encoder_cache(config.data, source, info, audio_input,  # noqa: E731
                                                 frozen_encoder, cache_root)
  if kind == "ctc":
    return _ctc_data(config, model.tokenizer, audio_input, states)
  return _speech_data(config, model.tokenizer, model.num_audio_tokens, audio_input, states)


def _encoder_cache(data_cfg, source, info, audio_input, frozen_encoder, cache_root: str):
  checked = batching.audio_input_from_config(data_cfg, audio_input)
  return encoder_cache.build_cache(
      cache_root, source, info, encode=frozen_encoder.encode, output_length=frozen_encoder.output_length,
      featurize=lambda padded, lengths: batching.encoder_features(padded, lengths, checked),
      buckets=batching.bucket_sizes_samples(data_cfg, checked),
      fingerprint={**frozen_encoder.fingerprint, "audio_input": repr(checked),
                   "data_dir": str(data_cfg.get("data_dir", "")), "split": str(data_cfg.train_split)},
      speed_factors=tuple(data_cfg.augment.speed_factors) if data_cfg.augment.speed else (1.0,),
      batch_size=int(data_cfg.eval_batch_size), progress=True)


def check_features_match(data_cfg, audio_input) -> None:
  """A log-mel encoder's n_mels and hop_length must be the data config's:
  evaluation and transcription featurize from the data config, so a
  difference would train on one frame rate and decode on another."""
  if audio_input is None or audio_input.kind != "mel":
    return
  for key in ("n_mels", "hop_length"):
    data_value, encoder_value = int(data_cfg[key]), int(getattr(audio_input, key))
    if data_value != encoder_value:
      raise ValueError(f"data.{key}={data_value} but the audio encoder reads {key}={encoder_value} "
                       "(from model.encoder, or its pretrained folder's preprocessor_config.json): "
                       "set them equal")


def _speech_data(config, tokenizer, num_audio_tokens, audio_input, states=None) -> RunData:
  data_cfg = config.data
  train_source, train_info = sources.open_source(data_cfg, data_cfg.train_split)
  dev_source, dev_info = sources.open_source(data_cfg, data_cfg.eval_split, train_info.label_names)
  train = pipeline.make_train_iterator(train_source, train_info, tokenizer, num_audio_tokens, data_cfg,
                                       audio_input=audio_input,
                                       encoder_states=states(train_source, train_info) if states else None)

  def dev_batches(max_batches: int):
    return pipeline.make_eval_iterator(dev_source, dev_info, tokenizer, num_audio_tokens, data_cfg,
                                       max_batches=max_batches, audio_input=audio_input)

  return RunData(train, dev_batches, train.stats, dev_source, dev_info, tuple(train_info.label_names),
                 train_info.skipped + dev_info.skipped)


# -------------------------------------------------------------------- CTC

def _ctc_data(config, tokenizer, audio_input, states=None) -> RunData:
  data_cfg = config.data
  train_source, train_info = sources.open_source(data_cfg, data_cfg.train_split)
  dev_source, dev_info = sources.open_source(data_cfg, data_cfg.eval_split, train_info.label_names)
  max_length = int(data_cfg.get("ctc_max_label_length", 128))
  prompts = text_lm.prompt_builder(tokenizer, data_cfg) if tokenizer is not None else None
  encode = ctc_labels.label_encoder(str(config.model.get("ctc_vocab", "") or ""), prompts)

  def add_labels(batch, texts):
    return ctc_labels.add_ctc_labels(batch, texts, encode, max_length)

  train = _ctc_train_iterator(train_source, train_info, tokenizer, data_cfg, add_labels, audio_input,
                              states(train_source, train_info) if states else None)

  def dev_batches(max_batches: int):
    it = pipeline.make_eval_iterator(dev_source, dev_info, tokenizer, lambda f: 0, data_cfg,
                                     max_batches=max_batches, with_metadata=True, audio_input=audio_input)
    for batch, meta in it:
      texts = list(meta["text"]) + [""] * (len(batch["example_mask"]) - len(meta["text"]))
      yield add_labels(batch, texts)

  return RunData(train, dev_batches, train.stats, dev_source, dev_info, tuple(train_info.label_names),
                 train_info.skipped + dev_info.skipped)


class _CTCTrainIterator(pipeline.TrainIterator):
  """The speech training iterator, with CTC labels made from each row's text."""

  def __init__(self, iterator, planner, add_labels):
    super().__init__(iterator, planner)
    self._add_labels = add_labels

  def __next__(self):
    batch = next(self._iterator)
    self._window.append(batch.pop("_stats"))
    return self._add_labels(batch, batch.pop("_meta")["text"])


def _ctc_train_iterator(source, info, tokenizer, data_cfg, add_labels, audio_input, encoder_states=None):
  shard = batching.shard_options_from_config(data_cfg)
  batch_size = int(data_cfg.batch_size)
  if batch_size % shard.shard_count:
    raise ValueError(f"data.batch_size={batch_size} is not divisible by {shard.shard_count} processes")
  planner = batching.BatchPlanner(batching.eligible_indices(info, ("asr",)), info.num_samples,
                                  batch_size // shard.shard_count, int(data_cfg.seed),
                                  int(data_cfg.length_grouping_window), shard)
  # Transcripts only: the prompt is irrelevant to CTC, so make it zero audio slots.
  asr_only = dict(data_cfg.to_dict(), tasks=("asr",), task_weights=(1.0,))
  maker = batching.BatchMaker(source, info, pipeline._prompt_builder(tokenizer, asr_only),  # pylint: disable=protected-access
                              lambda f: 0, asr_only, train=True, audio_input=audio_input,
                              encoder_states=encoder_states)
  dataset = grain.MapDataset.range(2 ** 62).map(lambda k: planner.make_host_batch(maker, k))
  return _CTCTrainIterator(iter(dataset.to_iter_dataset(batching.read_options(data_cfg))), planner,
                           add_labels)
