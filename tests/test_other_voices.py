"""The demo's unseen-synthesizer set (flite / festival, Debian packages the demo
never needs): skipped where neither is installed. The set re-speaks the test
sentences, voice by voice in turn, and a long 44.1 kHz recording of several of
them goes through `speechjax transcribe`'s chunking."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from trained_run import trained_tiny_run

from speechjax.data import audio as audio_lib
from speechjax.projects.spoken_commands import other_voices

VOICES = other_voices.installed_voices()
pytestmark = pytest.mark.skipif(not VOICES, reason="neither flite nor festival is installed "
                                "(apt-get install flite festival)")

ROWS = [{"audio": f"wavs/test/test-{i:06d}.wav", "text": text, "label": "x", "translation": "y",
         "speaker": "en-us", "id": f"test-{i:06d}"}
        for i, text in enumerate(["turn on the lights", "play some jazz in the kitchen",
                                  "set an alarm for seven"])]


def test_test_sentences_are_spoken_again_by_other_engines(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  (data_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  manifest = other_voices.build(str(data_dir), VOICES)
  rows = [json.loads(line) for line in open(manifest)]
  assert [r["text"] for r in rows] == [r["text"] for r in ROWS]
  assert [r["speaker"] for r in rows] == [VOICES[i % len(VOICES)].label for i in range(3)]
  assert all(r["speaker"].split(":")[0] in ("flite", "festival") for r in rows)
  stamps = []
  for row in rows:
    path = data_dir / row["audio"]
    rate, seconds = audio_lib.audio_info(str(path))
    assert rate == 16000 and 0.5 < seconds < 6 and abs(seconds - row["duration"]) < 1e-2
    wave = audio_lib.load_audio(str(path))
    assert 0.5 < np.abs(wave).max() <= 1.0  # speech, normalised
    stamps.append(path.stat().st_mtime_ns)
  other_voices.build(str(data_dir), VOICES)  # a second build reuses the wavs
  assert [(data_dir / r["audio"]).stat().st_mtime_ns for r in rows] == stamps
  assert not [p for p in os.listdir(data_dir) if ".tmp" in p]


def test_long_recording_at_44k_is_chunked_and_transcribed(tmp_path, tmp_path_factory, tiny_corpus):
  from speechjax.transcriber import Transcriber

  path = str(tmp_path / "long.flac")
  texts = [r["text"] for r in ROWS] * 4
  seconds = other_voices.render_long(VOICES[0], texts, path)
  rate, info_seconds = audio_lib.audio_info(path)
  assert rate == 44100 and abs(info_seconds - seconds) < 1e-2 and seconds > 12
  transcriber = Transcriber(trained_tiny_run(tmp_path_factory, tiny_corpus))
  (_, segments, error), = transcriber.transcribe_files([path])
  assert error is None
  # Chunks no longer than the run's window, in order, covering the whole recording.
  assert len(segments) >= int(seconds // transcriber.max_chunk_seconds)
  assert all(s.end - s.start <= transcriber.max_chunk_seconds + 1e-6 for s in segments)
  assert segments[0].start == 0 and abs(segments[-1].end - seconds) < 0.05
  assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
  # Cut at its pauses instead: one segment per sentence.
  by_pause = Transcriber(trained_tiny_run(tmp_path_factory, tiny_corpus), split_pause_seconds=0.3)
  (_, sentences, error), = by_pause.transcribe_files([path])
  assert error is None and len(sentences) == len(texts)
