r"""Runs, prints or tabulates a grid sweep.

    python -m speechjax.sweep --config=configs/demo.py:speech --workdir=runs/sweep \
        --sweep='lora.rank=4,8,16' --sweep='optim.lr=1e-4,3e-4' [--run | --print | --collect] \
        [-- --config.train.num_steps=200 ...]

A run that finished with the same config (all overrides applied) is skipped; a
run folder of another config is moved aside to ROOT/<name>.replaced-<time> and
the run trains from scratch. Results: ROOT/sweep.md, sweep.csv, sweep.png.
This file is kept short; the logic lives in grid.py, runner.py and report.py.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import shlex
import sys

from speechjax.sweep.grid import check_keys, load_plan, parse_sweep, plan_runs, run_fingerprints, save_plan
from speechjax.sweep.report import summarize
from speechjax.sweep.runner import execute_run, print_commands


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("config", None, "Config file (with :arg), as for speechjax.train.")
  flags.DEFINE_string("workdir", None, "Sweep folder: one sub-folder per run, plus the tables.")
  flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: a config key and its values "
                            "(repeat for a grid). Tuples in brackets: 'data.token_buckets=(64,128),(128,)'.")
  flags.DEFINE_bool("run", True, "Train (and score) the runs here, one after another.")
  flags.DEFINE_bool("print", False, "Print the train / evaluate commands instead of running them.")
  flags.DEFINE_bool("collect", False, "Only tabulate the runs already in --workdir.")
  flags.DEFINE_string("launcher", "", "Command that replaces `python -m speechjax.train`, e.g. "
                      "'launch/local.sh -n 2 -d 2' or 'sbatch launch/slurm.sbatch'.")
  flags.DEFINE_enum("evaluate", "auto", ["auto", "always", "never"],
                    "Run speechjax.evaluate after training: auto = for speech LLM runs.")
  flags.DEFINE_string("eval_split", "test", "Split speechjax.evaluate scores.")
  flags.DEFINE_integer("eval_max_examples", 0, "Score at most this many examples (0 = all).")
  flags.DEFINE_string("metric", "", "Column to rank and plot (default: the config's eval.metric).")
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  extra = [a for a in argv[1:]]
  root = FLAGS.workdir
  if FLAGS.sweep or FLAGS.config:
    if not FLAGS.config:
      raise app_error("--config is required with --sweep")
    config, specs = FLAGS.config, list(FLAGS.sweep)
  else:
    plan = load_plan(root)
    config, specs, extra = plan["config"], plan["sweep"], extra or plan["extra"]
  try:
    axes = [parse_sweep(s) for s in specs]
  except ValueError as e:
    print(f"speechjax.sweep: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  runs = plan_runs(axes)
  swept = [a.key for a in axes]
  launcher = shlex.split(FLAGS.launcher) if FLAGS.launcher else None
  statuses: dict[str, str] = {}
  running = FLAGS.run and not FLAGS.collect
  if not FLAGS.collect:
    try:
      check_keys(config, axes, extra)
    except ValueError as e:
      print(f"speechjax.sweep: {e}", file=sys.stderr)
      raise SystemExit(2) from None
    save_plan(root, config, axes, extra, runs)
    if FLAGS["print"].value:
      print_commands(config, root, runs, extra, launcher=launcher, evaluate=FLAGS.evaluate,
                     eval_split=FLAGS.eval_split, eval_max_examples=FLAGS.eval_max_examples)
      return
  try:
    fingerprints = run_fingerprints(config, runs, extra)
  except ValueError as e:
    if running:
      print(f"speechjax.sweep: {e}", file=sys.stderr)
      raise SystemExit(2) from None
    # Only tabulating (e.g. a sweep folder copied without its config file).
    logging.warning("cannot tell which runs still match their config (%s); tabulating them all", e)
    fingerprints = None
  if running:
    for i, run in enumerate(runs):
      logging.info("run %d/%d: %s", i + 1, len(runs), run.name)
      statuses[run.name] = execute_run(config, root, run, extra, launcher=launcher,
                                       evaluate=FLAGS.evaluate, eval_split=FLAGS.eval_split,
                                       eval_max_examples=FLAGS.eval_max_examples,
                                       fingerprint=fingerprints[run.name])
  result = summarize(root, runs, swept, FLAGS.eval_split, statuses, FLAGS.metric, fingerprints)
  with open(result["markdown"]) as f:
    print(f.read())
  print(f"wrote {result['markdown']}, {result['csv']}" +
        (f", {result['plot']}" if result["plot"] else ""))
  failed = [name for name, status in statuses.items() if status == "failed"]
  if failed:
    raise SystemExit(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)} "
                     f"(see ROOT/<run>/sweep.log)")


def app_error(message: str) -> Exception:
  from absl import app  # pylint: disable=g-import-not-at-top

  return app.UsageError(message)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  logging.getLogger().setLevel(logging.INFO)
  app.run(main)
