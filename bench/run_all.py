r"""Every benchmark of speechjax against PyTorch + transformers + peft, one process.

    make bench                          # = python -m bench.run_all  (~15-20 min, 2 cores)
    python -m bench.run_all --quick     # smaller model, LoRA only, fewer rounds, no end to end (~2 min)

Writes bench/results.json and the generated part of BENCHMARKS.md. Sections:

  train     LoRA and full fine-tuning steps of a ~41M-parameter speech LLM
            (Whisper-style encoder + frame-stack projector + Qwen2-style LLM),
            fp32: speechjax vs eager PyTorch and torch.compile; step-0 loss
            agreement; MFU against a 2048^3 fp32 matmul timed in the same rounds;
            compile times.
  memory    per-framework peak RSS of a training step in fresh processes, and
            the exact training-state bytes (params, grads, optimizer state).
  decode    batched greedy and beam-4 decoding with a KV cache vs transformers'
            generate, of the LM alone and (greedy) through the speech LLM.
  features  JAX log-mel vs WhisperFeatureExtractor and librosa on 16 clips of
            1-15 s, one thread per library, in a fresh process
            (bench/features_bench.py; + the data pipeline's own benchmark,
            bench/input_throughput.py, in the full run).
  transcribe  (full run) a folder of 200 clips through `speechjax transcribe`
            and through PyTorch + transformers on the same exported weights,
            each a fresh process: wall time with start, loading and compiling,
            real-time factors, identical transcripts; faster-whisper with
            Whisper tiny.en as a reference (bench/transcribe_bench.py).

Every comparison runs its variants interleaved (A B A B ...) after warm-up;
a speed-up is the median of the per-round ratios.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# PyTorch's OpenMP threads spin-wait at every barrier by default. On a shared
# machine (other processes on the cores) a spinning thread waits a whole
# scheduler slice for a descheduled peer: a 256^2 matmul measured 16 ms instead
# of 0.4 ms. PASSIVE makes them sleep instead; it is the setting that gives
# PyTorch its best numbers here, so the baseline uses it (must precede `import torch`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch.compile reuses compiled kernels from its on-disk cache across runs; a
# fresh cache per run makes its first-step time a cold compile, like JAX's.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
  os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_inductor_")
  atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLANS = {
    "full": dict(size="full", train_reps=5, train_calls=2, decode_reps=5, feature_reps=15,
                 feature_batch=16, memory_probes=True, input_pipeline=True,
                 train_modes=("lora", "full"), transcribe=True),
    # Smoke run: a smaller model, LoRA only (each torch.compile costs ~1 min).
    "quick": dict(size="quick", train_reps=3, train_calls=1, decode_reps=3, feature_reps=5,
                  feature_batch=8, memory_probes=False, input_pipeline=False,
                  train_modes=("lora",), transcribe=False),
}


def log(msg: str) -> None:
  print(msg, flush=True)


def memory_probes(size_name: str, folder: str, timeout: float = 300.0) -> dict:
  """bench.memory_probe for each framework and mode, each in a fresh process."""
  out = {}
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for framework in ("torch", "jax"):
    for mode in ("lora", "full"):
      cmd = [sys.executable, "-m", "bench.memory_probe", f"--framework={framework}",
             f"--mode={mode}", f"--size={size_name}", f"--folder={folder}"]
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=REPO, check=False)
        line = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        out[f"{framework}_{mode}"] = (json.loads(line[-1]) if line and proc.returncode == 0
                                      else {"error": proc.stderr[-2000:]})
      except subprocess.TimeoutExpired:
        out[f"{framework}_{mode}"] = {"error": f"timed out after {timeout}s"}
      log(f"[memory] {framework}/{mode}: {out[f'{framework}_{mode}']}")
  return out


def run(plan_name: str = "full", *, size_name: str | None = None, torch_compile: bool = True,
        train_reps: int | None = None, train_calls: int | None = None,
        decode_reps: int | None = None, feature_reps: int | None = None,
        feature_batch: int | None = None, memory: bool | None = None,
        input_pipeline: bool | None = None, train_modes: tuple[str, ...] | None = None,
        transcribe: bool | None = None, jax_compiler_options: dict | None = None) -> dict:
  """All sections; arguments override the plan (the smoke test uses a tiny model)."""
  import torch  # pylint: disable=import-outside-toplevel

  from bench import common, decode_bench, features_bench, train_bench  # pylint: disable=import-outside-toplevel
  from bench import speech_models as sm  # pylint: disable=import-outside-toplevel

  plan = dict(PLANS[plan_name])
  overrides = dict(size=size_name, train_reps=train_reps, train_calls=train_calls,
                   decode_reps=decode_reps, feature_reps=feature_reps,
                   feature_batch=feature_batch, memory_probes=memory,
                   input_pipeline=input_pipeline, train_modes=train_modes, transcribe=transcribe)
  plan.update({k: v for k, v in overrides.items() if v is not None})
  size = sm.SIZES[plan["size"]]
  start = time.perf_counter()
  results: dict = {"plan": {**plan, "name": plan_name, "torch_compile": torch_compile},
                   "machine": common.machine_info(),
                   "model": {k: getattr(size, k) for k in size.__dataclass_fields__}}
  results["model"].update(audio_tokens=size.audio_tokens, seq_len=size.seq_len)
  log(f"[bench] plan {plan_name}: {plan}; machine {results['machine']['cpu']}, "
      f"{results['machine']['cores']} cores, load {results['machine']['loadavg_at_start']}")
  torch.manual_seed(0)
  # Features in a process of their own (bench/features_bench.py): its thread
  # pools are sized before any library starts them, and nothing is left over
  # from the other sections (after them both extractors ran slower in-process).
  results["features"] = features_bench.run(clips=plan["feature_batch"],
                                           reps=plan["feature_reps"], log=log)
  peak = common.PeakMatmul(2048 if plan["size"] != "tiny" else 256)

  with tempfile.TemporaryDirectory() as folder:
    hf_models = sm.build_hf_models(size, folder)
    train = train_bench.run(size, folder, reps=plan["train_reps"], calls=plan["train_calls"],
                            torch_compile=torch_compile, modes=plan["train_modes"],
                            hf_models=hf_models,
                            peak_matmul=peak, compiler_options=jax_compiler_options, log=log)
    results["train"] = train
    if plan["memory_probes"]:
      results["memory_probes"] = memory_probes(plan["size"], folder)
    results["decode"] = decode_bench.run(size, hf_models[2], hf_models[4],
                                         reps=plan["decode_reps"], log=log)
    results["decode_speech"] = decode_bench.run_speech(size, hf_models, reps=plan["decode_reps"], log=log)
  if plan["input_pipeline"]:
    from bench import input_throughput  # pylint: disable=import-outside-toplevel
    log("[input] bench/input_throughput.py (synthetic corpus, pipeline, log-mel)")
    results["input_pipeline"] = input_throughput.run(num_utterances=80, batches=6, repeats=2,
                                                     batch_size=8)
  if plan["transcribe"]:
    from bench import transcribe_bench  # pylint: disable=import-outside-toplevel
    log("[transcribe] bench/transcribe_bench.py (corpus, a trained run, timed subprocesses)")
    results["transcribe"] = transcribe_bench.run("full", log=log)
  results.update(headline(results))
  results["total_seconds"] = time.perf_counter() - start
  results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
  return results


def _memory_ratio(probes: dict, mode: str) -> float | None:
  """speechjax's step peak RSS delta over PyTorch's (bench/memory_probe.py); None without both."""
  ours = _dig(probes, f"jax_{mode}", "step_peak_delta_bytes")
  theirs = _dig(probes, f"torch_{mode}", "step_peak_delta_bytes")
  return ours / theirs if ours and theirs else None


def headline(results: dict) -> dict:
  """The top-level keys: each a median of paired ratios (or of per-round MFU),
  and the step memory ratios (below 1: speechjax peaks lower)."""
  train = results.get("train", {})
  lora, full = train.get("lora", {}), train.get("full", {})
  pick = lambda d, *keys: _dig(d, *keys)
  return {
      "train_step_speedup": pick(lora, "speedup_vs_eager", "median"),
      "train_step_speedup_vs_compile": pick(lora, "speedup_vs_compile", "median"),
      "full_finetune_speedup": pick(full, "speedup_vs_eager", "median"),
      "full_finetune_speedup_vs_compile": pick(full, "speedup_vs_compile", "median"),
      "decode_speedup": pick(results, "decode", "speedup", "median"),
      "beam_decode_speedup": pick(results, "decode", "beam", "speedup", "median"),
      "speech_decode_speedup": pick(results, "decode_speech", "speedup", "median"),
      "features_speedup": pick(results, "features", "speedup", "median"),
      "features_speedup_vs_librosa": pick(results, "features", "speedup_vs_librosa", "median"),
      "features_speedup_range": _range(pick(results, "features", "speedup")),
      "features_speedup_vs_librosa_range": _range(pick(results, "features", "speedup_vs_librosa")),
      "transcribe_speedup": pick(results, "transcribe", "speedup", "median"),
      "lora_step_memory_ratio": _memory_ratio(results.get("memory_probes", {}), "lora"),
      "full_step_memory_ratio": _memory_ratio(results.get("memory_probes", {}), "full"),
      "mfu": pick(lora, "mfu", "speechjax", "median"),
      "mfu_full_finetune": pick(full, "mfu", "speechjax", "median"),
      "compile_seconds": pick(lora, "compile_seconds", "speechjax_compile"),
      "torch_compile_first_step_seconds": pick(lora, "compile_seconds",
                                               "torch_compile_first_step"),
  }


GPU_RESULTS = os.path.join(REPO, "bench", "gpu")


def gpu_summaries(folder: str = GPU_RESULTS) -> dict:
  """The summaries of the GPU runs kept under bench/gpu/ (bench/gpu_bench.py
  on a lent GPU; this CPU run cannot remeasure them), by file name."""
  out = {}
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    if name.endswith(".json"):
      with open(os.path.join(folder, name), encoding="utf-8") as f:
        run = json.load(f)
      out[name[:-len(".json")]] = {"command": run.get("command"), **run.get("summary", {})}
  return out


def _range(ratio: dict | None) -> list[float] | None:
  """[min, max] of a paired speed-up's per-round ratios."""
  return None if not ratio else [ratio["min"], ratio["max"]]


