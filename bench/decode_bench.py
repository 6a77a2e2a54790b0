"""Batched decoding with a KV cache: speechjax.generation against transformers'
`generate` on the same weights, prompts and settings. Three rows:

  greedy   the Qwen2 LM alone: generate_lm(method='greedy') vs generate(do_sample=False)
  beam     the same LM, beam 4: generate_lm(method='beam', num_beams=4) vs
           generate(num_beams=4); length_penalty 1, early_stopping False on both
  speech   greedy through the speech LLM: audio features -> encoder -> projector
           -> LLM prefill -> tokens (`generate_speech`, one compiled program) vs
           the torch Whisper encoder + projector, then `generate(inputs_embeds=...)`

EOS is disabled on both sides (HF: generation_config.eos_token_id = None;
speechjax: an id past the vocabulary), so every row generates exactly
max_new_tokens and both sides do the same work.

Where the time goes (fp32, 2 cores; `jax.profiler` trace of the compiled
generate joined to its HLO): the per-token step reads every weight once,
~108 MB per token for this 27M-parameter LM, in few-row matrix products that
read weights at a fifth to a third of the machine's streaming rate in XLA and
PyTorch alike (bench/small_matmul_probe.py); batch 32 costs 1.4-1.9x batch 8
per step. The prefill of 32 prompt tokens is ~100 ms of
a ~1.2 s generate; the token loop is one `while_loop` inside the compiled
program, so there is no host round trip per token. Per greedy token: the
matrix products ~80 % (MLP 55 %, LM head 13 %), reading a layer's K/V out of
the stacked [L, B, S, K, D] cache into the attention's [B, K, D, S] layout
~10 %, the rest small. Beam search (32 rows) keeps the cache where each
beam wrote it and reorders only the [B*K, S] slot indices (`rows`,
speechjax.models.transformer); reordering the whole cache to the surviving
beams' parents every step, and the copy that forced on the cache's in-place
update, took about a third of a beam step.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from bench import common
from bench import speech_models as sm
from speechjax.generation import generate_lm, generate_speech
from speechjax.hf import load_pretrained

NUM_BEAMS = 4


def _compare(ours, theirs, *, rows: int, new_tokens: int, reps: int, label: str, log) -> dict[str, Any]:
  """Times ours/theirs interleaved after one warm-up call each; token agreement of the outputs."""
  start = time.perf_counter()
  jax_tokens = ours()
  jax_first = time.perf_counter() - start
  hf_tokens = theirs()
  if hf_tokens.shape != (rows, new_tokens):
    raise RuntimeError(f"bench.decode ({label}): transformers generated {hf_tokens.shape}, expected "
                       f"{(rows, new_tokens)} (did EOS stop it?)")
  times = common.interleaved_timings({"speechjax": ours, "transformers": theirs}, reps)
  speedup = common.paired_speedup(times["transformers"], times["speechjax"])
  # On a random model near-ties can flip a token and the rows diverge after
  # it, so report the agreement of the prefix up to the first mismatch.
  same = jax_tokens == hf_tokens
  prefix = np.where(same.all(1), new_tokens, np.argmin(same, axis=1))
  tokens = rows * new_tokens
  result = {
      "new_tokens": new_tokens,
      "seconds": {k: common.spread(v) for k, v in times.items()},
      "raw_seconds": times,
      "tokens_per_s": {k: tokens / common.spread(v)["median"] for k, v in times.items()},
      "speedup": speedup,
      "speechjax_compile_and_first_call_seconds": jax_first,
      "identical_prefix_fraction": float(prefix.mean() / new_tokens),
      "identical_rows_fraction": float(same.all(1).mean()),
      "reps": reps,
  }
  log(f"[decode {label}] speechjax {result['tokens_per_s']['speechjax']:.0f} tok/s, transformers "
      f"{result['tokens_per_s']['transformers']:.0f} tok/s, speed-up {speedup['median']:.2f}x, "
      f"identical prefix {result['identical_prefix_fraction']:.0%} (first call {jax_first:.1f}s)")
  return result


def _hf_lm(lm):
  hf = copy.deepcopy(lm).eval()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  return hf


def run(size: sm.BenchSize, lm, lm_dir: str, *, reps: int = 5, log=print, dtype=jnp.float32,
        device=None, beam: bool = True) -> dict[str, Any]:
  """Greedy (and beam) decoding of the LM alone. dtype: speechjax's params and
  compute (the HF `lm` is used as given); device: where the prompt tensors go
  for transformers (None: CPU). The greedy row's keys sit at the top level
  (as they always have); the beam row is under 'beam'."""
  import torch  # pylint: disable=import-outside-toplevel
  b, t, n = size.decode_batch, size.decode_prompt, size.decode_new_tokens
  rs = np.random.RandomState(1)
  prompt = rs.randint(3, size.vocab, (b, t)).astype(np.int32)
  mask = np.ones_like(prompt)
  model, params = load_pretrained(lm_dir, dtype=dtype)
  never = size.vocab  # an id no argmax can produce: no row stops early
  hf = _hf_lm(lm)
  prompt_t = torch.from_numpy(prompt).long().to(device or "cpu")
  mask_t = torch.from_numpy(mask).long().to(device or "cpu")

  def ours(method="greedy"):
    out = generate_lm(model, params, prompt, mask, max_new_tokens=n, eos_id=never, pad_id=0,
                      method=method, num_beams=NUM_BEAMS, length_penalty=1.0, early_stopping=False,
                      length_bucket=t)
    return np.asarray(out.tokens)

  def theirs(num_beams=1):
    with torch.inference_mode():
      out = hf.generate(input_ids=prompt_t, attention_mask=mask_t, max_new_tokens=n,
                        min_new_tokens=0, do_sample=False, num_beams=num_beams, use_cache=True,
                        length_penalty=1.0, early_stopping=False)
    return out[:, t:].cpu().numpy()

  result = {"batch": b, "prompt_tokens": t,
            **_compare(ours, theirs, rows=b, new_tokens=n, reps=reps, label="greedy", log=log)}
  if beam:
    result["beam"] = {"batch": b, "prompt_tokens": t, "num_beams": NUM_BEAMS,
                      **_compare(lambda: ours("beam"), lambda: theirs(NUM_BEAMS), rows=b, new_tokens=n,
                                 reps=reps, label=f"beam {NUM_BEAMS}", log=log)}
  return result


def run_speech(size: sm.BenchSize, hf_models, *, reps: int = 5, log=print, dtype=jnp.float32,
               device=None) -> dict[str, Any]:
  """Greedy decoding through the speech LLM: `size.decode_batch` rows of
  `size.audio_frames` mel frames (-> size.audio_tokens audio tokens) followed
  by a `size.decode_prompt`-token text prompt; hf_models as
  speech_models.build_hf_models returns them. dtype: speechjax's weights and
  compute (the torch models are used as given, features cast to their
  dtype); device: where the torch inputs go (None: CPU)."""
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  encoder, projector, lm, enc_dir, lm_dir = hf_models
  b, t, n, m = size.decode_batch, size.decode_prompt, size.decode_new_tokens, size.audio_tokens
  rs = np.random.RandomState(2)
  features = rs.randn(b, size.mel_bins, size.audio_frames).astype(np.float32)
  text = rs.randint(3, size.vocab, (b, t)).astype(np.int32)
  model, variables = sm.jax_speech_llm(size, enc_dir, lm_dir, projector, lora=False,
                                       dtype=jnp.dtype(dtype).name)
  if jnp.dtype(dtype) != jnp.float32:  # weights stored as the torch side stores them
    variables = jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)
  batch = {"features": features, "feature_mask": np.ones((b, size.audio_frames), np.int32),
           "input_ids": np.concatenate([np.full((b, m), sm.AUDIO_PLACEHOLDER_ID, np.int32), text], 1),
           "attention_mask": np.ones((b, m + t), np.int32)}
  never = size.vocab

  def ours():
    out = generate_speech(model, variables, batch, max_new_tokens=n, eos_id=never, pad_id=0,
                          method="greedy", length_bucket=m + t)
    return np.asarray(out.tokens)

  hf, enc, proj = _hf_lm(lm), copy.deepcopy(encoder).eval(), copy.deepcopy(projector).eval()
  device = device or "cpu"
  features_t = torch.from_numpy(features).to(device=device, dtype=next(enc.parameters()).dtype)
  text_t = torch.from_numpy(text).long().to(device)
  mask_t = torch.ones((b, m + t), dtype=torch.long, device=device)

  def theirs():
    with torch.inference_mode():
      audio = proj(enc(features_t).last_hidden_state.to(next(proj.parameters()).dtype))
      audio = audio.to(next(hf.parameters()).dtype)
      embeds = torch.cat([audio, hf.get_input_embeddings()(text_t)], dim=1)
      out = hf.generate(inputs_embeds=embeds, attention_mask=mask_t, max_new_tokens=n, min_new_tokens=0,
                        do_sample=False, num_beams=1, use_cache=True)
    return out.cpu().numpy()  # with inputs_embeds only the new tokens come back

  return {"batch": b, "audio_frames": size.audio_frames, "audio_tokens": m, "prompt_tokens": t,
          **_compare(ours, theirs, rows=b, new_tokens=n, reps=reps, label="speech greedy", log=log)}
