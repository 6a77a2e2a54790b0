r"""Trains a speech LLM (or its stages: a text LM, a CTC encoder) from a config.

    python -m speechjax.train --config=configs/demo.py --workdir=runs/x \
        [--config.optim.lr=3e-4 ...]

If `--workdir` already holds a checkpoint, training resumes from it. This file
is intentionally kept short; the logic lives in speechjax.trainer.
"""

from __future__ import annotations

import json
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from speechjax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: config, metrics, checkpoints.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", 0, "Number of processes (0 = auto-detect / single).")
flags.DEFINE_integer("process_id", -1, "This process' index (-1 = auto-detect).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = _CONFIG.value
  runtime.setup(config, flags.FLAGS)
  from speechjax.trainer.loop import Trainer  # after jax.distributed is up

  summary = Trainer(config, _WORKDIR.value).run()
  print(json.dumps(summary, default=float))


if __name__ == "__main__":
  runtime.run_with_config_errors(main)
