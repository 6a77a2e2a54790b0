r"""Whisper alone on the demo's test sets: the baseline row of the demo report.

    python -m speechjax.projects.spoken_commands.whisper_baseline --workdir=runs/demo
    make demo-baseline                            # the same (installs the test extra: torch)

The pretrained Whisper the demo starts from (<workdir>/whisper, converted
from the pinned wheel's CTranslate2 folder, or --whisper), run as released:
PyTorch transformers `WhisperForConditionalGeneration.generate`, greedy,
inputs padded to 30 s as Whisper expects. Transcripts are scored with the same
WER / CER (and the same English normalizer) as the demo's evaluation, on
data/test.jsonl and, when other_voices.py has built it, data/test_other.jsonl.
Writes <workdir>/eval/whisper_baseline.json ({"splits": {name: scores}}),
which the demo report shows beside the speech LLM's scores, and the
transcripts in eval/whisper_baseline.predictions.jsonl.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from speechjax.data import audio as audio_lib
from speechjax.evaluation import metrics
from speechjax.projects.spoken_commands import whisper_weights

SPLITS = ("test", "test_other")
BATCH = 16


def transcribe(folder: str, paths: list[str], max_new_tokens: int = 64) -> list[str]:
  """Greedy transformers Whisper transcripts of 16 kHz files."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import WhisperForConditionalGeneration, WhisperProcessor  # pylint: disable=import-outside-toplevel

  processor = WhisperProcessor.from_pretrained(folder)
  model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
  texts = []
  for first in range(0, len(paths), BATCH):
    waves = [audio_lib.load_audio(p) for p in paths[first:first + BATCH]]
    inputs = processor(waves, sampling_rate=audio_lib.SAMPLE_RATE, return_tensors="pt")
    with torch.no_grad():
      tokens = model.generate(inputs.input_features, max_new_tokens=max_new_tokens, num_beams=1,
                              do_sample=False)
    texts += processor.batch_decode(tokens, skip_special_tokens=True)
  return [" ".join(t.split()) for t in texts]


def score(folder: str, data_dir: str, predictions_path: str = "") -> dict:
  out, lines = {}, []
  for split in SPLITS:
    manifest = os.path.join(data_dir, f"{split}.jsonl")
    if not os.path.exists(manifest):
      continue
    rows = [json.loads(line) for line in open(manifest)]
    start = time.time()
    hypotheses = transcribe(folder, [os.path.join(data_dir, r["audio"]) for r in rows])
    scores = metrics.transcript_metrics(hypotheses, [r["text"] for r in rows])
    out[split] = {"wer": scores["wer"], "cer": scores["cer"], "num_examples": len(rows),
                  "seconds": round(time.time() - start, 1)}
    lines += [json.dumps({"id": r["id"], "split": split, "prediction": h, "reference": r["text"]})
              for r, h in zip(rows, hypotheses)]
  if predictions_path:
    with open(predictions_path, "w") as f:
      f.writelines(line + "\n" for line in lines)
  return out


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/demo", "A demo run folder (its data/ and whisper/).")
  flags.DEFINE_string("whisper", "", "Whisper checkpoint ('' = the demo's pinned tiny.en).")


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  folder = whisper_weights.whisper_folder(flags.FLAGS.whisper, workdir)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  splits = score(folder, os.path.join(workdir, "data"),
                 os.path.join(out_dir, "whisper_baseline.predictions.jsonl"))
  with open(os.path.join(out_dir, "whisper_baseline.json"), "w") as f:
    json.dump({"model": folder, "decoding": "transformers generate, greedy, 30 s padding",
               "splits": splits}, f, indent=2)
  print(json.dumps(splits, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
