"""Corpus-level evaluation metrics: WER/CER, BLEU/chrF, accuracy/F1.

Each registered task (`speechjax.data.tasks`) names one of the per-task
functions at the bottom as its metric; `speechjax.evaluation.scoring.
compute_metrics(task, predictions, references)` looks the task up and calls it.

Conventions (these are what `evaluate` writes to W/eval/<name>.json):

* WER and CER are fractions (0.25 = 25 %), computed at corpus level with
  jiwer: (substitutions + deletions + insertions) / reference words (or
  characters, spaces included) summed over the corpus — not an average of
  per-utterance rates. Both sides are normalized first (see
  `speechjax.evaluation.normalizer`; Whisper's English normalizer by default), so
  "Hello, World!" and "hello world" match. A reference that normalizes to ""
  adds its hypothesis words as insertions; if the whole corpus has no reference
  words, the rate is the insertion count (jiwer's convention).
* BLEU and chrF are on sacrebleu's 0-100 scale (corpus_bleu with the default
  13a tokenizer, corpus_chrf with default settings), on the raw text;
  `sacrebleu_signatures()` gives the signature strings a paper quotes with them.
* Classification: labels are compared as stripped, lowercased strings.
  accuracy is a fraction; precision, recall and macro_f1 are macro averages
  over the classes that occur in the references (a prediction outside that
  set is simply wrong), with zero_division=0. `per_class_metrics` gives the
  per-class precision / recall / F1 / support and the confusion matrix.
* Summaries: ROUGE-1 / ROUGE-2 / ROUGE-L F-measures (rouge-score, Porter
  stemming) on a 0-100 scale, averaged over the examples.
* Short answers (spoken QA): exact_match and token f1 as SQuAD's scorer
  computes them (lowercased, punctuation and articles removed), fractions
  averaged over the examples.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import re
import string
from typing import Any

import jiwer
import sacrebleu

from speechjax.evaluation import normalizer as normalizer_lib

DEFAULT_NORMALIZER = "english"  # what WER / CER are computed after, unless a caller says otherwise
OTHER_LABEL = "<other>"  # the confusion-matrix column of predictions outside the label set


def _check_pairs(predictions: Sequence, references: Sequence, what: str):
  if len(predictions) != len(references):
    raise ValueError(f"speechjax.evaluation.metrics.{what}: {len(predictions)} predictions "
                     f"but {len(references)} references")
  if not references:
    raise ValueError(f"speechjax.evaluation.metrics.{what}: no examples to score")


def error_rates(predictions: Sequence[str], references: Sequence[str], *,
                unit: str = "word", normalizer: str = "english") -> dict[str, float]:
  """Corpus-level edit counts and error rate over words or characters.

  Returns {'rate', 'substitutions', 'deletions', 'insertions', 'hits',
  'num_reference'} (all floats).
  """
  _check_pairs(predictions, references, "error_rates")
  hyps = [normalizer_lib.normalize(p, normalizer) for p in predictions]
  refs = [normalizer_lib.normalize(r, normalizer) for r in references]
  if unit == "word":
    out = jiwer.process_words(refs, hyps)
  elif unit == "char":
    out = jiwer.process_characters(refs, hyps)
  else:
    raise ValueError(f"speechjax.evaluation.metrics.error_rates: unit must be 'word' or 'char', got {unit!r}")
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


def sacrebleu_signatures() -> dict[str, str]:
  """{'bleu': ..., 'chrf': ...}: sacrebleu's signatures of the settings `bleu` and
  `chrf` use (one reference per prediction), e.g.
  'nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0'."""
  out = {}
  for name, metric in (("bleu", sacrebleu.BLEU()), ("chrf", sacrebleu.CHRF())):
    metric.corpus_score(["a"], [["a"]])  # a signature names the reference count once scored
    out[name] = str(metric.get_signature())
  return out


def _label(x) -> str:
  return str(x).strip().lower()


def _label_set(y_true, labels) -> list[str]:
  return sorted({_label(c) for c in labels} if labels is not None else set(y_true))


def classification_metrics(predictions: Sequence, references: Sequence, *,
                           labels: Sequence | None = None) -> dict[str, float]:
  """accuracy, macro precision / recall / F1 over `labels` (default: the reference classes)."""
  # Imported here: the task registry imports this module, and sklearn takes
  # about two seconds to import, which every data-pipeline user would pay.
  from sklearn import metrics as sk_metrics

  _check_pairs(predictions, references, "classification_metrics")
  y_pred = [_label(p) for p in predictions]
  y_true = [_label(r) for r in references]
  classes = _label_set(y_true, labels)
  precision, recall, f1, _ = sk_metrics.precision_recall_fscore_support(
      y_true, y_pred, labels=classes, average="macro", zero_division=0)
  return {
      "accuracy": float(sk_metrics.accuracy_score(y_true, y_pred)),
      "macro_f1": float(f1),
      "precision": float(precision),
      "recall": float(recall),
  }


def per_class_metrics(predictions: Sequence, references: Sequence, *,
                      labels: Sequence | None = None) -> dict[str, Any]:
  """Per-class figures and the confusion matrix, labels compared as in
  `classification_metrics`.

  Returns {'labels': [class, ...] (sorted; `labels` or the reference classes,
  plus one '<other>' column when some prediction is none of them),
  'per_class': {class: {'precision', 'recall', 'f1', 'support'}} for the
  classes (not '<other>'), 'confusion': rows = reference class, columns =
  predicted class (same order as 'labels'), integer counts}. Precision of a
  class never predicted is 0 (zero_division=0), as in the macro figures.
  """
  _check_pairs(predictions, references, "per_class_metrics")
  y_pred = [_label(p) for p in predictions]
  y_true = [_label(r) for r in references]
  classes = _label_set(y_true, labels)
  unknown_refs = sorted(set(y_true) - set(classes))
  if unknown_refs:
    raise ValueError(f"speechjax.evaluation.metrics.per_class_metrics: reference label(s) {unknown_refs} "
                     f"not among the labels {classes}")
  columns = list(classes) + ([OTHER_LABEL] if set(y_pred) - set(classes) else [])
  index = {c: i for i, c in enumerate(columns)}
  confusion = [[0] * len(columns) for _ in classes]
  for truth, guess in zip(y_true, y_pred):
    confusion[index[truth]][index.get(guess, len(columns) - 1)] += 1
  per_class = {}
  for i, c in enumerate(classes):
    hits = confusion[i][i]
    predicted = sum(row[i] for row in confusion)
    support = sum(confusion[i])
    precision = hits / predicted if predicted else 0.0
    recall = hits / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    per_class[c] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                    "support": int(support)}
  return {"labels": columns, "per_class": per_class, "confusion": confusion}


# Per-task metrics, (predictions, references, **options) -> {name: float}; the
# classify task's is `classification_metrics` above.


def transcript_metrics(predictions: Sequence[str], references: Sequence[str], *,
                       normalizer: str = "english") -> dict[str, float]:
  """ASR: wer, cer, substitutions, deletions, insertions, num_reference_words.
  `normalizer` ('english' | 'basic' | 'none') is applied to both sides first."""
  words = error_rates(predictions, references, unit="word", normalizer=normalizer)
  return {"wer": words["rate"],
          "cer": error_rates(predictions, references, unit="char", normalizer=normalizer)["rate"],
          "substitutions": words["substitutions"], "deletions": words["deletions"],
          "insertions": words["insertions"], "num_reference_words": words["num_reference"]}


def translation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Speech translation: bleu, chrf (sacrebleu, 0-100, raw text)."""
  return {"bleu": bleu(predictions, references), "chrf": chrf(predictions, references)}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def qa_words(text: str) -> list[str]:
  """An answer as SQuAD's scorer compares it: lowercased, without punctuation
  and the articles a / an / the, split on whitespace."""
  return _ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION)).split()


