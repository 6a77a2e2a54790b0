r"""Log-mel features of mixed-length clips: speechjax vs transformers'
WhisperFeatureExtractor vs librosa, each library on one thread.

    python -m bench.features_bench [--clips=16] [--reps=15] [--threads=1]

prints one JSON object (the `features` section of bench/results.json) on its
last line; `run()` starts that command in a fresh process and returns it.

The clips: `clips` speech-like clips of 1-15 s (fixed seed), of mixed length
as a data pipeline receives them. Each side turns them into Whisper features
[80, samples // 160] the way its user would:

  speechjax     pads them into one [clips, longest] batch and calls
                `log_mel_with_mask` (jit'd; STFT blocks past a clip's end are
                skipped, the frame mask says which frames are real);
  transformers  `WhisperFeatureExtractor(clips, padding="longest")`, which
                pads the same way and runs torch.stft over the whole batch;
  librosa       `librosa.feature.melspectrogram` per clip with Whisper's
                settings (n_fft 400, hop 160, 80 Slaney mels, reflect
                padding), last frame dropped, then Whisper's log10, max - 8
                clamp and (x + 4) / 4 in numpy.

The three agree to float noise: `max_abs_diff` (transformers) compares every
valid frame; `max_abs_diff_librosa` the frames whose 400-sample window ends
inside the clip (librosa reflects the clip's end where a padded batch, here
and in Whisper, sees zeros: the last one or two frames of a clip differ).

Timing: two warm-up calls per side (the first compiles the jit, JIT-compiles
librosa's numba helpers, sets up torch: `first_call_seconds`), then `reps`
interleaved rounds (speechjax, transformers, librosa); a speed-up is the
median over rounds of the per-round ratio, with [min-max]. Each round also
records process CPU seconds: `cpu_speedup*` are the same ratios in CPU time.

Why one thread per library (what moves the ratio between runs). The dev
machine has 2 cores shared with other jobs (load average 3-8). A library
that splits a step over its threads waits for the last of them, so when
another process holds a core the step waits for a descheduled thread, for
as long as that library's thread pool makes it wait: the ratio then
measures the load and the thread pools, not the code. Measured on these 16
clips at load average 4-8, each library's default threads (2) against one
thread each:

  speechjax 43-54 ms vs 28-30 ms, WhisperFeatureExtractor 228-305 ms vs
  168-196 ms, librosa 274-400 ms vs 69-75 ms (librosa's mel product alone,
  an OpenBLAS sgemm per clip: 310-380 ms on 2 threads, 5-9 ms on one);
  speed-up vs librosa 6.3x and 6.9x (2 threads) vs 2.4x and 2.6x (one);
  with one busy-loop process added: 9.0x and 10.0x vs 2.9x and 3.1x;
  vs WhisperFeatureExtractor 5.2x-7.4x (2 threads) vs 6.0x-6.8x (one).

So the benchmark runs each library on one thread, where a busy core slows
every side by a similar factor. The ratio vs librosa still reads 2.3x-2.6x
between load average 3.5 and 7 (2.9x-3.1x with a busy loop added), so each
run reports its load average and the per-round [min-max]. XLA sizes its
intra-op pool from the CPUs the process may use when its backend starts:
`--threads=N` starts it with the process pinned to N CPUs and then lifts
the pin (`xla_intra_op_threads` records the pool); PyTorch gets
`set_num_threads`, librosa's OpenBLAS threadpoolctl's limit. `--threads=0`
keeps every library's defaults.

First calls are excluded: they take 0.8-1.0 s for speechjax (XLA compile),
0.2 s for WhisperFeatureExtractor and 1.8 s for librosa (numba; 13 s in the
first process after installing it). Allocation is part of the steady state:
after warm-up a WhisperFeatureExtractor call takes ~44,500 minor page faults
(~170 MB of fresh pages for its torch buffers), speechjax ~700, librosa 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
HOP = 160
N_FFT = 400
N_MELS = 80
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def speech_like_audio(batch: int, seconds: float, seed: int = 0) -> np.ndarray:
  """[batch, samples] float32 in [-1, 1]: amplitude-modulated harmonics plus
  noise (the STFT costs the same whatever the content)."""
  rs = np.random.RandomState(seed)
  n = int(seconds * SAMPLE_RATE)
  t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
  rows = []
  for _ in range(batch):
    f0 = rs.uniform(90, 250)
    voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rs.uniform(2, 5) * t)
    rows.append(0.2 * envelope * voiced + 0.01 * rs.randn(n))
  return np.clip(np.stack(rows), -1, 1).astype(np.float32)


def mixed_length_clips(count: int, min_seconds: float = 1.0, max_seconds: float = 15.0,
                       seed: int = 0) -> list[np.ndarray]:
  """`count` speech-like clips of uniformly drawn lengths in [min, max] seconds."""
  rs = np.random.RandomState(seed)
  seconds = rs.uniform(min_seconds, max_seconds, size=count)
  return [speech_like_audio(1, s, seed=seed + 1 + i)[0] for i, s in enumerate(seconds)]


def whisper_scaling(log_spec: np.ndarray) -> np.ndarray:
  """Whisper's clamp and scaling of log10 mel power [n_mels, frames]."""
  log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
  return (log_spec + 4.0) / 4.0


