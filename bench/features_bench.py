"""Log-mel feature extraction: speechjax.data.features.log_mel (jit'd JAX) vs
transformers' WhisperFeatureExtractor on the same [batch, samples] audio.

The two functions come from bench.input_throughput (the data pipeline's own
benchmark); here they run interleaved and the speed-up is the median of the
per-round ratios.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench import common
from bench.input_throughput import log_mel_functions

SAMPLE_RATE = 16000


def speech_like_audio(batch: int, seconds: float, seed: int = 0) -> np.ndarray:
  """[batch, samples] float32 in [-1, 1]: amplitude-modulated harmonics plus
  noise (the STFT costs the same whatever the content)."""
  rs = np.random.RandomState(seed)
  n = int(seconds * SAMPLE_RATE)
  t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
  rows = []
  for _ in range(batch):
    f0 = rs.uniform(90, 250)
    voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rs.uniform(2, 5) * t)
    rows.append(0.2 * envelope * voiced + 0.01 * rs.randn(n))
  return np.clip(np.stack(rows), -1, 1).astype(np.float32)


def run(batch: int = 16, seconds: float = 10.0, reps: int = 7, log=print) -> dict[str, Any]:
  waves = speech_like_audio(batch, seconds)
  ours, theirs = log_mel_functions(waves)
  start = time.perf_counter()
  ours_out = ours()
  compile_s = time.perf_counter() - start
  theirs_out = theirs()
  times = common.interleaved_timings({"speechjax": ours, "transformers": theirs}, reps)
  speedup = common.paired_speedup(times["transformers"], times["speechjax"])
  audio_seconds = batch * seconds
  result = {
      "batch_shape": list(waves.shape),
      "seconds": {k: common.spread(v) for k, v in times.items()},
      "raw_seconds": times,
      "x_realtime": {k: audio_seconds / common.spread(v)["median"] for k, v in times.items()},
      "speedup": speedup,
      "speechjax_compile_and_first_call_seconds": compile_s,
      "max_abs_diff": float(np.abs(ours_out - theirs_out).max()),
      "reps": reps,
  }
  log(f"[features] speechjax {result['x_realtime']['speechjax']:.0f}x real time, "
      f"WhisperFeatureExtractor {result['x_realtime']['transformers']:.0f}x, "
      f"speed-up {speedup['median']:.2f}x, max |diff| {result['max_abs_diff']:.1e}")
  return result
