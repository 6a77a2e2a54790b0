"""Generation with this library's models: a decoder LM (Llama-style `Decoder`
or GPT-2) and the SpeechLLM.

Each model is reached through the (step_fn, init_cache_fn) pair that
`search.generate` takes; the pairs are cached per model so repeated calls reuse
compiled programs. `generate_speech` runs the audio encoder, the projector, the
prefill and the token loop as one compiled program. Under a mesh
(`jax.set_mesh`, as `speechjax.evaluation.run_loader.mesh_context` sets it)
the batch is split over the mesh's batch axes and the weights stay where they
are sharded; the answers come back replicated, readable on every host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from speechjax.generation import stored_programs
from speechjax.generation.search import (
  STATIC_ARGNAMES,
  GenerationOutput,
  InitCacheFn,
  StepFn,
  decoding_settings,
  generate,
  generate_core,
  pad_to_bucket,
)


def _as_variables(params_or_variables) -> dict:
  """Accepts a params tree or a {'params': ..., 'lora': ...} variables dict."""
  if isinstance(params_or_variables, Mapping) and "params" in params_or_variables:
    return dict(params_or_variables)
  return {"params": params_or_variables}


@functools.lru_cache(maxsize=64)
def lm_decode_fns(model) -> tuple[StepFn, InitCacheFn]:
  """(step_fn, init_cache_fn) for a Decoder / GPT2 module, cached per model config
  so repeated `generate_lm` calls reuse compiled programs."""
  from speechjax.models import transformer  # pylint: disable=import-outside-toplevel

  def step_fn(variables, cache, inputs, positions, attention_mask):
    kwargs = {"inputs_embeds": inputs} if inputs.ndim == 3 else {"input_ids": inputs}
    return model.apply(variables, positions=positions, attention_mask=attention_mask,
                       cache=cache, **kwargs)

  def init_cache_fn(batch_size, max_length):
    return transformer.init_cache(model.config, batch_size, max_length)

  step_fn.vocab_size = getattr(model.config, "vocab_size", None)  # the logits' width (search._prefill)
  return step_fn, init_cache_fn


def check_position_range(decoder_config, prompt_mask, max_new_tokens: int):
  """Learned position tables (GPT-2) cannot go past max_position_embeddings:
  a gather would silently clamp, so refuse instead. RoPE models may extrapolate."""
  from speechjax.models import gpt2  # pylint: disable=import-outside-toplevel
  if not isinstance(decoder_config, gpt2.GPT2Config):
    return
  needed = int(np.max(np.sum(np.asarray(prompt_mask) > 0, axis=1))) + int(max_new_tokens)
  if needed > decoder_config.max_position_embeddings:
    raise ValueError(f"speechjax.generation: the longest prompt plus max_new_tokens needs "
                     f"{needed} positions but the GPT-2 model has "
                     f"max_position_embeddings={decoder_config.max_position_embeddings}")


def generate_lm(model, params, input_ids, attention_mask=None, **kwargs) -> GenerationOutput:
  """Generation with a decoder LM (`speechjax.hf.load_pretrained`'s model).

  params: the params tree, or a variables dict with 'params' (and 'lora').
  input_ids [B,T], attention_mask [B,T] (any padding side); `kwargs` as in
  `generate` (max_new_tokens, eos_id, pad_id required).
  """
  if attention_mask is None:
    attention_mask = np.ones(np.shape(input_ids), np.int32)
  check_position_range(model.config, attention_mask, kwargs.get("max_new_tokens", 0))
  step_fn, init_cache_fn = lm_decode_fns(model)
  return generate(step_fn, init_cache_fn, _as_variables(params), input_ids, attention_mask,
                  slot_rows=True, **kwargs)


@functools.lru_cache(maxsize=64)
def speech_decode_fns(model) -> tuple[StepFn, InitCacheFn]:
  """(step_fn, init_cache_fn) over `SpeechLLM.decode` (the LLM with a KV cache)."""
  from speechjax.models import transformer  # pylint: disable=import-outside-toplevel

  def step_fn(variables, cache, inputs, positions, attention_mask):
    kwargs = {"inputs_embeds": inputs} if inputs.ndim == 3 else {"input_ids": inputs}
    return model.apply(variables, positions=positions, attention_mask=attention_mask,
                       cache=cache, method="decode", **kwargs)

  def init_cache_fn(batch_size, max_length):
    return transformer.init_cache(model.config.decoder, batch_size, max_length)

  step_fn.vocab_size = model.config.decoder.vocab_size  # the logits' width (search._prefill)
  return step_fn, init_cache_fn


def _speech_generate(variables, features, feature_mask, input_ids, attention_mask, options, *, model,
                     **static):
  embeds, mask = model.apply(variables, features, feature_mask, input_ids, attention_mask,
                             method="embed_inputs")
  step_fn, init_cache_fn = speech_decode_fns(model)
  return generate_core(step_fn, init_cache_fn, variables, embeds, mask, options,
                       cache_batch_axis=1, slot_rows=True, **static)


_SPEECH_STATIC_ARGNAMES = ("model",) + tuple(
    a for a in STATIC_ARGNAMES if a not in ("step_fn", "init_cache_fn", "cache_batch_axis", "slot_rows"))


@functools.lru_cache(maxsize=8)
def _sharded_speech_generate_jit(mesh):
  # Replicated outputs: every host reads all answers (the tokens are small).
  return jax.jit(_speech_generate, static_argnames=_SPEECH_STATIC_ARGNAMES,
                 out_shardings=NamedSharding(mesh, P()))


def _batch_rule(rules):
  batch_axes = dict(rules).get("batch", ("data", "fsdp"))
  return (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())


def place_batch(arrays: dict, mesh, rules=()) -> dict:
  """Host arrays (every host holding all rows, as evaluation feeds them) ->
  jax.Arrays whose rows are split over the mesh's batch axes (the logical
  'batch' rule of `rules`; ('data', 'fsdp') without one). ValueError unless
  the batch divides over those axes."""
  axes = _batch_rule(rules)
  shards = math.prod(mesh.shape[a] for a in axes)
  placed = {}
  for key, value in arrays.items():
    value = np.asarray(value)
    if value.shape[0] % shards:
      sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
      raise ValueError(f"speechjax.generation: a batch of {value.shape[0]} rows ({key!r}) does not divide "
                       f"over the mesh's batch axes ({sizes}: {shards} shards); use a batch size that is "
                       f"a multiple of {shards} or a mesh with fewer batch shards")
    sharding = NamedSharding(mesh, P(axes, *([None] * (value.ndim - 1))))
    placed[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
  return placed

SPEECH_BATCH_KEYS = ("features", "feature_mask", "input_ids", "attention_mask")


def place_process_rows(arrays: dict, mesh, rules=()) -> dict:
  """This process' rows of a global batch (process i the i-th block, as the
  data pipeline feeds them on several hosts) -> global jax.Arrays split over
  the mesh's batch axes."""
  axes = _batch_rule(rules)
  return {key: jax.make_array_from_process_local_data(
              NamedSharding(mesh, P(axes, *([None] * (np.ndim(value) - 1)))), np.asarray(value))
          for key, value in arrays.items()}