def extractors(clips: list[np.ndarray], with_librosa: bool) -> dict[str, Any]:
  """name -> zero-argument function giving a list of [80, frames] arrays, one per clip."""
  from transformers import WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel

  from speechjax.data import features  # pylint: disable=import-outside-toplevel
  lengths = np.array([c.size for c in clips])
  frames = lengths // HOP
  hf = WhisperFeatureExtractor(feature_size=N_MELS)

  def speechjax():
    padded = np.zeros((len(clips), lengths.max()), np.float32)
    for i, clip in enumerate(clips):
      padded[i, :clip.size] = clip
    feats, _ = features.log_mel_with_mask(padded, lengths)
    feats = np.asarray(feats)
    return [feats[i, :, :n] for i, n in enumerate(frames)]

  def transformers():
    feats = hf(clips, sampling_rate=SAMPLE_RATE, padding="longest",
               return_tensors="np").input_features
    return [feats[i, :, :n] for i, n in enumerate(frames)]

  fns = {"speechjax": speechjax, "transformers": transformers}
  if with_librosa:
    import librosa  # pylint: disable=import-outside-toplevel

    def librosa_per_clip():
      out = []
      for clip in clips:
        power = librosa.feature.melspectrogram(y=clip, sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP,
                                               n_mels=N_MELS, pad_mode="reflect")[:, :-1]
        out.append(whisper_scaling(np.log10(np.maximum(power, 1e-10))))
      return out

    fns["librosa"] = librosa_per_clip
  return fns


