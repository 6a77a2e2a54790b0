"""Audio decoding/resampling and Whisper log-mel parity with transformers."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from speechjax.data import audio as audio_lib
from speechjax.data import features


def _speech_like(num_samples: int, sr: int = 16000, seed: int = 0) -> np.ndarray:
  """Glottal-pulse-like harmonics with a moving pitch, syllable envelope and noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(num_samples) / sr
  f0 = 110 + 40 * np.sin(2 * np.pi * 0.8 * t) + 10 * rng.standard_normal()
  phase = 2 * np.pi * np.cumsum(f0) / sr
  voiced = sum(np.sin(k * phase + rng.uniform(0, 6)) / k for k in range(1, 30))
  envelope = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None)**1.5
  return (0.15 * voiced * envelope + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


def _tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
  return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


@pytest.mark.parametrize("fmt,subtype,sr,channels", [("WAV", "PCM_16", 16000, 1),
                                                     ("WAV", "PCM_24", 44100, 2),
                                                     ("WAV", "PCM_U8", 8000, 1),
                                                     ("WAV", "FLOAT", 48000, 1),
                                                     ("WAV", "PCM_32", 22050, 3),
                                                     ("FLAC", "PCM_16", 22050, 2),
                                                     ("OGG", "VORBIS", 44100, 2)])
def test_load_audio_any_format_rate_and_channels(tmp_path, fmt, subtype, sr, channels):
  tone = _tone(1.0, sr)
  data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
  path = tmp_path / f"x.{fmt.lower()}"
  sf.write(str(path), data, sr, format=fmt, subtype=subtype)
  out = audio_lib.load_audio(str(path))
  assert out.dtype == np.float32 and out.ndim == 1
  assert abs(out.size - 16000) <= 2
  expected = _tone(1.0, 16000)[:out.size]
  inner = slice(400, out.size - 400)  # resampler edges
  tolerance = 0.05 if fmt == "OGG" or subtype == "PCM_U8" else 2e-3
  np.testing.assert_allclose(out[inner], expected[inner], atol=tolerance)


def test_in_memory_int_and_float_conversion():
  ints = np.array([-32768, 0, 16384, 32767], np.int16)
  np.testing.assert_allclose(audio_lib.to_float32(ints), [-1.0, 0.0, 0.5, 32767 / 32768])
  stereo = np.stack([ints, np.zeros_like(ints)], axis=1)
  np.testing.assert_allclose(audio_lib.to_model_input(stereo, 16000),
                             audio_lib.to_float32(ints) / 2)
  int32 = np.array([2**30], np.int32)
  np.testing.assert_allclose(audio_lib.to_float32(int32), [0.5])
  assert audio_lib.to_model_input(_tone(1.0, 8000), 8000).size == 16000
  back = audio_lib.int16_to_float(audio_lib.float_to_int16(np.array([0.25, -2.0], np.float32)))
  np.testing.assert_allclose(back, [0.25, -32767 / 32768], atol=1e-4)


def test_load_audio_errors_name_the_file(tmp_path):
  with pytest.raises(audio_lib.AudioError, match="missing.wav"):
    audio_lib.load_audio(str(tmp_path / "missing.wav"))
  bad = tmp_path / "bad.flac"
  bad.write_bytes(b"fLaC" + b"\x00" * 40)
  with pytest.raises(audio_lib.AudioError, match="bad.flac"):
    audio_lib.load_audio(str(bad))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
  # transformers builds librosa's Slaney filters (librosa itself is left out:
  # importing it costs ~10 s of numba start-up for the same check).
  from transformers import WhisperFeatureExtractor
  ours = features.mel_filters(n_mels)
  np.testing.assert_allclose(ours, WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T,
                             atol=1e-7)
  assert ours.shape == (n_mels, 201) and np.all(ours.sum(1) > 0)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("stft", ["rfft", "matmul"])
def test_log_mel_matches_whisper_feature_extractor(n_mels, stft):
  from transformers import WhisperFeatureExtractor
  extractor = WhisperFeatureExtractor(feature_size=n_mels)
  waves = [_speech_like(16000 * 3 + 77, seed=1), _speech_like(16000 * 2 + 5, seed=2) * 0.01]
  for wave in waves:
    ref = extractor(wave, sampling_rate=16000, padding="longest",
                    return_tensors="np").input_features[0]
    ours = np.asarray(features.log_mel(wave, n_mels=n_mels, stft=stft))
    assert ours.shape == ref.shape == (n_mels, wave.size // 160)
    assert np.abs(ours - ref).max() <= 2e-4
  # Batched input of equal-length rows: each row clamped at its own max, like HF's batch path.
  batch = np.stack([_speech_like(32000, seed=3), 0.05 * _speech_like(32000, seed=4)])
  ref = extractor(list(batch), sampling_rate=16000, padding="longest",
                  return_tensors="np").input_features
  ours = np.asarray(features.log_mel(batch, n_mels=n_mels, stft=stft))
  assert ours.shape == ref.shape == (2, n_mels, 200)
  assert np.abs(ours - ref).max() <= 2e-4


@pytest.mark.parametrize("hop_length", [240, 320])
def test_longer_hop_matches_whisper_feature_extractor(hop_length):
  from transformers import WhisperFeatureExtractor
  extractor = WhisperFeatureExtractor(hop_length=hop_length)
  wave = _speech_like(16000 * 3 + 77, seed=5)
  ref = extractor(wave, sampling_rate=16000, padding="longest", return_tensors="np").input_features[0]
  ours = np.asarray(features.log_mel(wave, hop_length=hop_length))
  assert ours.shape == ref.shape == (80, wave.size // hop_length)
  assert np.abs(ours - ref).max() <= 2e-4
  lengths = np.array([wave.size, 16000])
  batch = np.stack([wave, np.pad(wave[:16000], (0, wave.size - 16000))])
  feats, mask = features.log_mel_with_mask(batch, lengths, hop_length=hop_length)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), lengths // hop_length)
  assert np.abs(np.asarray(feats)[0] - ref).max() <= 2e-4


def test_bad_hop_length_is_refused():
  with pytest.raises(ValueError, match="hop_length=100"):
    features.log_mel(np.zeros(16000, np.float32), hop_length=100)


def test_log_mel_resamples_other_rates():
  wave16 = _speech_like(16000 * 2)
  wave8 = audio_lib.resample(wave16, 16000, 8000)
  out = np.asarray(features.log_mel(wave8, sample_rate=8000))
  assert out.shape == (80, 200)


def test_log_mel_with_mask_is_independent_of_padding():
  lengths = np.array([16000 * 2 + 123, 16000 + 7])
  waves = [_speech_like(int(n), seed=i) for i, n in enumerate(lengths)]
  results = []
  for total in (16000 * 3, 16000 * 5):
    batch = np.zeros((2, total), np.float32)
    for row, wave in enumerate(waves):
      batch[row, :wave.size] = wave
    feats, mask = features.log_mel_with_mask(batch, lengths)
    feats, mask = np.asarray(feats), np.asarray(mask)
    assert feats.shape == (2, 80, total // 160) and mask.shape == (2, total // 160)
    np.testing.assert_array_equal(mask.sum(1), lengths // 160)
    np.testing.assert_array_equal(mask, np.asarray(features.frame_mask(lengths, total // 160)))
    for row, n in enumerate(lengths):
      valid = feats[row, :, :n // 160]
      padding = feats[row, :, n // 160:]
      floor = valid.max() - 2.0  # (max - 8 + 4) / 4 relative to the scaled max
      np.testing.assert_allclose(padding, floor, atol=1e-5)
      assert valid.min() >= floor - 1e-5
      # Away from the end (where Whisper's own padding also sees zeros), frames
      # equal the unpadded computation.
      alone = np.asarray(features.log_mel(waves[row]))
      inner = (n - 200) // 160
      assert np.abs(valid[:, :inner] - alone[:, :inner]).max() <= 2e-4
    results.append(feats[:, :, :lengths.max() // 160] * mask[:, None, :lengths.max() // 160])
  np.testing.assert_allclose(results[0], results[1], atol=1e-5)


def test_log_mel_rejects_bad_shapes():
  with pytest.raises(ValueError, match="samples"):
    features.log_mel(np.zeros((2, 3, 1000), np.float32))
  with pytest.raises(ValueError, match="lengths"):
    features.log_mel_with_mask(np.zeros((2, 1000), np.float32), np.array([5]))


def _reference_features(row: np.ndarray, valid_frames: int) -> np.ndarray:
  """Whisper features of one padded row in float64 numpy (centred frames,
  reflect padding, periodic Hann, rfft, Slaney mels), clamped at the max over
  its first `valid_frames` frames; later frames hold the floor."""
  count = row.size // 160
  padded = np.pad(row.astype(np.float64), 200, mode="reflect")
  frames = np.stack([padded[i * 160:i * 160 + 400] for i in range(count)])
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
  power = np.abs(np.fft.rfft(frames * window, axis=-1))**2
  log_spec = np.log10(np.maximum(features.mel_filters(80).astype(np.float64) @ power.T, 1e-10))
  peak = log_spec[:, :valid_frames].max() if valid_frames else -10.0
  out = np.maximum(log_spec, peak - 8.0)
  out[:, valid_frames:] = peak - 8.0
  return (out + 4.0) / 4.0


@pytest.mark.parametrize("frames", [384, 300])  # whole blocks of 128 frames; a last block overlapping
def test_padded_batch_rows_match_a_numpy_reference_at_block_edges(frames):
  # Rows end inside, just before and just after a 128-frame STFT block, and one row
  # has no whole frame: skipped blocks must not change any row's features.
  samples = frames * 160 + 77
  lengths = np.array([samples, 100, 127 * 160 + 5, 128 * 160, 129 * 160 + 159, 256 * 160 + 1])
  batch = np.zeros((lengths.size, samples), np.float32)
  for row, n in enumerate(lengths):
    batch[row, :n] = _speech_like(int(n), seed=10 + row)
  feats, mask = features.log_mel_with_mask(batch, lengths)
  feats = np.asarray(feats)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), lengths // 160)
  for row, n in enumerate(lengths):
    ref = _reference_features(batch[row], int(n) // 160)
    assert np.abs(feats[row] - ref).max() <= 2e-4, row
