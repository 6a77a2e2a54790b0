"""A run's data from its config (speechjax.data.run_data): CTC labels, the
text-LM examples hook, the encoder/data feature agreement, and batches for
each run kind, given the model side as plain values."""

import os
import sys
import types

import numpy as np
import pytest

from speechjax.data import config as data_config
from speechjax.data import ctc_labels, pipeline, run_data, text_lm
from speechjax.data import prompts as prompts_lib
from speechjax.data import tasks as tasks_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402  pylint: disable=wrong-import-position


def tiny_config(corpus, kind):
  data_dir, tok_dir, _ = corpus
  c = tiny.get_config(kind)
  c.data.data_dir = data_dir
  c.model.tokenizer = tok_dir
  return c


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(tiny_corpus[1])


def test_character_labels_are_one_based_and_skip_unknown_characters():
  assert ctc_labels.encode_characters("Ab c!", "abc ") == [1, 2, 4, 3]
  encode = ctc_labels.label_encoder("abc ", None)
  batch = ctc_labels.add_ctc_labels({}, ["abc", "", "cccccc"], encode, max_length=4)
  np.testing.assert_array_equal(batch["ctc_labels"], [[1, 2, 3, 0], [0, 0, 0, 0], [3, 3, 3, 3]])
  np.testing.assert_array_equal(batch["ctc_label_mask"], [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
  with pytest.raises(ValueError, match="model.tokenizer"):
    ctc_labels.label_encoder("", None)


def test_token_labels_are_the_asr_answer_shifted_past_the_blank(tokenizer):
  prompts = prompts_lib.PromptBuilder(tokenizer)
  encode = ctc_labels.label_encoder("", prompts)
  text = "turn on the lights"
  assert encode(text) == [i + 1 for i in prompts.transcript_ids({"text": text})]
  assert encode(text) and encode("") == []


def test_examples_hook_is_resolved_or_refused_by_name():
  import ml_collections

  cfg = ml_collections.ConfigDict({"lm_examples": ""})
  assert text_lm.example_builder(cfg) is text_lm.text_lm_examples
  cfg.lm_examples = "speechjax.data.text_lm:pad_text_batch"
  assert text_lm.example_builder(cfg) is text_lm.pad_text_batch
  for bad, message in (("speechjax.data.text_lm", "package.module:function"),
                       ("no_such_module_anywhere:f", "cannot import"),
                       ("speechjax.data.text_lm:no_such_function", "no function")):
    cfg.lm_examples = bad
    with pytest.raises(ValueError, match=message):
      text_lm.example_builder(cfg)


def test_default_lm_examples_leave_the_audio_slot_empty(tokenizer):
  cfg = data_config.default_data_config()
  cfg.tasks = ("asr", "classify")
  record = {"text": "turn on the lights", "label": "lights_on", "translation": None}
  prompts = prompts_lib.PromptBuilder(tokenizer)
  examples = text_lm.text_lm_examples([record], tokenizer, cfg)
  expected = [prompts.prompt_ids_with_text_slot(record, task, [], k) + prompts.answer_ids(record, task, k)
              for task in cfg.tasks for k in range(prompts.num_instructions(task))]
  assert [list(e) for e in examples] == expected
  assert all(tasks_lib.AUDIO_PLACEHOLDER_ID not in e for e in examples)


def test_mel_encoder_must_read_the_data_configs_frames():
  cfg = data_config.default_data_config()
  mel = types.SimpleNamespace(kind="mel", n_mels=80, hop_length=160)
  run_data.check_features_match(cfg, mel)
  run_data.check_features_match(cfg, types.SimpleNamespace(kind="wave"))
  run_data.check_features_match(cfg, None)
  with pytest.raises(ValueError, match="data.hop_length=160 but the audio encoder reads hop_length=320"):
    run_data.check_features_match(cfg, types.SimpleNamespace(kind="mel", n_mels=80, hop_length=320))
  with pytest.raises(ValueError, match="data.n_mels=80"):
    run_data.check_features_match(cfg, types.SimpleNamespace(kind="mel", n_mels=128, hop_length=160))


def test_unknown_run_kind_is_refused(tiny_corpus):
  with pytest.raises(ValueError, match="valid: speech_llm, lm, ctc"):
    run_data.build_run_data(tiny_config(tiny_corpus, "lm"), types.SimpleNamespace(kind="tts"))


def test_lm_run_batches_come_from_the_configured_examples(tiny_corpus, tokenizer):
  config = tiny_config(tiny_corpus, "lm")
  config.data.lm_examples = "speechjax.projects.spoken_commands.lm_data:text_lm_examples"
  config.data.lm_audio_slot = "transcript"
  data = run_data.build_run_data(config, types.SimpleNamespace(kind="lm", tokenizer=tokenizer))
  batch = next(data.train)
  assert batch["input_ids"].shape == (8, 128)
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
  # Every row holds a transcript in its audio slot: its words appear twice (slot and answer).
  for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
    text = tokenizer.decode(row[mask.astype(bool)], skip_special_tokens=True)
    answer = text.strip().split("\n")[-1].strip()
    assert answer and text.count(answer) >= 2, text
  dev = list(data.dev_batches(1))
  assert len(dev) == 1 and dev[0]["example_mask"].sum() > 0
  # The state round-trips: the next batch after a restore is the next batch.
  state = data.train.get_state()
  expected = next(data.train)
  data.train.set_state(state)
  np.testing.assert_array_equal(next(data.train)["input_ids"], expected["input_ids"])


def test_ctc_run_labels_each_rows_transcript(tiny_corpus, tokenizer):
  config = tiny_config(tiny_corpus, "ctc")
  vocab = config.model.ctc_vocab
  model = types.SimpleNamespace(kind="ctc", tokenizer=tokenizer, num_audio_tokens=lambda f: 0,
                                audio_input=types.SimpleNamespace(kind="mel", sample_rate=16000, n_mels=80,
                                                                  hop_length=160, normalize=False))
  data = run_data.build_run_data(config, model)
  _, meta = next(iter(pipeline.make_eval_iterator(data.dev_source, data.dev_info, tokenizer, lambda f: 0,
                                                  config.data, max_batches=1, with_metadata=True)))
  dev = next(iter(data.dev_batches(1)))
  for row, text in enumerate(meta["text"]):
    ids = ctc_labels.encode_characters(text, vocab)[:128]
    np.testing.assert_array_equal(dev["ctc_labels"][row, :len(ids)], ids)
    assert dev["ctc_label_mask"][row].sum() == len(ids) > 0
  train = next(data.train)
  assert train["features"].shape[:2] == (8, 80)
  assert (train["ctc_label_mask"].sum(1) > 0).all()
  assert set(data.train_stats()) >= {"audio_padding_fraction", "audio_seconds_per_batch"}
