"""`speechjax transcribe --input=DIR --output=F`: every audio file under a folder,
recursively, into JSONL / TSV / SRT / VTT, resumable, unreadable files counted."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from trained_run import trained_tiny_run

from speechjax.transcribe import FolderOutput, Segment, find_audio_files, subtitles, transcribe_folder


def test_subtitles_number_cues_and_format_times():
  segments = [Segment(0.0, 5.0, "turn on"), Segment(5.0, 5.0, " "), Segment(5.0, 3725.5, "the lights")]
  assert subtitles(segments, "srt") == ("1\n00:00:00,000 --> 00:00:05,000\nturn on\n\n"
                                        "2\n00:00:05,000 --> 01:02:05,500\nthe lights\n")
  assert subtitles(segments, "vtt").startswith("WEBVTT\n\n1\n00:00:00.000 --> 00:00:05.000\nturn on\n")


def test_output_format_comes_from_the_suffix_and_bad_ones_are_named(tmp_path):
  assert FolderOutput(str(tmp_path / "o.tsv"), "", str(tmp_path), 3).fmt == "tsv"
  with pytest.raises(ValueError, match=r"\.jsonl/\.tsv/\.srt/\.vtt"):
    FolderOutput(str(tmp_path / "o.txt"), "", str(tmp_path), 3)
  with pytest.raises(ValueError, match="one subtitle file but 3 audio files"):
    FolderOutput(str(tmp_path / "o.srt"), "", str(tmp_path), 3)
  with pytest.raises(ValueError, match="is not a folder"):
    find_audio_files(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def folder(tiny_corpus, tmp_path_factory):
  """Three readable files (one nested, one longer than the run's 5 s bucket), a
  broken .wav and a text file that is not audio."""
  _, _, corpus_root = tiny_corpus
  with open(os.path.join(corpus_root, "test.jsonl")) as f:
    wavs = [os.path.join(corpus_root, json.loads(line)["audio"]) for line in f][:2]
  root = tmp_path_factory.mktemp("recordings")
  (root / "day2").mkdir()
  shutil.copy(wavs[0], root / "a.wav")
  shutil.copy(wavs[1], root / "day2" / "b.wav")
  wave, rate = sf.read(wavs[0], dtype="float32")
  silence = np.zeros(int(4.0 * rate), np.float32)
  sf.write(root / "day2" / "long.flac", np.concatenate([wave, silence, wave, silence]), rate)
  (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
  (root / "notes.txt").write_text("not audio")
  return root


@pytest.mark.slow  # shares a trained tiny run: ~60 s on 2 shared cores for the first test that needs it
def test_folder_to_jsonl_matches_the_transcriber_and_resumes(folder, tiny_corpus, tmp_path_factory, tmp_path):
  from speechjax.transcribe import Transcriber

  transcriber = Transcriber(trained_tiny_run(tmp_path_factory, tiny_corpus))
  out = tmp_path / "out" / "all.jsonl"
  counts = transcribe_folder(transcriber, str(folder), str(out), progress=False)
  assert (counts["transcribed"], counts["already_done"], counts["skipped"]) == (3, 0, 1)
  assert counts["skipped_files"][0]["audio"] == str(folder / "broken.wav")
  records = [json.loads(line) for line in out.read_text().splitlines()]
  expected = [str(folder / "a.wav"), str(folder / "day2" / "b.wav"), str(folder / "day2" / "long.flac")]
  assert [r["audio"] for r in records] == expected
  for record, (path, text, error) in zip(records, transcriber(expected)):
    assert record["audio"] == path and error is None
    assert record["text"] == text
  long_record = records[2]
  assert len(long_record["segments"]) >= 2  # longer than the 5 s bucket: chunked
  assert long_record["segments"][0]["start"] == 0.0
  assert long_record["segments"][-1]["end"] == pytest.approx(long_record["duration"])
  assert all(a["end"] == b["start"] for a, b in zip(long_record["segments"], long_record["segments"][1:]))

  # A rerun writes nothing new; a removed line is written again.
  again = transcribe_folder(transcriber, str(folder), str(out), progress=False)
  assert (again["transcribed"], again["already_done"], again["skipped"]) == (0, 3, 1)
  out.write_text("\n".join(out.read_text().splitlines()[:2]) + "\n")
  resumed = transcribe_folder(transcriber, str(folder), str(out), progress=False)
  assert (resumed["transcribed"], resumed["already_done"]) == (1, 2)
  assert [json.loads(line)["audio"] for line in out.read_text().splitlines()] == expected

  subs = tmp_path / "subs"
  transcribe_folder(transcriber, str(folder), str(subs), fmt="vtt", progress=False)
  assert sorted(str(p.relative_to(subs)) for p in subs.rglob("*.vtt")) == ["a.vtt", "day2/b.vtt",
                                                                          "day2/long.vtt"]
  assert (subs / "day2" / "long.vtt").read_text().startswith("WEBVTT\n\n1\n00:00:00.000 --> ")

  tsv = tmp_path / "all.tsv"
  transcribe_folder(transcriber, str(folder), str(tsv), progress=False)
  assert [line.split("\t")[0] for line in tsv.read_text().splitlines()] == expected


@pytest.mark.slow  # a subprocess loads the run and compiles: ~20 s on 2 shared cores
def test_command_line_reports_counts_and_refuses_a_bad_output_before_loading(folder, tiny_corpus,
                                                                             tmp_path_factory, tmp_path):
  from tiny_runs import run, subprocess_env

  workdir = trained_tiny_run(tmp_path_factory, tiny_corpus)
  out = tmp_path / "out.tsv"
  # Every compiled program is stored (however fast it compiled): the run keeps its decoding
  # programs, and their traces (stored_programs).
  result = run([sys.executable, "-m", "speechjax.cli", "transcribe", f"--workdir={workdir}",
                f"--input={folder}", f"--output={out}", "--decode.max_new_tokens=3", "--noprogress"],
               env={**subprocess_env(), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  assert any(name.startswith("jit_speech_generate-") for name in os.listdir(os.path.join(workdir, "xla_cache")))
  assert any(name.startswith("speech_generate-") for name in os.listdir(os.path.join(workdir, "xla_cache",
                                                                                  "exported")))
  assert f"{out}: transcribed 3, already there 0, skipped (unreadable) 1" in result.stdout
  assert f"skipped {folder / 'broken.wav'}: AudioError" in result.stdout
  assert len(out.read_text().splitlines()) == 3
  refused = subprocess.run([sys.executable, "-m", "speechjax.cli", "transcribe", f"--workdir={tmp_path}/no_run",
                            f"--input={folder}", f"--output={tmp_path / 'one.srt'}"], env=subprocess_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
  assert refused.returncode == 1
  assert "is one subtitle file but 4 audio files were found" in refused.stdout


@pytest.mark.slow  # shares the trained tiny run with the test above
def test_clips_are_batched_longest_first_and_answers_return_to_their_clips(tiny_corpus, tmp_path_factory,
                                                                          monkeypatch):
  """decode_waves sorts the clips (and the chunks of a long one) by length, longest
  first, decodes a partial batch in fewer rows, and gives each clip back its own
  answers in chunk order. The decoding is replaced by one that answers each row with
  its number of real samples' mel frames."""
  from speechjax.evaluation import scoring
  from speechjax.transcribe import Transcriber

  transcriber = Transcriber(trained_tiny_run(tmp_path_factory, tiny_corpus))
  transcriber.batch_size, transcriber.batch_shards = 32, 1
  assert [transcriber.rows_for(n) for n in (32, 17, 16, 9, 8, 5, 1)] == [32, 32, 16, 16, 8, 8, 4]
  transcriber.batch_shards = 8  # each row count must divide over the mesh's batch shards
  assert [transcriber.rows_for(n) for n in (9, 8, 1)] == [16, 8, 8]
  transcriber.batch_size, transcriber.batch_shards = 3, 1
  batches = []

  def frames_of_each_row(bundle, variables, batch, decode_cfg):
    frames = np.asarray(batch["feature_mask"]).sum(-1)
    batches.append(frames.tolist())
    return [str(int(n)) for n in frames]

  monkeypatch.setattr(scoring, "decode_batch", frames_of_each_row)
  rate, hop = 16000, 160
  longest = transcriber.buckets[-1]
  sizes = [rate, 3 * rate, longest + 2 * rate, 2 * rate]  # the third is cut into two chunks
  rng = np.random.default_rng(0)
  waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in sizes]
  segments = transcriber.decode_waves(waves, "asr")
  rows = [n for batch in batches for n in batch]
  assert [len(batch) for batch in batches] == [3, 3]  # 5 pieces: the second batch's last row repeated
  assert batches[1][1] == batches[1][2] and rows[:5] == sorted(rows[:5], reverse=True)
  for wave, segs in zip(waves, segments):
    assert [int(s.text) for s in segs] == [round((s.end - s.start) * rate) // hop for s in segs]
    assert segs[0].start == 0.0 and segs[-1].end == pytest.approx(wave.size / rate)
  assert [len(s) for s in segments] == [1, 1, 2, 1]
