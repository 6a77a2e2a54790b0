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

A dialogue example (several user clips joined, speechjax.data.dialogue) is
stored clip by clip, each clip encoded on its own as the model encodes it,
and its batches carry [B, S, N, D] states for S clips per row, the layout of
their uncached features.

Speed perturbation survives caching: with data.augment.speed the split is
encoded once per factor of data.augment.speed_factors (that many times the
encoding time and disk) and each training example (each clip of a dialogue)
draws one copy per step, as the uncached pipeline draws a factor. Noise and
SpecAugment, which draw new values every step, are refused.

Layout of a cache folder (written to a temporary folder, then renamed, so a
crash never leaves a half-written cache):

    meta.json     fingerprint (encoder weights, config, features, source, factors), dim, count, clips
    clips.npy     int64 [num_examples + 1]: example i's clips are rows clips[i]:clips[i+1] of index
    index.npy     int64 [num_clips, num_copies, 3]: rows start:start+length of
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
from speechjax.data import dialogue

log = logging.getLogger(__name__)

VERSION = 2  # 2: clip-level index (dialogues)
STATE_KEYS = ("encoder_states", "encoder_state_mask")


class EncoderStateCache:
  """Read side: `cache.get(i, copy, clip)` -> float32 [n, dim], clip `clip`
  of source index i (an example of one clip: clip 0)."""

  def __init__(self, folder: str, output_length: Callable[[int], int] | None = None):
    self.folder = folder
    with open(os.path.join(folder, "meta.json")) as f:
      self.meta = json.load(f)
    self.dim = int(self.meta["dim"])
    self.speed_factors = tuple(float(f) for f in self.meta["speed_factors"])
    self.index = np.load(os.path.join(folder, "index.npy"))
    if not os.path.exists(os.path.join(folder, "clips.npy")):  # format 1: one clip per example
      raise ValueError(f"{folder} is an encoder-state cache of an older format (no clips.npy); "
                       f"delete {folder} and the next run rebuilds it")
    self.clips = np.load(os.path.join(folder, "clips.npy"))
    total = int(self.meta["frames"])
    path = os.path.join(folder, "states.bin")
    expected = total * self.dim * 2
    if (self.index.shape[1:] != (len(self.speed_factors), 3) or os.path.getsize(path) != expected
        or self.clips.shape != (int(self.meta["count"]) + 1,) or self.clips[-1] != len(self.index)):
      raise ValueError(f"{folder}: index {self.index.shape}, clips {self.clips.shape} / "
                       f"{os.path.getsize(path)} bytes do not match meta.json ({self.meta['count']} "
                       f"examples, {total} frames x {self.dim} float16, {len(self.speed_factors)} "
                       f"copies); delete {folder} to rebuild it")
    self.states = np.memmap(path, np.float16, "r", shape=(total, self.dim)) if total else np.zeros((0, self.dim))
    self.output_length = output_length

  def __len__(self) -> int:
    return len(self.clips) - 1

  @property
  def num_copies(self) -> int:
    return len(self.speed_factors)

  def num_clips(self, i: int) -> int:
    return int(self.clips[i + 1] - self.clips[i])

  def _row(self, i: int, clip: int) -> int:
    if not 0 <= clip < self.num_clips(i):
      raise IndexError(f"{self.folder}: example {i} has {self.num_clips(i)} clip(s), not clip {clip}")
    return int(self.clips[i]) + clip

  def num_samples(self, i: int, copy: int = 0, clip: int = 0) -> int:
    """Samples of the clip as encoded (after its speed factor)."""
    return int(self.index[self._row(i, clip), copy, 2])

  def get(self, i: int, copy: int = 0, clip: int = 0) -> np.ndarray:
    start, length, _ = self.index[self._row(i, clip), copy]
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
  """Encodes every clip of every example of `source` (a dialogue's user clips
  one by one) once per speed factor, each clipped to the largest of the audio
  `buckets` (samples) as training clips it, unless `root/<fingerprint>`
  already holds them.

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
  rows: dict[tuple[int, int], np.ndarray] = {}  # (example, clip) -> [copies, 3]: start, frames, samples
  num_clips = np.zeros(count, np.int64)
  written, dim, start = 0, 0, time.time()

  def encode_clips(out, pending, copy) -> None:
    nonlocal written, dim
    sizes = np.array([w.size for _, _, w in pending], np.int64)
    samples = next((b for b in sorted(buckets) if b >= sizes.max()), max(buckets))
    sizes = np.minimum(sizes, samples)
    padded = np.zeros((batch_size, samples), np.float32)
    for row, (_, _, wave) in enumerate(pending):
      padded[row, :sizes[row]] = wave[:sizes[row]]
    padded_sizes = np.concatenate([sizes, np.full(batch_size - len(pending), samples)])
    features, feature_mask = featurize(padded, padded_sizes)
    states, mask = (np.asarray(x) for x in encode(features, feature_mask))
    dim = states.shape[-1]
    for row, (i, clip, _) in enumerate(pending):
      n = int(mask[row].sum())
      out.write(np.ascontiguousarray(states[row, :n], np.float16).tobytes())
      rows.setdefault((int(i), clip), np.zeros((len(speed_factors), 3), np.int64))[copy] = (written, n, sizes[row])
      written += n

  try:
    with open(os.path.join(tmp, "states.bin"), "wb") as out:
      for copy, factor in enumerate(speed_factors):
        pending = []  # (example, clip, wave), encoded batch_size at a time
        for done, i in enumerate(order, 1):
          record = source[int(i)]
          pieces = dialogue.user_clips(record, audio_lib.int16_to_float(np.asarray(record["audio"])))
          num_clips[i] = len(pieces)
          pending += [(i, clip, augment.speed_perturb(piece, factor)) for clip, piece in enumerate(pieces)]
          while len(pending) >= batch_size or (done == count and pending):
            encode_clips(out, pending[:batch_size], copy)
            pending = pending[batch_size:]
          if progress and done % (20 * batch_size) == 0:
            log.info("encoder states (speed %.2f): %d / %d examples (%.0f s)", factor, done, count,
                     time.time() - start)
    clips = np.concatenate([[0], np.cumsum(num_clips)])
    index = np.zeros((int(clips[-1]), len(speed_factors), 3), np.int64)
    for (i, clip), value in rows.items():
      index[clips[i] + clip] = value
    np.save(os.path.join(tmp, "index.npy"), index)
    np.save(os.path.join(tmp, "clips.npy"), clips)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump({"fingerprint": fingerprint, "dim": dim, "count": count, "clips": len(index), "frames": written,
                 "speed_factors": list(speed_factors), "seconds": round(time.time() - start, 1)},
                f, indent=2, default=str)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log.info("encoder states: %d examples (%d clips) x %d copies, %d frames in %.0f s -> %s", count,
           len(index), len(speed_factors), written, time.time() - start, folder)
  return EncoderStateCache(folder, output_length)


def cached_states(cache: EncoderStateCache, indices, copies, input_frames: int) -> dict[str, np.ndarray]:
  """The batch entries for source `indices` (copy `copies[k]` of each) padded
  to the bucket's encoder length: [B, N, D] and [B, N]."""
  one_segment = cached_segments(cache, indices, [[copy] for copy in copies], 1, input_frames)
  return {key: value[:, 0] for key, value in one_segment.items()}


def cached_segments(cache: EncoderStateCache, indices, copies, segments: int,
                    input_frames: int) -> dict[str, np.ndarray]:
  """The batch entries of a batch holding dialogues: row k's clips (copy
  `copies[k][c]` of clip c) in its last segments, each padded to the
  bucket's encoder length, the unused segments first and empty:
  encoder_states [B, segments, N, D], encoder_state_mask [B, segments, N]."""
  n_out = int(cache.output_length(input_frames))
  states = np.zeros((len(indices), segments, n_out, cache.dim), np.float32)
  mask = np.zeros((len(indices), segments, n_out), np.int32)
  for row, (index, row_copies) in enumerate(zip(indices, copies)):
    first = segments - len(row_copies)
    for clip, copy in enumerate(row_copies):
      values = cache.get(int(index), int(copy), clip)[:n_out]
      states[row, first + clip, :len(values)] = values
      mask[row, first + clip, :len(values)] = 1
  return {"encoder_states": states, "encoder_state_mask": mask}
