"""The demo's quick variant end to end: corpus, LM, CTC encoder, speech LLM,
evaluation, transcription, report. Checks mechanics (losses fall, files well
formed), not the full-size accuracy targets."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_losses(path):
  with open(path) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_quick_demo_end_to_end(tmp_path):
  workdir = tmp_path / "demo"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run([sys.executable, "-m", "speechjax.demo", "--config=configs/demo.py:quick",
                           f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
  assert result.returncode == 0, result.stderr[-4000:]
  for stage in ("stages/lm", "stages/ctc", "."):
    losses = train_losses(workdir / stage / "metrics.jsonl")
    assert len(losses) >= 2 and losses[-1] < losses[0], (stage, losses)
  assert (workdir / "lm" / "config.json").exists() and (workdir / "encoder" / "model.safetensors").exists()
  results = json.loads((workdir / "eval" / "test.json").read_text())
  for key in ("wer", "cer", "accuracy", "bleu", "num_examples"):
    assert key in results, key
  assert results["num_examples"] > 0
  predictions = (workdir / "eval" / "test.predictions.jsonl").read_text().strip().split("\n")
  assert {json.loads(p)["task"] for p in predictions} == {"asr", "translate", "classify"}
  assert (workdir / "report.md").read_text().startswith("# speechjax CPU demo")
  assert (workdir / "curves.png").stat().st_size > 10_000
  assert "test split" in result.stdout and "total time" in result.stdout
