"""evaluate and transcribe on a tiny trained run folder."""

import json
import os
import subprocess
import sys

import pytest

from speechjax.train import build_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def trained_run(tiny_corpus, tmp_path_factory):
  data_dir, tok_dir, _ = tiny_corpus
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.model.tokenizer = tok_dir
  config.data.tasks = ("asr", "translate", "classify")
  config.data.task_weights = (1.0, 1.0, 1.0)
  config.train.num_steps = 6
  config.checkpoint.every_steps = 6
  workdir = str(tmp_path_factory.mktemp("run"))
  build_trainer(config, workdir).run()
  return workdir


def test_evaluate_writes_metrics_and_predictions(trained_run, tiny_corpus):
  from speechjax.evaluate import evaluate_run

  summary = evaluate_run(trained_run, split="test", max_examples=8, progress=False)
  with open(os.path.join(trained_run, "eval", "test.json")) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(summary))
  for key in ("wer", "cer", "bleu", "chrf", "accuracy", "macro_f1", "num_examples", "num_skipped"):
    assert key in written, key
  assert written["num_examples"] == 8 and written["num_skipped"] == 0
  assert 0.0 <= written["cer"] and 0.0 <= written["accuracy"] <= 1.0
  with open(os.path.join(trained_run, "eval", "test.predictions.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 3 * 8
  assert {r["task"] for r in rows} == {"asr", "translate", "classify"}
  assert all(set(r) == {"id", "task", "prediction", "reference"} for r in rows)

  # A manifest scores the same way, named after the file.
  manifest = os.path.join(tiny_corpus[2], "dev.jsonl")
  evaluate_run(trained_run, manifest=manifest, tasks=("asr",), max_examples=4, progress=False)
  with open(os.path.join(trained_run, "eval", "dev.json")) as f:
    assert json.load(f)["asr/num_examples"] == 4


def test_transcribe_cli_reports_bad_files_and_goes_on(trained_run, tiny_corpus, tmp_path):
  root = tiny_corpus[2]
  with open(os.path.join(root, "test.jsonl")) as f:
    good = [os.path.join(root, json.loads(line)["audio"]) for line in f][:2]
  bad = tmp_path / "broken.wav"
  bad.write_bytes(b"RIFF not really a wav file")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run([sys.executable, "-m", "speechjax.transcribe", f"--workdir={trained_run}",
                           good[0], str(bad), good[1]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stdout.strip().split("\n")
  assert [line.split("\t")[0] for line in lines] == [good[0], str(bad), good[1]]
  assert lines[1].split("\t")[1].startswith("ERROR: ")
  assert not lines[0].split("\t")[1].startswith("ERROR")
