"""Whisper-compatible log-mel features computed in JAX.

Matches `transformers.WhisperFeatureExtractor` (and openai/whisper's
`log_mel_spectrogram`): 25 ms Hann window (n_fft 400, periodic), 10 ms hop
(160), centred frames with reflect padding, power spectrum, Slaney mel filters
(librosa's default, 80 or 128 bins), then

    log_spec = log10(max(mel, 1e-10))
    log_spec = max(log_spec, log_spec.max() - 8)
    features = (log_spec + 4) / 4

and the last STFT frame dropped, so `num_samples // 160` frames. Every
function takes `hop_length` (160 by default; 240 or 320 give the same features
at a lower frame rate, as WhisperFeatureExtractor(hop_length=...) does).

Padded batches: Whisper clamps at "utterance max - 8 dB*10"; with padding, the
max must not depend on how much padding a batch has. `log_mel_with_mask`
therefore takes the max per example over its valid frames only
(frame < length // 160) and fills padded frames with that example's floor
value (max - 8 + 4) / 4, which is exactly what Whisper produces for the silent
padding it appends up to 30 s. Valid frames near the end see zeros instead of
a reflection of the signal, as in Whisper's own 30 s padding.

The STFT uses `jnp.fft.rfft` on frames built with strided slices (no
gather), one batch row at a time, in blocks of BLOCK_FRAMES frames (1.28 s at
hop 160). A block that starts past a row's valid frames is skipped, so the
padding of a batch costs little: 16 clips of 1-15 s padded to the longest
take about half the time the whole padded batch would. The mel product runs
per group of bands over the bins the group touches. On a 2-core CPU the rfft
measured 1.6-2.5x faster than a DFT matmul (`stft='matmul'`, kept for
accelerators and comparison). bench/features_bench.py compares the speed with
WhisperFeatureExtractor and librosa.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the per-utterance max (80 dB)
BLOCK_FRAMES = 128  # STFT frames computed together (1.28 s at hop 160)
MEL_BAND_GROUPS = 4  # the mel product runs per group of bands (see _log_mel_block)


def num_frames(num_samples: int | np.ndarray, hop_length: int = HOP_LENGTH) -> int | np.ndarray:
  """Feature frames for `num_samples` samples (Whisper drops the last STFT frame)."""
  return num_samples // hop_length


def check_hop_length(hop_length: int) -> int:
  """The hop must divide into the frame pieces `_frames` cuts (a multiple of 80
  samples, <= n_fft): 160 (Whisper's 10 ms), 240, 320 (20 ms) or 400."""
  hop_length = int(hop_length)
  if not 0 < hop_length <= N_FFT or hop_length % 80:
    raise ValueError(f"hop_length={hop_length}: expected a multiple of 80 samples up to {N_FFT} "
                     "(160 = Whisper 10 ms, 320 = 20 ms)")
  return hop_length


def _hz_to_mel(freqs: np.ndarray) -> np.ndarray:
  """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa htk=False)."""
  freqs = np.asarray(freqs, np.float64)
  f_sp = 200.0 / 3
  mels = freqs / f_sp
  min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
  log_region = freqs >= min_log_hz
  mels = np.where(log_region, min_log_mel + np.log(np.maximum(freqs, 1e-10) / min_log_hz) / logstep,
                  mels)
  return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
  mels = np.asarray(mels, np.float64)
  f_sp = 200.0 / 3
  min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
  return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)),
                  f_sp * mels)


@functools.cache
def mel_filters(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
  """Slaney-normalised triangular mel filters [n_mels, 1 + n_fft // 2] (= librosa.filters.mel)."""
  fft_freqs = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
  mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2))
  fdiff = np.diff(mel_freqs)
  ramps = mel_freqs[:, None] - fft_freqs[None, :]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_freqs[2:n_mels + 2] - mel_freqs[:n_mels]))[:, None]
  return weights.astype(np.float32)


@functools.cache
def _hann_window(n_fft: int = N_FFT) -> np.ndarray:
  """Periodic Hann window, as torch.hann_window / Whisper use."""
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


