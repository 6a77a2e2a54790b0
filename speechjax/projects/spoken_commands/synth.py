"""Synthetic spoken-command corpus: espeak-ng voices reading the `corpus` domain.

    python -m speechjax.projects.spoken_commands.synth --out=data/spoken_commands \\
        --num_train=2000 --num_dev=200 --num_test=200 --seed=0

writes, deterministically for a seed,

    OUT/wavs/<split>/<id>.wav            16 kHz 16-bit mono, 2-4 s
    OUT/train.jsonl dev.jsonl test.jsonl manifests (audio, text, label, translation,
                                          speaker, duration, id)
    OUT/lm_text.jsonl                    text only: every sentence of the train partition
                                          (text, label, translation), for LM pretraining
    OUT/corpus.json                      voices per split, intents, vocabulary, timings
    OUT/tfds/spoken_commands/1.0.0/      the TFDS (array_record) dataset

Voices are espeak-ng accents x voice variants with per-utterance rate and
pitch. Dev and test use voice variants that train never hears (disjoint
timbres; accents are shared) AND transcripts that train never contains.

TTS engines (`--tts`): 'library' drives libespeak-ng through ctypes from the
`espeakng-loader` wheel (library + voice data, pinned with the package, no
system install, ~2 ms an utterance); 'binary' runs a system `espeak-ng`
executable per utterance; 'auto' (default) takes the wheel and falls back to a
system binary when the wheel is missing. The same seed gives byte-identical
audio with the same engine and espeak-ng version; across versions it differs.
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import ctypes
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

from speechjax.data import audio as audio_lib
from speechjax.projects.spoken_commands import corpus

ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
# Voice variants (timbre: formants, pitch range, breathiness) kept apart per split.
VARIANTS = {
    "train": ("m1", "m2", "m4", "m5", "m7", "f1", "f2", "f4"),
    "dev": ("m3", "f3"),
    "test": ("m6", "f5"),
}
RATE_WPM = (140, 180)
PITCH = (35, 65)  # espeak pitch parameter, 0-100
PAD_SECONDS = (0.2, 0.45)
PEAK_DB = (-6.0, -1.0)
MIN_JOBS_FOR_POOL = 50  # below this, starting worker processes costs more than it saves
SYNTH_CHUNK = 16  # utterances per espeak child process (fixed: it is part of the output's recipe)


def voices(split: str) -> tuple[str, ...]:
  return tuple(f"{accent}+{variant}" for variant in VARIANTS[split] for accent in ACCENTS)


class Espeak:
  """libespeak-ng in synchronous mode; one per process (the library is global)."""

  _AUDIO_OUTPUT_SYNCHRONOUS = 2
  _RATE, _PITCH = 1, 3
  _POS_CHARACTER, _CHARS_UTF8 = 1, 1

  def __init__(self):
    import espeakng_loader  # pylint: disable=g-import-not-at-top
    self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
    c = ctypes
    self._lib.espeak_Initialize.argtypes = [c.c_int, c.c_int, c.c_char_p, c.c_int]
    self._lib.espeak_Synth.argtypes = [c.c_void_p, c.c_size_t, c.c_uint, c.c_int, c.c_uint,
                                       c.c_uint, c.c_void_p, c.c_void_p]
    self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    self._libc = ctypes.CDLL(None)
    self.sample_rate = self._lib.espeak_Initialize(self._AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                   espeakng_loader.get_data_path().encode(), 0)
    if self.sample_rate <= 0:
      raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
    self._chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                     ctypes.c_void_p)

    def on_audio(wav, num_samples, events):
      del events
      if num_samples > 0:
        self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
      return 0

    self._callback = callback_type(on_audio)  # keep a reference: ctypes does not
    self._lib.espeak_SetSynthCallback(self._callback)
    # Warm up once here (dictionary loading, lazy tables), so forked children
    # (see `say_many`) start fast, all from this same fixed state.
    self._synthesize("one two three", "en", 175, 50)

  def _synthesize(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    self._chunks = []
    # Breathy variants add noise from espeak's own generator (whose seed
    # differs between processes) and from libc rand(): fix both.
    self._lib.espeak_ng_SetRandSeed(0)
    self._libc.srand(0)
    if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
      raise ValueError(f"espeak-ng has no voice {voice!r}")
    self._lib.espeak_SetParameter(self._RATE, int(rate), 0)
    self._lib.espeak_SetParameter(self._PITCH, int(pitch), 0)
    data = text.encode("utf-8") + b"\0"
    status = self._lib.espeak_Synth(data, len(data), 0, self._POS_CHARACTER, 0, self._CHARS_UTF8,
                                    None, None)
    self._lib.espeak_Synchronize()
    if status != 0 or not self._chunks:
      raise RuntimeError(f"espeak-ng failed on {text!r} with voice {voice} (status {status})")
    return np.concatenate(self._chunks)

  def say_many(self, requests: Sequence[tuple[str, str, int, int]]) -> list[np.ndarray]:
    """int16 audio at self.sample_rate for each (text, voice, rate, pitch), reproducibly.

    libespeak-ng keeps synthesis state in static variables (wave generator
    phase, flutter position, ...) that no API call resets, so the same text
    comes out slightly different depending on what was synthesised before.
    Each call therefore runs in a forked child of this engine, which never
    synthesises after its fixed warm-up: the output depends only on
    `requests`. Callers keep the grouping fixed (see SYNTH_CHUNK).
    """
    if not hasattr(os, "fork"):
      return [self._synthesize(*request) for request in requests]
    if _jax_is_running():  # forking a process that runs XLA's threads can deadlock
      return _clean_helper().submit(_library_say_many, list(requests)).result()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: synthesise, send, exit without running Python cleanup
      code = 0
      try:
        os.close(read_fd)
        waves = [self._synthesize(*request).astype("<i2").tobytes() for request in requests]
        payload = b"".join(len(w).to_bytes(8, "little") + w for w in waves)
      except Exception as e:  # pylint: disable=broad-except
        payload, code = repr(e).encode(), 1
      with os.fdopen(write_fd, "wb") as pipe:
        pipe.write(payload)
      os._exit(code)  # pylint: disable=protected-access
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
      payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
      raise RuntimeError(f"espeak-ng failed on {requests!r}: {payload[-500:]!r}")
    waves, offset = [], 0
    while offset < len(payload):
      size = int.from_bytes(payload[offset:offset + 8], "little")
      waves.append(np.frombuffer(payload[offset + 8:offset + 8 + size], "<i2").astype(np.int16))
      offset += 8 + size
    return waves

  def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    return self.say_many([(text, voice, rate, pitch)])[0]


class EspeakBinary:
  """Fallback through a system `espeak-ng` executable (same voices, slower)."""

  sample_rate = 22050

  def __init__(self):
    self._exe = shutil.which("espeak-ng")
    if not self._exe:
      raise RuntimeError("Neither the espeakng-loader wheel nor an espeak-ng binary is available.")

  def say_many(self, requests: Sequence[tuple[str, str, int, int]]) -> list[np.ndarray]:
    return [self.say(*request) for request in requests]

  def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
      command = [self._exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", f.name, text]
      subprocess.run(command, check=True, capture_output=True)
      import soundfile as sf  # pylint: disable=g-import-not-at-top
      audio, self.sample_rate = sf.read(f.name, dtype="int16")
    return audio


def _jax_is_running() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(bridge is not None and bridge.backends_are_initialized())


_HELPER = None


def _clean_helper() -> concurrent.futures.ProcessPoolExecutor:
  """A spawned process without JAX, where espeak children can be forked safely."""
  global _HELPER
  if _HELPER is None:
    _HELPER = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"))
  return _HELPER


def _library_say_many(requests):
  return engine("library").say_many(requests)


_ENGINES = {}
TTS_KINDS = ("auto", "library", "binary")


def engine(kind: str = "auto"):
  """The process' TTS engine: 'library' (espeakng-loader wheel), 'binary' or 'auto'."""
  if kind not in TTS_KINDS:
    raise ValueError(f"tts must be one of {TTS_KINDS}, got {kind!r}")
  if kind not in _ENGINES:
    if kind == "library":
      _ENGINES[kind] = Espeak()
    elif kind == "binary":
      _ENGINES[kind] = EspeakBinary()
    else:
      try:
        _ENGINES[kind] = engine("library")
      except (ImportError, OSError):
        _ENGINES[kind] = engine("binary")
  return _ENGINES[kind]


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything needed to render one utterance, fixed by the seed before synthesis."""
  path: str
  text: str
  voice: str
  rate: int
  pitch: int
  pad_start: float
  pad_end: float
  peak_db: float


def trim_silence(audio: np.ndarray, sample_rate: int, threshold_db: float = -45.0,
                 margin_seconds: float = 0.05) -> np.ndarray:
  """Cuts leading/trailing samples below threshold_db relative to the peak."""
  magnitude = np.abs(audio.astype(np.float32))
  peak = magnitude.max() if magnitude.size else 0.0
  if peak == 0.0:
    return audio
  loud = np.flatnonzero(magnitude > peak * 10**(threshold_db / 20))
  margin = int(margin_seconds * sample_rate)
  return audio[max(0, loud[0] - margin):loud[-1] + margin + 1]


def finish(job: Job, raw: np.ndarray, sample_rate: int) -> float:
  """Trims, resamples to 16 kHz, pads, normalises and writes one wav; returns seconds."""
  speech = audio_lib.resample(trim_silence(audio_lib.to_float32(raw), sample_rate), sample_rate)
  speech *= 10**(job.peak_db / 20) / max(float(np.abs(speech).max()), 1e-6)
  sr = audio_lib.SAMPLE_RATE
  audio = np.concatenate([
      np.zeros(int(job.pad_start * sr), np.float32), speech,
      np.zeros(int(job.pad_end * sr), np.float32)
  ])
  audio_lib.write_wav(job.path, audio)
  return audio.size / sr


def render_chunk(jobs: Sequence[Job], tts_kind: str = "auto") -> list[float]:
  """Synthesises a fixed group of jobs in one espeak child process (see Espeak.say_many)."""
  tts = engine(tts_kind)
  raws = tts.say_many([(job.text, job.voice, job.rate, job.pitch) for job in jobs])
  return [finish(job, raw, tts.sample_rate) for job, raw in zip(jobs, raws)]


def plan_split(split: str, count: int, seed: int, out_dir: str,
               known_words: set[str] | None, spoken_tasks: bool = False) -> tuple[list[Job], list[dict]]:
  """Sentences, voices and prosody for one split, all drawn before any synthesis.
  spoken_tasks: rows also carry 'summary', 'question' and 'answer' (the
  summarize and spoken_qa tasks; corpus.summary_of, corpus.question_about)."""
  rng = np.random.default_rng([seed, ("train", "dev", "test").index(split)])
  sentences = corpus.sample_split(split, count, seed, rng, known_words)
  split_voices = voices(split)
  jobs, rows = [], []
  for i, sentence in enumerate(sentences):
    uid = f"{split}-{i:06d}"
    rel = os.path.join("wavs", split, f"{uid}.wav")
    job = Job(path=os.path.join(out_dir, rel), text=sentence.text,
              voice=split_voices[rng.integers(len(split_voices))],
              rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
              pitch=int(rng.integers(PITCH[0],
                                     PITCH[1] + 1)), pad_start=float(rng.uniform(*PAD_SECONDS)),
              pad_end=float(rng.uniform(*PAD_SECONDS)), peak_db=float(rng.uniform(*PEAK_DB)))
    jobs.append(job)
    row = {
        "audio": rel,
        "text": sentence.text,
        "label": sentence.intent,
        "translation": sentence.translation,
        "speaker": job.voice,
        "id": uid
    }
    if spoken_tasks:
      question, answer = corpus.question_about(sentence)
      row.update(summary=corpus.summary_of(sentence), question=question, answer=answer)
    rows.append(row)
  return jobs, rows


def synthesize(out_dir: str, num_train: int, num_dev: int, num_test: int, seed: int = 0,
               workers: int = 2, tts: str = "auto", spoken_tasks: bool = False) -> dict:
  """Writes wavs + manifests (not the TFDS dataset); returns the corpus summary."""
  start = time.perf_counter()
  plans, train_words = {}, None
  for split, count in (("train", num_train), ("dev", num_dev), ("test", num_test)):
    if count <= 0:
      continue
    plans[split] = plan_split(split, count, seed, out_dir,
                              None if split == "train" else train_words, spoken_tasks)
    if split == "train":
      train_words = corpus.vocabulary(row["text"] for row in plans[split][1])
  for split in plans:
    os.makedirs(os.path.join(out_dir, "wavs", split), exist_ok=True)
  all_jobs = [job for jobs, _ in plans.values() for job in jobs]
  # Fixed groups: the audio depends on the grouping, never on the worker count.
  chunks = [all_jobs[i:i + SYNTH_CHUNK] for i in range(0, len(all_jobs), SYNTH_CHUNK)]
  if workers > 1 and len(all_jobs) >= MIN_JOBS_FOR_POOL:
    # spawn, not fork: the parent may hold JAX threads.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      rendered = pool.map(functools.partial(render_chunk, tts_kind=tts), chunks)
  else:
    rendered = [render_chunk(chunk, tts) for chunk in chunks]
  durations = [d for chunk in rendered for d in chunk]
  synth_seconds = time.perf_counter() - start
  offset = 0
  summary = {"seed": seed, "tts": tts, "intents": list(corpus.INTENTS),
             "translation_language": corpus.TRANSLATION_LANGUAGE,
             "vocabulary_size": len(corpus.vocabulary()), "splits": {}}
  for split, (jobs, rows) in plans.items():
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      for row, duration in zip(rows, durations[offset:offset + len(rows)]):
        f.write(json.dumps({**row, "duration": round(duration, 3)}, ensure_ascii=False) + "\n")
      for row in (dialogue_rows(rows) if spoken_tasks else []):
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    split_durations = np.asarray(durations[offset:offset + len(rows)])
    offset += len(rows)
    summary["splits"][split] = {
        "num_utterances": len(rows),
        "voices": sorted({j.voice for j in jobs}),
        "num_unique_sentences": len({r["text"] for r in rows}),
        "hours": float(split_durations.sum() / 3600),
        "seconds_min_mean_max": [float(split_durations.min()), float(split_durations.mean()),
                                 float(split_durations.max())],
    }
  summary["synthesis_seconds"] = synth_seconds
  summary["lm_text_sentences"] = write_lm_text(os.path.join(out_dir, LM_TEXT_FILE), seed)
  if spoken_tasks:
    summary["spoken_tasks"] = ["summarize", "spoken_qa", "dialogue"]
    summary["dialogues"] = {split: len(dialogue_rows(rows)) for split, (_, rows) in plans.items()}
  return summary


DIALOGUE_EVERY = 4  # one two-turn dialogue per this many utterances of a split


def dialogue_rows(rows: Sequence[dict]) -> list[dict]:
  """Two-turn spoken dialogues over a split's own utterances (the `dialogue`
  task): the user says a command, the assistant repeats it, the user says the
  next one and asks again, and the answer scored is its transcript."""
  out = []
  for start in range(0, len(rows) - 1, DIALOGUE_EVERY):
    first, second = rows[start], rows[start + 1]
    out.append({"id": f"{first['id']}-dialogue", "turns": [
        {"role": "user", "audio": first["audio"]},
        {"role": "assistant", "text": first["text"]},
        {"role": "user", "audio": second["audio"], "text": "and this one?"},
        {"role": "assistant", "text": second["text"]}]})
  return out


LM_TEXT_FILE = "lm_text.jsonl"


def write_lm_text(path: str, seed: int) -> int:
  """Every sentence of the train partition as a text-only record: a text
  corpus for the LM, like LibriSpeech's LM corpus next to its audio. It
  holds no dev or test transcript (the partition is disjoint)."""
  count = 0
  with open(path, "w", encoding="utf-8") as f:
    for _, sentences in sorted(corpus.partition(seed)["train"].items()):
      for sentence in sentences:
        f.write(json.dumps({"text": sentence.text, "label": sentence.intent,
                            "translation": sentence.translation}, ensure_ascii=False) + "\n")
        count += 1
  return count


def build(out_dir: str, num_train: int = 1000, num_dev: int = 100, num_test: int = 100,
          seed: int = 0, workers: int = 2, name: str = "spoken_commands",
          overwrite: bool = True, tts: str = "auto", spoken_tasks: bool = False) -> dict:
  """Synthesises the corpus and builds its TFDS dataset under OUT/tfds; returns the summary."""
  from speechjax.projects.spoken_commands import tfds_builder  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  summary = synthesize(out_dir, num_train, num_dev, num_test, seed, workers, tts, spoken_tasks)
  start = time.perf_counter()
  summary["dataset_dir"] = tfds_builder.build_spoken_commands(
      out_dir, name=name, splits=tuple(summary["splits"]), num_workers=workers, overwrite=overwrite)
  summary["tfds_build_seconds"] = time.perf_counter() - start
  with open(os.path.join(out_dir, "corpus.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, ensure_ascii=False)
  return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
  """CLI flags, defined only when run as a program so importing this module adds none."""
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_integer("num_train", 1000, "Training utterances.")
  flags.DEFINE_integer("num_dev", 100, "Dev utterances (held-out voices and sentences).")
  flags.DEFINE_integer("num_test", 100, "Test utterances (held-out voices and sentences).")
  flags.DEFINE_integer("seed", 0, "Seed: same seed, same corpus.")
  flags.DEFINE_integer("workers", 2, "Synthesis processes.")
  flags.DEFINE_string("name", "spoken_commands", "TFDS dataset name (folder under OUT/tfds).")
  flags.DEFINE_enum("tts", "auto", TTS_KINDS,
                    "library: the espeakng-loader wheel; binary: a system espeak-ng; "
                    "auto: the wheel, else the binary.")
  flags.DEFINE_bool("spoken_tasks", False, "Also write summaries and spoken-QA pairs (the summarize "
                    "and spoken_qa tasks).")


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  start = time.perf_counter()
  summary = build(FLAGS.out, FLAGS.num_train, FLAGS.num_dev, FLAGS.num_test, FLAGS.seed,
                  FLAGS.workers, FLAGS.name, tts=FLAGS.tts, spoken_tasks=FLAGS.spoken_tasks)
  summary["total_seconds"] = time.perf_counter() - start
  summary.pop("intents")
  print(json.dumps(summary, indent=2, ensure_ascii=False))


if __name__ == "__main__":
  define_flags()
  app.run(main)