def max_abs_diff(ours: list[np.ndarray], theirs: list[np.ndarray],
                 lengths: np.ndarray | None = None) -> float:
  """Largest |difference| over the clips' frames; with `lengths`, only frames
  whose window ends inside the clip (i * hop + n_fft / 2 <= length)."""
  worst = 0.0
  for i, (a, b) in enumerate(zip(ours, theirs)):
    n = a.shape[-1] if lengths is None else min(a.shape[-1], (int(lengths[i]) - N_FFT // 2) // HOP + 1)
    worst = max(worst, float(np.abs(a[:, :n] - b[:, :n]).max()) if n > 0 else 0.0)
  return worst


def limit_threads(threads: int) -> dict[str, Any]:
  """Each library on `threads` threads (0: leave their defaults). Must run
  before JAX's backend starts: XLA sizes its intra-op pool from the CPUs the
  process may use at that moment."""
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  if threads > 0:
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(allowed)[:threads])
    jax.devices()
    os.sched_setaffinity(0, allowed)
    torch.set_num_threads(threads)
    try:
      import threadpoolctl  # pylint: disable=import-outside-toplevel
      threadpoolctl.threadpool_limits(threads)
    except ImportError:  # no librosa (it brings scikit-learn and threadpoolctl): no BLAS in the loop
      pass
  jax.devices()
  task = "/proc/self/task"
  names = [open(os.path.join(task, t, "comm"), encoding="utf-8").read().strip()
           for t in os.listdir(task)]
  return {"threads": threads, "xla_intra_op_threads": sum("XLAEigen" in n for n in names),
          "torch_threads": torch.get_num_threads()}


def measure(clips: int = 16, reps: int = 15, threads: int = 1, log=print) -> dict[str, Any]:
  """The comparison in this process (call `limit_threads` first; `run` does both)."""
  from bench import common  # pylint: disable=import-outside-toplevel
  try:
    import librosa  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    with_librosa = True
  except ImportError:
    log("[features] librosa is not installed (pip install -e '.[bench]'): its column is left out")
    with_librosa = False
  waves = mixed_length_clips(clips)
  lengths = np.array([w.size for w in waves])
  fns = extractors(waves, with_librosa)
  first, outputs = {}, {}
  for name, fn in fns.items():
    start = time.perf_counter()
    outputs[name] = fn()
    first[name] = time.perf_counter() - start
    fn()
  cpu: dict[str, list[float]] = {}
  times = common.interleaved_timings(fns, reps, cpu=cpu)
  audio_seconds = float(lengths.sum()) / SAMPLE_RATE
  ratio = lambda other, t: common.paired_speedup(t[other], t["speechjax"]) if other in t else None
  result = {
      "batch_shape": [len(waves), int(lengths.max())],
      "clip_seconds": [round(float(n) / SAMPLE_RATE, 3) for n in lengths],
      "audio_seconds": audio_seconds,
      "seconds": {k: common.spread(v) for k, v in times.items()},
      "raw_seconds": times,
      "cpu_seconds": {k: common.spread(v) for k, v in cpu.items()},
      "x_realtime": {k: audio_seconds / common.spread(v)["median"] for k, v in times.items()},
      "speedup": ratio("transformers", times),
      "speedup_vs_librosa": ratio("librosa", times),
      "cpu_speedup": ratio("transformers", cpu),
      "cpu_speedup_vs_librosa": ratio("librosa", cpu),
      "first_call_seconds": first,
      "speechjax_compile_and_first_call_seconds": first["speechjax"],
      "max_abs_diff": max_abs_diff(outputs["speechjax"], outputs["transformers"]),
      "max_abs_diff_librosa": (max_abs_diff(outputs["speechjax"], outputs["librosa"], lengths)
                               if with_librosa else None),
      "reps": reps,
      "loadavg": [round(x, 2) for x in os.getloadavg()],
  }
  return result


def summary(result: dict[str, Any]) -> str:
  speed, x = result["speedup"], result["x_realtime"]
  text = (f"[features] {result['batch_shape'][0]} clips, {result['audio_seconds']:.0f} s of audio, "
          f"{result.get('threads', '?')} thread(s) each: speechjax {x['speechjax']:.0f}x real time, "
          f"WhisperFeatureExtractor {x['transformers']:.0f}x, speed-up {speed['median']:.2f}x "
          f"[{speed['min']:.2f}-{speed['max']:.2f}]")
  lib = result.get("speedup_vs_librosa")
  if lib:
    text += (f"; librosa {x['librosa']:.0f}x, speed-up {lib['median']:.2f}x "
             f"[{lib['min']:.2f}-{lib['max']:.2f}]")
  return text + (f"; max |diff| {result['max_abs_diff']:.1e} / "
                 f"{_maybe(result.get('max_abs_diff_librosa'))}")


def _maybe(x):
  return "n/a" if x is None else f"{x:.1e}"


def run(clips: int = 16, reps: int = 15, threads: int = 1, log=print,
        timeout: float = 900.0) -> dict[str, Any]:
  """`python -m bench.features_bench` in a fresh process (thread pools sized
  before anything starts them, no state left by other benchmarks)."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  # One CPU device: with a forced device count (the test suite asks for 8) XLA
  # starts a pool thread per device whatever the CPUs.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  cmd = [sys.executable, "-m", "bench.features_bench", f"--clips={clips}", f"--reps={reps}",
         f"--threads={threads}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout,
                        check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  result = json.loads(lines[-1])
  log(summary(result))
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--clips", type=int, default=16, help="clips of 1-15 s in the batch")
  parser.add_argument("--reps", type=int, default=15, help="interleaved timing rounds")
  parser.add_argument("--threads", type=int, default=1,
                      help="threads per library (0: each library's default)")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  threads = limit_threads(args.threads)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  result = {**measure(args.clips, args.reps, args.threads, log=log), **threads}
  log(summary(result))
  print(json.dumps(result, default=float))


if __name__ == "__main__":
  main()
