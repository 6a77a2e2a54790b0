"""Augmentations do what they say: SpecAugment masks, noise SNR, speed perturbation."""

from __future__ import annotations

import numpy as np
import pytest

from speechjax.data import augment, features


def _voiced(seconds=2.0, sr=16000, f0=150.0):
  t = np.arange(int(seconds * sr)) / sr
  wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 12))
  return (0.2 * wave * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def test_spec_augment_masks_bands_at_the_floor():
  wave = _voiced()
  feats = np.asarray(features.log_mel(wave))
  floor = feats.min()
  rng = np.random.default_rng(0)
  valid = 150  # pretend the last 50 frames are padding
  out = augment.spec_augment(feats, valid, rng, num_freq_masks=2, freq_mask_width=20,
                             num_time_masks=2, time_mask_width=30, max_time_fraction=0.2)
  changed = out != feats
  assert changed.any() and out.shape == feats.shape
  np.testing.assert_array_equal(out[changed], floor)
  freq_rows = np.flatnonzero(np.all(out == floor, axis=1) & ~np.all(feats == floor, axis=1))
  time_cols = np.flatnonzero(np.all(out == floor, axis=0) & ~np.all(feats == floor, axis=0))
  assert 0 < len(freq_rows) <= 40 and 0 < len(time_cols) <= 2 * int(0.2 * valid)
  assert time_cols.max() < valid  # time masks stay inside the valid frames
  # Every changed cell lies in a masked row or a masked column.
  rows, cols = np.nonzero(changed)
  assert np.all(np.isin(rows, freq_rows) | np.isin(cols, time_cols))
  again = augment.spec_augment(feats, valid, np.random.default_rng(0), num_freq_masks=2,
                               freq_mask_width=20, num_time_masks=2, time_mask_width=30,
                               max_time_fraction=0.2)
  np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
@pytest.mark.parametrize("color", ["white", "pink"])
def test_additive_noise_hits_the_requested_snr(snr_db, color):
  clean = _voiced()
  noisy = augment.add_noise(clean, snr_db, np.random.default_rng(1), color)
  noise = noisy - clean
  measured = 10 * np.log10(
      np.mean(clean.astype(np.float64)**2) / np.mean(noise.astype(np.float64)**2))
  assert abs(measured - snr_db) < 0.05
  assert noisy.dtype == np.float32 and noisy.shape == clean.shape
  silent = np.zeros(100, np.float32)
  np.testing.assert_array_equal(augment.add_noise(silent, 10.0, np.random.default_rng(0)), silent)
  if color == "pink":  # more energy in low than in high frequencies
    spectrum = np.abs(np.fft.rfft(noise))**2
    assert spectrum[10:len(spectrum) // 10].mean() > 5 * spectrum[len(spectrum) // 2:].mean()


def test_random_noise_snr_in_range():
  rng = np.random.default_rng(2)
  for _ in range(20):
    _, snr = augment.random_noise(_voiced(0.2), rng, (5.0, 15.0))
    assert 5.0 <= snr <= 15.0


@pytest.mark.parametrize("factor", [0.9, 1.0, 1.1])
def test_speed_perturbation_scales_length_and_pitch(factor):
  wave = _voiced(2.0, f0=200.0)
  out = augment.speed_perturb(wave, factor)
  assert abs(out.size - wave.size / factor) <= 2
  spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
  peak_hz = np.argmax(spectrum) * 16000 / out.size
  assert abs(peak_hz - 200.0 * factor) < 3.0
  rng = np.random.default_rng(0)
  seen = {augment.random_speed(wave, rng)[1] for _ in range(30)}
  assert seen == {0.9, 1.0, 1.1}
  with pytest.raises(ValueError):
    augment.speed_perturb(wave, 0.0)
