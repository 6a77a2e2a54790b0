r"""Transcribes (translates, classifies) audio files with a trained run.

    python -m speechjax.transcribe --workdir=runs/demo a.wav b.flac [--task=asr|translate|classify]

Prints one line per file: `FILE<TAB>output`. A file that cannot be read gets
an `FILE<TAB>ERROR: ...` line and the others go on; the exit status is 1 when
any file failed. Audio longer than the largest bucket (30 s at most) is cut
into chunks at quiet points, the chunks decoded in one batch, and joined.
"""

from __future__ import annotations

import sys

from absl import app, flags
import numpy as np

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no flags."""
  flags.DEFINE_string("workdir", None, "Training folder (config.json + checkpoints).")
  flags.DEFINE_enum("task", "asr", ["asr", "translate", "classify"], "What to produce.")
  flags.DEFINE_string("checkpoint", "best", "best | last")
  flags.mark_flags_as_required(["workdir"])


class Transcriber:
  """Loads a run once; `__call__(paths, task)` -> [(path, text or None, error or None)]."""

  def __init__(self, workdir: str, checkpoint: str = "best"):
    from speechjax import evaluation, inference
    from speechjax.data import pipeline, tasks

    self.config, self.bundle, variables, _ = inference.load_trained(workdir, checkpoint)
    self.variables = evaluation.inference_variables(variables, self.bundle.model_config.lora)
    data_cfg = self.config.data
    self.prompts = tasks.PromptBuilder(self.bundle.tokenizer, data_cfg.template, data_cfg.translation_language,
                                       bool(data_cfg.add_bos))
    self.buckets = sorted(pipeline.bucket_sizes_samples(data_cfg))
    self.hop_length = pipeline.hop_length(data_cfg)
    self.batch_size = int(data_cfg.eval_batch_size)

  def _batch(self, waves: list[np.ndarray], task: str) -> dict:
    from speechjax.data import features, pipeline

    lengths = np.array([w.size for w in waves])
    samples = pipeline.smallest_fitting(int(lengths.max()), self.buckets) or self.buckets[-1]
    padded = np.zeros((len(waves), samples), np.float32)
    for i, w in enumerate(waves):
      padded[i, :w.size] = w[:samples]
    feats, mask = features.log_mel_with_mask(padded, np.minimum(lengths, samples),
                                             n_mels=int(self.config.data.n_mels),
                                             hop_length=self.hop_length)
    num_audio = self.bundle.num_audio_tokens(feats.shape[-1])
    prompts = [self.prompts.prompt_ids({}, task, num_audio) for _ in waves]
    width = max(len(p) for p in prompts)
    ids = np.full((len(waves), width), self.prompts.pad_id, np.int32)
    attn = np.zeros((len(waves), width), np.int32)
    for i, p in enumerate(prompts):  # left padding: generation starts at the last column
      ids[i, width - len(p):] = p
      attn[i, width - len(p):] = 1
    return {"features": np.asarray(feats), "feature_mask": np.asarray(mask, np.int32), "input_ids": ids,
            "attention_mask": attn}

  def __call__(self, paths, task: str = "asr"):
    from speechjax import decode, evaluation
    from speechjax.data import audio as audio_lib

    chunks, owners, results = [], [], {}
    limit_seconds = self.buckets[-1] / audio_lib.SAMPLE_RATE
    for path in paths:
      try:
        wave = audio_lib.load_audio(path)
        if wave.size == 0 or not np.all(np.isfinite(wave)):
          raise ValueError("empty or non-finite audio")
      except Exception as e:  # report and go on with the other files
        results[path] = (None, f"{type(e).__name__}: {e}")
        continue
      for piece in decode.chunk_audio(wave, audio_lib.SAMPLE_RATE, limit_seconds):
        chunks.append(piece)
        owners.append(path)
    texts: dict[str, list[str]] = {}
    for start in range(0, len(chunks), self.batch_size):
      group = chunks[start:start + self.batch_size]
      outs = evaluation.decode_batch(self.bundle, self.variables, self._batch(group, task),
                                     self.config.eval.decode)
      for owner, text in zip(owners[start:start + self.batch_size], outs):
        texts.setdefault(owner, []).append(text)
    for path, pieces in texts.items():
      results[path] = (decode.join_transcripts(pieces), None)
    return [(p, *results[p]) for p in paths]


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more audio files")
  failed = False
  for path, text, error in Transcriber(FLAGS.workdir, FLAGS.checkpoint)(paths, FLAGS.task):
    if error is not None:
      failed = True
      print(f"{path}\tERROR: {error}", flush=True)
    else:
      print(f"{path}\t{text}", flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  define_flags()
  app.run(main)
