"""Metrics against hand-computed values."""

from __future__ import annotations

import pytest

from speechjax.evaluation import metrics, normalizer, scoring


def test_one_substitution_in_four_words():
  out = metrics.error_rates(["the cat sat up"], ["the cat sat down"])
  assert out["rate"] == pytest.approx(0.25)
  assert (out["substitutions"], out["deletions"], out["insertions"]) == (1.0, 0.0, 0.0)


def test_empty_hypothesis_is_all_deletions():
  out = metrics.error_rates([""], ["a b c"])
  assert out["rate"] == 1.0 and out["deletions"] == 3.0


def test_insertions_can_exceed_one():
  assert metrics.wer(["a b c d"], ["a"]) == pytest.approx(3.0)


def test_wer_is_corpus_level_not_mean_of_utterances():
  # utterance rates 0 and 1 (mean 0.5); corpus: 1 sub + 1 del over 6 words.
  out = metrics.error_rates(["a b c d", "x"], ["a b c d", "e f"])
  assert out["rate"] == pytest.approx(2 / 6)
  assert out["num_reference"] == 6.0


def test_empty_reference_counts_insertions():
  out = metrics.error_rates(["a b", "hello there"], ["a b", "um"])  # "um" normalizes to ""
  assert out["insertions"] == 2.0 and out["rate"] == pytest.approx(1.0)


def test_english_normalizer():
  norm = normalizer.normalize
  assert norm("Hello, World!") == "hello world"
  assert norm("The colour of Mr. Smith's car") == norm("the color of mister smith's car")
  assert norm("twenty five") == "25"
  assert metrics.wer(["Hello, World!"], ["hello world"]) == 0.0
  assert metrics.wer(["I like the colour"], ["i like the color"]) == 0.0


def test_basic_and_none_normalizers():
  assert normalizer.normalize("Héllo,  World!", "basic") == "héllo world"
  assert metrics.wer(["Hello, World!"], ["hello world"], normalizer="none") == 1.0
  with pytest.raises(ValueError, match="unknown normalizer"):
    normalizer.normalize("x", "klingon")


def test_cer():
  assert metrics.cer(["abed"], ["abcd"]) == pytest.approx(0.25)
  # spaces count: "ab cd" -> "abcd" is one deletion over 5 characters.
  assert metrics.cer(["abcd"], ["ab cd"]) == pytest.approx(0.2)


def test_bleu_and_chrf():
  refs = ["the quick brown fox jumps over the lazy dog", "a b c d e f"]
  assert metrics.bleu(refs, refs) == pytest.approx(100.0)
  assert metrics.chrf(refs, refs) == pytest.approx(100.0)
  assert metrics.bleu(["zz yy xx ww", "qq rr ss tt"], refs) == pytest.approx(0.0)


def test_macro_f1_by_hand():
  refs = ["a", "a", "a", "b", "b", "c"]
  preds = ["a", "a", "b", "b", "c", "c"]
  # a: P=1 R=2/3 F1=0.8 ; b: P=1/2 R=1/2 F1=1/2 ; c: P=1/2 R=1 F1=2/3
  out = metrics.classification_metrics(preds, refs)
  assert out["accuracy"] == pytest.approx(4 / 6)
  assert out["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
  assert out["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
  assert out["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_classification_labels_are_case_insensitive_and_unknowns_are_wrong():
  out = metrics.classification_metrics([" Positive", "banana"], ["positive", "negative"])
  assert out["accuracy"] == 0.5
  assert out["macro_f1"] == pytest.approx(0.5)  # positive F1=1, negative F1=0


def test_compute_metrics_keys_and_types():
  asr = scoring.compute_metrics("asr", ["hello world"], ["Hello world."])
  assert set(asr) == {"wer", "cer", "substitutions", "deletions", "insertions",
                      "num_reference_words"}
  assert asr["wer"] == 0.0
  assert set(scoring.compute_metrics("translate", ["a b"], ["a b"])) == {"bleu", "chrf"}
  assert set(scoring.compute_metrics("classify", [1, 2], [1, 1])) == {
      "accuracy", "macro_f1", "precision", "recall"}
  instruct = scoring.compute_metrics("instruct", ["yes it is"], ["yes it is"])
  assert set(instruct) == {"wer", "cer", "bleu", "chrf"}
  for out in (asr, instruct):
    assert all(type(v) is float for v in out.values())


def test_each_task_scores_with_its_metric_function():
  preds, refs = ["the cat sat up", "a b c"], ["the cat sat down", "a b c"]
  asr = scoring.compute_metrics("asr", preds, refs)
  words = metrics.error_rates(preds, refs)
  assert asr["wer"] == pytest.approx(1 / 7) == words["rate"]
  assert asr["cer"] == metrics.cer(preds, refs)
  assert (asr["substitutions"], asr["num_reference_words"]) == (1.0, 7.0)
  assert scoring.compute_metrics("translate", preds, refs) == {
      "bleu": metrics.bleu(preds, refs), "chrf": metrics.chrf(preds, refs)}
  assert scoring.compute_metrics("instruct", preds, refs) == {
      "wer": asr["wer"], "cer": asr["cer"], "bleu": metrics.bleu(preds, refs),
      "chrf": metrics.chrf(preds, refs)}
  # Options reach the task's function: a normalizer for ASR, the label set for classify.
  assert scoring.compute_metrics("asr", ["Hello, World!"], ["hello world"], normalizer="none")["wer"] == 1.0
  assert scoring.compute_metrics("classify", ["a"], ["a"], labels=["a", "b"])["macro_f1"] == 0.5


def test_bad_input():
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    scoring.compute_metrics("asr", ["a", "b"], ["a"])
  with pytest.raises(ValueError, match="no examples"):
    scoring.compute_metrics("asr", [], [])
  with pytest.raises(KeyError, match="unknown task 'summarize'; registered: asr, translate"):
    scoring.compute_metrics("summarize", ["a"], ["a"])
