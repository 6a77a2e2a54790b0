"""Manifests read directly (training on a .jsonl, evaluate --manifest): a bad line
spoils only itself, is listed once in RUN/skipped.jsonl with file, line and
reason, and a plugin task's own field is kept."""

import json
import os

import numpy as np
import pytest
import soundfile

from speechjax.data import sources, tasks, validate
from speechjax.evaluation import metrics

EMOTION = tasks.Task("emotion", fields=("emotion",), answer="emotion", metric=metrics.classification_metrics,
                     headline=("accuracy",), instructions=("<audio>\nHow does the speaker feel?",))


@pytest.fixture
def emotion_task():
  tasks.register_task(EMOTION)
  yield EMOTION
  tasks.unregister_task("emotion")


def _write_wav(path, seconds=0.5):
  rng = np.random.default_rng(0)
  soundfile.write(str(path), (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)


def _broken_manifest(tmp_path):
  """Lines: 1 good, 2 a byte that is not UTF-8, 3 not JSON, 4 missing audio file,
  5 blank, 6 good with an emotion, 7 no 'text'."""
  _write_wav(tmp_path / "a.wav")
  lines = [json.dumps({"audio": "a.wav", "text": "turn on the lights", "emotion": "calm"}).encode(),
           b'{"audio": "a.wav", "text": "caf\xe9"}',
           b"{not json",
           json.dumps({"audio": "missing.wav", "text": "x"}).encode(),
           b"",
           json.dumps({"audio": "a.wav", "text": "lights off", "emotion": "angry"}).encode(),
           json.dumps({"audio": "a.wav"}).encode()]
  path = tmp_path / "train.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


def test_a_line_with_bad_bytes_skips_that_line_only(tmp_path):
  path = _broken_manifest(tmp_path)
  source = sources.ManifestSource(path, required_fields=("text",))
  assert len(source) == 2
  assert [source[i]["text"] for i in range(2)] == ["turn on the lights", "lights off"]
  assert [(s.line, s.reason) for s in source.skipped] == [
      (2, "invalid_utf8"), (3, "invalid_json"), (4, "audio_not_found"), (7, "missing_text")]
  assert all(s.manifest == path for s in source.skipped)
  assert source.info.num_skipped == 4 and len(source.info.skipped) == 4


def test_a_plugin_tasks_field_is_kept_and_required(tmp_path, emotion_task):
  del emotion_task
  path = _broken_manifest(tmp_path)
  config = {"tasks": ("emotion",), "max_audio_seconds": 30.0}
  source, info = sources.open_source(config, path)
  assert [source[i]["emotion"] for i in range(len(source))] == ["calm", "angry"]
  # Only the emotion field is required: line 7 (no text, no emotion) is skipped for it.
  assert {s.line: s.reason for s in info.skipped}[7] == "missing_text"
  assert "emotion" in validate.text_fields()


def test_skipped_lines_are_listed_once_in_the_run_folder(tmp_path):
  path = _broken_manifest(tmp_path)
  source = sources.ManifestSource(path, required_fields=("text",))
  run = tmp_path / "run"
  sources.record_skipped(str(run), source.info.skipped)
  # Scoring the same file again, or a resumed run, lists nothing twice.
  again = sources.ManifestSource(path, required_fields=("text",))
  sources.record_skipped(str(run), again.info.skipped + source.info.skipped)
  with open(run / "skipped.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [(r["manifest"], r["line"], r["reason"]) for r in rows] == [
      (path, 2, "invalid_utf8"), (path, 3, "invalid_json"), (path, 4, "audio_not_found"),
      (path, 7, "missing_text")]


def test_evaluation_counts_each_skipped_line_once(tmp_path):
  from speechjax.data import fields
  from speechjax.evaluate import count_skipped

  # 5 lines left out when the source was read, 4 usable examples, scored on 3 tasks.
  bits = fields.field_bits
  fields = [bits({"text": "a", "translation": "b", "label": "c"})] * 3 + [bits({"text": "a"})]
  info = sources.SourceInfo(np.full(4, 16000, np.int64), np.asarray(fields, np.int32), ("c",), 5)
  data_cfg = {"max_audio_seconds": 30.0}
  assert count_skipped(info, ("asr", "translate", "classify"), data_cfg) == 5
  # An example no scored task can use counts once too.
  fields[3] = bits({"speaker": "x"})
  info.fields = np.asarray(fields, np.int32)
  assert count_skipped(info, ("asr", "translate", "classify"), data_cfg) == 6
  # A clip longer than the encoder window is scored in chunks, not skipped.
  info.num_samples = np.asarray([16000, 16000, 40 * 16000, 16000], np.int64)
  assert count_skipped(info, ("asr", "translate", "classify"), data_cfg) == 6


def test_missing_manifest_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=os.path.join(str(tmp_path), "nope.jsonl")):
    sources.ManifestSource(str(tmp_path / "nope.jsonl"))


@pytest.mark.slow  # builds a tiny trainer on a manifest: ~30 s on 2 shared cores
def test_training_on_a_manifest_lists_its_bad_lines_in_the_run_folder(tiny_corpus, tmp_path):
  import sys

  from speechjax.train import build_trainer

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
  import tiny  # pylint: disable=import-outside-toplevel

  _, tok_dir, corpus_root = tiny_corpus
  with open(os.path.join(corpus_root, "train.jsonl")) as f:
    records = [json.loads(line) for line in f][:16]
  for record in records:
    record["audio"] = os.path.join(corpus_root, record["audio"])
  lines = [json.dumps(r).encode() for r in records]
  lines[3] = b'{"audio": "x.wav", "text": "caf\xe9"}'
  lines[9] = json.dumps({"audio": records[9]["audio"]}).encode()
  train = tmp_path / "train.jsonl"
  train.write_bytes(b"\n".join(lines) + b"\n")
  config = tiny.get_config()
  config.model.tokenizer = tok_dir
  config.data.train_split = str(train)
  config.data.eval_split = str(train)
  config.logging.tensorboard = False
  workdir = tmp_path / "run"
  trainer = build_trainer(config, str(workdir))
  trainer.close()
  with open(workdir / "skipped.jsonl") as f:
    rows = [json.loads(line) for line in f]
  # Read twice (train and dev are the same file), listed once.
  assert [(r["manifest"], r["line"], r["reason"]) for r in rows] == [
      (str(train), 4, "invalid_utf8"), (str(train), 10, "missing_text")]
