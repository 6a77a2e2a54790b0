"""A frozen encoder's output states, computed once per split and read back in training.

When the audio encoder is frozen (SLAM-ASR's recipe, or a head trained on a
pretrained Whisper), every epoch recomputes the same encoder states. With
`data.cache_encoder_states = True` the training split is encoded once, in
batches, and training batches carry the stored states instead of the audio
features:

    batch["encoder_states"]      float32 [B, N, D]  (the encoder's last hidden states)
    batch["encoder_state_mask"]  int32   [B, N]

N is the encoder's output length for the batch's audio bucket, so the audio
slots and shapes are those the uncached batch would have. The model skips
the encoder (`from_states=True`); evaluation, transcription and export still
run the real encoder on audio, so what is scored is the model as it will be
used. The states are the deterministic (eval-mode) encoder's, which is why
the cache refuses a trainable encoder (speechjax.train checks).

Speed perturbation survives caching: with data.augment.speed the split is
encoded once per factor of data.augment.speed_factors (that many times the
encoding time and disk) and each training example draws one copy per step, as
the uncached pipeline draws a factor. Noise and SpecAugment, which draw new
values every step, are refused.

Layout of a cache folder (written to a temporary folder, then renamed, so a
crash never leaves a half-written cache):

    meta.json     fingerprint (encoder weights, config, features, source, factors), dim, count
    index.npy     int64 [num_examples, num_copies, 3]: rows start:start+length of
                  states.bin, and the copy's length in samples
    states.bin    float16 rows [total_frames, dim]

A changed encoder, feature setting, source or factor list gives another
fingerprint and another folder; an existing folder with the same fingerprint
is reused.
"""

from __future__ import annotations

from collections.abc import Callable
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import numpy as np

from speechjax.data import audio as audio_lib

log = logging.getLogger(__name__)

VERSION = 1
STATE_KEYS = ("encoder_states", "encoder_state_mask")


class EncoderStateCache:
  """Read side: `cache.get(i, copy)` -> float32 [n, dim] for source index i."""

  def __init__(self, folder: str, output_length: Callable[[int], int] | None = None):
    self.folder = folder
    with open(os.path.join(folder, "meta.json")) as f:
      self.meta = json.load(f)
    self.dim = int(self.meta["dim"])
    self.speed_factors = tuple(float(f) for f in self.meta["speed_factors"])
    self.index = np.load(os.path.join(folder, "index.npy"))
    total = int(self.meta["frames"])
    path = os.path.join(folder, "states.bin")
    expected = total * self.dim * 2
    if self.index.shape[1:] != (len(self.speed_factors), 3) or os.path.getsize(path) != expected:
      raise ValueError(f"{folder}: index {self.index.shape} / {os.path.getsize(path)} bytes do not match "
                       f"meta.json ({total} frames x {self.dim} float16, {len(self.speed_factors)} "
                       f"copies); delete {folder} to rebuild it")
    self.states = np.memmap(path, np.float16, "r", shape=(total, self.dim)) if total else np.zeros((0, self.dim))
    self.output_length = output_length

  def __len__(self) -> int:
    return len(self.index)

  @property
  def num_copies(self) -> int:
    return len(self.speed_factors)

  def num_samples(self, i: int, copy: int = 0) -> int:
    """Samples of example i's audio as encoded (after its speed factor)."""
    return int(self.index[i, copy, 2])

  def get(self, i: int, copy: int = 0) -> np.ndarray:
    start, length, _ = self.index[i, copy]
    return np.asarray(self.states[start:start + length], np.float32)


