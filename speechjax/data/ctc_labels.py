"""Transcripts -> CTC label ids, for pretraining an audio encoder with a CTC head.

Label 0 is the blank in every vocabulary, so real labels start at 1. Two
vocabularies exist, chosen by `model.ctc_vocab` (the same key the model side
sizes its CTC head from):

  * characters: `model.ctc_vocab` lists them ("_ abc..." style), label = index + 1;
  * the LLM tokenizer's ids (`model.ctc_vocab` empty): label = token id + 1,
    exactly the tokens of the ASR answer, which is what a 'ctc_compress'
    projector hands to the LLM and what a text-pretrained LM saw in its slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from speechjax.data import prompts as prompts_lib

LabelEncoder = Callable[[str], list[int]]


def encode_characters(text: str, vocab: str) -> list[int]:
  """Characters -> label ids (1-based). Characters outside the vocabulary are
  dropped, after lower-casing."""
  index = {c: i + 1 for i, c in enumerate(vocab)}
  return [index[c] for c in text.lower() if c in index]


def label_encoder(ctc_vocab: str, prompts: prompts_lib.PromptBuilder | None) -> LabelEncoder:
  """text -> label ids: over `ctc_vocab`'s characters, or, with `ctc_vocab`
  empty, over the tokenizer ids of the ASR answer `prompts` writes."""
  if ctc_vocab:
    return lambda text: encode_characters(text, ctc_vocab)
  if prompts is None:
    raise ValueError("CTC labels over tokenizer ids need model.tokenizer (or set model.ctc_vocab "
                     "to the characters the CTC head predicts)")
  return lambda text: [i + 1 for i in prompts.transcript_ids({"text": text})] if text else []


def add_ctc_labels(batch: dict, texts: Sequence[str], encode: LabelEncoder, max_length: int) -> dict:
  """Adds `ctc_labels` / `ctc_label_mask` [rows, max_length] (int32) for each
  row's transcript; labels past `max_length` are cut, empty texts (padding
  rows) get no label."""
  labels = np.zeros((len(texts), max_length), np.int32)
  label_mask = np.zeros((len(texts), max_length), np.int32)
  for row, text in enumerate(texts):
    ids = encode(text)[:max_length]
    labels[row, :len(ids)] = ids
    label_mask[row, :len(ids)] = 1
  batch["ctc_labels"], batch["ctc_label_mask"] = labels, label_mask
  return batch
