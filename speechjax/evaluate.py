r"""Scores a trained run on a split or a manifest; never trains.

    python -m speechjax.evaluate --workdir=runs/demo --split=test
    python -m speechjax.evaluate --workdir=runs/demo --manifest=my_data/test.jsonl
    python -m speechjax.evaluate --workdir=runs/big --mesh=1,-1,1   # FSDP over every device

writes W/eval/<name>.json (wer, cer, bleu, accuracy, ..., num_examples,
num_skipped) and W/eval/<name>.predictions.jsonl (one line per example).
A CTC encoder run (model.kind='ctc', e.g. the demo's ctc stage) is scored on
its greedy CTC transcripts (task 'asr': WER, CER).
The run is loaded onto the mesh it trained on (its `mesh.shape`), or onto
`--mesh`; each batch is split over the mesh's batch axes. On several hosts
(launch/local.sh --module speechjax.evaluate, a TPU slice, SLURM) each host
reads and decodes its rows of every batch, the answers are exchanged, and
process 0 writes W/eval/.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
import jax

from speechjax import dry_run, parallel, runtime, transcribe, transcriber

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no flags."""
  flags.DEFINE_string("workdir", None, "Training folder (config.json + checkpoints).")
  flags.DEFINE_string("split", "test", "Dataset split to score.")
  flags.DEFINE_string("manifest", "", "Score this JSONL manifest instead of a split.")
  flags.DEFINE_string("name", "", "Output name (default: the split or manifest file name).")
  flags.DEFINE_list("tasks", [], "Registered tasks to score (default: the tasks the run trained on).")
  flags.DEFINE_string("checkpoint", "best", "best | last")
  flags.DEFINE_integer("max_examples", 0, "Score at most this many examples per task (0 = all).")
  flags.DEFINE_bool("dry_run", False, "Open the run's splits and tokenizer, lower its step, exit (no weights).")
  transcribe.define_decode_flags()  # --decode.method=beam --decode.beam_size=5 ...
  transcribe.define_mesh_flag()  # --mesh=1,-1,1
  runtime.define_distributed_flags()  # several hosts: each decodes its rows (evaluation/hosts.py)
  flags.adopt_module_key_flags(transcribe)  # --help lists them
  flags.mark_flags_as_required(["workdir"])


def count_skipped(info, eval_tasks, data_cfg) -> int:
  """Examples no scored task used, each counted once: the lines left out when
  the data was built or read, plus those eligible for none of `eval_tasks`
  (fields missing). Clips longer than the encoder window are not skipped:
  scoring decodes them in chunks."""
  from speechjax.data import batching

  del data_cfg  # no length limit applies to scoring
  used = set()
  for task in eval_tasks:
    used.update(int(i) for i in batching.eligible_indices(info, (task,), max_seconds=None))
  return int(getattr(info, "num_skipped", 0)) + len(info.num_samples) - len(used)


def evaluate_run(workdir: str, split: str = "test", manifest: str = "", name: str = "",
                 tasks=(), checkpoint: str = "best", max_examples: int = 0,
                 progress: bool = True, decode=None, mesh_shape=None) -> dict:
  """Decodes and scores; returns the summary written to W/eval/<name>.json.
  decode: {field: value} overriding the run's eval.decode (method, beam_size, ...).
  mesh_shape: one size per mesh axis (-1 = the rest) to load and decode on
  instead of the run's `mesh.shape`."""
  import ml_collections

  from speechjax import run_paths
  from speechjax.data import sources
  from speechjax.data import tasks as tasks_lib
  from speechjax.evaluation import run_loader, scoring

  workdir, manifest = run_paths.expand(workdir), run_paths.expand(manifest)
  for task in tasks:  # a misspelt task fails before the model loads
    tasks_lib.get_task(task)
  config, bundle, variables, step = run_loader.load_trained(workdir, checkpoint, mesh_shape=mesh_shape)
  transcriber.apply_decode_overrides(config, decode)
  if bundle.kind not in ("speech_llm", "ctc"):
    raise ValueError(f"{workdir} trained a {bundle.kind!r} model; evaluate scores speech LLMs and CTC "
                     "encoders")
  run_loader.check_eval_batch(config)
  train_source, train_info = sources.open_source(config.data, config.data.train_split)
  del train_source
  target = manifest or split
  # A CTC encoder (the 'ctc' kind) transcribes, greedily: its task is 'asr'.
  eval_tasks = tuple(tasks) or (("asr",) if bundle.kind == "ctc" else tuple(config.data.tasks))
  # A manifest's lines must have the fields of the tasks scored here, not of those trained.
  read_cfg = ml_collections.ConfigDict({**config.data.to_dict(), "tasks": eval_tasks})
  source, info = sources.open_source(read_cfg, target, train_info.label_names)
  variables = scoring.inference_variables(variables, getattr(bundle.model_config, "lora", None))
  with run_loader.mesh_context(config):
    results = [scoring.evaluate_task(bundle, variables, source, info, config.data, task, config.eval.decode,
                                     max_examples=max_examples, classify_with=config.eval.classify_with,
                                     label_names=train_info.label_names, progress=progress)
               for task in eval_tasks]
  summary = scoring.summarize(results)
  summary.update(checkpoint_step=step, split=target, num_skipped=count_skipped(info, eval_tasks, config.data))
  if jax.process_index() != 0:  # every host holds every answer; process 0 writes them
    return summary
  sources.record_skipped(workdir, info.skipped)
  name = name or (os.path.splitext(os.path.basename(manifest))[0] if manifest else split)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, f"{name}.predictions.jsonl"), "w") as f:
    for r in results:
      for p in r.predictions:
        f.write(json.dumps(p, ensure_ascii=False) + "\n")
  scoring.write_report(out_dir, name, summary)  # W/eval/<name>.report.md
  scoring.write_confusion_figures(out_dir, name, summary)  # W/eval/<name>.confusion.png (classify)
  return summary


def main(argv):
  del argv
  from speechjax.data import tasks as tasks_lib

  unknown = [task for task in FLAGS.tasks if task not in tasks_lib.TASK_REGISTRY]
  if unknown:
    raise app.UsageError(f"--tasks: {', '.join(unknown)} not registered; registered: "
                         f"{', '.join(tasks_lib.task_names())}")
  try:
    decode = transcribe.check_decode_overrides(transcribe.decode_flag_values())
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  mesh_shape = transcribe.mesh_flag_value()
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.dry_run:
    return dry_run.print_dry_run(workdir=FLAGS.workdir, split=FLAGS.manifest or FLAGS.split)
  transcribe.check_mesh_flag(FLAGS.workdir, mesh_shape)
  transcribe.use_run_compile_cache(FLAGS.workdir)
  summary = evaluate_run(FLAGS.workdir, FLAGS.split, FLAGS.manifest, FLAGS.name, FLAGS.tasks,
                         FLAGS.checkpoint, FLAGS.max_examples, decode=decode, mesh_shape=mesh_shape)
  if jax.process_index() != 0:
    return
  logging.info("wrote %s/eval", FLAGS.workdir)
  print(json.dumps({k: v for k, v in summary.items() if "/" not in k}, indent=2, sort_keys=True))


if __name__ == "__main__":
  define_flags()
  app.run(main)