def fingerprint_of(**parts: Any) -> str:
  """A short stable hash of JSON-able parts (the cache folder's name)."""
  text = json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def params_digest(params) -> str:
  """sha256 over every leaf's path, shape, dtype and bytes: which weights made the states."""
  import jax  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}{value.shape}{value.dtype}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def build_cache(root: str, source, info, *, encode: Callable, output_length: Callable[[int], int],
                featurize: Callable, buckets: tuple[int, ...], fingerprint: dict,
                speed_factors: tuple[float, ...] = (1.0,), batch_size: int = 32,
                progress: bool = False) -> EncoderStateCache:
  """Encodes every example of `source` once per speed factor (clipped to the
  largest of the audio `buckets` (samples), as training clips it) unless
  `root/<fingerprint>` already holds them.

  featurize(padded [B, S], lengths [B]) -> (features, feature_mask): the encoder's input.
  encode(features, feature_mask) -> (states [B, N, D], mask [B, N]), numpy or jax.
  output_length(input_frames) -> N for a padded bucket of that many input frames.
  """
  from speechjax.data import augment  # pylint: disable=import-outside-toplevel

  speed_factors = tuple(float(f) for f in speed_factors)
  fingerprint = {**fingerprint, "buckets": [int(b) for b in buckets], "count": len(info.num_samples),
                 "samples": int(np.sum(info.num_samples)), "speed_factors": list(speed_factors)}
  folder = os.path.join(root, fingerprint_of(**fingerprint))
  if os.path.exists(os.path.join(folder, "meta.json")):
    log.info("encoder states: reusing %s", folder)
    return EncoderStateCache(folder, output_length)
  count = len(info.num_samples)
  order = np.argsort(np.asarray(info.num_samples), kind="stable")  # similar lengths share a bucket
  tmp = f"{folder}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  index = np.zeros((count, len(speed_factors), 3), np.int64)  # start, frames, samples
  written, dim, start = 0, 0, time.time()
  try:
    with open(os.path.join(tmp, "states.bin"), "wb") as out:
      for copy, factor in enumerate(speed_factors):
        for first in range(0, count, batch_size):
          chunk = order[first:first + batch_size]
          waves = [augment.speed_perturb(audio_lib.int16_to_float(np.asarray(source[int(i)]["audio"])), factor)
                   for i in chunk]
          sizes = np.array([w.size for w in waves], np.int64)
          samples = next((b for b in sorted(buckets) if b >= sizes.max()), max(buckets))
          sizes = np.minimum(sizes, samples)
          padded = np.zeros((batch_size, samples), np.float32)
          for row, wave in enumerate(waves):
            padded[row, :sizes[row]] = wave[:sizes[row]]
          padded_sizes = np.concatenate([sizes, np.full(batch_size - len(chunk), samples)])
          features, feature_mask = featurize(padded, padded_sizes)
          states, mask = (np.asarray(x) for x in encode(features, feature_mask))
          dim = states.shape[-1]
          for row, i in enumerate(chunk):
            n = int(mask[row].sum())
            out.write(np.ascontiguousarray(states[row, :n], np.float16).tobytes())
            index[i, copy] = (written, n, sizes[row])
            written += n
          if progress and (first // batch_size) % 20 == 0:
            log.info("encoder states (speed %.2f): %d / %d examples (%.0f s)", factor,
                     first + len(chunk), count, time.time() - start)
    np.save(os.path.join(tmp, "index.npy"), index)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump({"fingerprint": fingerprint, "dim": dim, "count": count, "frames": written,
                 "speed_factors": list(speed_factors), "seconds": round(time.time() - start, 1)},
                f, indent=2, default=str)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log.info("encoder states: %d examples x %d copies, %d frames in %.0f s -> %s", count,
           len(speed_factors), written, time.time() - start, folder)
  return EncoderStateCache(folder, output_length)


def cached_states(cache: EncoderStateCache, indices, copies, input_frames: int) -> dict[str, np.ndarray]:
  """The batch entries for source `indices` (copy `copies[k]` of each) padded
  to the bucket's encoder length."""
  n_out = int(cache.output_length(input_frames))
  states = np.zeros((len(indices), n_out, cache.dim), np.float32)
  mask = np.zeros((len(indices), n_out), np.int32)
  for row, (index, copy) in enumerate(zip(indices, copies)):
    values = cache.get(int(index), int(copy))[:n_out]
    states[row, :len(values)] = values
    mask[row, :len(values)] = 1
  return {"encoder_states": states, "encoder_state_mask": mask}
