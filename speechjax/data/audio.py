"""Audio decoding and resampling: any file soundfile reads -> float32 mono 16 kHz.

Everything downstream (features, augmentation, datasets) assumes float32 mono
audio at `SAMPLE_RATE` in [-1, 1]. Datasets store it as int16 to halve the
size; `int16_to_float` / `float_to_int16` convert between the two.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000


class AudioError(ValueError):
  """An audio file could not be read or holds no usable audio."""


def to_float32(audio: np.ndarray) -> np.ndarray:
  """Integer PCM (int8/16/32, uint8) or float audio -> float32 in [-1, 1]."""
  audio = np.asarray(audio)
  if audio.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
    return (audio.astype(np.float32) - 128.0) / 128.0
  if np.issubdtype(audio.dtype, np.integer):
    return (audio.astype(np.float32) / float(-np.iinfo(audio.dtype).min))
  if np.issubdtype(audio.dtype, np.floating):
    return audio.astype(np.float32, copy=False)
  raise AudioError(f"Unsupported audio dtype {audio.dtype}.")


def to_mono(audio: np.ndarray) -> np.ndarray:
  """[samples] or [samples, channels] -> [samples] by averaging channels."""
  audio = np.asarray(audio)
  if audio.ndim == 1:
    return audio
  if audio.ndim == 2:
    return audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0]
  raise AudioError(f"Expected audio [samples] or [samples, channels], got shape {audio.shape}.")


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
  """Band-limited resampling with soxr (high quality); no-op when rates match."""
  audio = np.asarray(audio, np.float32)
  if int(orig_sr) == int(target_sr) or audio.size == 0:
    return audio
  return soxr.resample(audio, int(orig_sr), int(target_sr),
                       quality="HQ").astype(np.float32, copy=False)


def to_model_input(audio: np.ndarray, sample_rate: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
  """Any in-memory audio (int or float, mono or [samples, channels]) -> float32 mono target_sr."""
  return resample(to_mono(to_float32(audio)), sample_rate, target_sr)


def load_audio(source: str | os.PathLike | bytes | Any, target_sr: int = SAMPLE_RATE) -> np.ndarray:
  """Decodes wav/flac/ogg/mp3/... (path, bytes or file object) to float32 mono target_sr.

  Raises AudioError naming the file when it is missing or cannot be decoded.
  Content checks (empty, NaN, too long) are left to `validate.check_audio`.
  """
  name = source if isinstance(source, (str, os.PathLike)) else "<in-memory audio>"
  if isinstance(source, (bytes, bytearray)):
    source = io.BytesIO(source)
  if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
    raise AudioError(f"Audio file not found: {name}")
  try:
    # libsndfile scales integer PCM to [-1, 1) itself (x / 2**(bits-1)).
    audio, sample_rate = sf.read(source, dtype="float32", always_2d=True)
  except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as e:
    raise AudioError(f"Cannot decode audio file {name}: {e}") from e
  return to_model_input(audio, sample_rate, target_sr)


def audio_info(path: str | os.PathLike) -> tuple[int, float]:
  """(sample_rate, seconds) from the header only, without decoding the file."""
  try:
    info = sf.info(str(path))
  except (sf.LibsndfileError, RuntimeError) as e:
    raise AudioError(f"Cannot read audio header of {path}: {e}") from e
  return info.samplerate, info.frames / float(info.samplerate or 1)


def float_to_int16(audio: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> int16 with clipping (the storage format of our datasets)."""
  audio = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
  return np.round(audio * 32767.0).astype(np.int16)


def int16_to_float(audio: np.ndarray) -> np.ndarray:
  """int16 storage -> float32 model input; float input passes through."""
  audio = np.asarray(audio)
  if audio.dtype == np.int16:
    return audio.astype(np.float32) * (1.0 / 32768.0)
  return to_float32(audio)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
  """Writes 16-bit PCM WAV (float input is clipped to [-1, 1])."""
  audio = np.asarray(audio)
  if audio.dtype != np.int16:
    audio = float_to_int16(audio)
  sf.write(str(path), audio, int(sample_rate), subtype="PCM_16")
