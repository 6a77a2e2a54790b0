"""Batched generation with a KV cache: greedy, beam search and sampling.

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

Padding never changes results: prompts are rolled so each row's last real
token is the last column (right- or inner-padded rows become left-padded),
positions are cumsum(mask) - 1, and masked slots are never attended. Long
prompts with a big vocabulary are prefilled without materialising the
[B,T,V] prompt logits (see FULL_PREFILL_LOGITS_LIMIT).

Beam search follows transformers' `_beam_search` (v5) step by step: 2*K (or
(1 + #eos) * K) candidates per step, finished hypotheses scored as
sum_logprob / generated_length ** length_penalty (the EOS token counts), the
same `early_stopping` heuristics, and rows that hit `max_new_tokens` finish.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("greedy", "beam", "sample")
NEG_INF = -1.0e9  # transformers' "impossible" score, kept for identical tie-breaking

StepFn = Callable[..., tuple[jax.Array, Any]]
InitCacheFn = Callable[[int, int], Any]


class GenerationOutput(NamedTuple):
  """tokens: [B, max_new_tokens] int32, pad after EOS (EOS included).

  lengths: [B] generated tokens up to and including EOS.
  scores: [B] float32 — greedy/sample: sum of the model's log-probabilities of
  the emitted tokens; beam: that sum / lengths ** length_penalty (HF's
  `sequences_scores`).
  """
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array


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
    raise ValueError(f"speechjax.decode: prompt {prompt.shape} and prompt_mask "
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


def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
  return jnp.any(tokens[..., None] == eos_ids, axis=-1)


def _map_batch(fn, cache, axis: int):
  return jax.tree_util.tree_map(lambda x: fn(x) if x.ndim > axis else x, cache)


def _top_p_filter(logits, top_p):
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # A token survives when the mass strictly ahead of it is < top_p (HF keeps
  # tokens whose ascending cumsum exceeds 1 - top_p); the top token always does.
  mass_ahead = jnp.cumsum(probs, axis=-1) - probs
  cutoff = jnp.min(jnp.where(mass_ahead < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def _process_logits(logits, temperature, top_k: int, top_p):
  """Temperature, then top-k, then top-p (HF's warper order); masked -> -inf.

  temperature and top_p may be traced; top_p None skips the top-p sort.
  """
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return logits if top_p is None else _top_p_filter(logits, top_p)


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
  vocab = jax.eval_shape(step_fn, *last)[0].shape[-1]
  if length > 1 and batch * length * vocab > FULL_PREFILL_LOGITS_LIMIT:
    _, cache = step_fn(variables, cache, prompt[:, :-1], positions[:, :-1], mask)
    logits, cache = step_fn(variables, cache, prompt[:, -1:], positions[:, -1:], mask)
  else:
    logits, cache = step_fn(variables, cache, prompt, positions, mask)
  next_position = jnp.sum(prompt_mask, axis=1)  # position of the first new token
  return logits[:, -1].astype(jnp.float32), cache, mask, next_position


def _sample_loop(step_fn, variables, logits, cache, mask, next_position, *, max_new_tokens,
                 eos_ids, pad_id, greedy, temperature, top_k, top_p, rng):
  batch = logits.shape[0]

  def choose(logits, i):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _process_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(jax.random.fold_in(rng, i), logits).astype(jnp.int32)

  def emit(state, logits):
    i, cache, tokens, lengths, scores, finished = state
    tok = jnp.where(finished, pad_id, choose(logits, i))
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], 1)[:, 0]
    scores += jnp.where(finished, 0.0, logprob)
    lengths += (~finished).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
    finished |= _is_eos(tok, eos_ids)
    return i + 1, cache, tokens, lengths, scores, finished

  state = (jnp.int32(0), cache, jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.float32),
           jnp.zeros((batch,), bool))
  state = emit(state, logits)

  def cond(state):
    i, finished = state[0], state[-1]
    return (i < max_new_tokens) & ~jnp.all(finished)

  def body(state):
    i, cache, tokens = state[:3]
    last = jax.lax.dynamic_slice(tokens, (0, i - 1), (batch, 1))
    logits, cache = step_fn(variables, cache, last, (next_position + i - 1)[:, None], mask)
    return emit((i, cache) + state[2:], logits[:, -1].astype(jnp.float32))

  _, _, tokens, lengths, scores, _ = jax.lax.while_loop(cond, body, state)
  return GenerationOutput(tokens, lengths, scores)


class _BeamState(NamedTuple):
  i: jax.Array                # tokens generated so far
  cache: Any                  # batch * num_beams rows
  running_seqs: jax.Array     # [B, K, N]
  running_scores: jax.Array   # [B, K] sum of log-probs (NEG_INF for dead beams)
  seqs: jax.Array             # [B, K, N] finished hypotheses, best first
  scores: jax.Array           # [B, K] length-penalised scores
  lengths: jax.Array          # [B, K]
  is_finished: jax.Array      # [B, K]
  improvable: jax.Array       # [B] HF's is_early_stop_heuristic_unsatisfied
  done: jax.Array             # scalar


def _beam_loop(step_fn, variables, logits, cache, mask, next_position, *, max_new_tokens,
               eos_ids, pad_id, num_beams, length_penalty, early_stopping, cache_batch_axis):
  batch, vocab = logits.shape
  k, n = num_beams, max_new_tokens
  keep = max(2, 1 + eos_ids.shape[0]) * k
  if keep > k * vocab:
    raise ValueError(f"speechjax.decode: num_beams={k} needs {keep} candidates but "
                     f"there are only {k * vocab} (vocab {vocab})")
  axis = cache_batch_axis
  tile = lambda x: jnp.repeat(x, k, axis=0)
  # Prefill ran once per prompt; the beams start as copies of its cache.
  cache = _map_batch(lambda x: jnp.repeat(x, k, axis=axis), cache, axis)
  mask, next_position = tile(mask), tile(next_position)
  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)
  in_top_k = jnp.arange(keep) < k
  stop_when_full = early_stopping is True

  def update(s: _BeamState, logits):
    logprobs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
    flat = (logprobs + s.running_scores[:, :, None]).reshape(batch, k * vocab)
    topk_lp, topk_idx = jax.lax.top_k(flat, keep)
    parent, tok = topk_idx // vocab, (topk_idx % vocab).astype(jnp.int32)
    cand_seqs = gather(s.running_seqs, parent)
    cand_seqs = jnp.where(jnp.arange(n) == s.i, tok[:, :, None], cand_seqs)
    hits = _is_eos(tok, eos_ids) | (s.i + 1 >= n)

    live_lp = topk_lp + hits * NEG_INF
    nxt = jax.lax.top_k(live_lp, k)[1]
    running_seqs, running_scores = gather(cand_seqs, nxt), gather(live_lp, nxt)
    beam_rows = (gather(parent, nxt) + jnp.arange(batch)[:, None] * k).reshape(-1)

    just_finished = hits & in_top_k[None]
    fin = topk_lp / (s.i + 1).astype(jnp.float32) ** length_penalty
    full = jnp.all(s.is_finished, axis=1, keepdims=True) & stop_when_full
    fin += full * NEG_INF + (~s.improvable[:, None]) * NEG_INF + (~just_finished) * NEG_INF
    m_scores = jnp.concatenate([s.scores, fin], 1)
    best = jax.lax.top_k(m_scores, k)[1]
    seqs = gather(jnp.concatenate([s.seqs, cand_seqs], 1), best)
    scores = gather(m_scores, best)
    lengths = gather(jnp.concatenate(
        [s.lengths, jnp.broadcast_to(s.i + 1, (batch, keep))], 1), best)
    is_finished = gather(jnp.concatenate([s.is_finished, just_finished], 1), best)

    cache = _map_batch(lambda x: jnp.take(x, beam_rows, axis=axis), s.cache, axis)
    i = s.i + 1
    if early_stopping == "never" and length_penalty > 0.0:
      best_len = jnp.float32(n)
    else:
      best_len = i.astype(jnp.float32)
    best_possible = running_scores[:, :1] / best_len ** length_penalty
    worst = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), NEG_INF)
    improvable = s.improvable & jnp.any(best_possible > worst, axis=1)
    done = (~jnp.any(improvable)) | (jnp.all(is_finished) & stop_when_full) | jnp.all(hits)
    return _BeamState(i, cache, running_seqs, running_scores, seqs, scores, lengths,
                      is_finished, improvable, done)

  running_scores = jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(NEG_INF)
  empty = jnp.full((batch, k, n), pad_id, jnp.int32)
  state = _BeamState(
      jnp.int32(0), cache, empty, running_scores, empty,
      jnp.full((batch, k), NEG_INF, jnp.float32), jnp.zeros((batch, k), jnp.int32),
      jnp.zeros((batch, k), bool), jnp.ones((batch,), bool), jnp.bool_(False))
  state = update(state, tile(logits))

  def body(s: _BeamState):
    last = jax.lax.dynamic_slice_in_dim(s.running_seqs, s.i - 1, 1, axis=2).reshape(batch * k, 1)
    logits, cache = step_fn(variables, s.cache, last, (next_position + s.i - 1)[:, None], mask)
    return update(s._replace(cache=cache), logits[:, -1].astype(jnp.float32))

  state = jax.lax.while_loop(lambda s: ~s.done, body, state)
  return GenerationOutput(state.seqs[:, 0], state.lengths[:, 0], state.scores[:, 0])


def _generate_core(step_fn, init_cache_fn, variables, prompt, prompt_mask, options, *,
                   method, max_new_tokens, num_beams, length_penalty, early_stopping, top_k,
                   cache_batch_axis):
  """`options` holds the traced settings: eos_ids [E], pad_id, temperature, top_p
  (None = off), rng."""
  logits, cache, mask, next_position = _prefill(
      step_fn, init_cache_fn, variables, prompt, prompt_mask, max_new_tokens)
  eos_ids = jnp.asarray(options["eos_ids"], jnp.int32).reshape(-1)
  pad_id = jnp.asarray(options["pad_id"], jnp.int32)
  if method == "beam":
    return _beam_loop(step_fn, variables, logits, cache, mask, next_position,
                      max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                      num_beams=num_beams, length_penalty=length_penalty,
                      early_stopping=early_stopping, cache_batch_axis=cache_batch_axis)
  return _sample_loop(step_fn, variables, logits, cache, mask, next_position,
                      max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                      greedy=method == "greedy", temperature=options["temperature"],
                      top_k=top_k, top_p=options["top_p"], rng=options["rng"])


# Compilation key: the callables, shapes and these. What is in `options` is traced,
# so eos / pad ids, temperatures and top_p values share a program. The token loop
# has no lax.cond (on GPU a conditional costs a host sync per token): greedy,
# sampling and sampling with top-p are separate programs.
_STATIC = ("step_fn", "init_cache_fn", "method", "max_new_tokens", "num_beams", "length_penalty",
           "early_stopping", "top_k", "cache_batch_axis")
_generate_jit = jax.jit(_generate_core, static_argnames=_STATIC)


def _eos_tuple(eos_id) -> tuple[int, ...]:
  ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
  if not ids:
    raise ValueError("speechjax.decode: eos_id must name at least one token id")
  return tuple(int(e) for e in ids)


def decoding_settings(*, max_new_tokens: int, eos_id, pad_id: int, method: str = "greedy",
                      num_beams: int = 4, length_penalty: float = 1.0,
                      early_stopping: bool | str = False, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, rng=None):
  """Validates user settings -> (traced options, static kwargs) for `_generate_core`."""
  if method not in METHODS:
    raise ValueError(f"speechjax.decode: method must be one of {METHODS}, got {method!r}")
  if max_new_tokens < 1:
    raise ValueError(f"speechjax.decode: max_new_tokens must be >= 1, got {max_new_tokens}")
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"speechjax.decode: early_stopping must be True, False or 'never', "
                     f"got {early_stopping!r}")
  if method == "beam" and num_beams < 1:
    raise ValueError(f"speechjax.decode: num_beams must be >= 1, got {num_beams}")
  if method == "sample":
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(f"speechjax.decode: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                       f"got {temperature}, {top_p}, {top_k}")
    if rng is None and temperature > 0:
      raise ValueError("speechjax.decode: method='sample' needs an rng key")
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
                         prompt_mask, *, cache_batch_axis: int = 1, **settings):
  """Traceable `generate` (no jit, no bucketing), to call inside your own jit.

  `settings` as in `generate`; they are all static here.
  """
  options, static = decoding_settings(**settings)
  return _generate_core(step_fn, init_cache_fn, variables, prompt, prompt_mask, options,
                        cache_batch_axis=cache_batch_axis, **static)


def generate(step_fn: StepFn, init_cache_fn: InitCacheFn, variables, prompt, prompt_mask=None,
             *, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
             method: str = "greedy", num_beams: int = 4, length_penalty: float = 1.0,
             early_stopping: bool | str = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, rng: jax.Array | None = None, length_bucket: int = 32,
             cache_batch_axis: int = 1) -> GenerationOutput:
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
                       cache_batch_axis=cache_batch_axis, **static)


# --------------------------------------------------------------------------- models


def _as_variables(params_or_variables) -> dict:
  """Accepts a params tree or a {'params': ..., 'lora': ...} variables dict."""
  if isinstance(params_or_variables, Mapping) and "params" in params_or_variables:
    return dict(params_or_variables)
  return {"params": params_or_variables}


@functools.lru_cache(maxsize=64)
def lm_decode_fns(model) -> tuple[StepFn, InitCacheFn]:
  """(step_fn, init_cache_fn) for a Decoder / GPT2 module, cached per model config
  so repeated `generate_lm` calls reuse compiled programs."""
  from speechjax.models import decoder  # pylint: disable=import-outside-toplevel

  def step_fn(variables, cache, inputs, positions, attention_mask):
    kwargs = {"inputs_embeds": inputs} if inputs.ndim == 3 else {"input_ids": inputs}
    return model.apply(variables, positions=positions, attention_mask=attention_mask,
                       cache=cache, **kwargs)

  def init_cache_fn(batch_size, max_length):
    return decoder.init_cache(model.config, batch_size, max_length)

  return step_fn, init_cache_fn


def check_position_range(decoder_config, prompt_mask, max_new_tokens: int):
  """Learned position tables (GPT-2) cannot go past max_position_embeddings:
  a gather would silently clamp, so refuse instead. RoPE models may extrapolate."""
  from speechjax.models import gpt2  # pylint: disable=import-outside-toplevel
  if not isinstance(decoder_config, gpt2.GPT2Config):
    return
  needed = int(np.max(np.sum(np.asarray(prompt_mask) > 0, axis=1))) + int(max_new_tokens)
  if needed > decoder_config.max_position_embeddings:
    raise ValueError(f"speechjax.decode: the longest prompt plus max_new_tokens needs "
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
                  **kwargs)


@functools.lru_cache(maxsize=64)
def speech_decode_fns(model) -> tuple[StepFn, InitCacheFn]:
  """(step_fn, init_cache_fn) over `SpeechLLM.decode` (the LLM with a KV cache)."""
  from speechjax.models import decoder  # pylint: disable=import-outside-toplevel

  def step_fn(variables, cache, inputs, positions, attention_mask):
    kwargs = {"inputs_embeds": inputs} if inputs.ndim == 3 else {"input_ids": inputs}
    return model.apply(variables, positions=positions, attention_mask=attention_mask,
                       cache=cache, method="decode", **kwargs)

  def init_cache_fn(batch_size, max_length):
    return decoder.init_cache(model.config.decoder, batch_size, max_length)

  return step_fn, init_cache_fn


def _speech_generate(model, variables, features, feature_mask, input_ids, attention_mask,
                     options, **static):
  embeds, mask = model.apply(variables, features, feature_mask, input_ids, attention_mask,
                             method="embed_inputs")
  step_fn, init_cache_fn = speech_decode_fns(model)
  return _generate_core(step_fn, init_cache_fn, variables, embeds, mask, options,
                        cache_batch_axis=1, **static)


_speech_generate_jit = jax.jit(
    _speech_generate,
    static_argnames=("model",) + tuple(
        a for a in _STATIC if a not in ("step_fn", "init_cache_fn", "cache_batch_axis")))

SPEECH_BATCH_KEYS = ("features", "feature_mask", "input_ids", "attention_mask")


def generate_speech(model, variables, batch, *, max_new_tokens: int,
                    eos_id: int | Sequence[int], pad_id: int, length_bucket: int = 32,
                    **settings) -> GenerationOutput:
  """Generation with a SpeechLLM: audio + prompt in, answer tokens out.

  batch: the pipeline's dict (features, feature_mask, input_ids with audio
  placeholders, attention_mask; other keys are ignored) holding the prompt only,
  padded on either side. variables: {'params': ..., 'lora': ...} (lora
  optional). `settings`: method, num_beams, ..., rng as in `generate`.
  Encoder, projector, prefill and decoding run as one compiled program.
  """
  missing = [k for k in SPEECH_BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"speechjax.decode.generate_speech: batch lacks {missing}; "
                     f"it has {sorted(batch)}")
  options, static = decoding_settings(max_new_tokens=max_new_tokens, eos_id=eos_id,
                                      pad_id=pad_id, **settings)
  check_position_range(model.config.decoder, batch["attention_mask"], max_new_tokens)
  input_ids, attention_mask = pad_to_bucket(batch["input_ids"], batch["attention_mask"],
                                            length_bucket, pad_id)
  return _speech_generate_jit(model, _as_variables(variables), batch["features"],
                              batch["feature_mask"], input_ids, attention_mask, options,
                              **static)


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


# --------------------------------------------------------------------------- long audio


def chunk_audio(audio, sample_rate: int, chunk_seconds: float = 30.0,
                search_seconds: float = 2.0) -> list[np.ndarray]:
  """Splits mono audio into consecutive chunks of at most `chunk_seconds`.

  Each cut is placed at the quietest 20 ms frame within the last
  `search_seconds` of the window, so words are rarely split; 0 cuts exactly at
  the limit. The chunks cover the audio without overlap or gap, so their
  transcripts can be joined with `join_transcripts`.
  """
  audio = np.asarray(audio)
  if audio.ndim != 1:
    raise ValueError(f"speechjax.decode.chunk_audio: expected mono audio [samples], "
                     f"got shape {audio.shape}")
  limit = int(chunk_seconds * sample_rate)
  if limit < 1:
    raise ValueError(f"speechjax.decode.chunk_audio: chunk_seconds={chunk_seconds} at "
                     f"{sample_rate} Hz is shorter than one sample")
  frame = max(1, int(0.02 * sample_rate))
  search = min(int(search_seconds * sample_rate), limit // 2)
  chunks, start = [], 0
  while len(audio) - start > limit:
    end = start + limit
    if search >= frame:
      window = audio[end - search:end].astype(np.float64)
      frames = window[:(len(window) // frame) * frame].reshape(-1, frame)
      energy = np.sum(frames ** 2, axis=1)
      # Among equally quiet frames prefer the latest, keeping chunks long.
      quietest = len(energy) - 1 - int(np.argmin(energy[::-1]))
      end = end - search + quietest * frame + frame // 2
    chunks.append(audio[start:end])
    start = end
  chunks.append(audio[start:])
  return chunks


def join_transcripts(texts: Sequence[str]) -> str:
  """Concatenates the transcripts of consecutive chunks."""
  return " ".join(t.strip() for t in texts if t.strip())
