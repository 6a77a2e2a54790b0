"""Audio longer than the encoder's window: cut into chunks at quiet moments,
each transcribed on its own (`speechjax.transcribe`), and the transcripts joined."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAUSE_DB = -40.0  # a 20 ms frame this far below the loudest one counts as a pause


def split_at_pauses(audio: np.ndarray, sample_rate: int, min_pause_seconds: float) -> list[np.ndarray]:
  """Cuts in the middle of every pause of at least `min_pause_seconds` (20 ms
  frames PAUSE_DB below the loudest); silence at either end stays attached.
  The pieces cover the audio without overlap or gap."""
  frame = max(1, int(0.02 * sample_rate))
  count = len(audio) // frame
  if count < 3 or min_pause_seconds <= 0:
    return [audio]
  energy = np.sum(audio[:count * frame].astype(np.float64).reshape(count, frame) ** 2, axis=1)
  quiet = energy <= energy.max() * 10 ** (PAUSE_DB / 10)
  shortest = max(1, int(round(min_pause_seconds / 0.02)))
  cuts, run_start = [], None
  for i, is_quiet in enumerate(np.append(quiet, False)):
    if is_quiet and run_start is None:
      run_start = i
    elif not is_quiet and run_start is not None:
      if i - run_start >= shortest and run_start > 0 and i < count:  # inner pauses only
        cuts.append((run_start + i) // 2 * frame)
      run_start = None
  return [audio[a:b] for a, b in zip([0] + cuts, cuts + [len(audio)])]


def chunk_audio(audio, sample_rate: int, chunk_seconds: float = 30.0,
                search_seconds: float = 2.0, min_pause_seconds: float = 0.0) -> list[np.ndarray]:
  """Splits mono audio into consecutive chunks of at most `chunk_seconds`.

  With `min_pause_seconds` > 0 it first cuts at every pause that long
  (split_at_pauses): one chunk per utterance, for models trained on single
  utterances (e.g. spoken commands); longer pieces are then cut as below.

  Each cut is placed in the middle of the longest quiet stretch (20 ms
  frames within 3 dB of the quietest one) in the last `search_seconds` of the
  window, so words are rarely split and both sides keep some of the pause;
  0 cuts exactly at the limit. The chunks cover the audio without overlap or gap, so their
  transcripts can be joined with `join_transcripts`.
  """
  audio = np.asarray(audio)
  if audio.ndim != 1:
    raise ValueError(f"speechjax.generation.chunk_audio: expected mono audio [samples], "
                     f"got shape {audio.shape}")
  if min_pause_seconds > 0:
    return [chunk for piece in split_at_pauses(audio, sample_rate, min_pause_seconds)
            for chunk in chunk_audio(piece, sample_rate, chunk_seconds, search_seconds)]
  limit = int(chunk_seconds * sample_rate)
  if limit < 1:
    raise ValueError(f"speechjax.generation.chunk_audio: chunk_seconds={chunk_seconds} at "
                     f"{sample_rate} Hz is shorter than one sample")
  frame = max(1, int(0.02 * sample_rate))
  search = min(int(search_seconds * sample_rate), limit // 2)
  chunks, start = [], 0
  while len(audio) - start > limit:
    end = start + limit
    if search >= frame:
      window = audio[end - search:end].astype(np.float64)
      frames = window[:(len(window) // frame) * frame].reshape(-1, frame)
      energy = np.sum(frames ** 2, axis=1)
      end = end - search + _middle_of_longest_quiet_run(energy) * frame + frame // 2
    chunks.append(audio[start:end])
    start = end
  chunks.append(audio[start:])
  return chunks


def _middle_of_longest_quiet_run(energy: np.ndarray) -> int:
  """Index of the middle frame of the longest run of frames within 3 dB of
  the quietest (the latest such run on a tie, keeping chunks long)."""
  quiet = energy <= 2.0 * energy.min() + 1e-12
  best_start, best_length, run_start = 0, 0, None
  for i, is_quiet in enumerate(np.append(quiet, False)):
    if is_quiet and run_start is None:
      run_start = i
    elif not is_quiet and run_start is not None:
      if i - run_start >= best_length:
        best_start, best_length = run_start, i - run_start
      run_start = None
  return best_start + best_length // 2


def join_transcripts(texts: Sequence[str]) -> str:
  """Concatenates the transcripts of consecutive chunks."""
  return " ".join(t.strip() for t in texts if t.strip())
