r"""Input pipeline throughput and JAX log-mel vs transformers' WhisperFeatureExtractor.

    python -m bench.input_throughput [--num_utterances=400] [--repeats=5] [--out=FILE.json]

Prints one JSON object:
  pipeline_tfds   training batches from the array_record dataset (read, int16
                  decode, JAX log-mel, tokenization, padding, batching), in
                  audio seconds per wall second (x real time);
  pipeline_files_flac22k / pipeline_files_ogg44k_stereo
                  the same batches from audio files decoded and resampled on
                  every access (FLAC 22.05 kHz mono; OGG/Vorbis 44.1 kHz stereo);
  log_mel         the same [batch, samples] audio through speechjax's jit'd JAX
                  log_mel and through WhisperFeatureExtractor (which uses torch.stft
                  when torch is installed), alternating A B A B, median of repeats.
Goals on the 2-core dev machine: >= 1000x real time, log-mel >= 2x.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import (
  app,  # pylint: disable=g-import-not-at-top
  flags,
)
import jax
import numpy as np

from speechjax.data import audio as audio_lib
from speechjax.data import config as data_config
from speechjax.data import features, pipeline, sources
from speechjax.projects.spoken_commands import synth
from speechjax.projects.spoken_commands import tokenizer as tokenizer_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_utterances", 400, "Synthetic utterances in the benchmark corpus.")
flags.DEFINE_integer("batches", 40, "Batches timed per pipeline measurement.")
flags.DEFINE_integer("repeats", 5, "Repetitions (median reported).")
flags.DEFINE_integer("batch_size", 16, "Batch size.")
flags.DEFINE_string("out", "", "Also write the JSON here.")


class FileSource:
  """Decodes and resamples the original file on every access (no TFDS)."""

  def __init__(self, rows):
    self.rows = rows

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, index):
    row = dict(self.rows[index])
    row["audio"] = audio_lib.load_audio(row.pop("path"))
    return row


def _make_corpus(folder: str, count: int):
  """Synthetic corpus + TFDS dataset, plus each utterance re-encoded as FLAC 22.05 kHz
  mono and as OGG/Vorbis 44.1 kHz stereo (file paths that need decoding + resampling)."""
  summary = synth.build(folder, num_train=count, num_dev=0, num_test=0, seed=0, workers=2,
                        name="bench")
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  rows = {"flac22k": [], "ogg44k_stereo": []}
  with open(os.path.join(folder, "train.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      wave = audio_lib.load_audio(os.path.join(folder, row["audio"]))
      fields = {
          "text": row["text"],
          "label": row["label"],
          "translation": row["translation"],
          "id": row["id"]
      }
      path = os.path.join(folder, f'{row["id"]}.flac')
      sf.write(path, audio_lib.resample(wave, 16000, 22050), 22050)
      rows["flac22k"].append({"path": path, **fields})
      path = os.path.join(folder, f'{row["id"]}.ogg')
      sf.write(path, np.stack([audio_lib.resample(wave, 16000, 44100)] * 2, axis=1), 44100,
               format="OGG", subtype="VORBIS")
      rows["ogg44k_stereo"].append({"path": path, **fields})
  return summary, rows


def _time_pipeline(source, info, tok, config, batches: int) -> float:
  """Audio seconds per wall second over `batches` batches (after one warm-up pass)."""
  iterator = pipeline.make_train_iterator(source, info, tok, lambda f: (f + 1) // 2 // 4, config)
  for _ in range(batches):  # warm-up: compiles every bucket shape, fills the prefetch
    next(iterator)
  iterator.stats()
  start = time.perf_counter()
  seconds = 0.0
  for _ in range(batches):
    seconds += float(next(iterator)["audio_seconds"].sum())
  elapsed = time.perf_counter() - start
  iterator.close()
  return seconds / elapsed


def log_mel_functions(waves: np.ndarray):
  """(ours, theirs): zero-argument functions computing the log-mel of the
  [batch, samples] `waves` with speechjax (jit'd JAX) and with transformers'
  WhisperFeatureExtractor, both returning numpy [batch, 80, frames]."""
  from transformers import WhisperFeatureExtractor  # pylint: disable=g-import-not-at-top
  extractor = WhisperFeatureExtractor(feature_size=80)
  as_list = list(waves)

  def ours():
    return np.asarray(features.log_mel(waves))

  def theirs():
    return extractor(as_list, sampling_rate=16000, padding="longest",
                     return_tensors="np").input_features

  return ours, theirs


def _log_mel_comparison(waves: np.ndarray, repeats: int) -> dict:
  ours, theirs = log_mel_functions(waves)
  ours()
  theirs()
  times = {"jax": [], "hf": []}
  for _ in range(repeats):  # A B A B
    for name, fn in (("jax", ours), ("hf", theirs)):
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  jax_s, hf_s = statistics.median(times["jax"]), statistics.median(times["hf"])
  audio_seconds = waves.size / 16000
  return {
      "batch_shape": list(waves.shape),
      "jax_seconds": jax_s,
      "hf_seconds": hf_s,
      "speedup": hf_s / jax_s,
      "jax_x_realtime": audio_seconds / jax_s,
      "hf_x_realtime": audio_seconds / hf_s,
      "max_abs_diff": float(np.abs(ours() - theirs()).max())
  }


def _speech_row(source, rng, samples: int) -> np.ndarray:
  """Random utterances joined up to `samples` (real speech, not tones)."""
  pieces, total = [], 0
  while total < samples:
    pieces.append(audio_lib.int16_to_float(source[int(rng.integers(len(source)))]["audio"]))
    total += pieces[-1].size
  return np.concatenate(pieces)[:samples]


def run(num_utterances: int = 400, batches: int = 40, repeats: int = 5,
        batch_size: int = 16) -> dict:
  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    summary, rows = _make_corpus(folder, num_utterances)
    corpus_seconds = time.perf_counter() - start
    tok = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.domain_texts(), 512)
    config = data_config.default_data_config()
    config.data_dir = os.path.join(folder, "tfds")
    config.name = "bench"
    config.batch_size = batch_size
    config.audio_buckets_seconds = (3.0, 4.0, 5.0)
    config.token_buckets = (64, 96, 128)
    config.tasks = ("asr", "translate", "classify")
    config.task_weights = (1.0, 1.0, 1.0)
    tfds_source, tfds_info = sources.open_source(config, "train")
    runs = {"tfds": (tfds_source, tfds_info)}
    for kind, kind_rows in rows.items():
      runs[f"files_{kind}"] = (FileSource(kind_rows),
                               sources.SourceInfo(tfds_info.num_samples, tfds_info.fields,
                                                  tfds_info.label_names))
    results = {name: [] for name in runs}
    for _ in range(repeats):  # alternate so machine load hits every variant alike
      for name, (source, info) in runs.items():
        results[name].append(_time_pipeline(source, info, tok, config, batches))
    rng = np.random.default_rng(0)
    waves = np.stack([_speech_row(tfds_source, rng, 10 * 16000) for _ in range(batch_size)])
    speeds = {f"pipeline_{name}_x_realtime": statistics.median(v) for name, v in results.items()}
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "device": str(jax.devices()[0])
        },
        "corpus": {
            "utterances": num_utterances,
            "hours": summary["splits"]["train"]["hours"],
            "synthesis_seconds": summary["synthesis_seconds"],
            "tfds_build_seconds": summary["tfds_build_seconds"],
            "total_seconds": corpus_seconds
        },
        **speeds,
        "pipeline_runs": results,
        "pipeline_setup": {
            "batch_size": batch_size,
            "batches_timed": batches,
            "worker_threads": config.worker_threads,
            "tasks": list(config.tasks)
        },
        "log_mel": _log_mel_comparison(waves.astype(np.float32), repeats * 2),
    }


def main(argv):
  del argv
  result = run(FLAGS.num_utterances, FLAGS.batches, FLAGS.repeats, FLAGS.batch_size)
  text = json.dumps(result, indent=2)
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  sys.exit(app.run(main))
