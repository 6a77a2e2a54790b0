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
  with pytest.raises(KeyError, match="unknown task 'dialogue_act'; registered: asr, translate"):
    scoring.compute_metrics("dialogue_act", ["a"], ["a"])


def test_per_class_metrics_and_confusion_matrix_on_hand_made_predictions():
  refs = ["on", "on", "on", "off", "off", "stop"]
  preds = ["on", "off", "on", "off", "Jump", "on"]
  out = metrics.per_class_metrics(preds, refs, labels=["off", "on", "stop", "up"])
  assert out["labels"] == ["off", "on", "stop", "up", metrics.OTHER_LABEL]
  # rows = reference off, on, stop, up; columns = predicted off, on, stop, up, <other>
  assert out["confusion"] == [[1, 0, 0, 0, 1],
                              [1, 2, 0, 0, 0],
                              [0, 1, 0, 0, 0],
                              [0, 0, 0, 0, 0]]
  assert out["per_class"]["off"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
  on = out["per_class"]["on"]
  assert (on["precision"], on["recall"], on["support"]) == (2 / 3, 2 / 3, 3)
  assert on["f1"] == pytest.approx(2 / 3)
  assert out["per_class"]["stop"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
  assert out["per_class"]["up"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
  # The per-class figures agree with the macro ones over the same classes.
  macro = metrics.classification_metrics(preds, refs, labels=["off", "on", "stop", "up"])
  assert macro["precision"] == pytest.approx(sum(r["precision"] for r in out["per_class"].values()) / 4)
  assert macro["recall"] == pytest.approx(sum(r["recall"] for r in out["per_class"].values()) / 4)
  assert macro["macro_f1"] == pytest.approx(sum(r["f1"] for r in out["per_class"].values()) / 4)
  # Without labels: the reference classes, and no '<other>' column when every prediction is one.
  plain = metrics.per_class_metrics(["b", "a"], ["a", "a"])
  assert plain["labels"] == ["a", metrics.OTHER_LABEL] and plain["confusion"] == [[1, 1]]
  assert plain["per_class"] == {"a": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}}
  assert metrics.per_class_metrics(["a", "a"], ["a", "a"])["confusion"] == [[2]]
  with pytest.raises(ValueError, match=r"reference label\(s\) \['z'\] not among the labels"):
    metrics.per_class_metrics(["a"], ["z"], labels=["a"])


def test_summary_and_report_carry_the_per_class_table_and_the_figure(tmp_path):
  preds, refs = ["on", "off", "off"], ["on", "on", "off"]
  classes = metrics.per_class_metrics(preds, refs)
  result = scoring.TaskResult("classify", scoring.compute_metrics("classify", preds, refs),
                              [{"prediction": p, "reference": r} for p, r in zip(preds, refs)], 0,
                              classes=classes)
  summary = scoring.summarize([result])
  assert summary["accuracy"] == summary["classify/accuracy"] == pytest.approx(2 / 3)
  assert summary["classify/confusion"] == {"labels": ["off", "on"], "matrix": [[1, 0], [1, 1]]}
  assert summary["classify/per_class"]["on"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
  report = scoring.report_markdown(summary, "test")
  assert "| label | precision | recall | F1 | support |" in report
  assert "| off | 50.00 | 100.00 | 66.67 | 1 |" in report
  assert "| on | 100.00 | 50.00 | 66.67 | 2 |" in report
  (path,) = scoring.write_confusion_figures(str(tmp_path), "test", summary)
  assert path == str(tmp_path / "test.confusion.png")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
