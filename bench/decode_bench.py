"""Batched greedy decoding with a KV cache: speechjax.generation.generate_lm vs
transformers' `generate(do_sample=False)` on the same Qwen2 model and prompts.

EOS is disabled on both sides (HF: generation_config.eos_token_id = None;
speechjax: an id past the vocabulary), so every row generates exactly
max_new_tokens and both sides do the same work.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from bench import common
from bench import speech_models as sm
from speechjax.generation import generate_lm
from speechjax.hf import load_pretrained


def run(size: sm.BenchSize, lm, lm_dir: str, *, reps: int = 5, log=print, dtype=jnp.float32,
        device=None) -> dict[str, Any]:
  """dtype: speechjax's params and compute (the HF `lm` is used as given);
  device: where the prompt tensors go for transformers (None: CPU)."""
  import torch  # pylint: disable=import-outside-toplevel
  b, t, n = size.decode_batch, size.decode_prompt, size.decode_new_tokens
  rs = np.random.RandomState(1)
  prompt = rs.randint(3, size.vocab, (b, t)).astype(np.int32)
  mask = np.ones_like(prompt)

  model, params = load_pretrained(lm_dir, dtype=dtype)
  never = size.vocab  # an id no argmax can produce: no row stops early

  def ours():
    out = generate_lm(model, params, prompt, mask, max_new_tokens=n, eos_id=never, pad_id=0,
                      method="greedy", length_bucket=t)
    return np.asarray(out.tokens)

  hf = copy.deepcopy(lm).eval()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  prompt_t = torch.from_numpy(prompt).long().to(device or "cpu")
  mask_t = torch.from_numpy(mask).long().to(device or "cpu")

  def theirs():
    with torch.inference_mode():
      out = hf.generate(input_ids=prompt_t, attention_mask=mask_t, max_new_tokens=n,
                        min_new_tokens=0, do_sample=False, num_beams=1, use_cache=True)
    return out[:, t:].cpu().numpy()

  start = time.perf_counter()
  jax_tokens = ours()
  jax_first = time.perf_counter() - start
  hf_tokens = theirs()
  if hf_tokens.shape != (b, n):
    raise RuntimeError(f"bench.decode: transformers generated {hf_tokens.shape}, expected "
                       f"{(b, n)} (did EOS stop it?)")
  log(f"[decode] speechjax compiled + first call {jax_first:.1f}s")
  times = common.interleaved_timings({"speechjax": ours, "transformers": theirs}, reps)
  tokens = b * n
  speedup = common.paired_speedup(times["transformers"], times["speechjax"])
  # Greedy on a random model: near-ties can flip a token and the rows diverge
  # after it, so report the agreement of the prefix up to the first mismatch.
  same = jax_tokens == hf_tokens
  prefix = np.where(same.all(1), n, np.argmin(same, axis=1))
  result = {
      "batch": b, "prompt_tokens": t, "new_tokens": n,
      "seconds": {k: common.spread(v) for k, v in times.items()},
      "raw_seconds": times,
      "tokens_per_s": {k: tokens / common.spread(v)["median"] for k, v in times.items()},
      "speedup": speedup,
      "speechjax_compile_and_first_call_seconds": jax_first,
      "identical_prefix_fraction": float(prefix.mean() / n),
      "reps": reps,
  }
  log(f"[decode] speechjax {result['tokens_per_s']['speechjax']:.0f} tok/s, transformers "
      f"{result['tokens_per_s']['transformers']:.0f} tok/s, speed-up {speedup['median']:.2f}x, "
      f"identical greedy prefix {result['identical_prefix_fraction']:.0%}")
  return result
