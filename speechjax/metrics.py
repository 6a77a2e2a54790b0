"""Corpus-level evaluation metrics: WER/CER, BLEU/chrF, accuracy/F1.

Conventions (these are what `evaluate` writes to W/eval/<name>.json):

* WER and CER are fractions (0.25 = 25 %), computed at corpus level with
  jiwer: (substitutions + deletions + insertions) / reference words (or
  characters, spaces included) summed over the corpus — not an average of
  per-utterance rates. Both sides are normalized first (see
  `speechjax.text_normalizer`; Whisper's English normalizer by default), so
  "Hello, World!" and "hello world" match. A reference that normalizes to ""
  adds its hypothesis words as insertions; if the whole corpus has no reference
  words, the rate is the insertion count (jiwer's convention).
* BLEU and chrF are on sacrebleu's 0-100 scale (corpus_bleu with the default
  13a tokenizer, corpus_chrf with default settings), on the raw text.
* Classification: labels are compared as stripped, lowercased strings.
  accuracy is a fraction; precision, recall and macro_f1 are macro averages
  over the classes that occur in the references (a prediction outside that
  set is simply wrong), with zero_division=0.
"""

from __future__ import annotations

from typing import Sequence

import jiwer
import sacrebleu
from sklearn import metrics as sk_metrics

from speechjax import text_normalizer

TASKS = ("asr", "translate", "classify", "instruct")


def _check_pairs(predictions: Sequence, references: Sequence, what: str):
  if len(predictions) != len(references):
    raise ValueError(f"speechjax.metrics.{what}: {len(predictions)} predictions "
                     f"but {len(references)} references")
  if not references:
    raise ValueError(f"speechjax.metrics.{what}: no examples to score")


def error_rates(predictions: Sequence[str], references: Sequence[str], *,
                unit: str = "word", normalizer: str = "english") -> dict[str, float]:
  """Corpus-level edit counts and error rate over words or characters.

  Returns {'rate', 'substitutions', 'deletions', 'insertions', 'hits',
  'num_reference'} (all floats).
  """
  _check_pairs(predictions, references, "error_rates")
  hyps = [text_normalizer.normalize(p, normalizer) for p in predictions]
  refs = [text_normalizer.normalize(r, normalizer) for r in references]
  if unit == "word":
    out = jiwer.process_words(refs, hyps)
  elif unit == "char":
    out = jiwer.process_characters(refs, hyps)
  else:
    raise ValueError(f"speechjax.metrics.error_rates: unit must be 'word' or 'char', got {unit!r}")
  num_ref = out.substitutions + out.deletions + out.hits
  edits = out.substitutions + out.deletions + out.insertions
  return {
      "rate": float(edits / max(num_ref, 1)),
      "substitutions": float(out.substitutions),
      "deletions": float(out.deletions),
      "insertions": float(out.insertions),
      "hits": float(out.hits),
      "num_reference": float(num_ref),
  }


def wer(predictions: Sequence[str], references: Sequence[str], *,
        normalizer: str = "english") -> float:
  """Corpus word error rate as a fraction."""
  return error_rates(predictions, references, unit="word", normalizer=normalizer)["rate"]


def cer(predictions: Sequence[str], references: Sequence[str], *,
        normalizer: str = "english") -> float:
  """Corpus character error rate as a fraction (spaces count as characters)."""
  return error_rates(predictions, references, unit="char", normalizer=normalizer)["rate"]


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
  """sacrebleu corpus BLEU (0-100), one reference per prediction."""
  _check_pairs(predictions, references, "bleu")
  return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
  """sacrebleu corpus chrF (0-100), one reference per prediction."""
  _check_pairs(predictions, references, "chrf")
  return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def _label(x) -> str:
  return str(x).strip().lower()


def classification_metrics(predictions: Sequence, references: Sequence, *,
                           labels: Sequence | None = None) -> dict[str, float]:
  """accuracy, macro precision / recall / F1 over `labels` (default: the reference classes)."""
  _check_pairs(predictions, references, "classification_metrics")
  y_pred = [_label(p) for p in predictions]
  y_true = [_label(r) for r in references]
  classes = sorted({_label(c) for c in labels} if labels is not None else set(y_true))
  precision, recall, f1, _ = sk_metrics.precision_recall_fscore_support(
      y_true, y_pred, labels=classes, average="macro", zero_division=0)
  return {
      "accuracy": float(sk_metrics.accuracy_score(y_true, y_pred)),
      "macro_f1": float(f1),
      "precision": float(precision),
      "recall": float(recall),
  }


def compute_metrics(task: str, predictions: Sequence, references: Sequence, *,
                    normalizer: str = "english",
                    labels: Sequence | None = None) -> dict[str, float]:
  """The metrics `evaluate` reports for `task`, as plain floats.

  'asr'       -> wer, cer, substitutions, deletions, insertions, num_reference_words
  'translate' -> bleu, chrf
  'classify'  -> accuracy, macro_f1, precision, recall
  'instruct'  -> wer, cer (normalized) and bleu, chrf (raw): free-form answers
                 are scored both as transcripts and as generated text.
  `normalizer` ('english' | 'basic' | 'none') applies to WER/CER only.
  """
  if task in ("asr", "instruct"):
    words = error_rates(predictions, references, unit="word", normalizer=normalizer)
    out = {"wer": words["rate"],
           "cer": error_rates(predictions, references, unit="char",
                              normalizer=normalizer)["rate"]}
    if task == "asr":
      out.update(substitutions=words["substitutions"], deletions=words["deletions"],
                 insertions=words["insertions"], num_reference_words=words["num_reference"])
    else:
      out.update(bleu=bleu(predictions, references), chrf=chrf(predictions, references))
    return out
  if task == "translate":
    return {"bleu": bleu(predictions, references), "chrf": chrf(predictions, references)}
  if task == "classify":
    return classification_metrics(predictions, references, labels=labels)
  raise ValueError(f"speechjax.metrics.compute_metrics: unknown task {task!r}; expected one of {TASKS}")
