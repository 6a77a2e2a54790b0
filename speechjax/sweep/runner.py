"""Running a sweep's runs: train and score commands, each run's status, one run
at a time, or the commands printed for a cluster scheduler.

A run's results are keyed on the config it trains with: RUN/config.json (which
speechjax.train writes before its first step) holds it, and its fingerprint is
compared with the fingerprint of the config the sweep asks for. A folder of
another config is moved aside and the run trains from scratch, so a changed
setting never inherits an old run's checkpoint or scores, while an unchanged
run is skipped (or resumed, when it did not finish). The fingerprint leaves out
the keys a resumed run may change (speechjax.trainer.config_record), so a sweep
asking for more steps resumes each run to the new train.num_steps.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import logging
import os
import shlex
import subprocess
import sys
import time

from speechjax.sweep.grid import Run, config_fingerprint, model_kind, resolve_config

DONE_MARKER = "sweep_done.json"


def train_command(config: str, run_dir: str, run: Run, extra: Sequence[str] = (),
                  launcher: Sequence[str] | None = None) -> list[str]:
  prefix = list(launcher) if launcher else [sys.executable, "-m", "speechjax.train"]
  return prefix + [f"--config={config}", f"--workdir={run_dir}"] + run.config_args() + list(extra)


def evaluate_command(run_dir: str, split: str = "test", max_examples: int = 0,
                     python: str | None = None) -> list[str]:
  cmd = [python or sys.executable, "-m", "speechjax.evaluate", f"--workdir={run_dir}",
         f"--split={split}"]
  if max_examples:
    cmd.append(f"--max_examples={max_examples}")
  return cmd


def read_run_config(run_dir: str) -> dict:
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _final_checkpoint_written(run_dir: str, config: dict) -> bool:
  num_steps = config.get("train", {}).get("num_steps")
  return num_steps is not None and os.path.isdir(
      os.path.join(run_dir, "checkpoints", "last", str(int(num_steps))))


def read_marker(run_dir: str) -> dict | None:
  """RUN/sweep_done.json as a dict ({} when it cannot be read), None when absent."""
  path = os.path.join(run_dir, DONE_MARKER)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      marker = json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}
  return marker if isinstance(marker, dict) else {}


def recorded_fingerprint(run_dir: str) -> str | None:
  """Fingerprint of the config a run folder was trained with (from RUN/config.json,
  else from its marker); None when the folder records none."""
  config = read_run_config(run_dir)
  if config:
    return config_fingerprint(config)
  return (read_marker(run_dir) or {}).get("config_fingerprint")


def _checkpoint_steps(run_dir: str) -> list[int]:
  folder = os.path.join(run_dir, "checkpoints", "last")
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def run_status(run_dir: str, evaluate: bool, args: Sequence[str] | None = None, *,
               fingerprint: str | None = None, num_steps: int | None = None) -> str:
  """'missing' (no folder), 'changed' (the folder holds a run of a config other
  than `fingerprint`, or one trained past `num_steps`; without a fingerprint:
  finished with other train arguments than `args`), 'done' (marker written, or
  final checkpoint of a run that is not scored), 'trained' (final checkpoint,
  not yet scored) or 'started' (also: a run of the same config recorded with
  another train.num_steps than `num_steps`, which resuming takes there)."""
  if not os.path.isdir(run_dir):
    return "missing"
  if fingerprint is not None:
    recorded = recorded_fingerprint(run_dir)
    if recorded is not None and recorded != fingerprint:
      return "changed"
  recorded_steps = read_run_config(run_dir).get("train", {}).get("num_steps")
  if num_steps is not None and recorded_steps is not None and int(recorded_steps) != num_steps:
    # The same run asked to go another length: resume it to the new length,
    # unless it already went further (its scores are not this run's).
    steps = _checkpoint_steps(run_dir)
    return "changed" if steps and steps[-1] > num_steps else "started"
  marker = read_marker(run_dir)
  if marker is not None:
    recorded_args = marker.get("args")
    if (fingerprint is None and args is not None and recorded_args is not None
        and list(recorded_args) != list(args)):
      return "changed"
    return "done"
  config = read_run_config(run_dir)
  if _final_checkpoint_written(run_dir, config):
    if not evaluate or not wants_evaluation(config, "auto"):
      return "done"
    return "trained"
  return "started"


def wants_evaluation(config: dict, mode: str) -> bool:
  if mode == "never":
    return False
  if mode == "always":
    return True
  return config.get("model", {}).get("kind", "speech_llm") == "speech_llm"


def _run_logged(cmd: list[str], log_path: str, env=None) -> int:
  with open(log_path, "a") as log:
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode


def _tail(path: str, lines: int = 20) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def set_aside(run_dir: str) -> str:
  """Renames a run folder to RUN.replaced-<date>-<time> (its checkpoints and
  scores stay on disk, out of the sweep's table); returns the new path."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target, n = f"{run_dir}.replaced-{stamp}", 1
  while os.path.exists(target):
    n += 1
    target = f"{run_dir}.replaced-{stamp}-{n}"
  os.rename(run_dir, target)
  return target


def scored_as_asked(marker: dict, eval_split: str, eval_max_examples: int) -> bool:
  """Whether a finished run's scores are for this split and example count
  (a marker that does not say is taken at its word)."""
  return (bool(marker.get("evaluated", True))
          and marker.get("eval_split", eval_split) == eval_split
          and marker.get("eval_max_examples", eval_max_examples) == eval_max_examples)


def execute_run(config: str, root: str, run: Run, extra: Sequence[str] = (), *,
                launcher: Sequence[str] | None = None, evaluate: str = "auto",
                eval_split: str = "test", eval_max_examples: int = 0,
                fingerprint: str | None = None) -> str:
  """Trains (resuming an unfinished run of the same config) and scores one run;
  returns its status: 'done', 'skipped' (already done) or 'failed'.

  `fingerprint`: `config_fingerprint` of the config the run trains with
  (resolved here when not given). A folder of another config is moved aside
  (`set_aside`) and the run trains from scratch; a finished run scored with
  another split or example count is scored again.
  """
  run_dir = os.path.join(root, run.name)
  args = [f"--config={config}", *run.config_args(), *extra]
  resolved = resolve_config(config, [*run.config_args(), *extra])
  if fingerprint is None:
    fingerprint = config_fingerprint(resolved)
  num_steps = resolved.get("train", {}).get("num_steps")
  status = run_status(run_dir, evaluate != "never", args, fingerprint=fingerprint,
                      num_steps=None if num_steps is None else int(num_steps))
  if status == "started" and read_marker(run_dir) is not None:
    logging.info("%s: finished with fewer steps than train.num_steps=%s; resuming it", run.name,
                 num_steps)
    os.remove(os.path.join(run_dir, DONE_MARKER))
  if status == "changed":
    moved = set_aside(run_dir)
    logging.info("%s: the folder held a run of another config, moved to %s; training from "
                 "scratch", run.name, moved)
    status = "missing"
  if status == "done":
    marker = read_marker(run_dir) or {}
    if (not wants_evaluation(read_run_config(run_dir), evaluate)
        or scored_as_asked(marker, eval_split, eval_max_examples)):
      logging.info("%s: already finished, skipped", run.name)
      return "skipped"
    logging.info("%s: trained with this config but not scored on %s (max_examples %d); "
                 "scoring it", run.name, eval_split, eval_max_examples)
    os.remove(os.path.join(run_dir, DONE_MARKER))
    status = "trained"
  os.makedirs(run_dir, exist_ok=True)
  log_path = os.path.join(run_dir, "sweep.log")
  start = time.time()
  if status != "trained":
    logging.info("%s: training (log: %s)", run.name, log_path)
    code = _run_logged(train_command(config, run_dir, run, extra, launcher), log_path)
    if code != 0:
      logging.error("%s: training failed (exit %d); last lines of %s:\n%s", run.name, code,
                    log_path, _tail(log_path))
      return "failed"
  run_config = read_run_config(run_dir)
  evaluated = wants_evaluation(run_config, evaluate)
  if evaluated:
    logging.info("%s: evaluating on %s", run.name, eval_split)
    env = dict(os.environ)
    cache_dir = run_config.get("compile_cache_dir", "")
    if cache_dir and "JAX_COMPILATION_CACHE_DIR" not in env:  # evaluate has no config flag for it
      env["JAX_COMPILATION_CACHE_DIR"] = cache_dir if "://" in cache_dir else os.path.abspath(cache_dir)
    code = _run_logged(evaluate_command(run_dir, eval_split, eval_max_examples), log_path, env)
    if code != 0:
      logging.error("%s: evaluation failed (exit %d); last lines of %s:\n%s", run.name, code,
                    log_path, _tail(log_path))
      return "failed"
  with open(os.path.join(run_dir, DONE_MARKER), "w") as f:
    json.dump({"name": run.name, "overrides": run.overrides, "args": args,
               "config_fingerprint": fingerprint, "evaluated": evaluated,
               "eval_split": eval_split if evaluated else None,
               "eval_max_examples": eval_max_examples if evaluated else None,
               "seconds": round(time.time() - start, 1)}, f, indent=2, default=str)
  return "done"


def print_commands(config: str, root: str, runs: Sequence[Run], extra: Sequence[str], *,
                   launcher: Sequence[str] | None, evaluate: str, eval_split: str,
                   eval_max_examples: int, out=None) -> None:
  """Shell lines that train (and score) every run, for a cluster scheduler."""
  out = out or sys.stdout
  launcher = list(launcher) if launcher else ["python", "-m", "speechjax.train"]
  print(f"# {len(runs)} runs of {config} under {root}: train", file=out)
  scoring = []
  for run in runs:
    run_dir = os.path.join(root, run.name)
    print(shlex.join(train_command(config, run_dir, run, extra, launcher)), file=out)
    if wants_evaluation({"model": {"kind": model_kind(config, run, extra)}}, evaluate):
      scoring.append(shlex.join(evaluate_command(run_dir, eval_split, eval_max_examples, "python")))
  if scoring:
    print("# when they have finished: score them", file=out)
    for line in scoring:
      print(line, file=out)
  print("# then tabulate:", file=out)
  print(f"python -m speechjax.sweep --workdir={shlex.quote(root)} --collect", file=out)
