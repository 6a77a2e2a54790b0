"""Batched generation with a KV cache: greedy, beam search and sampling, model-agnostic.

The whole generation — prefill, the token loop (`jax.lax.while_loop`, exits
as soon as every row is done) and beam bookkeeping — is one jit-compiled
program, so there is no host round trip per token, and the KV cache is updated
in place inside the loop. Prompts are left-padded to a multiple of
`length_bucket`, so batches of similar length reuse one program. The
compilation key is the batch size, the bucketed prompt length,
`max_new_tokens`, the method and the beam / top-k settings; eos and pad ids,
temperature and top_p are traced values and never recompile.

The model is reached through two functions, so a plain LM and the SpeechLLM
share the code:

    init_cache_fn(batch_size, max_length) -> cache
    step_fn(variables, cache, inputs, positions, attention_mask) -> (logits [B,T,V], cache)

`inputs` is either token ids [B,T] (int) or embeddings [B,T,H] (the
SpeechLLM prefill passes the audio-merged embeddings). The cache follows the
decoder contract: a call with T new tokens writes slots [index, index+T);
`attention_mask` is [B, max_length] over cache slots; leaves other than the
scalar 'index' carry the batch on axis `cache_batch_axis` (1 for the decoder's
[layers, batch, slots, heads, dim] k/v), which beam search tiles and reorders.
With `slot_rows=True` the cache is a dict of speechjax's decoders
(speechjax.models.transformer): beam search adds `rows` [B, S] and reorders
that alone, and each step reads a beam's slots from the rows that wrote them,
instead of copying the whole cache into the surviving beams' order every step.

Padding never changes results: prompts are rolled so each row's last real
token is the last column (right- or inner-padded rows become left-padded),
positions are cumsum(mask) - 1, and masked slots are never attended. Long
prompts with a big vocabulary are prefilled without materialising the
[B,T,V] prompt logits (see FULL_PREFILL_LOGITS_LIMIT).

The token loops themselves (sampling, and beam search as transformers does it)
are in `token_loops`; generation with this library's models is in
`model_steps`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from speechjax.generation.token_loops import GenerationOutput, beam_loop, sample_loop

METHODS = ("greedy", "beam", "sample")

StepFn = Callable[..., tuple[jax.Array, Any]]
InitCacheFn = Callable[[int, int], Any]


# --------------------------------------------------------------------------- helpers


def pad_to_bucket(prompt, prompt_mask, bucket: int, pad_value=0):
  """Left-pads prompt [B,T(,H)] and mask [B,T] so T is a multiple of `bucket`.

  jax.Arrays stay on device (and keep their sharding when no padding is needed).
  """
  if not isinstance(prompt, jax.Array):
    prompt = np.asarray(prompt)
  if not isinstance(prompt_mask, jax.Array):
    prompt_mask = np.asarray(prompt_mask)
  if prompt_mask.shape != prompt.shape[:2]:
    raise ValueError(f"speechjax.generation: prompt {prompt.shape} and prompt_mask "
                     f"{prompt_mask.shape} disagree on [batch, length]")
  length = prompt.shape[1]
  extra = (-length) % bucket if bucket > 1 else 0
  if extra == 0:
    return prompt, prompt_mask
  widths = [(0, 0), (extra, 0)] + [(0, 0)] * (prompt.ndim - 2)
  xnp = jnp if isinstance(prompt, jax.Array) else np
  return (xnp.pad(prompt, widths, constant_values=pad_value),
          xnp.pad(prompt_mask, [(0, 0), (extra, 0)]))


def left_align(prompt: jax.Array, prompt_mask: jax.Array):
  """Rolls each row right so its last real token sits in the last column."""
  length = prompt_mask.shape[1]
  cols = jnp.arange(length)
  last = jnp.max(jnp.where(prompt_mask > 0, cols, 0), axis=1)
  shift = (length - 1 - last)[:, None]
  src = (cols[None, :] - shift) % length
  mask = jnp.take_along_axis(prompt_mask, src, axis=1)
  idx = src if prompt.ndim == 2 else src[:, :, None]
  return jnp.take_along_axis(prompt, idx, axis=1), mask


# --------------------------------------------------------------------------- core


# Above this many prompt logits (batch * length * vocab) the prefill runs as two
# calls, all but the last token and then the last one, so the [B,T,V] logits of
# the first call are dead code and never materialise (2**26 floats = 256 MiB).
FULL_PREFILL_LOGITS_LIMIT = 2**26


def _prefill(step_fn, init_cache_fn, variables, prompt, prompt_mask, max_new_tokens):
  batch, length = prompt_mask.shape
  prompt, prompt_mask = left_align(prompt, prompt_mask.astype(jnp.int32))
  cache = init_cache_fn(batch, length + max_new_tokens)
  mask = jnp.concatenate(
      [prompt_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  last = (variables, cache, prompt[:, -1:], positions[:, -1:], mask)
  # The logits' width: the step's own `vocab_size` when it states one (model_steps'
  # steps do), else one abstract trace of a one-token step (~0.2 s per program).
  vocab = getattr(step_fn, "vocab_size", None) or jax.eval_shape(step_fn, *last)[0].shape[-1]
  if length > 1 and batch * length * vocab > FULL_PREFILL_LOGITS_LIMIT:
    _, cache = step_fn(variables, cache, prompt[:, :-1], positions[:, :-1], mask)
    logits, cache = step_fn(variables, cache, prompt[:, -1:], positions[:, -1:], mask)
  else:
    logits, cache = step_fn(variables, cache, prompt, positions, mask)
  next_position = jnp.sum(prompt_mask, axis=1)  # position of the first new token
  return logits[:, -1].astype(jnp.float32), cache, mask, next_position


def generate_core(step_fn, init_cache_fn, variables, prompt, prompt_mask, options, *,
                  method, max_new_tokens, num_beams, length_penalty, early_stopping, top_k,
                  cache_batch_axis, slot_rows=False):
  """Prefill and token loop, traceable; `options` holds the traced settings:
  eos_ids [E], pad_id, temperature, top_p (None = off), rng."""
  logits, cache, mask, next_position = _prefill(
      step_fn, init_cache_fn, variables, prompt, prompt_mask, max_new_tokens)
  eos_ids = jnp.asarray(options["eos_ids"], jnp.int32).reshape(-1)
  pad_id = jnp.asarray(options["pad_id"], jnp.int32)
  if method == "beam":
    return beam_loop(step_fn, variables, logits, cache, mask, next_position,
                     max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                     num_beams=num_beams, length_penalty=length_penalty,
                     early_stopping=early_stopping, cache_batch_axis=cache_batch_axis,
                     slot_rows=slot_rows)
  return sample_loop(step_fn, variables, logits, cache, mask, next_position,
                    max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                    greedy=method == "greedy", temperature=options["temperature"],
                    top_k=top_k, top_p=options["top_p"], rng=options["rng"])


# Compilation key: the callables, shapes and these. What is in `options` is traced,
# so eos / pad ids, temperatures and top_p values share a program. The token loop
# has no lax.cond (on GPU a conditional costs a host sync per token): greedy,
# sampling and sampling with top-p are separate programs.
STATIC_ARGNAMES = ("step_fn", "init_cache_fn", "method", "max_new_tokens", "num_beams",
                   "length_penalty", "early_stopping", "top_k", "cache_batch_axis", "slot_rows")
_generate_jit = jax.jit(generate_core, static_argnames=STATIC_ARGNAMES)


def _eos_tuple(eos_id) -> tuple[int, ...]:
  ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
  if not ids:
    raise ValueError("speechjax.generation: eos_id must name at least one token id")
  return tuple(int(e) for e in ids)


def decoding_settings(*, max_new_tokens: int, eos_id, pad_id: int, method: str = "greedy",
                      num_beams: int = 4, length_penalty: float = 1.0,
                      early_stopping: bool | str = False, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, rng=None):
  """Validates user settings -> (traced options, static kwargs) for `generate_core`."""
  if method not in METHODS:
    raise ValueError(f"speechjax.generation: method must be one of {METHODS}, got {method!r}")
  if max_new_tokens < 1:
    raise ValueError(f"speechjax.generation: max_new_tokens must be >= 1, got {max_new_tokens}")
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"speechjax.generation: early_stopping must be True, False or 'never', "
                     f"got {early_stopping!r}")
  if method == "beam" and num_beams < 1:
    raise ValueError(f"speechjax.generation: num_beams must be >= 1, got {num_beams}")
  if method == "sample":
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(f"speechjax.generation: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                       f"got {temperature}, {top_p}, {top_k}")
    if rng is None and temperature > 0:
      raise ValueError("speechjax.generation: method='sample' needs an rng key")
  if method == "sample" and temperature == 0:
    method = "greedy"
  sample, beam = method == "sample", method == "beam"
  options = {
      "eos_ids": np.asarray(_eos_tuple(eos_id), np.int32),
      "pad_id": np.int32(pad_id),
      "temperature": np.float32(temperature) if sample else None,
      "top_p": np.float32(top_p) if sample and top_p < 1 else None,
      "rng": rng if sample else None,
  }
  # Settings a method does not use are normalised so they do not cause recompiles.
  static = dict(
      method=method, max_new_tokens=int(max_new_tokens),
      num_beams=int(num_beams) if beam else 1,
      length_penalty=float(length_penalty) if beam else 1.0,
      early_stopping=early_stopping if beam else False,
      top_k=int(top_k) if sample else 0)
  return options, static


def generate_from_prompt(step_fn: StepFn, init_cache_fn: InitCacheFn, variables, prompt,
                         prompt_mask, *, cache_batch_axis: int = 1, slot_rows: bool = False, **settings):
  """Traceable `generate` (no jit, no bucketing), to call inside your own jit.

  `settings` as in `generate`; they are all static here.
  """
  options, static = decoding_settings(**settings)
  return generate_core(step_fn, init_cache_fn, variables, prompt, prompt_mask, options,
                       cache_batch_axis=cache_batch_axis, slot_rows=slot_rows, **static)


def generate(step_fn: StepFn, init_cache_fn: InitCacheFn, variables, prompt, prompt_mask=None,
             *, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
             method: str = "greedy", num_beams: int = 4, length_penalty: float = 1.0,
             early_stopping: bool | str = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, rng: jax.Array | None = None, length_bucket: int = 32,
             cache_batch_axis: int = 1, slot_rows: bool = False) -> GenerationOutput:
  """Generates up to `max_new_tokens` per row; one compiled program per shape bucket.

  Args:
    step_fn, init_cache_fn: the model (see the module docstring). Keep the same
      function objects across calls: they are part of the compilation key.
    variables: passed to `step_fn` unchanged.
    prompt: token ids [B,T] or embeddings [B,T,H]; any padding side.
    prompt_mask: [B,T], 1 = real token (default all ones).
    eos_id: one id or several (a row stops at any of them); pad_id fills the
      rest of a finished row.
    method: 'greedy' | 'beam' (num_beams, length_penalty, early_stopping as in
      transformers) | 'sample' (temperature — 0 means greedy —, top_k, top_p; needs rng).
    length_bucket: prompts are left-padded to a multiple of this.
    slot_rows: the cache reads slots through `rows` (see the module docstring;
      speechjax's decoders do).
  """
  options, static = decoding_settings(
      max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, method=method,
      num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
      temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
  if prompt_mask is None:
    prompt_mask = np.ones(np.shape(prompt)[:2], np.int32)
  pad_value = pad_id if np.ndim(prompt) == 2 else 0
  prompt, prompt_mask = pad_to_bucket(prompt, prompt_mask, length_bucket, pad_value)
  return _generate_jit(step_fn, init_cache_fn, variables, prompt, prompt_mask, options,
                       cache_batch_axis=cache_batch_axis, slot_rows=slot_rows, **static)


# --------------------------------------------------------------------------- outputs


def output_token_lists(output: GenerationOutput, eos_id=None) -> list[list[int]]:
  """Each row's generated ids cut at its length; a final EOS is dropped when
  `eos_id` (one id or several) is given."""
  eos_ids = set(_eos_tuple(eos_id)) if eos_id is not None else set()
  rows = []
  for row, n in zip(np.asarray(output.tokens), np.asarray(output.lengths)):
    ids = row[:n].tolist()
    rows.append(ids[:-1] if ids and ids[-1] in eos_ids else ids)
  return rows


def decode_texts(tokenizer, output: GenerationOutput, eos_id=None,
                 skip_special_tokens: bool = True) -> list[str]:
  """Generated ids -> stripped strings with an HF tokenizer (`batch_decode`)."""
  rows = output_token_lists(output, eos_id)
  texts = tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)
  return [t.strip() for t in texts]