def generate_speech(model, variables, batch, *, max_new_tokens: int,
                    eos_id: int | Sequence[int], pad_id: int, length_bucket: int = 32,
                    process_rows: bool = False, **settings) -> GenerationOutput:
  """Generation with a SpeechLLM: audio + prompt in, answer tokens out.

  batch: the pipeline's dict (features, feature_mask, input_ids with audio
  placeholders, attention_mask; other keys are ignored) holding the prompt only,
  padded on either side. variables: {'params': ..., 'lora': ...} (lora
  optional). `settings`: method, num_beams, ..., rng as in `generate`.
  Encoder, projector, prefill and decoding run as one compiled program (on one
  device with a compilation cache directory set, its trace is kept there:
  `stored_programs`); under a current mesh of several devices the batch rows
  are split over its batch axes (`place_batch`), so the batch size must
  divide over them.
  process_rows: the batch holds this process' rows of the global batch (scoring
  on several hosts: each feeds its own rows; `place_process_rows`); the
  answers of every row of the global batch come back on every host.
  """
  missing = [k for k in SPEECH_BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"speechjax.generation.generate_speech: batch lacks {missing}; "
                     f"it has {sorted(batch)}")
  options, static = decoding_settings(max_new_tokens=max_new_tokens, eos_id=eos_id,
                                      pad_id=pad_id, **settings)
  check_position_range(model.config.decoder, batch["attention_mask"], max_new_tokens)
  input_ids, attention_mask = pad_to_bucket(batch["input_ids"], batch["attention_mask"],
                                            length_bucket, pad_id)
  inputs = {"features": batch["features"], "feature_mask": batch["feature_mask"],
            "input_ids": input_ids, "attention_mask": attention_mask}
  mesh = jax.sharding.get_mesh()
  sharded = not mesh.empty and mesh.size > 1
  if sharded:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    place = place_process_rows if process_rows else place_batch
    inputs = place(inputs, mesh, nn.get_logical_axis_rules())
  elif process_rows and jax.process_count() > 1:
    raise ValueError("speechjax.generation.generate_speech: process_rows on several processes needs a "
                     "current mesh over their devices (jax.set_mesh)")
  args = (_as_variables(variables), inputs["features"], inputs["feature_mask"], inputs["input_ids"],
          inputs["attention_mask"], options)
  if sharded:
    return _sharded_speech_generate_jit(mesh)(*args, model=model, **static)
  # One device: the traced program is kept with the compile cache.
  return stored_programs.call("speech_generate", _speech_generate, {"model": model, **static}, *args)
