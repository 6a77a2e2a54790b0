r"""Trains a speech LLM (or its stages: a text LM, a CTC encoder) from a config.

    python -m speechjax.train --config=configs/demo.py --workdir=runs/x \
        [--config.optim.lr=3e-4 ...]

If `--workdir` already holds a checkpoint, training resumes from it. This file
is intentionally kept short: it builds the model bundle and the data and hands
both to the loop in speechjax.trainer.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from speechjax import dry_run, run_paths, runtime

FLAGS = flags.FLAGS


def build_trainer(config, workdir: str):
  """The model bundle, the data it trains on, and the Trainer holding both."""
  import jax

  from speechjax import model_builder
  from speechjax.data import sources
  from speechjax.data.run_data import build_run_data
  from speechjax.trainer.loop import Trainer

  bundle = model_builder.build(config)
  frozen = cache_root = None
  if config.data.get("cache_encoder_states", False):
    check_encoder_frozen(config, bundle)
    frozen = model_builder.frozen_encoder(config, bundle)
    cache_root = config.data.get("encoder_cache_dir", "") or os.path.join(workdir, "encoder_cache")
  data = build_run_data(config, bundle, frozen_encoder=frozen, cache_root=cache_root)
  trainer = Trainer(config, workdir, bundle=bundle, data=data)
  if jax.process_index() == 0:  # every line the run left out, with file, line number and reason
    sources.record_skipped(workdir, data.skipped)
  return trainer


def check_encoder_frozen(config, bundle) -> None:
  """Stored encoder states are only right while the encoder does not train."""
  import flax.linen as nn

  from speechjax.trainer import partition
  from speechjax.tree import flatten

  abstract = nn.unbox(bundle.abstract_variables())
  selection = partition.trainable_patterns(config.train, bundle.num_decoder_layers)
  trainable, _ = partition.split_variables(abstract, selection)
  trained = sorted(path for path in flatten(trainable, sep="/") if path.split("/")[1] == "encoder")
  if trained:
    raise ValueError(f"data.cache_encoder_states stores the encoder's states once, but train.mode="
                     f"{config.train.mode!r} (with lora.targets {tuple(config.lora.targets)}) trains "
                     f"{len(trained)} encoder weights, e.g. {trained[0]}: use a mode that freezes the "
                     "encoder ('projector', or 'lora' with targets outside encoder/), or turn the cache off")


def define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no flags."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run folder: config, metrics, checkpoints.")
  runtime.define_distributed_flags()
  flags.DEFINE_bool("dry_run", False, "Open every split and the tokenizer, lower the step, exit (no weights).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = FLAGS.config
  runtime.setup(config, FLAGS)  # jax.distributed is up before the trainer touches devices
  if FLAGS.dry_run:
    return dry_run.print_dry_run(config)
  from speechjax.trainer.config_record import ConfigChangedError

  try:
    trainer = build_trainer(config, run_paths.expand(FLAGS.workdir))
  except ConfigChangedError as e:  # a resume that would train another experiment
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  summary = trainer.run()  # returns with every checkpoint save finished and closed
  runtime.shutdown()
  print(json.dumps(summary, default=float))


if __name__ == "__main__":
  define_flags()
  runtime.run_with_config_errors(main)
