r"""The demo's test sentences spoken by synthesizers it never trains on.

    python -m speechjax.projects.spoken_commands.other_voices --workdir=runs/demo
    make demo-other-voices                        # the same

The demo trains on espeak-ng voices only. This set re-speaks every test
utterance (same sentence, intent and translation) with another engine: flite
(voices kal16, slt, awb, rms) and festival (every installed voice, e.g.
kal_diphone, ked_diphone, cmu_us_slt_arctic_hts), taken in turn. They are
Debian packages (`apt-get install flite festival festvox-kdlpc16k
festvox-us-slt-hts`); the demo never needs them, and with none installed this
program says so and exits.

Writes <workdir>/data/wavs/test_other/*.wav and <workdir>/data/test_other.jsonl
(rows as test.jsonl, `speaker` = 'engine:voice'), then scores the run on it
(<workdir>/eval/test_other.json) unless --score=false, and transcribes one
long 44.1 kHz FLAC of ten of those sentences in a row (data/long_other.flac,
cut at its pauses: `speechjax transcribe --split_pause_seconds=0.3`). Re-running reuses the wavs already written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile

from absl import app, flags
import numpy as np

from speechjax.data import audio as audio_lib
from speechjax.projects.spoken_commands.synth import PAD_SECONDS, trim_silence

FLITE_VOICES = ("kal16", "slt", "awb", "rms")
SPLIT = "test_other"
SEED = 7


@dataclasses.dataclass(frozen=True)
class Voice:
  engine: str  # 'flite' | 'festival'
  name: str

  @property
  def label(self) -> str:
    return f"{self.engine}:{self.name}"

  def command(self, text_path: str, wav_path: str) -> list[str]:
    if self.engine == "flite":
      return ["flite", "-voice", self.name, "-f", text_path, "-o", wav_path]
    return ["text2wave", "-eval", f"(voice_{self.name})", text_path, "-o", wav_path]


def _festival_voices() -> list[str]:
  if not shutil.which("festival") or not shutil.which("text2wave"):
    return []
  out = subprocess.run(["festival", "--pipe"], input="(print (voice.list))\n", capture_output=True,
                       text=True, timeout=60, check=False).stdout
  lines = [line for line in out.splitlines() if line.startswith("(")]
  return sorted(lines[-1].strip("()").split()) if lines else []


def installed_voices() -> list[Voice]:
  """Every voice of flite and festival found on this machine (none: [])."""
  found = []
  if shutil.which("flite"):
    listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True, timeout=60,
                            check=False).stdout.split()
    found += [Voice("flite", v) for v in FLITE_VOICES if v in listed]
  found += [Voice("festival", v) for v in _festival_voices()]
  return found


def speak(voice: Voice, text: str, pad: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
  """16 kHz float32 speech of `text`, silence trimmed to `pad` seconds (before,
  after), peak at -3 dBFS."""
  with tempfile.TemporaryDirectory() as tmp:
    text_path, wav_path = os.path.join(tmp, "text.txt"), os.path.join(tmp, "out.wav")
    with open(text_path, "w") as f:
      f.write(text + "\n")
    result = subprocess.run(voice.command(text_path, wav_path), capture_output=True, text=True,
                            timeout=120, check=False)
    if result.returncode != 0 or not os.path.exists(wav_path):
      raise RuntimeError(f"{voice.label} failed on {text!r}: {result.stderr.strip()[-300:]}")
    import soundfile as sf  # pylint: disable=g-import-not-at-top
    raw, rate = sf.read(wav_path, dtype="float32")
  speech = audio_lib.resample(trim_silence(audio_lib.to_mono(raw), rate), rate)
  speech = speech * (10**(-3 / 20) / max(float(np.abs(speech).max()), 1e-6))
  silence = [np.zeros(int(seconds * audio_lib.SAMPLE_RATE), np.float32) for seconds in pad]
  return np.concatenate([silence[0], speech.astype(np.float32), silence[1]])


def build(data_dir: str, voices: list[Voice], limit: int = 0) -> str:
  """Re-speaks data_dir/test.jsonl with `voices` in turn; returns the manifest
  path. The manifest is written last (atomically), so it only ever lists wavs
  that exist."""
  if not voices:
    raise ValueError("no other synthesizer installed: apt-get install flite festival")
  rows = [json.loads(line) for line in open(os.path.join(data_dir, "test.jsonl"))]
  rows = rows[:limit] if limit else rows
  os.makedirs(os.path.join(data_dir, "wavs", SPLIT), exist_ok=True)
  out_rows = []
  for i, row in enumerate(rows):
    voice = voices[i % len(voices)]
    uid = f"{SPLIT}-{i:06d}"
    rel = os.path.join("wavs", SPLIT, f"{uid}.wav")
    path = os.path.join(data_dir, rel)
    if not os.path.exists(path):
      # The silence around each utterance is drawn as the demo corpus draws
      # it (synth.PAD_SECONDS): only the voice differs from the test split.
      pad = tuple(np.random.default_rng([SEED, i]).uniform(*PAD_SECONDS, size=2))
      audio = speak(voice, row["text"], pad)
      audio_lib.write_wav(path + ".tmp.wav", audio)
      os.replace(path + ".tmp.wav", path)
    duration = audio_lib.audio_info(path)[1]
    out_rows.append({**row, "audio": rel, "speaker": voice.label, "id": uid, "duration": round(duration, 3)})
  manifest = os.path.join(data_dir, f"{SPLIT}.jsonl")
  with open(manifest + ".tmp", "w") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows)
  os.replace(manifest + ".tmp", manifest)
  return manifest


def render_long(voice: Voice, texts: list[str], path: str, sample_rate: int = 44100,
                pause_seconds: float = 0.6) -> float:
  """One recording of `texts` in a row (pauses between), at `sample_rate`, as
  a user would bring it (e.g. a 44.1 kHz FLAC); returns its seconds."""
  import soundfile as sf  # pylint: disable=import-outside-toplevel
  pause = np.zeros(int(pause_seconds * audio_lib.SAMPLE_RATE), np.float32)
  parts = []
  for text in texts:
    parts += [speak(voice, text), pause]
  audio = audio_lib.resample(np.concatenate(parts), audio_lib.SAMPLE_RATE, sample_rate)
  tmp = f"{path}.tmp{os.path.splitext(path)[1]}"
  sf.write(tmp, audio, sample_rate)
  os.replace(tmp, path)
  return audio.size / sample_rate


def transcribe_long(workdir: str, voices: list[Voice], num_sentences: int = 10) -> tuple[str, float, str]:
  """Renders `num_sentences` test sentences with the first voice into
  data/long_other.flac (44.1 kHz, past the encoder's window) and transcribes it
  with the run: -> (path, seconds, transcript)."""
  from speechjax.transcriber import Transcriber  # pylint: disable=import-outside-toplevel
  data_dir = os.path.join(workdir, "data")
  rows = [json.loads(line) for line in open(os.path.join(data_dir, "test.jsonl"))][:num_sentences]
  path = os.path.join(data_dir, "long_other.flac")
  seconds = render_long(voices[0], [r["text"] for r in rows], path)
  # One command per pause, as the demo's model was trained (single commands).
  (_, text, error), = Transcriber(workdir, split_pause_seconds=0.3)([path])
  return path, seconds, text if error is None else f"ERROR {error}"


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/demo", "A finished demo run (its data/test.jsonl is re-spoken).")
  flags.DEFINE_integer("limit", 0, "Re-speak only the first N test utterances (0 = all).")
  flags.DEFINE_bool("score", True, "Score the run on the set (eval/test_other.json).")


def main(argv):
  del argv
  voices = installed_voices()
  if not voices:
    print("other_voices: neither flite nor festival is installed (apt-get install flite festival); "
          "nothing to measure")
    return
  data_dir = os.path.join(flags.FLAGS.workdir, "data")
  manifest = build(data_dir, voices, flags.FLAGS.limit)
  print(f"{manifest}: voices {', '.join(v.label for v in voices)}")
  if flags.FLAGS.score:
    from speechjax.evaluate import evaluate_run  # pylint: disable=g-import-not-at-top
    summary = evaluate_run(flags.FLAGS.workdir, manifest=manifest, name=SPLIT)
    print(json.dumps({k: v for k, v in summary.items() if "/" not in k}, indent=2, sort_keys=True))
    path, seconds, text = transcribe_long(flags.FLAGS.workdir, voices)
    print(f"{path} ({seconds:.1f} s, 44.1 kHz, {voices[0].label}): {text}")
    from speechjax.projects.spoken_commands.main import refresh_scores  # pylint: disable=g-import-not-at-top
    refresh_scores(flags.FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
