"""Grain pipeline: Batch contract, bucketing, resumable state, eval pass, sharding, mixing."""

from __future__ import annotations

import json
import os

import grain
import numpy as np
import pytest

from speechjax.data import batching, pipeline, sources, tasks
from speechjax.data import config as data_config
from speechjax.data import prompts as prompts_lib
from speechjax.projects.spoken_commands import synth
from speechjax.projects.spoken_commands import tokenizer as tokenizer_lib


def num_audio_tokens(frames):
  return (frames + 1) // 2 // 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pipeline") / "corpus")
  summary = synth.build(out, num_train=24, num_dev=7, num_test=3, seed=5, workers=1)
  with open(os.path.join(out, "train.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  texts = [r["text"] for r in rows] + [r["translation"] for r in rows] + [r["label"] for r in rows]
  for pool in tasks.INSTRUCTIONS.values():
    texts += [t.replace("{language}", "French") for t in pool]
  tok = tokenizer_lib.train_bpe_tokenizer(texts * 2, vocab_size=400)
  return out, summary, tok


def _config(out, **overrides):
  config = data_config.default_data_config()
  config.data_dir = os.path.join(out, "tfds")
  config.batch_size = 4
  config.eval_batch_size = 3
  config.audio_buckets_seconds = (2.5, 3.5, 5.0)
  config.token_buckets = (48, 64, 96)
  config.length_grouping_window = 2
  config.shard_by_process = False
  config.update(overrides)
  return config


def test_default_config_has_every_key():
  config = data_config.default_data_config()
  for key in ("name", "data_dir", "train_split", "eval_split", "test_split", "batch_size",
              "eval_batch_size", "audio_buckets_seconds", "token_buckets", "max_audio_seconds",
              "n_mels", "template", "tasks", "task_weights", "seed", "worker_threads", "augment"):
    assert key in config
  for key in ("speed", "noise", "noise_snr_db", "spec_augment", "freq_masks", "time_masks"):
    assert key in config.augment
  assert json.loads(json.dumps(config.to_dict()))["tasks"] == ["asr"]


def test_train_batches_follow_the_contract(corpus):
  out, _, tok = corpus
  config = _config(out, tasks=("asr", "translate", "classify"), task_weights=(1.0, 1.0, 1.0))
  source, info = sources.open_source(config, "train")
  iterator = pipeline.make_train_iterator(source, info, tok, num_audio_tokens, config)
  buckets = batching.bucket_sizes_samples(config)
  for _ in range(6):
    batch = next(iterator)
    assert set(batch) == set(pipeline.BATCH_KEYS)
    dtypes = {
        "features": np.float32,
        "feature_mask": np.int32,
        "input_ids": np.int32,
        "attention_mask": np.int32,
        "targets": np.int32,
        "target_mask": np.float32,
        "class_labels": np.int32,
        "audio_seconds": np.float32,
        "example_mask": np.float32
    }
    for key, dtype in dtypes.items():
      assert isinstance(batch[key], np.ndarray) and batch[key].dtype == dtype, key
    b, n_mels, frames = batch["features"].shape
    assert b == 4 and n_mels == 80 and frames in [s // 160 for s in buckets]
    assert batch["feature_mask"].shape == (4, frames)
    length = batch["input_ids"].shape[1]
    assert length in config.token_buckets
    for key in ("attention_mask", "targets", "target_mask"):
      assert batch[key].shape == (4, length)
    np.testing.assert_array_equal((batch["input_ids"] == tasks.AUDIO_PLACEHOLDER_ID).sum(1),
                                  num_audio_tokens(frames))
    np.testing.assert_array_equal(batch["feature_mask"].sum(1),
                                  np.round(batch["audio_seconds"] * 16000).astype(int) // 160)
    assert np.all(batch["target_mask"] <= batch["attention_mask"])
    assert np.all(np.diff(batch["attention_mask"], axis=1) <= 0)  # right padding
    np.testing.assert_array_equal(batch["example_mask"], 1.0)
    assert np.all((batch["class_labels"] >= 0) & (batch["class_labels"] < len(info.label_names)))
    real = batch["attention_mask"][:, 1:] > 0
    np.testing.assert_array_equal(
        batch["targets"][:, :-1][real & (batch["input_ids"][:, 1:] >= 0)],
        batch["input_ids"][:, 1:][real & (batch["input_ids"][:, 1:] >= 0)])
  stats = iterator.stats()
  assert 0.0 <= stats["audio_padding_fraction"] < 1.0 and 0.0 <= stats[
      "token_padding_fraction"] < 1.0
  assert stats["audio_seconds_per_batch"] > 4.0 and stats["truncated_examples"] == 0.0
  assert iterator.stats() == {}


def test_task_mixing_follows_weights_and_fields(corpus):
  out, _, tok = corpus
  config = _config(out, tasks=("asr", "classify"), task_weights=(1.0, 3.0))
  source, info = sources.open_source(config, "train")
  iterator = pipeline.make_train_iterator(source, info, tok, num_audio_tokens, config)
  labels = set(info.label_names)
  kinds = []
  for _ in range(10):
    batch = next(iterator)
    for row in range(4):
      answer = tok.decode(batch["targets"][row][batch["target_mask"][row] > 0][:-1]).strip()
      kinds.append("classify" if answer in labels else "asr")
  assert 0.55 < kinds.count("classify") / len(kinds) < 0.95


def test_resume_sees_exactly_the_same_batches(corpus):
  out, _, tok = corpus
  config = _config(out, tasks=("asr", "translate"), task_weights=(1.0, 1.0), worker_threads=2)
  config.augment.update(speed=True, noise=True, spec_augment=True)
  source, info = sources.open_source(config, "train")
  first = pipeline.make_train_iterator(source, info, tok, num_audio_tokens, config)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # survives a JSON checkpoint
  expected = [next(first) for _ in range(3)]
  resumed = pipeline.make_train_iterator(source, info, tok, num_audio_tokens, config)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(3)]
  for a, b in zip(expected, got):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(a[key], b[key])
  # Epochs differ in order (reshuffled) but cover every example once.
  planner = first.planner
  assert planner.batches_per_epoch == 6
  for epoch in (0, 1):
    assert sorted(planner.epoch(epoch).ravel().tolist()) == list(range(24))
  assert planner.epoch(0).tolist() != planner.epoch(1).tolist()


def test_length_grouping_reduces_padding():
  rng = np.random.default_rng(0)
  lengths = rng.integers(16000, 16000 * 10, size=512)

  def padding(window):
    planner = batching.BatchPlanner(np.arange(512), lengths, 8, 0, window,
                                    grain.sharding.NoSharding())
    batches = planner.epoch(0)
    return 1 - lengths[batches].sum() / (lengths[batches].max(1).sum() * 8)

  assert padding(16) < 0.5 * padding(0)


def test_eval_iterator_is_one_ordered_padded_pass(corpus):
  out, _, tok = corpus
  config = _config(out, tasks=("asr", "translate"), task_weights=(1.0, 1.0))
  config.augment.update(speed=True, noise=True, spec_augment=True)  # must not apply to eval
  source, info = sources.open_source(config, "dev")
  evaluation = pipeline.make_eval_iterator(source, info, tok, num_audio_tokens, config,
                                           with_metadata=True)
  assert evaluation.task == "asr" and len(evaluation) == 3 and evaluation.num_examples == 7
  ids, masks = [], []
  for batch, meta in evaluation:
    assert set(batch) == set(pipeline.BATCH_KEYS)
    ids += meta["id"]
    masks.append(batch["example_mask"])
    assert meta["reference"] == meta["text"]
    assert batch["feature_mask"].sum(1).min() > 0
  assert ids == [source[i]["id"].decode() for i in range(7)]
  np.testing.assert_array_equal(np.concatenate(masks), [1] * 7 + [0] * 2)
  # Augmentation is off in evaluation: features equal an unaugmented log-mel.
  first, _ = next(iter(evaluation))
  from speechjax.data import audio as audio_lib
  from speechjax.data import features
  wave = audio_lib.int16_to_float(source[0]["audio"])
  frames = wave.size // 160
  alone = np.asarray(features.log_mel(wave))
  assert np.abs(first["features"][0][:, :frames - 3] - alone[:, :frames - 3]).max() < 2e-4


def test_generation_batches_are_left_padded_prompts(corpus):
  out, _, tok = corpus
  config = _config(out, template="chatml")
  source, info = sources.open_source(config, "dev")
  evaluation = pipeline.make_eval_iterator(source, info, tok, num_audio_tokens, config,
                                           task="translate", generate=True, with_metadata=True,
                                           max_batches=1)
  batch, meta = next(iter(evaluation))
  assert len(evaluation) == 1 and meta["task"] == ["translate"] * 3
  assert np.all(np.diff(batch["attention_mask"], axis=1) >= 0)  # left padding
  assert batch["target_mask"].sum() == 0
  builder = prompts_lib.PromptBuilder(tok, "chatml")
  frames = batch["features"].shape[-1]
  for row in range(3):
    prompt = builder.prompt_ids(source[row], "translate", num_audio_tokens(frames))
    np.testing.assert_array_equal(batch["input_ids"][row][-len(prompt):], prompt)
    assert meta["reference"][row] == source[row]["translation"].decode()


def test_hosts_get_disjoint_shards(corpus):
  out, _, tok = corpus
  config = _config(out)
  source, info = sources.open_source(config, "train")
  seen = []
  for index in range(2):
    shard = grain.sharding.ShardOptions(index, 2, drop_remainder=True)
    iterator = pipeline.make_train_iterator(source, info, tok, num_audio_tokens, config,
                                            shard_options=shard)
    assert iterator.planner.batch_size == 2 and iterator.planner.batches_per_epoch == 6
    seen.append(set(iterator.planner.epoch(0).ravel().tolist()))
    assert next(iterator)["input_ids"].shape[0] == 2
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24
  dev, dev_info = sources.open_source(config, "dev")
  counts = [
      len(
          pipeline.make_eval_iterator(dev, dev_info, tok, num_audio_tokens, config,
                                      shard_options=grain.sharding.ShardOptions(i, 2)))
      for i in range(2)
  ]
  assert counts[0] == counts[1]  # every host runs the same number of eval steps


def test_manifest_split_and_missing_task_fields(corpus, tmp_path):
  out, _, tok = corpus
  with open(os.path.join(out, "test.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  rows[1].pop("label")
  manifest = tmp_path / "eval.jsonl"

  def write(rows):
    manifest.write_text("".join(
        json.dumps({**r, "audio": os.path.join(out, r["audio"])}) + "\n" for r in rows))

  write(rows)
  config = _config(out)
  _, train_info = sources.open_source(config, "train")
  source, info = sources.open_source(config, str(manifest), label_names=train_info.label_names)
  evaluation = pipeline.make_eval_iterator(source, info, tok, num_audio_tokens, config,
                                           task="classify", with_metadata=True)
  assert evaluation.num_examples == 2 and evaluation.num_skipped == 1
  batch, meta = next(iter(evaluation))
  assert meta["label"] == [rows[0]["label"], rows[2]["label"]]
  expected = [train_info.label_names.index(label) for label in meta["label"]]
  assert batch["class_labels"][:2].tolist() == expected
  rows[0]["audio"] = "missing.wav"  # a bad line counts as skipped too
  write(rows)
  source, info = sources.open_source(config, str(manifest), label_names=train_info.label_names)
  evaluation = pipeline.make_eval_iterator(source, info, tok, num_audio_tokens, config,
                                           task="classify")
  assert evaluation.num_examples == 1 and evaluation.num_skipped == 2


def test_over_long_examples_are_left_out(corpus):
  out, _, tok = corpus
  config = _config(out)
  source, info = sources.open_source(config, "train")
  limit = float(np.median(info.num_samples)) / 16000
  config.max_audio_seconds = limit
  iterator = pipeline.make_train_iterator(source, info, tok, num_audio_tokens, config)
  kept = iterator.planner.indices
  assert 0 < len(kept) < 24 and np.all(info.num_samples[kept] <= limit * 16000)
  evaluation = pipeline.make_eval_iterator(source, info, tok, num_audio_tokens, config)
  assert evaluation.num_skipped == int((info.num_samples > limit * 16000).sum()) > 0


def test_prompt_longer_than_largest_bucket_is_a_clear_error(corpus):
  out, _, tok = corpus
  config = _config(out, token_buckets=(16,))
  source, info = sources.open_source(config, "train")
  iterator = pipeline.make_train_iterator(source, info, tok, num_audio_tokens, config)
  with pytest.raises(ValueError, match="token_buckets"):
    next(iterator)
