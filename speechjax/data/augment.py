"""Training-time augmentation: speed perturbation, additive noise, SpecAugment.

All functions are numpy, take an explicit `np.random.Generator` and run on the
host inside the input pipeline (the pipeline seeds one generator per batch
from (seed, batch index), so augmentation is deterministic and resumable).
Order in the pipeline: speed -> noise on the waveform, SpecAugment on the
log-mel features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from speechjax.data import audio as audio_lib


def speed_perturb(audio: np.ndarray, factor: float,
                  sample_rate: int = audio_lib.SAMPLE_RATE) -> np.ndarray:
  """Plays `audio` `factor` times faster (pitch shifts with it, as in Kaldi/sox `speed`).

  Resampling from sample_rate * factor to sample_rate leaves
  round(len / factor) samples: 1.1 -> shorter and higher, 0.9 -> longer and lower.
  """
  if factor <= 0:
    raise ValueError(f"speed factor must be > 0, got {factor}")
  if factor == 1.0 or audio.size == 0:
    return audio
  return audio_lib.resample(audio, int(round(sample_rate * factor)), sample_rate)


def random_speed(
    audio: np.ndarray, rng: np.random.Generator,
    factors: Sequence[float] = (0.9, 1.0, 1.1)) -> tuple[np.ndarray, float]:
  factor = float(factors[rng.integers(len(factors))])
  return speed_perturb(audio, factor), factor


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator,
              color: str = "white") -> np.ndarray:
  """Adds Gaussian noise so that 10*log10(P_signal / P_noise) = snr_db.

  color: 'white', or 'pink' (1/f power, closer to room and fan noise).
  Silent input is returned unchanged (no signal power to scale against).
  """
  audio = np.asarray(audio, np.float32)
  signal_power = float(np.mean(audio.astype(np.float64)**2)) if audio.size else 0.0
  if signal_power == 0.0:
    return audio
  noise = rng.standard_normal(audio.size)
  if color == "pink":
    spectrum = np.fft.rfft(noise)
    spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1.0))
    noise = np.fft.irfft(spectrum, n=audio.size)
  elif color != "white":
    raise ValueError(f"noise color must be 'white' or 'pink', got {color!r}")
  noise *= np.sqrt(signal_power / 10**(snr_db / 10) / max(float(np.mean(noise**2)), 1e-20))
  return (audio + noise).astype(np.float32)


def random_noise(audio: np.ndarray, rng: np.random.Generator,
                 snr_range: Sequence[float] = (10.0, 30.0),
                 color: str = "white") -> tuple[np.ndarray, float]:
  snr = float(rng.uniform(snr_range[0], snr_range[1]))
  return add_noise(audio, snr, rng, color), snr


def spec_augment(features: np.ndarray, frames_valid: int, rng: np.random.Generator, *,
                 num_freq_masks: int = 2, freq_mask_width: int = 27, num_time_masks: int = 2,
                 time_mask_width: int = 40, max_time_fraction: float = 0.2,
                 floor: float | None = None) -> np.ndarray:
  """SpecAugment (Park et al., 2019) on one example's log-mel [n_mels, frames].

  Each mask is [start, start + w) with w uniform in [0, width]. Time masks
  stay inside the valid frames and are limited to `max_time_fraction` of
  them each (so short utterances are not wiped out). Masked cells get `floor`
  (default: the example's minimum over valid frames, i.e. Whisper's silence
  value), not zero, which for Whisper features would be a loud-ish value.
  """
  out = np.array(features, np.float32, copy=True)
  n_mels, frames = out.shape
  frames_valid = int(min(max(frames_valid, 0), frames))
  if floor is None:
    floor = float(out[:, :frames_valid].min()) if frames_valid else float(out.min())
  for _ in range(num_freq_masks):
    width = int(rng.integers(0, min(freq_mask_width, n_mels) + 1))
    start = int(rng.integers(0, n_mels - width + 1))
    out[start:start + width, :] = floor
  max_width = min(time_mask_width, int(max_time_fraction * frames_valid))
  for _ in range(num_time_masks):
    if max_width <= 0:
      break
    width = int(rng.integers(0, max_width + 1))
    start = int(rng.integers(0, frames_valid - width + 1))
    out[:, start:start + width] = floor
  return out
