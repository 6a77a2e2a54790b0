"""Text classification batches (`model.kind='text_classifier'`, a BERT-style
encoder with a classification head): each example's `text` tokenized as
[CLS] text [SEP] — the tokenizer's bos / eos tokens when it has no cls / sep —
and its `label` as an index into the training split's label names.

    train, dev_batches = text_classifier_batches(config, tokenizer, label_names)
    batch = next(train)  # input_ids [B, T], attention_mask [B, T], class_labels [B], example_mask [B]

`classify_texts` runs a trained classifier on any list of strings, e.g. ASR
transcripts for a cascade baseline (speech -> transcript -> label).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from speechjax.data import batching, sources, text_lm
from speechjax.data import tasks as tasks_lib


def special_ids(tokenizer) -> tuple[int | None, int | None, int]:
  """(first, last, pad) ids around a text: [CLS]/[SEP] or the BOS/EOS tokens."""
  first = getattr(tokenizer, "cls_token_id", None)
  if first is None:
    first = getattr(tokenizer, "bos_token_id", None)
  last = getattr(tokenizer, "sep_token_id", None)
  if last is None:
    last = getattr(tokenizer, "eos_token_id", None)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (last or 0)
  return first, last, int(pad)


def text_ids(tokenizer, text: str, max_length: int) -> np.ndarray:
  first, last, _ = special_ids(tokenizer)
  body = tokenizer.encode(str(text).strip(), add_special_tokens=False)
  ids = ([first] if first is not None else []) + body
  ids = ids[:max_length - (last is not None)] + ([last] if last is not None else [])
  return np.asarray(ids, np.int32)


def labelled_examples(records: Iterable[dict], tokenizer, label_names: Sequence[str],
                      max_length: int) -> list[tuple[np.ndarray, int]]:
  """(token ids, label index) of the records with a text and a label; a label
  the training split does not name gets index -1 (scored as wrong, never trained on)."""
  index = {name: i for i, name in enumerate(label_names)}
  out = []
  for record in records:
    text, label = tasks_lib.as_text(record.get("text")).strip(), tasks_lib.as_text(record.get("label")).strip()
    if text and label:
      out.append((text_ids(tokenizer, text, max_length), index.get(label, -1)))
  return out


def classification_batch(items: Sequence[tuple[np.ndarray, int]], buckets: Sequence[int], pad_id: int,
                         example_mask: np.ndarray | None = None) -> dict:
  """Right-padded ids in the smallest fitting token bucket, with labels and masks."""
  longest = max(len(ids) for ids, _ in items)
  length = batching.smallest_fitting(longest, buckets) or max(buckets)
  ids = np.full((len(items), length), pad_id, np.int32)
  mask = np.zeros((len(items), length), np.int32)
  for row, (seq, _) in enumerate(items):
    seq = seq[:length]
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = 1
  return {"input_ids": ids, "attention_mask": mask,
          "class_labels": np.asarray([label for _, label in items], np.int32),
          "example_mask": np.ones(len(items), np.float32) if example_mask is None else example_mask}


def _fixed_batches(items, batch_size: int, buckets, pad_id: int, max_batches: int = 0):
  """Ordered batches of `items`, the last one padded (example_mask 0)."""
  n = -(-len(items) // batch_size)
  if max_batches:
    n = min(n, max_batches)
  for k in range(n):
    chunk = list(items[k * batch_size:(k + 1) * batch_size])
    mask = np.zeros(batch_size, np.float32)
    mask[:len(chunk)] = 1
    chunk += [chunk[-1]] * (batch_size - len(chunk))
    yield classification_batch(chunk, buckets, pad_id, mask)


def text_classifier_batches(config, tokenizer, label_names: Sequence[str]
                            ) -> tuple[text_lm.CheckpointableIterator, Callable[[int], Iterable[dict]]]:
  """(endless shuffled train batches, max_batches -> dev batches) for a
  text_classifier run on the configured dataset's `text` and `label` fields."""
  if tokenizer is None:
    raise ValueError("model.kind='text_classifier' needs model.tokenizer (an HF tokenizer folder)")
  data_cfg = config.data
  buckets = tuple(sorted(int(t) for t in data_cfg.token_buckets))
  train_source, _ = sources.open_source(data_cfg, data_cfg.train_split)
  dev_source, _ = sources.open_source(data_cfg, data_cfg.eval_split, label_names)
  train = labelled_examples(text_lm.text_records(train_source), tokenizer, label_names, max(buckets))
  dev = labelled_examples(text_lm.text_records(dev_source), tokenizer, label_names, max(buckets))
  if not train or not dev:
    raise ValueError(f"no examples with 'text' and 'label' in the {'train' if not train else 'dev'} split of "
                     f"{data_cfg.data_dir} (model.kind='text_classifier' reads both fields)")
  pad = special_ids(tokenizer)[2]
  rows = text_lm.host_rows(data_cfg)
  train_batches = text_lm.shuffled_batches(train, data_cfg, lambda items: classification_batch(items, buckets, pad))

  def dev_batches(max_batches: int):
    for batch in _fixed_batches(dev, int(data_cfg.batch_size), buckets, pad, max_batches):
      yield batching.take_rows(batch, rows)

  return train_batches, dev_batches


def classify_texts(apply_logits: Callable[[np.ndarray, np.ndarray], np.ndarray], tokenizer,
                   texts: Sequence[str], label_names: Sequence[str], *, batch_size: int = 64,
                   buckets: Sequence[int] = (64,)) -> list[str]:
  """The label a text classifier gives each text (an empty text gets the
  classifier's answer for [CLS] [SEP]). apply_logits(input_ids, attention_mask) -> [B, labels]."""
  if not texts:
    return []
  pad = special_ids(tokenizer)[2]
  items = [(text_ids(tokenizer, t, max(buckets)), -1) for t in texts]
  out = []
  for batch in _fixed_batches(items, batch_size, tuple(sorted(buckets)), pad):
    logits = np.asarray(apply_logits(batch["input_ids"], batch["attention_mask"]))
    valid = int(batch["example_mask"].sum())
    out += [label_names[int(i)] for i in np.argmax(logits[:valid], -1)]
  return out
