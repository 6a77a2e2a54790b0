"""TFDS builders (manifest, LibriSpeech layout) and bad-input handling, without TensorFlow."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import soundfile as sf

from speechjax.data import build as build_cli
from speechjax.data import fields, sources, validate
from speechjax.data.builders import covost2, instructions, librispeech, manifest


def _tone(seconds, sr, freq=220.0):
  return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def _write_manifest(path, rows, extra_lines=()):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    for line in extra_lines:
      f.write(line + "\n")


@pytest.fixture()
def corpus_dir(tmp_path):
  """Good files in several formats plus one bad file of every kind."""
  audio_dir = tmp_path / "audio"
  audio_dir.mkdir()
  sf.write(str(audio_dir / "good.wav"), _tone(1.0, 16000), 16000, subtype="PCM_16")
  sf.write(str(audio_dir / "stereo.flac"), np.stack([_tone(1.5, 22050)] * 2, 1), 22050)
  sf.write(str(audio_dir / "vorbis.ogg"), _tone(0.5, 44100), 44100, format="OGG", subtype="VORBIS")
  nan = _tone(1.0, 16000)
  nan[100:200] = np.nan
  sf.write(str(audio_dir / "nan.wav"), nan, 16000, subtype="FLOAT")
  (audio_dir / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" * 4)
  (audio_dir / "not_audio.flac").write_text("hello")
  sf.write(str(audio_dir / "empty.wav"), np.zeros(0, np.float32), 16000)
  sf.write(str(audio_dir / "long.wav"), _tone(3.0, 8000), 8000)
  sf.write(str(audio_dir / "short.wav"), _tone(0.05, 16000), 16000)
  return tmp_path


GOOD = [
    {"audio": "audio/good.wav", "text": "turn on the lights", "label": "lights_on", "id": "a"},
    {"audio": "audio/stereo.flac", "text": "play jazz", "translation": "joue du jazz",
     "speaker": "s1"},
    {"audio": "audio/vorbis.ogg", "text": "describe", "prompt": "What is this?",
     "target": "A tone."},
]
BAD = {
    "non_finite_audio": {"audio": "audio/nan.wav", "text": "x"},
    "unreadable_audio": {"audio": "audio/corrupt.wav", "text": "x"},
    "empty_audio": {"audio": "audio/empty.wav", "text": "x"},
    "too_long": {"audio": "audio/long.wav", "text": "x"},
    "too_short": {"audio": "audio/short.wav", "text": "x"},
    "audio_not_found": {"audio": "audio/missing.wav", "text": "x"},
    "missing_text": {"audio": "audio/good.wav"},
    "empty_text": {"audio": "audio/good.wav", "text": "   "},
    "missing_audio_field": {"text": "no audio"},
}


def test_manifest_builder_keeps_good_and_lists_every_bad_kind(corpus_dir):
  bad_rows = list(BAD.values()) + [{"audio": "audio/not_audio.flac", "text": "x"}]
  _write_manifest(corpus_dir / "train.jsonl", GOOD[:2] + bad_rows + GOOD[2:], ["{broken json"])
  _write_manifest(corpus_dir / "dev.jsonl", [GOOD[0]])
  # An absolute path in a manifest kept elsewhere resolves too.
  other = corpus_dir / "elsewhere"
  other.mkdir()
  _write_manifest(other / "test.jsonl", [{
      **GOOD[1], "audio": str(corpus_dir / "audio/stereo.flac")
  }])
  dataset_dir = manifest.build_manifest_dataset(
      {
          "train": str(corpus_dir / "train.jsonl"),
          "dev": str(corpus_dir / "dev.jsonl"),
          "test": str(other / "test.jsonl")
      }, str(corpus_dir / "tfds"), "toy", max_seconds=2.0)
  assert dataset_dir.endswith(os.path.join("toy", "1.0.0"))

  skipped = manifest.read_skipped(dataset_dir)
  reasons = sorted(s["reason"] for s in skipped)
  assert reasons == sorted(list(BAD) + ["unreadable_audio", "invalid_json"])
  assert all(s["split"] == "train" and s["manifest"].endswith("train.jsonl") for s in skipped)
  lines = {s["reason"]: s["line"] for s in skipped if s["reason"] != "unreadable_audio"}
  assert lines["non_finite_audio"] == 3 and lines["invalid_json"] == 14

  train = manifest.load_data_source(dataset_dir, "train")
  assert len(train) == 3  # manifest order is kept
  first, second, third = train[0], train[1], train[2]
  assert first["text"] == b"turn on the lights" and first["label"] == b"lights_on" and first[
      "id"] == b"a"
  assert first["audio"].dtype == np.int16 and first["audio"].shape == (16000,)
  assert second["audio"].shape == (24000,) and second["translation"] == b"joue du jazz"
  assert second["id"] == b"train-000002" and second["speaker"] == b"s1"
  assert third["prompt"] == b"What is this?" and third["audio"].shape == (8000,)
  assert abs(float(first["duration"]) - 1.0) < 1e-6
  np.testing.assert_allclose(first["audio"] / 32767.0, _tone(1.0, 16000), atol=1e-4)

  meta = manifest.dataset_metadata(dataset_dir)
  assert meta["label_names"] == ["lights_on"]
  assert meta["num_samples"]["train"] == [16000, 24000, 8000]
  mask = fields.field_mask
  assert meta["fields"]["train"] == [
      mask(["text", "label"]), mask(["text", "translation"]), mask(["text", "prompt", "target"])
  ]
  assert meta["num_skipped"] == {"train": 11, "dev": 0, "test": 0}
  assert len(manifest.load_data_source(dataset_dir, "test")) == 1

  source, info = sources.tfds_split(str(corpus_dir / "tfds"), "train", "toy")
  assert len(source) == 3 and info.num_samples.tolist() == [16000, 24000, 8000
                                                           ] and info.num_skipped == 11


def test_all_bad_manifest_fails_naming_it(corpus_dir):
  _write_manifest(corpus_dir / "good.jsonl", GOOD)
  _write_manifest(corpus_dir / "all_bad.jsonl", list(BAD.values()))
  with pytest.raises(validate.AllExamplesSkippedError, match="all_bad.jsonl"):
    manifest.build_manifest_dataset(
        {"train": [str(corpus_dir / "good.jsonl"),
                   str(corpus_dir / "all_bad.jsonl")]}, str(corpus_dir / "tfds"), "mixed",
        max_seconds=2.0)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    manifest.build_manifest_dataset({"train": str(corpus_dir / "nope.jsonl")},
                                    str(corpus_dir / "tfds"), "x")


def test_manifest_source_reads_without_building(corpus_dir):
  _write_manifest(corpus_dir / "eval.jsonl", GOOD + [BAD["non_finite_audio"], BAD["empty_text"]])
  for cache_mb in (1024.0, 0.0):
    source = sources.ManifestSource(str(corpus_dir / "eval.jsonl"), max_seconds=2.0,
                                    cache_mb=cache_mb, label_names=("other", "lights_on"))
    assert len(source) == 3 and sorted(
        s.reason for s in source.skipped) == ["empty_text", "non_finite_audio"]
    assert source[1]["audio"].dtype == np.int16 and source[1]["audio"].size == 24000
    assert source.info.label_names == ("other", "lights_on") and source.info.num_skipped == 2


def _fake_librispeech(root, rng):
  layout = {"dev-clean": {"84": ["121123"], "174": ["50561"]}, "test-clean": {"1089": ["134686"]},
            "train-clean-100": {"19": ["198"]}}
  for split, speakers in layout.items():
    for speaker, chapters in speakers.items():
      for chapter in chapters:
        folder = root / "LibriSpeech" / split / speaker / chapter
        folder.mkdir(parents=True)
        lines = []
        for utt in range(3):
          uid = f"{speaker}-{chapter}-{utt:04d}"
          sf.write(str(folder / f"{uid}.flac"),
                   (0.1 * rng.standard_normal(16000 + 800 * utt)).astype(np.float32), 16000)
          lines.append(f"{uid} HELLO WORLD NUMBER {utt}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
  return layout


def test_librispeech_builder_reads_local_layout(tmp_path):
  _fake_librispeech(tmp_path / "raw", np.random.default_rng(0))
  assert librispeech.split_name("train-clean-100") == "train_clean_100"
  assert librispeech.split_directory("train_other_500") == "train-other-500"
  result = build_cli.main(["librispeech", f'--manual_dir={tmp_path / "raw"}',
                           f'--data_dir={tmp_path / "tfds"}', "--splits=dev_clean,test-clean"])
  assert result["name"] == "librispeech" and result["splits"] == {
      "dev_clean": {"examples": 6, "skipped": 0}, "test_clean": {"examples": 3, "skipped": 0}}
  dataset_dir = result["dataset_dir"]
  dev = manifest.load_data_source(dataset_dir, "dev_clean")
  test = manifest.load_data_source(dataset_dir, "test_clean")
  assert len(dev) == 6 and len(test) == 3
  ids = [dev[i]["id"].decode() for i in range(len(dev))]
  assert ids == [f"84-121123-{u:04d}" for u in range(3)] + [f"174-50561-{u:04d}" for u in range(3)]
  assert dev[2]["text"] == b"hello world number 2" and dev[2]["speaker"] == b"84"
  assert dev[2]["audio"].shape == (17600,)
  with pytest.raises(FileNotFoundError, match="train-clean-360"):
    librispeech.Librispeech(manual_dir=str(tmp_path / "raw"), splits=["train_clean_360"],
                            data_dir=str(tmp_path / "tfds2"))
  with pytest.raises(ValueError, match="train_clean_100, train_clean_360"):
    librispeech.Librispeech(manual_dir=str(tmp_path / "raw"), splits=["train_clean100"],
                            data_dir=str(tmp_path / "tfds2"))
  everything = librispeech.build_librispeech(str(tmp_path / "raw"), str(tmp_path / "tfds3"))
  assert sorted(manifest.open_dataset(everything).info.splits) == [
      "dev_clean", "test_clean", "train_clean_100"]


def test_covost2_builder_reads_tsv_and_mp3_clips(tmp_path):
  clips = tmp_path / "cv" / "en" / "clips"
  clips.mkdir(parents=True)
  rows = {"train": [("a.mp3", "Hello there.", "Hallo.", "c1"), ("b.wav", 'Good "day".', "Guten Tag.", "c2")],
          "dev": [("c.mp3", "Yes.", "Ja.", "c1")],
          "test": [("d.mp3", "No.", "Nein.", "c2"), ("missing.mp3", "Gone.", "Weg.", "c2")]}
  for split, split_rows in rows.items():
    lines = ["client_id\tpath\tsentence\ttranslation"]
    for path, sentence, translation, client in split_rows:
      if path != "missing.mp3":
        sf.write(str(clips / path), _tone(1.0, 22050 if path.endswith("mp3") else 16000),
                 22050 if path.endswith("mp3") else 16000,
                 **({"format": "MP3"} if path.endswith("mp3") else {}))
      lines.append(f"{client}\t{path}\t{sentence}\t{translation}")
    (tmp_path / f"covost_v2.en_de.{split}.tsv").write_text("\n".join(lines) + "\n")
  result = build_cli.main(["covost2", f"--tsv_dir={tmp_path}", f'--clips_dir={tmp_path / "cv" / "en"}',
                           "--source_language=en", "--target_language=de",
                           f'--data_dir={tmp_path / "tfds"}'])
  assert result["name"] == "covost2_en_de"
  assert result["splits"] == {"dev": {"examples": 1, "skipped": 0}, "test": {"examples": 1, "skipped": 1},
                              "train": {"examples": 2, "skipped": 0}}
  train = manifest.load_data_source(result["dataset_dir"], "train")
  assert train[0]["text"] == b"Hello there." and train[0]["translation"] == b"Hallo."
  assert train[1]["text"] == b'Good "day".' and train[1]["speaker"] == b"c2" and train[1]["id"] == b"b"
  assert abs(train[0]["audio"].size - 16000) < 1200  # mp3 decoded and resampled to 16 kHz
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "covost_v2.en_de.train.tsv").write_text("path\tsentence\n")
  with pytest.raises(ValueError, match="translation"):
    list(covost2.iter_tsv(str(tmp_path / "bad" / "covost_v2.en_de.train.tsv"), str(clips)))
  with pytest.raises(FileNotFoundError, match="covost_v2.en_fr.train.tsv"):
    covost2.Covost2(tsv_dir=str(tmp_path), clips_dir=str(clips), target_language="fr",
                    data_dir=str(tmp_path / "tfds2"))


def test_instruction_builder_makes_one_example_per_turn(tmp_path):
  sf.write(str(tmp_path / "a.wav"), _tone(1.0, 16000), 16000)
  sf.write(str(tmp_path / "b.wav"), _tone(1.2, 16000), 16000)
  clip_a = {"audio": "a.wav", "id": "a", "text": "lights on", "translation": "lumière",
            "turns": [{"instruction": "What is asked?", "answer": "Light."},
                      {"instruction": "<audio> Polite?", "answer": "No."}]}
  clip_b = {"audio": "b.wav", "text": "play jazz"}
  _write_manifest(tmp_path / "train.jsonl", [clip_a, clip_b])
  _write_manifest(tmp_path / "test.jsonl", [clip_a])
  result = build_cli.main(["instructions", f'--train={tmp_path / "train.jsonl"}',
                           f'--split=test={tmp_path / "test.jsonl"}', f'--data_dir={tmp_path / "tfds"}'])
  assert result["name"] == "speech_instructions"
  assert {s: v["examples"] for s, v in result["splits"].items()} == {"test": 2, "train": 3}
  train = manifest.load_data_source(result["dataset_dir"], "train")
  rows = [{k: train[i][k].decode() for k in ("id", "text", "translation", "prompt", "target")}
          for i in range(3)]
  assert rows == [
      {"id": "a-0", "text": "lights on", "translation": "lumière", "prompt": "What is asked?",
       "target": "Light."},
      {"id": "a-1", "text": "", "translation": "", "prompt": "<audio> Polite?", "target": "No."},
      {"id": "train-000002", "text": "play jazz", "translation": "", "prompt": "", "target": ""}]
  mask = fields.field_mask
  assert manifest.dataset_metadata(result["dataset_dir"])["fields"]["train"] == [
      mask(["text", "translation", "prompt", "target"]), mask(["prompt", "target"]), mask(["text"])]
  _write_manifest(tmp_path / "bad.jsonl", [{"audio": "a.wav", "turns": [{"instruction": "Q?"}]}])
  with pytest.raises(ValueError, match=r"bad.jsonl:1: turn 0 .*'answer'"):
    instructions.build_instruction_dataset({"train": str(tmp_path / "bad.jsonl")}, str(tmp_path / "x"))


def test_tensorflow_is_not_needed():
  assert importlib.util.find_spec("tensorflow") is None
