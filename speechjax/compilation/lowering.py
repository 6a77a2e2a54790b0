"""Lowering a config's train step on abstract shapes: no weights allocated.

`lower_train_step(config)` builds the model from its config sections (not
from pretrained folders), derives every array's shape and sharding with
`jax.eval_shape`, and lowers the sharded, donated train step for the largest
batch shape the data config allows. A recipe for a 7B model is checked this
way on a CPU in seconds, so a recipe that no longer compiles fails CI; the
same lowering, on the devices of a TPU topology, is what `speechjax.compile`
compiles to report per-chip memory and FLOPs.
"""

from __future__ import annotations

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax import model_builder, parallel
from speechjax.data import batching
from speechjax.trainer import optim, partition
from speechjax.trainer import step as step_lib

CTC_LABEL_LENGTH = 128


def _with_sharding(tree, shardings):
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _encoder_config(bundle):
  """The encoder's config (speech_llm and ctc kinds), which declares its input
  kind and output length (the encoder contract, speechjax/models/encoders/base.py)."""
  encoder = getattr(bundle.model_config, "encoder", None)
  missing = [name for name in ("audio_input", "output_length") if not hasattr(encoder, name)]
  if missing:
    raise TypeError(f"model.kind={bundle.kind!r}: the encoder config {type(encoder).__name__} lacks "
                    f"{missing} of the audio-encoder contract (speechjax/models/encoders/base.py)")
  return encoder


def batch_geometry(config, bundle) -> dict:
  """The largest batch the data config makes, in the units each part of the
  model sees: rows, audio samples and seconds, encoder inputs (mel frames or
  wave samples) and outputs, the LLM's audio slots, and its sequence length
  (audio slots included: the prompt holds one placeholder per audio token)."""
  rows = int(config.data.batch_size)
  tokens = max(int(x) for x in config.data.token_buckets)
  geometry = {"batch_size": rows, "tokens": tokens, "audio_samples": 0, "audio_seconds": 0.0,
              "input_kind": "", "encoder_inputs": 0, "encoder_tokens": 0, "audio_tokens": 0}
  if bundle.kind == "lm":
    return geometry
  samples = max(batching.bucket_sizes_samples(config.data))
  encoder = _encoder_config(bundle)
  audio_input = encoder.audio_input()
  inputs = samples // batching.hop_length(config.data) if audio_input.kind == "mel" else samples
  geometry.update(audio_samples=samples, audio_seconds=samples / audio_input.sample_rate,
                  input_kind=audio_input.kind, n_mels=int(audio_input.n_mels), encoder_inputs=inputs,
                  encoder_tokens=int(encoder.output_length(inputs)))
  if bundle.kind == "speech_llm":
    geometry["audio_tokens"] = int(bundle.num_audio_tokens(inputs))
  return geometry


def abstract_batch(config, bundle, mesh, rules) -> dict:
  g = batch_geometry(config, bundle)
  b, t = g["batch_size"], g["tokens"]
  shapes = {"input_ids": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.int32),
            "targets": ((b, t), jnp.int32), "target_mask": ((b, t), jnp.float32),
            "example_mask": ((b,), jnp.float32)}
  if bundle.kind != "lm":
    n = g["encoder_inputs"]
    features = (b, g["n_mels"], n) if g["input_kind"] == "mel" else (b, n)
    shapes.update(features=(features, jnp.float32), feature_mask=((b, n), jnp.int32),
                  class_labels=((b,), jnp.int32), audio_seconds=((b,), jnp.float32))
    if bundle.kind == "ctc":
      shapes.update(ctc_labels=((b, CTC_LABEL_LENGTH), jnp.int32),
                    ctc_label_mask=((b, CTC_LABEL_LENGTH), jnp.int32))
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, rules, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def _check_batch_divides(config, mesh, rules) -> None:
  shards = parallel.num_batch_shards(mesh, rules)
  rows = int(config.data.batch_size)
  if rows % shards:
    raise ValueError(f"data.batch_size={rows} is not a multiple of the data-parallel size {shards} "
                     f"(mesh {dict(mesh.shape)}, batch over {dict(rules).get('batch')}); "
                     f"use a multiple of {shards}")


def parameter_sizes(trainable, frozen) -> dict[str, tuple[int, bool]]:
  """'/'-joined path (collection first: 'params/decoder/...', 'lora/...') ->
  (number of elements, trainable?)."""
  sizes = {}
  for tree, trains in ((trainable, True), (frozen, False)):
    for path, leaf in traverse_util.flatten_dict(tree, sep="/").items():
      sizes[path] = (int(np.prod(leaf.shape)), trains)
  return sizes


def lower_train_step(config, mesh=None):
  """-> (jax.stages.Lowered, info): info holds the parameter counts
  ("trainable_params", "frozen_params", "parameter_sizes" per path), the batch
  geometry ("geometry", see batch_geometry) and "model_kind"."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.encoder_pretrained = ""
    config.model.decoder_pretrained = ""
    config.model.tokenizer = ""
  bundle = model_builder.build(config)
  mesh = mesh or parallel.mesh_from_config(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  _check_batch_divides(config, mesh, rules)
  boxed = bundle.abstract_variables()
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
  sizes = parameter_sizes(trainable, frozen)
  info = {"trainable_params": sum(n for n, trains in sizes.values() if trains),
          "frozen_params": sum(n for n, trains in sizes.values() if not trains),
          "parameter_sizes": sizes, "geometry": batch_geometry(config, bundle), "model_kind": bundle.kind}
  return lowered, info