def qa_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Short answers (spoken QA): exact_match and f1, fractions averaged over the
  examples, each answer normalized by `qa_words`. f1 is the harmonic mean of
  the precision and recall of the words the two share (as a multiset); when
  either side has no words, f1 is 1 if both have none, else 0."""
  _check_pairs(predictions, references, "qa_metrics")
  exact, f1 = [], []
  for prediction, reference in zip(predictions, references):
    pred, ref = qa_words(prediction), qa_words(reference)
    exact.append(float(pred == ref))
    if not pred or not ref:
      f1.append(float(pred == ref))
      continue
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    precision, recall = common / len(pred), common / len(ref)
    f1.append(2 * precision * recall / (precision + recall) if common else 0.0)
  return {"exact_match": sum(exact) / len(exact), "f1": sum(f1) / len(f1)}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def summary_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Summaries: rouge1, rouge2 and rougeL F-measures on a 0-100 scale,
  averaged over the examples (Google's rouge-score: lowercased, alphanumeric
  tokens, Porter stemming), as summarization papers report them."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top

  _check_pairs(predictions, references, "summary_metrics")
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for prediction, reference in zip(predictions, references):
    scores = scorer.score(str(reference), str(prediction))  # (target, prediction)
    for name in ROUGE_TYPES:
      totals[name] += scores[name].fmeasure
  return {name: 100.0 * total / len(references) for name, total in totals.items()}


def free_form_metrics(predictions: Sequence[str], references: Sequence[str], *,
                      normalizer: str = "english") -> dict[str, float]:
  """Free-form answers, scored both as transcripts and as generated text:
  wer, cer (normalized) and bleu, chrf (raw)."""
  return {"wer": wer(predictions, references, normalizer=normalizer),
          "cer": cer(predictions, references, normalizer=normalizer),
          "bleu": bleu(predictions, references), "chrf": chrf(predictions, references)}
