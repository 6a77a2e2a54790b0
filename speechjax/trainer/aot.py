"""Lowering a config's train step on abstract shapes: no weights allocated.

`lower_train_step(config)` builds the model from its config sections (not
from pretrained folders), derives every array's shape and sharding with
`jax.eval_shape`, and lowers the sharded, donated train step for the largest
batch shape the data config allows. A recipe for a 7B model is checked this
way on a CPU in seconds, so a recipe that no longer compiles fails CI.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax import model_builder, parallel
from speechjax.data import pipeline
from speechjax.trainer import optim, partition
from speechjax.trainer import step as step_lib


def _with_sharding(tree, shardings):
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(config, bundle, mesh, rules) -> dict:
  b = int(config.data.batch_size)
  if bundle.kind == "lm":
    t = max(int(x) for x in config.data.token_buckets)
    shapes = {"input_ids": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.int32),
              "targets": ((b, t), jnp.int32), "target_mask": ((b, t), jnp.float32),
              "example_mask": ((b,), jnp.float32)}
  else:
    samples = max(pipeline.bucket_sizes_samples(config.data))
    frames = samples // pipeline.hop_length(config.data)
    t = max(int(x) for x in config.data.token_buckets)
    n_mels = int(config.data.n_mels)
    shapes = {"features": ((b, n_mels, frames), jnp.float32), "feature_mask": ((b, frames), jnp.int32),
              "input_ids": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.int32),
              "targets": ((b, t), jnp.int32), "target_mask": ((b, t), jnp.float32),
              "class_labels": ((b,), jnp.int32), "audio_seconds": ((b,), jnp.float32),
              "example_mask": ((b,), jnp.float32)}
    if bundle.kind == "ctc":
      shapes.update(ctc_labels=((b, 128), jnp.int32), ctc_label_mask=((b, 128), jnp.int32))
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, rules, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def lower_train_step(config, mesh=None):
  """-> (jax.stages.Lowered, info dict with parameter counts)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.encoder_pretrained = ""
    config.model.decoder_pretrained = ""
    config.model.tokenizer = ""
  bundle = model_builder.build(config)
  mesh = mesh or parallel.mesh_from_config(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  boxed = jax.eval_shape(bundle.init_fn, jax.random.PRNGKey(0))
  variables = _with_sharding(nn.unbox(boxed), parallel.logical_shardings(boxed, mesh, rules))
  trainable, frozen = partition.split_variables(
      variables, partition.trainable_patterns(config.train, bundle.num_decoder_layers))
  frozen_dtype = jnp.dtype(config.model.frozen_dtype)
  frozen = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                     sharding=x.sharding), frozen)
  trainable = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), trainable)
  optimizer, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  trainable_shardings = jax.tree_util.tree_map(lambda x: x.sharding, trainable)
  opt_state = jax.eval_shape(optimizer.init, trainable)
  opt_shardings = parallel.shardings_like(opt_state, parallel.path_shardings(trainable_shardings), mesh)
  repl = parallel.replicated(mesh)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=repl)
  state = {"step": scalar(jnp.int32), "trainable": trainable,
           "opt_state": _with_sharding(opt_state, opt_shardings),
           "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl),
           "skipped": scalar(jnp.int32), "bad_in_a_row": scalar(jnp.int32)}
  train_step = step_lib.make_train_step(bundle.objective, optimizer, schedule, config.train)
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
  jitted = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, None),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = jitted.lower(state, frozen, abstract_batch(config, bundle, mesh, rules))
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
  return lowered, {"trainable_params": count(trainable), "frozen_params": count(frozen)}