@functools.cache
def _mel_band_groups(n_mels: int) -> tuple[tuple[int, int, np.ndarray], ...]:
  """The mel filters cut into MEL_BAND_GROUPS runs of bands, each with the
  bins it touches: (first bin, end bin, weights [bands, end - first])."""
  weights = mel_filters(n_mels)
  groups = []
  edges = np.linspace(0, n_mels, MEL_BAND_GROUPS + 1).astype(int)
  for start, stop in zip(edges[:-1], edges[1:]):
    bins = np.flatnonzero(weights[start:stop].any(axis=0))
    lo, hi = (int(bins.min()), int(bins.max()) + 1) if bins.size else (0, 1)  # empty filters
    groups.append((lo, hi, weights[start:stop, lo:hi]))
  return tuple(groups)


def _frames(padded: jax.Array, count: int, hop_length: int = HOP_LENGTH) -> jax.Array:
  """`count` frames [count, N_FFT] of reflect-padded samples (frame i starts
  at padded[i * hop]), built without a gather.

  N_FFT (400) and the hop are both multiples of 80: cut the samples into
  80-sample pieces; frame i is pieces 2i .. 2i+4 (at hop 160). Five strided
  slices stacked is much faster on XLA:CPU than a gather or a concat of hop blocks.
  """
  piece = math.gcd(N_FFT, hop_length)
  per_frame, per_hop = N_FFT // piece, hop_length // piece
  num_pieces = (count - 1) * per_hop + per_frame
  pieces = padded[:num_pieces * piece].reshape(num_pieces, piece)
  stacked = jnp.stack(
      [pieces[k:k + (count - 1) * per_hop + 1:per_hop] for k in range(per_frame)], axis=-2)
  return stacked.reshape(count, N_FFT)


def _power_spectrum(padded: jax.Array, count: int, stft: str, hop_length: int) -> jax.Array:
  """|STFT|^2 [count, 1 + N_FFT // 2] of the frames of `padded`."""
  frames = _frames(padded, count, hop_length) * _hann_window()
  if stft == "rfft":
    spec = jnp.fft.rfft(frames, n=N_FFT, axis=-1)
    return spec.real**2 + spec.imag**2
  if stft == "matmul":
    k = np.arange(1 + N_FFT // 2)
    n = np.arange(N_FFT)
    angle = 2.0 * np.pi * np.outer(n, k) / N_FFT
    basis = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1).astype(np.float32)
    out = jnp.matmul(frames, basis, precision=jax.lax.Precision.HIGHEST)
    re, im = jnp.split(out, 2, axis=-1)
    return re**2 + im**2
  raise ValueError(f"stft must be 'rfft' or 'matmul', got {stft!r}")


def _log_mel_block(padded: jax.Array, count: int, n_mels: int, stft: str,
                   hop_length: int) -> jax.Array:
  """log10 mel power [n_mels, count] of `count` frames of `padded`.

  A triangular mel filter touches a handful of bins: one product per group of
  bands over the bins the group touches does a quarter of the multiply-adds
  of the dense [n_mels, 201] product.
  """
  power = _power_spectrum(padded, count, stft, hop_length)
  mel = jnp.concatenate([
      jax.lax.dot_general(jnp.asarray(w), power[:, lo:hi], (((1,), (1,)), ((), ())),
                          precision=jax.lax.Precision.HIGHEST)
      for lo, hi, w in _mel_band_groups(n_mels)], axis=0)
  return jnp.log10(jnp.maximum(mel, LOG_FLOOR))


