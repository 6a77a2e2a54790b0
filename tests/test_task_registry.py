"""The task registry: a task defined in this file alone flows through the
pipeline, the manifest builder, scoring and transcribe's task check."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from speechjax.data import batching, fields, pipeline, sources, tasks
from speechjax.data import config as data_config
from speechjax.data import prompts as prompts_lib
from speechjax.data.builders import manifest
from speechjax.evaluation import scoring


def count_words(example) -> str:
  return str(len(tasks.as_text(example.get("text")).split()))


def exact_match(predictions, references) -> dict[str, float]:
  return {"exact_match": float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)]))}


COUNT_WORDS = tasks.Task(
    "count_words", fields=("text",), answer=count_words, metric=exact_match, headline=("exact_match",),
    instructions=("<audio>\nHow many words are spoken?", "Count the words in {language}: <audio>"))
# A task whose field no built-in task uses: the builder must store it and the
# field bits must record it.
EMOTION = tasks.Task("emotion", fields=("emotion",), answer="emotion", metric=exact_match,
                     headline=("exact_match",), instructions=("<audio>\nHow does the speaker feel?",))


@pytest.fixture()
def registered():
  """Registers the toy tasks for one test and always removes them again."""
  tasks.register_task(COUNT_WORDS)
  tasks.register_task(EMOTION)
  try:
    yield
  finally:
    for name in ("count_words", "emotion"):
      if name in tasks.TASK_REGISTRY:
        tasks.unregister_task(name)


def num_audio_tokens(frames: int) -> int:
  return (frames + 1) // 2 // 8


def _tokenizer(tok_dir):
  import transformers
  return transformers.PreTrainedTokenizerFast.from_pretrained(tok_dir)


def test_lookup_errors_list_the_registered_names(registered):
  assert tasks.get_task("count_words") is COUNT_WORDS
  assert tasks.task_names() == ("asr", "translate", "classify", "instruct", "summarize", "spoken_qa",
                                "dialogue", "count_words", "emotion")
  assert tasks.TASKS[-2:] == ("count_words", "emotion") and "count_words" in tasks.INSTRUCTIONS
  with pytest.raises(KeyError) as error:
    tasks.get_task("count_word")
  assert "unknown task 'count_word'" in str(error.value)
  for name in tasks.task_names():
    assert name in str(error.value)


def test_duplicates_are_refused_unless_replaced(registered):
  with pytest.raises(ValueError, match="'count_words' is already registered; pass replace=True"):
    tasks.register_task(COUNT_WORDS)
  with pytest.raises(ValueError, match="'asr' is already registered"):
    tasks.register_task(tasks.Task("asr", fields=("text",), answer="text", metric=exact_match,
                                   headline=(), instructions=("<audio>",)))
  terse = tasks.Task("count_words", fields=("text",), answer=count_words, metric=exact_match,
                     headline=("exact_match",), instructions=("<audio> words?",))
  assert tasks.register_task(terse, replace=True) is terse
  assert tasks.get_task("count_words").instructions == ("<audio> words?",)


def test_unregistered_task_is_gone():
  tasks.register_task(COUNT_WORDS)
  tasks.unregister_task("count_words")
  assert "count_words" not in tasks.task_names() and "count_words" not in tasks.TASK_FIELDS
  with pytest.raises(KeyError, match="registered: asr, translate, classify, instruct"):
    tasks.get_task("count_words")


def test_pipeline_trains_on_the_toy_task(registered, tiny_corpus):
  data_dir, tok_dir, _ = tiny_corpus
  tok = _tokenizer(tok_dir)
  config = data_config.default_data_config()
  config.update(data_dir=data_dir, tasks=("count_words",), task_weights=(1.0,), batch_size=4,
                shard_by_process=False, length_grouping_window=0, token_buckets=(64, 128))
  source, info = sources.open_source(config, "train")
  iterator = pipeline.make_train_iterator(source, info, tok, num_audio_tokens, config)
  prompts = prompts_lib.PromptBuilder(tok, language="French")
  pool = [prompts.instruction({}, "count_words", k) for k in range(2)]
  assert pool[1] == "Count the words in French: <audio>"
  for k in range(3):
    batch = next(iterator)
    for row, index in enumerate(iterator.planner(k)):
      record = source[int(index)]
      expected = str(len(tasks.as_text(record["text"]).split()))
      answer = batch["targets"][row][batch["target_mask"][row] > 0]
      assert answer[-1] == tok.eos_token_id
      assert tok.decode(answer[:-1]).strip() == expected
      prompt = tok.decode([i for i in batch["input_ids"][row] if i >= 0], skip_special_tokens=True)
      assert any(p.replace("<audio>", "").strip() in prompt for p in pool)


def test_evaluation_reads_the_toy_answers_and_metric(registered, tiny_corpus):
  data_dir, tok_dir, _ = tiny_corpus
  config = data_config.default_data_config()
  config.update(data_dir=data_dir, tasks=("asr",), eval_batch_size=4, shard_by_process=False)
  source, info = sources.open_source(config, "dev")
  evaluation = pipeline.make_eval_iterator(source, info, _tokenizer(tok_dir), num_audio_tokens, config,
                                           task="count_words", generate=True, with_metadata=True,
                                           max_batches=1)
  batch, meta = next(iter(evaluation))
  assert meta["task"] == ["count_words"] * 4
  assert meta["reference"] == [str(len(text.split())) for text in meta["text"]]

  scores = scoring.compute_metrics("count_words", ["3", "4", "5", "x"], ["3", "4", "6", "7"])
  assert scores == {"exact_match": 0.5}
  predictions = [{"id": str(i), "task": "count_words", "prediction": p, "reference": r}
                 for i, (p, r) in enumerate(zip(["3", "4"], ["3", "5"]))]
  summary = scoring.summarize([
      scoring.TaskResult("count_words", {"exact_match": 0.5}, predictions, 1),
      scoring.TaskResult("asr", {"wer": 0.25, "cer": 0.1}, predictions, 0),
  ])
  assert summary["exact_match"] == 0.5 and summary["count_words/exact_match"] == 0.5
  assert summary["wer"] == 0.25 and summary["tasks"] == ["count_words", "asr"]
  assert summary["num_skipped"] == 1 and summary["count_words/num_examples"] == 2


def _write_manifest(folder, rows):
  path = os.path.join(folder, "toy.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return path


def test_builder_stores_and_requires_the_fields_of_the_tasks_in_use(registered, tiny_corpus,
                                                                    tmp_path):
  corpus_root = tiny_corpus[2]
  with open(os.path.join(corpus_root, "train.jsonl"), encoding="utf-8") as f:
    audio = [os.path.join(corpus_root, json.loads(line)["audio"]) for line in f][:3]
  rows = [{"audio": audio[0], "label": "lights_on", "emotion": "calm"},  # no transcript
          {"audio": audio[1], "text": "play some jazz", "emotion": "happy"},
          {"audio": audio[2], "text": "stop", "label": "stop"}]
  path = _write_manifest(str(tmp_path), rows)
  assert fields.fields_required_by(("classify",)) == ("label",)
  assert fields.fields_required_by(("asr", "count_words")) == ("text",)
  assert fields.fields_required_by(("asr", "emotion")) == ()
  assert "emotion" in fields.stored_fields() and "emotion" in fields.field_names()

  # Built for classification only, the line without "text" is kept.
  labels_dir = manifest.build_manifest_dataset({"train": path}, str(tmp_path / "tfds"), "labels",
                                               tasks=("classify",))
  skipped = manifest.read_skipped(labels_dir)
  assert [(s["reason"], s["line"], s["detail"]) for s in skipped] == [
      ("missing_text", 2, 'no "label" field')]
  assert len(manifest.load_data_source(labels_dir, "train")) == 2
  # Built for ASR (the default), the line without "text" is left out.
  asr_dir = manifest.build_manifest_dataset({"train": path}, str(tmp_path / "tfds"), "asr_toy")
  assert [(s["reason"], s["line"]) for s in manifest.read_skipped(asr_dir)] == [("missing_text", 1)]

  any_dir = manifest.build_manifest_dataset({"train": path}, str(tmp_path / "tfds"), "any_toy",
                                            tasks=("asr", "classify", "emotion"))
  data = manifest.load_data_source(any_dir, "train")
  assert [data[i]["emotion"] for i in range(3)] == [b"calm", b"happy", b""]
  source, info = sources.tfds_split(any_dir, "train")
  for task, expected in (("asr", [1, 2]), ("classify", [0, 2]), ("emotion", [0, 1]),
                         ("count_words", [1, 2])):
    np.testing.assert_array_equal(batching.eligible_indices(info, (task,)), expected)
  np.testing.assert_array_equal(batching.eligible_indices(info, ("classify", "emotion")), [0, 1, 2])


def test_transcribe_accepts_any_registered_task_that_needs_only_audio(registered):
  from speechjax import transcriber as transcribe

  transcribe.check_task("count_words")
  transcribe.check_task("translate")
  with pytest.raises(ValueError, match="registered: asr, translate, classify, instruct, summarize, spoken_qa, "
                                       "dialogue, count_words"):
    transcribe.check_task("count")
  with pytest.raises(ValueError, match="'prompt'.*use one of: asr, translate, classify, summarize, count_words"):
    transcribe.check_task("instruct")
  with pytest.raises(ValueError, match=r"several clips per example.*--manifest=F.jsonl --tasks=dialogue"):
    transcribe.check_task("dialogue")
