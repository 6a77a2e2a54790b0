"""A trained run folder -> a model ready to decode.

The frozen weights are rebuilt exactly as training built them (same config,
same seed, same pretrained folders, found again when the run folder was
moved) and the trained weights are read from the
best checkpoint (or the latest when no evaluation picked a best one).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from speechjax import model_builder, parallel, run_paths
from speechjax.trainer import checkpoint as ckpt_lib
from speechjax.trainer import partition

log = logging.getLogger(__name__)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config, its paths pointed at what they name from where the run
  folder is now (`speechjax.run_paths.resolve`)."""
  workdir = run_paths.expand(workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a speechjax training folder?")
  with open(path) as f:
    values = json.load(f)
  rules = values.get("mesh", {}).get("rules")
  if rules is not None:  # JSON made the (name, axes) pairs lists
    values["mesh"]["rules"] = tuple((r[0], tuple(r[1]) if isinstance(r[1], list) else r[1]) for r in rules)
  config = ml_collections.ConfigDict(values)
  run_paths.resolve(config, workdir)
  return config


def load_trained(workdir: str, which: str = "best", *, config=None):
  """-> (config, bundle, variables {'params', 'lora'?}, step)."""
  workdir = run_paths.expand(workdir)
  config = config or load_config(workdir)
  bundle = model_builder.build(config)
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  variables, _ = bundle.init_variables(rng, mesh, parallel.DEFAULT_RULES)
  patterns = partition.trainable_patterns(config.train, bundle.num_decoder_layers)
  trainable, frozen = partition.split_variables(variables, patterns)
  trainable, meta, step = ckpt_lib.restore_trainable(workdir, trainable, which)
  log.info("loaded %s checkpoint of %s at step %d", which, workdir, step)
  return config, bundle, partition.join_variables(trainable, frozen), step
