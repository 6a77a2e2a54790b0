r"""Scores a trained run on a split or a manifest; never trains.

    python -m speechjax.evaluate --workdir=runs/demo --split=test
    python -m speechjax.evaluate --workdir=runs/demo --manifest=my_data/test.jsonl

writes W/eval/<name>.json (wer, cer, bleu, accuracy, ..., num_examples,
num_skipped) and W/eval/<name>.predictions.jsonl (one line per example).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no flags."""
  flags.DEFINE_string("workdir", None, "Training folder (config.json + checkpoints).")
  flags.DEFINE_string("split", "test", "Dataset split to score.")
  flags.DEFINE_string("manifest", "", "Score this JSONL manifest instead of a split.")
  flags.DEFINE_string("name", "", "Output name (default: the split or manifest file name).")
  flags.DEFINE_list("tasks", [], "Tasks to score (default: the tasks the run trained on).")
  flags.DEFINE_string("checkpoint", "best", "best | last")
  flags.DEFINE_integer("max_examples", 0, "Score at most this many examples per task (0 = all).")
  flags.mark_flags_as_required(["workdir"])


def evaluate_run(workdir: str, split: str = "test", manifest: str = "", name: str = "",
                 tasks=(), checkpoint: str = "best", max_examples: int = 0,
                 progress: bool = True) -> dict:
  """Decodes and scores; returns the summary written to W/eval/<name>.json."""
  from speechjax import evaluation, inference
  from speechjax.data import sources

  config, bundle, variables, step = inference.load_trained(workdir, checkpoint)
  if bundle.kind != "speech_llm":
    raise ValueError(f"{workdir} trained a {bundle.kind!r} model; evaluate scores speech LLMs")
  train_source, train_info = sources.open_source(config.data, config.data.train_split)
  del train_source
  target = manifest or split
  source, info = sources.open_source(config.data, target, train_info.label_names)
  variables = evaluation.inference_variables(variables, bundle.model_config.lora)
  results = [evaluation.evaluate_task(bundle, variables, source, info, config.data, task, config.eval.decode,
                                      max_examples=max_examples, classify_with=config.eval.classify_with,
                                      label_names=train_info.label_names, progress=progress)
             for task in (tuple(tasks) or tuple(config.data.tasks))]
  summary = evaluation.summarize(results)
  summary.update(checkpoint_step=step, split=target,
                 num_skipped=summary["num_skipped"] + int(getattr(info, "num_skipped", 0)))
  name = name or (os.path.splitext(os.path.basename(manifest))[0] if manifest else split)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, f"{name}.predictions.jsonl"), "w") as f:
    for r in results:
      for p in r.predictions:
        f.write(json.dumps(p, ensure_ascii=False) + "\n")
  return summary


def main(argv):
  del argv
  summary = evaluate_run(FLAGS.workdir, FLAGS.split, FLAGS.manifest, FLAGS.name, FLAGS.tasks,
                         FLAGS.checkpoint, FLAGS.max_examples)
  logging.info("wrote %s/eval", FLAGS.workdir)
  print(json.dumps({k: v for k, v in summary.items() if "/" not in k}, indent=2, sort_keys=True))


if __name__ == "__main__":
  define_flags()
  app.run(main)