def _row_features(row: jax.Array, valid_frames: jax.Array, n_mels: int, stft: str,
                  hop_length: int) -> jax.Array:
  """Whisper features [n_mels, samples // hop] of one row [samples] whose first
  `valid_frames` frames are real: the clamp max is taken over those, later
  frames hold the floor value (max - 8 + 4) / 4.

  The frames go through the STFT in blocks of BLOCK_FRAMES, each under a
  lax.cond that skips it when it starts at or past `valid_frames`, so the
  padding of a batch costs almost nothing. The cond also makes each block a
  computation of its own over a materialised slice: XLA:CPU runs that faster
  than the same blocks fused into the row (measured with every block valid).
  The last block overlaps the one before it so that all have one static shape.
  """
  count = row.shape[-1] // hop_length
  pad = N_FFT // 2
  padded = jnp.pad(row, (pad, pad), mode="reflect")
  size = min(BLOCK_FRAMES, count)
  compute = functools.partial(_log_mel_block, count=size, n_mels=n_mels, stft=stft,
                              hop_length=hop_length)
  skip = lambda segment: jnp.zeros((n_mels, size), jnp.float32)
  blocks, done = [], 0
  for start in range(0, count, size):
    start = min(start, count - size)
    segment = padded[start * hop_length:start * hop_length + (size - 1) * hop_length + N_FFT]
    block = jax.lax.cond(done < valid_frames, compute, skip, segment)
    blocks.append(block[:, done - start:])  # frames before `done` are in the previous block
    done = start + size
  log_spec = jnp.concatenate(blocks, axis=1)
  valid = jnp.arange(count)[None, :] < valid_frames
  peak = jnp.max(jnp.where(valid, log_spec, -jnp.inf))
  peak = jnp.where(jnp.isfinite(peak), peak, jnp.log10(LOG_FLOOR))  # a row with no frame
  floor = peak - DYNAMIC_RANGE
  return (jnp.where(valid, jnp.maximum(log_spec, floor), floor) + 4.0) / 4.0


