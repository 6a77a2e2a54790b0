"""Synthetic spoken-command corpus: domain templates, held-out splits, espeak synthesis, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from speechjax.data.builders import manifest
from speechjax.projects.spoken_commands import corpus, synth


def test_domain_size_and_french_grammar():
  assert len(corpus.INTENTS) >= 10
  assert len(corpus.vocabulary()) >= 150
  sentences = {s.text: s for s in corpus.all_sentences()}
  assert len(sentences) > 2000
  cases = {
      "switch on the living room lights": "allume les lumières du salon",
      "turn off the lights in the kitchen": "éteins les lumières dans la cuisine",
      "take me to the airport": "emmène-moi à l'aéroport",
      "take me to the museum": "emmène-moi au musée",
      "navigate to the hotel in athens": "guide-moi jusqu'à l'hôtel d'athènes",
      "navigate to the park in rome": "guide-moi jusqu'au parc de rome",
      "we need more eggs from the shop": "il nous faut plus d'œufs du magasin",
      "set the temperature to twenty one degrees": "règle la température à vingt et un degrés",
      "wake me up at one o'clock in the morning": "réveille-moi à une heure du matin",
      "set a timer for forty five minutes": "règle un minuteur de quarante-cinq minutes",
      "what is the weather in london tomorrow": "quelle est la météo à londres demain",
      "play moonlight sonata by beethoven": "joue la sonate au clair de lune de beethoven",
  }
  for english, french in cases.items():
    assert sentences[english].translation == french
  assert sentences["take me to the museum"].intent == "navigate"
  assert [corpus.french_number(n) for n in (17, 21, 70, 71, 80, 91, 99)] == [
      "dix-sept", "vingt et un", "soixante-dix", "soixante et onze", "quatre-vingts",
      "quatre-vingt-onze", "quatre-vingt-dix-neuf"
  ]
  assert corpus.english_number(45) == "forty five"


def test_sentence_partition_is_disjoint_seeded_and_covers_every_intent():
  parts = corpus.partition(0)
  texts = {split: {s.text for pool in p.values() for s in pool} for split, p in parts.items()}
  assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"]
  assert not texts["dev"] & texts["test"]
  assert texts == {
      split: {s.text for pool in p.values() for s in pool}
      for split, p in corpus.partition(0).items()
  }
  assert texts["dev"] != {s.text for pool in corpus.partition(1)["dev"].values() for s in pool}
  for template in range(len(corpus.TEMPLATES)):
    assert parts["dev"][template] and parts["test"][template] and parts["train"][template]
  rng = np.random.default_rng(0)
  train = corpus.sample_split("train", 1500, 0, rng)
  known = corpus.vocabulary(s.text for s in train)
  assert known == corpus.vocabulary()  # every word is trained on
  dev = corpus.sample_split("dev", 300, 0, rng, known)
  assert {s.intent for s in dev} == set(corpus.INTENTS)
  assert not {s.text for s in dev} & {s.text for s in train}
  # A tiny train set: dev avoids unseen words but still covers every intent.
  few = corpus.sample_split("train", 60, 0, rng)
  dev = corpus.sample_split("dev", 300, 0, rng, corpus.vocabulary(s.text for s in few))
  assert {s.intent for s in dev} == set(corpus.INTENTS)


def test_voices_are_held_out():
  assert not set(synth.voices("train")) & set(synth.voices("dev"))
  assert not set(synth.voices("train")) & set(synth.voices("test"))
  assert not set(
      synth.VARIANTS["train"]) & (set(synth.VARIANTS["dev"]) | set(synth.VARIANTS["test"]))


def test_espeak_speaks_with_each_voice():
  tts = synth.engine()
  for voice in (synth.voices("train")[0], synth.voices("dev")[-1], synth.voices("test")[3]):
    wave = tts.say("turn on the lights", voice, 170, 50)
    assert wave.dtype == np.int16 and wave.size > 0.5 * tts.sample_rate
    assert np.abs(wave).max() > 1000


def _manifest(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synth") / "corpus")
  summary = synth.build(out, num_train=16, num_dev=6, num_test=6, seed=3, workers=1)
  return out, summary


def test_build_writes_manifests_wavs_and_tfds(built):
  out, summary = built
  rows = {
      split: _manifest(os.path.join(out, f"{split}.jsonl")) for split in ("train", "dev", "test")
  }
  assert [len(rows[s]) for s in ("train", "dev", "test")] == [16, 6, 6]
  for split, split_rows in rows.items():
    for row in split_rows:
      assert row["label"] in corpus.INTENTS and row["text"] and row["translation"]
      wave, sr = sf.read(os.path.join(out, row["audio"]), dtype="int16")
      assert sr == 16000 and wave.ndim == 1
      assert abs(wave.size / sr - row["duration"]) < 1e-3
      assert 1.2 <= row["duration"] <= 5.0
      assert row["speaker"] in synth.voices(split)
  train_text = {r["text"] for r in rows["train"]}
  train_voices = {r["speaker"] for r in rows["train"]}
  for split in ("dev", "test"):
    assert not {r["text"] for r in rows[split]} & train_text  # held-out sentences
    assert not {r["speaker"] for r in rows[split]} & train_voices  # held-out voices
  source = manifest.load_data_source(summary["dataset_dir"], "dev")
  assert len(source) == 6 and source[0]["text"].decode() == rows["dev"][0]["text"]
  assert os.path.exists(os.path.join(out, "corpus.json"))
  # The LM's text corpus: the whole train partition, no dev or test transcript.
  from speechjax.data.text_lm import read_text_manifest
  lm_text = read_text_manifest(os.path.join(out, synth.LM_TEXT_FILE))
  assert len(lm_text) == summary["lm_text_sentences"] > len(train_text)
  assert train_text <= {r["text"] for r in lm_text}
  for split in ("dev", "test"):
    assert not {r["text"] for r in rows[split]} & {r["text"] for r in lm_text}
  assert all(r["label"] in corpus.INTENTS and r["translation"] for r in lm_text)


def test_build_is_deterministic_across_runs_and_worker_counts(built, tmp_path, monkeypatch):
  out, _ = built
  monkeypatch.setattr(synth, "MIN_JOBS_FOR_POOL", 0)
  again = str(tmp_path / "again")
  synth.synthesize(again, num_train=16, num_dev=6, num_test=6, seed=3, workers=2)
  for split in ("train", "dev", "test"):
    first, second = _manifest(os.path.join(out, f"{split}.jsonl")), _manifest(
        os.path.join(again, f"{split}.jsonl"))
    assert first == second
  for row in _manifest(os.path.join(out, "dev.jsonl")):
    with open(os.path.join(out, row["audio"]), "rb") as a, open(os.path.join(again, row["audio"]),
                                                                "rb") as b:
      assert a.read() == b.read()
  other = str(tmp_path / "other_seed")
  synth.synthesize(other, num_train=16, num_dev=0, num_test=0, seed=4, workers=1)
  assert _manifest(os.path.join(other,
                                "train.jsonl")) != _manifest(os.path.join(out, "train.jsonl"))


def test_cli(tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run([
      sys.executable, "-m", "speechjax.projects.spoken_commands.synth", f"--out={out}", "--num_train=4", "--num_dev=2",
      "--num_test=2", "--seed=1", "--workers=1"
  ], capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout)["splits"]["train"]["num_utterances"] == 4
  for split in ("train", "dev", "test"):
    assert (out / f"{split}.jsonl").exists()
  assert (out / "tfds" / "spoken_commands" / "1.0.0" / "dataset_info.json").exists()


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="no system espeak-ng binary")
def test_system_binary_engine_is_usable_and_reproducible():
  tts = synth.engine("binary")
  first = tts.say("set a timer", synth.voices("dev")[0], 160, 45)
  assert first.dtype == np.int16 and first.size > 0.3 * tts.sample_rate
  np.testing.assert_array_equal(first, tts.say("set a timer", synth.voices("dev")[0], 160, 45))


def test_unknown_engine_is_refused():
  with pytest.raises(ValueError, match="tts must be one of"):
    synth.engine("festival")
