r"""Grid sweeps: expand config overrides into runs, run or print them, tabulate.

    python -m speechjax.sweep --config=configs/demo.py:speech --workdir=runs/sweep \
        --sweep='lora.rank=4,8,16' --sweep='optim.lr=1e-4,3e-4' [--run | --print | --collect] \
        [-- --config.train.num_steps=200 ...]

Each point of the grid is a run folder ROOT/<name> (the name spells the swept
values, e.g. `rank=8_lr=3e-4`) trained by `python -m speechjax.train` (or
`--launcher`, e.g. 'launch/local.sh -n 2'), then scored by
`python -m speechjax.evaluate` when it trained a speech LLM. Runs go one after
another. A run's results are keyed on the config it trains with (all overrides
applied): a run that finished before with the same config is skipped, an
unfinished one resumes, and a folder that holds a run of another config (the
config file or the arguments after `--` changed) is moved aside to
ROOT/<name>.replaced-<time> and the run trains from scratch; so re-running a
sweep does exactly what is missing or changed. `--print` writes the commands
for a cluster instead, and `--collect` only tabulates. Results: ROOT/sweep.md
(markdown), ROOT/sweep.csv, ROOT/sweep.png, with the plan in ROOT/sweep.json.
Arguments after `--` go to every train command.

    grid.py     --sweep specs -> runs and names; resolved configs and their fingerprints; the plan
    runner.py   train / evaluate commands, run status, running one run, printing the commands
    report.py   metrics of each run -> sweep.csv, sweep.md, sweep.png
    __main__.py the command line
"""

from speechjax.sweep.grid import (
  Run,
  SweepAxis,
  check_keys,
  config_fingerprint,
  expand_grid,
  load_plan,
  model_kind,
  parse_sweep,
  parse_value,
  plan_runs,
  resolve_config,
  run_fingerprints,
  run_name,
  save_plan,
  short_keys,
  split_top_level,
  value_text,
)
from speechjax.sweep.report import (
  collect_results,
  eval_metrics,
  last_metrics,
  plot_results,
  primary_metric,
  summarize,
  write_table,
)
from speechjax.sweep.runner import (
  DONE_MARKER,
  evaluate_command,
  execute_run,
  print_commands,
  read_marker,
  read_run_config,
  recorded_fingerprint,
  run_status,
  scored_as_asked,
  set_aside,
  train_command,
  wants_evaluation,
)

__all__ = [
    "DONE_MARKER", "Run", "SweepAxis", "check_keys", "collect_results", "config_fingerprint",
    "eval_metrics", "evaluate_command", "execute_run", "expand_grid", "last_metrics",
    "load_plan", "model_kind", "parse_sweep", "parse_value", "plan_runs", "plot_results",
    "primary_metric", "print_commands", "read_marker", "read_run_config", "recorded_fingerprint",
    "resolve_config", "run_fingerprints", "run_name", "run_status", "save_plan",
    "scored_as_asked", "set_aside", "short_keys", "split_top_level", "summarize",
    "train_command", "value_text", "wants_evaluation", "write_table",
]
