"""The token loops of generation: sampling (greedy is its argmax case) and beam search.

Both run inside the jit-compiled program `search.generate` builds, as one
`jax.lax.while_loop` each, and stop as soon as every row is done. They get the
prefill's last logits and KV cache and call `step_fn` once per new token.

Beam search follows transformers' `_beam_search` (v5) step by step: 2*K (or
(1 + #eos) * K) candidates per step, finished hypotheses scored as
sum_logprob / generated_length ** length_penalty (the EOS token counts), the
same `early_stopping` heuristics, and rows that hit `max_new_tokens` finish.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1.0e9  # transformers' "impossible" score, kept for identical tie-breaking


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


def sample_loop(step_fn, variables, logits, cache, mask, next_position, *, max_new_tokens,
                eos_ids, pad_id, greedy, temperature, top_k, top_p, rng):
  """Greedy or sampled tokens until EOS or `max_new_tokens`, one step per token."""
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


def beam_loop(step_fn, variables, logits, cache, mask, next_position, *, max_new_tokens,
              eos_ids, pad_id, num_beams, length_penalty, early_stopping, cache_batch_axis,
              slot_rows=False):
  """Beam search as transformers does it; returns each row's best finished hypothesis.

  slot_rows: the cache is a speechjax decoder cache that reads slots through
  `rows` (speechjax.models.transformer); the beams' reorder then moves those
  [B*K, S] indices instead of copying every layer's K/V each step.
  """
  batch, vocab = logits.shape
  k, n = num_beams, max_new_tokens
  keep = max(2, 1 + eos_ids.shape[0]) * k
  if keep > k * vocab:
    raise ValueError(f"speechjax.generation: num_beams={k} needs {keep} candidates but "
                     f"there are only {k * vocab} (vocab {vocab})")
  axis = cache_batch_axis
  tile = lambda x: jnp.repeat(x, k, axis=0)
  # Prefill ran once per prompt; the beams start as copies of its cache.
  cache = _map_batch(lambda x: jnp.repeat(x, k, axis=axis), cache, axis)
  if slot_rows:  # every slot read from its own row until the beams diverge
    rows, slots = cache["k"].shape[1:3]
    cache = {**cache, "rows": jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, slots))}
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

    if slot_rows:
      cache = {**s.cache, "rows": jnp.take(s.cache["rows"], beam_rows, axis=0)}
    else:
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
