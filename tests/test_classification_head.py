"""The classification-head path end to end: a tiny speech LLM trained with
`train.cls_loss_weight > 0` on the `classify` task, the head's weights moving
and its loss falling, then `evaluate_run` reading labels off the head
(`eval.classify_with='head'`) and writing accuracy, macro-F1, per-class
figures, a report table and a confusion-matrix PNG into the run folder."""

from __future__ import annotations

import json
import os
import struct
import sys

import jax
import numpy as np

from speechjax.evaluation import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _head_config(tiny_corpus):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny  # pylint: disable=import-outside-toplevel

  from speechjax.data import sources

  data_dir, tok_dir, _ = tiny_corpus
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.model.tokenizer = tok_dir
  config.data.tasks = ("classify",)
  config.data.task_weights = (1.0,)
  _, train_info = sources.open_source(config.data, config.data.train_split)
  config.model.num_classes = len(train_info.label_names)  # one logit per label the data names
  config.train.cls_loss_weight = 1.0
  config.train.lm_loss_weight = 0.0  # every update goes to the head
  config.train.num_steps = 48
  config.optim.update(lr=3e-3, warmup_steps=1)
  config.checkpoint.every_steps = 48
  config.checkpoint.async_save = False
  config.logging.tensorboard = False
  config.eval.classify_with = "head"
  return config, train_info.label_names


def _classifier_kernel(trainer) -> np.ndarray:
  params = trainer.state["trainable"]
  leaves = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  (kernel,) = [v for k, v in leaves.items() if "classifier" in k and "kernel" in k]
  return np.asarray(jax.device_get(kernel), np.float32)


def test_head_trains_and_evaluates_with_per_class_figures_and_a_confusion_png(tmp_path, tiny_corpus):
  from speechjax.evaluate import evaluate_run
  from speechjax.train import build_trainer

  config, label_names = _head_config(tiny_corpus)
  assert len(label_names) >= 2
  workdir = str(tmp_path / "run")
  trainer = build_trainer(config, workdir)
  before = _classifier_kernel(trainer)
  trainer.run()
  after = _classifier_kernel(trainer)
  assert before.shape[-1] == len(label_names)
  assert np.abs(after - before).max() > 1e-3  # the head trained

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  cls_losses = [r["cls_loss"] for r in rows if r.get("split") == "train" and "cls_loss" in r]
  assert len(cls_losses) == config.train.num_steps and all(np.isfinite(cls_losses))
  # Each step's loss is of a different batch: compare the first and last eight.
  assert np.mean(cls_losses[-8:]) < np.mean(cls_losses[:8]) - 0.03

  summary = evaluate_run(workdir, split="test", max_examples=8, progress=False)  # one eval batch
  eval_dir = os.path.join(workdir, "eval")
  with open(os.path.join(eval_dir, "test.predictions.jsonl")) as f:
    predictions = [json.loads(line) for line in f]
  assert len(predictions) == summary["classify/num_examples"] > 0
  assert all(p["prediction"] in label_names for p in predictions)  # read off the head: a label name
  preds = [p["prediction"] for p in predictions]
  refs = [p["reference"] for p in predictions]
  accuracy = sum(p == r for p, r in zip(preds, refs)) / len(refs)
  f1s = []
  for c in sorted(set(refs)):
    hits = sum(p == r == c for p, r in zip(preds, refs))
    predicted, support = preds.count(c), refs.count(c)
    precision = hits / predicted if predicted else 0.0
    recall = hits / support
    f1s.append(2 * precision * recall / (precision + recall) if hits else 0.0)
  assert summary["accuracy"] == summary["classify/accuracy"]
  assert abs(summary["classify/accuracy"] - accuracy) < 1e-12
  assert abs(summary["classify/macro_f1"] - sum(f1s) / len(f1s)) < 1e-12

  with open(os.path.join(eval_dir, "test.json")) as f:
    written = json.load(f)
  per_class = written["classify/per_class"]
  assert sorted(per_class) == sorted(label_names)
  for label, row in per_class.items():
    assert set(row) == {"precision", "recall", "f1", "support"}
    assert row["support"] == refs.count(label)
  confusion = written["classify/confusion"]
  assert confusion["labels"][:len(label_names)] == sorted(label_names)
  matrix = np.asarray(confusion["matrix"])
  assert matrix.sum() == len(predictions) and np.trace(matrix) == round(accuracy * len(predictions))
  with open(os.path.join(eval_dir, "test.report.md")) as f:
    report = f.read()
  assert "| label | precision | recall | F1 | support |" in report
  assert all(f"| {label} |" in report for label in label_names)

  png = os.path.join(eval_dir, "test.confusion.png")
  with open(png, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
  width, height = struct.unpack(">II", head[16:24])
  assert 200 <= width <= 4000 and 200 <= height <= 4000
  assert os.path.getsize(png) > 2000
  assert metrics.OTHER_LABEL not in per_class
