"""Early stopping: a run stops `eval.patience` evaluations after its best one,
and the best checkpoint holds the weights of that evaluation's step."""

import json
import os
import sys

import numpy as np
import pytest

from speechjax.trainer.loop import EarlyStopping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402  pylint: disable=wrong-import-position


def test_stops_after_patience_evaluations_without_improvement():
  stopper = EarlyStopping("loss", "min", patience=2)
  seen = [(stopper.update({"loss": v}), stopper.should_stop) for v in (3.0, 2.0, 2.5, 2.0, 1.0, 1.5, 1.2)]
  # 2.0 again is not an improvement; the stop comes at the second evaluation after 1.0.
  assert seen == [(True, False), (True, False), (False, False), (False, True),
                  (True, False), (False, False), (False, True)]
  assert stopper.best == 1.0
  # The counters survive a restart (they travel in the checkpoint's meta).
  resumed = EarlyStopping("loss", "min", 2, stopper.state())
  assert resumed.best == 1.0 and resumed.should_stop
  maxed = EarlyStopping("accuracy", "max", patience=1)
  assert maxed.update({"accuracy": 0.5}) and not maxed.update({"accuracy": 0.4}) and maxed.should_stop
  never = EarlyStopping("loss", "min", patience=0)
  for v in (1.0, 2.0, 3.0, 4.0):
    never.update({"loss": v})
  assert not never.should_stop  # patience 0: no early stopping


@pytest.mark.slow  # trains a tiny run with evaluations: ~1 min on 2 shared cores
def test_run_stops_at_patience_and_keeps_the_best_checkpoint(tiny_corpus, tmp_path):
  from speechjax.evaluation import run_loader
  from speechjax.train import build_trainer

  data_dir, tok_dir, _ = tiny_corpus
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.model.tokenizer = tok_dir
  config.train.num_steps = 40
  config.eval.every_steps = 2
  config.eval.max_batches = 1
  config.eval.task_metrics = False
  # Lower loss counts as worse: training makes every evaluation after the first
  # one "worse" unless the loss rises, so the run must stop long before 40 steps.
  config.eval.metric = "loss"
  config.eval.mode = "max"
  config.eval.patience = 2
  config.checkpoint.every_steps = 100
  config.logging.tensorboard = False
  workdir = str(tmp_path / "run")
  summary = build_trainer(config, workdir).run()

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    dev = [r for r in map(json.loads, f) if r["split"] == "dev"]
  steps, losses = [r["step"] for r in dev], [r["loss"] for r in dev]
  best_index = int(np.argmax(losses))
  assert summary["stopped_by"] == "early_stopping"
  assert summary["best"] == pytest.approx(losses[best_index])
  # Stopped exactly `patience` evaluations after the best, and no later.
  assert len(dev) == best_index + 1 + config.eval.patience
  assert summary["final_step"] == steps[-1] < config.train.num_steps
  # The best checkpoint holds the best evaluation's step, and evaluate reads it.
  best_dir = os.path.join(workdir, "checkpoints", "best")
  assert sorted(int(d) for d in os.listdir(best_dir) if d.isdigit()) == [steps[best_index]]
  _, _, _, restored_step = run_loader.load_trained(workdir, "best")
  assert restored_step == steps[best_index]
  _, _, _, last_step = run_loader.load_trained(workdir, "last")
  assert last_step == steps[-1]
