"""The summarize task (audio -> a short summary, ROUGE) and the spoken_qa task
(audio + a text question -> a short answer, SQuAD-style exact match and token
F1). Their fields go through the manifest builder, their prompts are built as
documented, and a tiny speech LLM trains on both, decodes them and is scored
with their metrics by evaluate."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tiny_runs

from speechjax.data import prompts as prompts_lib
from speechjax.data import tasks
from speechjax.evaluation import metrics, scoring


def test_exact_match_and_token_f1_on_hand_made_answers():
  predictions = ["The Eiffel Tower.", "in paris", "blue", "", "four  o'clock"]
  references = ["eiffel tower", "Paris", "red", "seven", "Four o'clock"]
  out = metrics.qa_metrics(predictions, references)
  # Articles, case, punctuation and spacing do not count: 1, 0, 0, 0, 1 exact;
  # 'in paris' against 'paris' has precision 1/2, recall 1: F1 2/3.
  assert out["exact_match"] == pytest.approx(2 / 5)
  assert out["f1"] == pytest.approx((1 + 2 / 3 + 0 + 0 + 1) / 5)
  # A repeated word counts as often as it occurs in both (a multiset overlap).
  assert metrics.qa_metrics(["yes yes yes"], ["yes"])["f1"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
  # An answer that normalizes to nothing matches only an empty prediction.
  assert metrics.qa_metrics(["", "x"], ["the", "a"])["exact_match"] == 0.5
  with pytest.raises(ValueError, match="qa_metrics: 1 predictions but 2 references"):
    metrics.qa_metrics(["a"], ["a", "b"])
  assert scoring.compute_metrics("spoken_qa", predictions, references) == out


def test_rouge_on_hand_made_summaries():
  out = metrics.summary_metrics(["the cat sat on the mat", "dogs running"], ["the cat was on the mat", "dog runs"])
  # 1: 5 of 6 unigrams shared, 3 of 5 bigrams, longest common subsequence 5 words;
  # 2: Porter stemming makes 'dogs running' and 'dog runs' the same two words.
  assert out["rouge1"] == pytest.approx(100 * (5 / 6 + 1) / 2)
  assert out["rouge2"] == pytest.approx(100 * (3 / 5 + 1) / 2)
  assert out["rougeL"] == pytest.approx(100 * (5 / 6 + 1) / 2)
  assert metrics.summary_metrics(["x y"], ["a b"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
  with pytest.raises(ValueError, match="summary_metrics: 2 predictions but 1 references"):
    metrics.summary_metrics(["a", "b"], ["a"])
  assert scoring.compute_metrics("summarize", ["dogs running"], ["dog runs"])["rougeL"] == pytest.approx(100)


def test_summarize_prompts_with_its_instructions(tiny_corpus):
  import transformers

  spec = tasks.get_task("summarize")
  assert spec.fields == ("summary",) and spec.headline == ("rougeL",) and len(spec.instructions) == 4
  tok = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_corpus[1])
  prompts = prompts_lib.PromptBuilder(tok)
  example = {"summary": "kitchen lights on", "text": "turn on the kitchen lights"}
  assert tasks.supported_tasks(example) == ["asr", "summarize"]
  assert prompts.num_instructions("summarize") == 4
  assert prompts.instruction(example, "summarize", 1) == "Give a short summary of this recording: <audio>"
  item = prompts.training_example(example, "summarize", num_audio_tokens=2, instruction_index=1)
  answer = item["targets"][item["target_mask"] > 0]
  assert tok.decode(answer[:-1]).strip() == "kitchen lights on"


def test_the_question_follows_the_audio_and_the_answer_is_the_target(tiny_corpus):
  import transformers

  spec = tasks.get_task("spoken_qa")
  assert spec.fields == ("question", "answer") and spec.headline == ("exact_match", "f1")
  tok = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_corpus[1])
  prompts = prompts_lib.PromptBuilder(tok)
  example = {"question": "which room is named", "answer": "the kitchen", "text": "turn on the kitchen lights"}
  assert tasks.supported_tasks(example) == ["asr", "spoken_qa"]
  assert not tasks.supports({"question": "which room", "answer": " "}, "spoken_qa")
  assert prompts.instruction(example, "spoken_qa") == "<audio>\nwhich room is named"
  item = prompts.training_example(example, "spoken_qa", num_audio_tokens=3)
  answer = item["targets"][item["target_mask"] > 0]
  assert answer[-1] == tok.eos_token_id and tok.decode(answer[:-1]).strip() == "the kitchen"
  assert list(item["input_ids"]).count(tasks.AUDIO_PLACEHOLDER_ID) == 3


def _manifests(corpus_root: str, out_dir: str) -> dict[str, str]:
  """Each tiny-corpus utterance asked for its last word and summarized as its
  first two words: train and test manifests."""
  paths = {}
  for split in ("train", "test"):
    with open(os.path.join(corpus_root, f"{split}.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    path = os.path.join(out_dir, f"qa_{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps({"id": row["id"], "audio": os.path.join(corpus_root, row["audio"]),
                            "question": "what is the last word", "answer": row["text"].split()[-1],
                            "summary": " ".join(row["text"].split()[:2])}) + "\n")
    paths[split] = path
  return paths


@pytest.mark.slow
def test_a_speech_llm_trains_decodes_and_is_scored_on_summaries_and_questions(tiny_corpus, tmp_path):
  from speechjax.data.builders import manifest
  from speechjax.evaluate import evaluate_run
  from speechjax.train import build_trainer

  _, tok_dir, corpus_root = tiny_corpus
  manifests = _manifests(corpus_root, str(tmp_path))
  manifest.build_manifest_dataset(manifests, str(tmp_path / "tfds"), "last_word",
                                  tasks=("spoken_qa", "summarize"), num_workers=1)
  config = tiny_runs.tiny_task_config(str(tmp_path / "tfds"), "last_word", tok_dir, ("spoken_qa", "summarize"))
  workdir = str(tmp_path / "run")
  trainer = build_trainer(config, workdir)
  batch = next(iter(trainer.data.train))
  assert batch["target_mask"].sum() > 0
  trainer.run()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
  assert len(losses) == 6 and all(np.isfinite(losses))

  summary = evaluate_run(workdir, split="test", progress=False)
  assert summary["tasks"] == ["spoken_qa", "summarize"]
  assert summary["spoken_qa/num_examples"] == summary["summarize/num_examples"] == 16
  with open(os.path.join(workdir, "eval", "test.predictions.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  with open(manifests["test"], encoding="utf-8") as f:
    expected = {r["id"]: r for r in map(json.loads, f)}
  qa = [r for r in rows if r["task"] == "spoken_qa"]
  summaries = [r for r in rows if r["task"] == "summarize"]
  assert {r["id"]: r["reference"] for r in qa} == {k: r["answer"] for k, r in expected.items()}
  assert {r["id"]: r["reference"] for r in summaries} == {k: r["summary"] for k, r in expected.items()}
  # The summary's figures are the metrics of the written predictions.
  rescored = metrics.qa_metrics([r["prediction"] for r in qa], [r["reference"] for r in qa])
  assert summary["exact_match"] == rescored["exact_match"] and summary["f1"] == rescored["f1"]
  rouge = metrics.summary_metrics([r["prediction"] for r in summaries], [r["reference"] for r in summaries])
  assert summary["rougeL"] == rouge["rougeL"] and summary["summarize/rouge1"] == rouge["rouge1"]
  with open(os.path.join(workdir, "eval", "test.report.md")) as f:
    report = f.read()
  assert "## spoken_qa" in report and f"exact match {100 * rescored['exact_match']:.2f} %" in report
  assert "## summarize" in report and f"rougeL {rouge['rougeL']:.2f}" in report


def test_transcribe_takes_the_question_as_its_instruction():
  from speechjax import transcriber as transcribe

  assert transcribe.check_task("spoken_qa", "which room is named") == {"question": "which room is named"}
  with pytest.raises(ValueError, match=r"--task='spoken_qa' needs an instruction \(in a manifest, the field "
                                       r"'question'"):
    transcribe.check_task("spoken_qa")
