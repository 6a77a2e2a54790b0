"""Batched generation with a KV cache: greedy, beam search and sampling.

The whole generation — prefill, the token loop (`jax.lax.while_loop`, exits
as soon as every row is done) and beam bookkeeping — is one jit-compiled
program, so there is no host round trip per token. Prompts are left-padded to a
multiple of `length_bucket`, so batches of similar length reuse one program
(the key is batch size, bucketed prompt length, `max_new_tokens` and the
decoding settings).

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
positions are cumsum(mask) - 1, and masked slots are never attended.

Beam search follows transformers' `_beam_search` (v5) step by step: 2*K (or
(1 + #eos) * K) candidates per step, finished hypotheses scored as
sum_logprob / generated_length ** length_penalty (the EOS token counts), the
same `early_stopping` heuristics, and rows that hit `max_new_tokens` finish.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

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
  """Left-pads prompt [B,T(,H)] and mask [B,T] so T is a multiple of `bucket`."""
  prompt, prompt_mask = np.asarray(prompt), np.asarray(prompt_mask)
  if prompt_mask.shape != prompt.shape[:2]:
    raise ValueError(f"speechjax.decode: prompt {prompt.shape} and prompt_mask "
                     f"{prompt_mask.shape} disagree on [batch, length]")
  length = prompt.shape[1]
  extra = (-length) % bucket if bucket > 1 else 0
  if extra == 0:
    return prompt, prompt_mask
  widths = [(0, 0), (extra, 0)] + [(0, 0)] * (prompt.ndim - 2)
  return (np.pad(prompt, widths, constant_values=pad_value),
          np.pad(prompt_mask, [(0, 0), (extra, 0)]))


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


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  return functools.reduce(jnp.logical_or, [tokens == e for e in eos_ids])


def _map_batch(fn, cache, axis: int):
  return jax.tree_util.tree_map(lambda x: fn(x) if x.ndim > axis else x, cache)


def _process_logits(logits, temperature: float, top_k: int, top_p: float):
  """Temperature, then top-k, then top-p (HF's warper order); masked -> -inf."""
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token survives when the mass strictly ahead of it is < top_p (HF keeps
    # tokens whose ascending cumsum exceeds 1 - top_p); the top token always does.
    mass_ahead = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_ahead < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


# --------------------------------------------------------------------------- core


def _prefill(step_fn, init_cache_fn, variables, prompt, prompt_mask, max_new_tokens):
  batch, length = prompt_mask.shape
  prompt, prompt_mask = left_align(prompt, prompt_mask.astype(jnp.int32))
  cache = init_cache_fn(batch, length + max_new_tokens)
  mask = jnp.concatenate(
      [prompt_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  logits, cache = step_fn(variables, cache, prompt, positions, mask)
  next_position = jnp.sum(prompt_mask, axis=1)  # position of the first new token
  return logits[:, -1].astype(jnp.float32), cache, mask, next_position


def _sample_loop(step_fn, variables, logits, cache, mask, next_position, rng, *,
                 max_new_tokens, eos_ids, pad_id, greedy, temperature, top_k, top_p):
  batch = logits.shape[0]

  def emit(state, logits):
    i, cache, tokens, lengths, scores, finished = state
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if greedy:
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      key = jax.random.fold_in(rng, i)
      tok = jax.random.categorical(
          key, _process_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)
    tok = jnp.where(finished, pad_id, tok)
    scores += jnp.where(finished, 0.0, jnp.take_along_axis(logprobs, tok[:, None], 1)[:, 0])
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
  keep = max(2, 1 + len(eos_ids)) * k
  if keep > k * vocab:
    raise ValueError(f"speechjax.decode: num_beams={k} needs {keep} candidates but "
                     f"there are only {k * vocab} (vocab {vocab})")
  axis = cache_batch_axis
  tile = lambda x: jnp.repeat(x, k, axis=0)
  cache = _map_batch(lambda x: jnp.repeat(x, k, axis=axis), cache, axis)
  mask, next_position = tile(mask), tile(next_position)
  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)
  top_k_mask = jnp.arange(keep) < k
  stop_always_true = early_stopping is True

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

    just_finished = hits & top_k_mask[None]
    fin = topk_lp / (s.i + 1).astype(jnp.float32) ** length_penalty
    full = jnp.all(s.is_finished, axis=1, keepdims=True) & stop_always_true
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
    done = (~jnp.any(improvable)) | (jnp.all(is_finished) & stop_always_true) | jnp.all(hits)
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


def generate_from_prompt(step_fn: StepFn, init_cache_fn: InitCacheFn, variables, prompt,
                         prompt_mask, rng=None, *, max_new_tokens: int,
                         eos_ids: tuple[int, ...], pad_id: int, method: str = "greedy",
                         num_beams: int = 4, length_penalty: float = 1.0,
                         early_stopping: bool | str = False, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0,
                         cache_batch_axis: int = 1) -> GenerationOutput:
  """Traceable body of `generate` (no jit, no bucketing): use inside your own jit."""
  if method not in METHODS:
    raise ValueError(f"speechjax.decode: method must be one of {METHODS}, got {method!r}")
  if max_new_tokens < 1:
    raise ValueError(f"speechjax.decode: max_new_tokens must be >= 1, got {max_new_tokens}")
  logits, cache, mask, next_position = _prefill(
      step_fn, init_cache_fn, variables, prompt, prompt_mask, max_new_tokens)
  if method == "beam":
    return _beam_loop(step_fn, variables, logits, cache, mask, next_position,
                      max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                      num_beams=num_beams, length_penalty=length_penalty,
                      early_stopping=early_stopping, cache_batch_axis=cache_batch_axis)
  greedy = method == "greedy" or temperature == 0.0
  if not greedy and rng is None:
    raise ValueError("speechjax.decode: method='sample' needs an rng key")
  return _sample_loop(step_fn, variables, logits, cache, mask, next_position, rng,
                      max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                      greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)


_STATIC = ("step_fn", "init_cache_fn", "max_new_tokens", "eos_ids", "pad_id", "method",
           "num_beams", "length_penalty", "early_stopping", "temperature", "top_k", "top_p",
           "cache_batch_axis")
_generate_jit = jax.jit(generate_from_prompt, static_argnames=_STATIC)


def _eos_tuple(eos_id) -> tuple[int, ...]:
  ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
  if not ids:
    raise ValueError("speechjax.decode: eos_id must name at least one token id")
  return tuple(int(e) for e in ids)


def _sampling_kwargs(method, num_beams, length_penalty, early_stopping, temperature,
                     top_k, top_p):
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"speechjax.decode: early_stopping must be True, False or 'never', "
                     f"got {early_stopping!r}")
  if method == "beam" and num_beams < 1:
    raise ValueError(f"speechjax.decode: num_beams must be >= 1, got {num_beams}")
  if method == "sample" and (temperature < 0 or not 0 < top_p <= 1):
    raise ValueError(f"speechjax.decode: need temperature >= 0 and 0 < top_p <= 1, "
                     f"got {temperature}, {top_p}")
  # Settings that do not affect a method are normalised so they do not cause recompiles.
  return dict(
      method=method,
      num_beams=int(num_beams) if method == "beam" else 1,
      length_penalty=float(length_penalty) if method == "beam" else 1.0,
      early_stopping=early_stopping if method == "beam" else False,
      temperature=float(temperature) if method == "sample" else 1.0,
      top_k=int(top_k) if method == "sample" else 0,
      top_p=float(top_p) if method == "sample" else 1.0)


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
    method: 'greedy' | 'beam' (num_beams, length_penalty, early_stopping as in
      transformers) | 'sample' (temperature — 0 means greedy —, top_k, top_p; needs rng).
    length_bucket: prompts are left-padded to a multiple of this.
  """
  if prompt_mask is None:
    prompt_mask = np.ones(np.shape(prompt)[:2], np.int32)
  pad_value = pad_id if np.ndim(prompt) == 2 else 0
  prompt, prompt_mask = pad_to_bucket(prompt, prompt_mask, length_bucket, pad_value)
  return _generate_jit(
      step_fn, init_cache_fn, variables, prompt, prompt_mask, rng,
      max_new_tokens=int(max_new_tokens), eos_ids=_eos_tuple(eos_id), pad_id=int(pad_id),
      cache_batch_axis=cache_batch_axis,
      **_sampling_kwargs(method, num_beams, length_penalty, early_stopping, temperature,
                         top_k, top_p))