@functools.partial(jax.jit, static_argnames=("n_mels", "stft", "hop_length"))
def _log_mel_jit(audio: jax.Array, lengths: jax.Array, n_mels: int, stft: str,
                 hop_length: int) -> tuple[jax.Array, jax.Array]:
  """(features [batch, n_mels, frames], mask [batch, frames]) of [batch, samples]."""
  row = functools.partial(_row_features, n_mels=n_mels, stft=stft, hop_length=hop_length)
  # One row at a time keeps the frames of a row in cache: ~2x faster on CPU
  # than one big [batch, frames, 400] FFT, and no slower elsewhere.
  features = jax.lax.map(lambda args: row(*args), (audio, lengths // hop_length))
  return features, frame_mask(lengths, audio.shape[-1] // hop_length, hop_length)


def frame_mask(lengths, frames: int, hop_length: int = HOP_LENGTH):
  """int32 [B, frames]: 1 for frames computed from real samples (frame < length // hop)."""
  lengths = jnp.asarray(lengths)
  return (jnp.arange(frames)[None, :] < (lengths // hop_length)[:, None]).astype(jnp.int32)


def _prepare(audio, sample_rate: int) -> jax.Array:
  if sample_rate != SAMPLE_RATE:
    from speechjax.data import audio as audio_lib  # pylint: disable=g-import-not-at-top
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
      audio = audio_lib.resample(audio, sample_rate, SAMPLE_RATE)
    else:
      audio = np.stack([audio_lib.resample(a, sample_rate, SAMPLE_RATE) for a in audio])
  audio = jnp.asarray(audio, jnp.float32)
  if audio.ndim not in (1, 2):
    raise ValueError(
        f"log_mel expects audio [samples] or [batch, samples], got shape {audio.shape}")
  if audio.shape[-1] < N_FFT // 2 + 1:
    raise ValueError(f"log_mel needs at least {N_FFT // 2 + 1} samples for reflect padding, "
                     f"got shape {audio.shape}")
  return audio


def log_mel(audio, sample_rate: int = SAMPLE_RATE, n_mels: int = 80, *,
            stft: str = "rfft", hop_length: int = HOP_LENGTH) -> jax.Array:
  """Whisper log-mel features.

  Args:
    audio: float waveform [samples] or [batch, samples] in [-1, 1]. Audio at
      another rate is resampled (on host, with soxr) first.
    sample_rate: rate of `audio`.
    n_mels: 80 (Whisper v1-v3 small models) or 128 (large-v3).
    stft: 'rfft' (default, faster on CPU) or 'matmul' (DFT as a matmul).
    hop_length: samples between frames; 160 (10 ms) is Whisper's. A longer
      hop (320 = 20 ms) halves the frames an encoder trained on them reads.

  Returns:
    float32 [n_mels, samples // hop] or [batch, n_mels, samples // hop]. Each
    batch row is clamped at its own max - 8, over all of its frames: use
    `log_mel_with_mask` for padded batches.
  """
  audio = _prepare(audio, sample_rate)
  batch = audio.reshape(-1, audio.shape[-1])
  # Every frame valid. The lengths go in as an argument, not a constant, so the
  # STFT blocks stay under their lax.cond (faster on CPU, see _row_features).
  lengths = jnp.full((batch.shape[0],), audio.shape[-1], jnp.int32)
  features, _ = _log_mel_jit(batch, lengths, n_mels=n_mels, stft=stft,
                             hop_length=check_hop_length(hop_length))
  return features.reshape(audio.shape[:-1] + features.shape[1:])


def log_mel_with_mask(audio, lengths, sample_rate: int = SAMPLE_RATE, n_mels: int = 80, *,
                      stft: str = "rfft",
                      hop_length: int = HOP_LENGTH) -> tuple[jax.Array, jax.Array]:
  """Log-mel of a right-padded batch plus its frame mask.

  Args:
    audio: float [batch, samples], example i valid in [:lengths[i]].
    lengths: int [batch] valid samples per row (at 16 kHz; with another
      `sample_rate` pass lengths at that rate, they are rescaled).

  Returns:
    (features float32 [batch, n_mels, samples // hop], mask int32 [batch, frames]).
    The clamp max is per example over valid frames; padded frames hold the
    example's floor value, like Whisper's silent padding.
  """
  lengths = np.asarray(lengths)
  if sample_rate != SAMPLE_RATE:
    lengths = np.round(lengths * (SAMPLE_RATE / sample_rate)).astype(np.int64)
  audio = _prepare(audio, sample_rate)
  if audio.ndim != 2 or lengths.shape != (audio.shape[0],):
    raise ValueError(f"log_mel_with_mask expects audio [batch, samples] and lengths [batch], got "
                     f"{audio.shape} and {lengths.shape}")
  return _log_mel_jit(audio, jnp.asarray(lengths, jnp.int32), n_mels=n_mels, stft=stft,
                      hop_length=check_hop_length(hop_length))


# Raw-sample input of wave encoders (wav2vec2, HuBERT, WavLM).
WAVE_NORM_EPS = 1e-7  # transformers' Wav2Vec2FeatureExtractor adds it to the variance


def waves_with_mask(audio, lengths, *, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
  """A right-padded batch of 16 kHz samples as a wave encoder reads it.

  Args:
    audio: float [batch, samples], example i valid in [:lengths[i]].
    lengths: int [batch] valid samples per row.
    normalize: scale each row to zero mean and unit variance over its valid
      samples (Wav2Vec2FeatureExtractor's do_normalize), so padding does not
      change an example's statistics.

  Returns:
    (samples float32 [batch, samples] with 0 past each length,
     mask int32 [batch, samples], 1 on valid samples).
  """
  audio = np.asarray(audio, np.float32)
  lengths = np.asarray(lengths, np.int64)
  if audio.ndim != 2 or lengths.shape != (audio.shape[0],):
    raise ValueError(f"waves_with_mask expects audio [batch, samples] and lengths [batch], got "
                     f"{audio.shape} and {lengths.shape}")
  mask = (np.arange(audio.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
  waves = np.where(mask > 0, audio, 0.0).astype(np.float32)
  if normalize:
    count = np.maximum(mask.sum(axis=1, keepdims=True), 1).astype(np.float64)
    mean = waves.sum(axis=1, keepdims=True, dtype=np.float64) / count
    var = (np.square(waves - mean) * mask).sum(axis=1, keepdims=True) / count
    scaled = (waves - mean) / np.sqrt(var + WAVE_NORM_EPS)
    waves = np.where(mask > 0, scaled, 0.0).astype(np.float32)
  return waves, mask