def measured_on() -> str:
  """Today's date and the checked-out commit ('+ changes' when the tree differs from it)."""
  stamp = time.strftime("%Y-%m-%d")
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return stamp
  return f"{stamp} at commit {commit}" + (" + changes" if dirty else "")


def _dig(d, *keys):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="~2 minute smoke run (smaller model, LoRA step only)")
  parser.add_argument("--no_torch_compile", action="store_true",
                      help="skip the torch.compile variants (each compiles for 30-90 s)")
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results.json"))
  parser.add_argument("--markdown", default=os.path.join(REPO, "BENCHMARKS.md"))
  args = parser.parse_args(argv)
  from bench import report  # pylint: disable=import-outside-toplevel
  plan = "quick" if args.quick else "full"
  results = run(plan, torch_compile=not args.no_torch_compile)
  command = "make bench" if plan == "full" and not args.no_torch_compile else (
      "python -m bench.run_all " + " ".join(a for a in (sys.argv[1:] if argv is None else argv)))
  results["command"] = command
  results["measured"] = measured_on()
  results["gpu"] = gpu_summaries()
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=float)
    f.write("\n")
  report.write_markdown(args.markdown, results)
  log(f"[bench] wrote {args.out} and {args.markdown} in {results['total_seconds']:.0f}s")
  log(json.dumps({k: results[k] for k in headline(results)}, indent=1))


if __name__ == "__main__":
  main()
