r"""Grid sweeps: expand config overrides into runs, run or print them, tabulate.

    python -m speechjax.sweep --config=configs/demo.py:speech --workdir=runs/sweep \
        --sweep='lora.rank=4,8,16' --sweep='optim.lr=1e-4,3e-4' [--run | --print | --collect] \
        [-- --config.train.num_steps=200 ...]

Each point of the grid is a run folder ROOT/<name> (the name spells the swept
values, e.g. `rank=8_lr=3e-4`) trained by `python -m speechjax.train` (or
`--launcher`, e.g. 'launch/local.sh -n 2'), then scored by
`python -m speechjax.evaluate` when it trained a speech LLM. Runs go one after
another; a run that finished before (its `sweep_done.json` marker, or a final
checkpoint) is skipped, so re-running a sweep only does what is missing.
`--print` writes the commands for a cluster instead, and `--collect` only
tabulates. Results: ROOT/sweep.md (markdown), ROOT/sweep.csv, ROOT/sweep.png,
with the plan in ROOT/sweep.json. Arguments after `--` go to every train command.

This file is intentionally kept short in its main; the logic lives in
importable functions (expand_grid, run_name, collect_results, ...).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

DONE_MARKER = "sweep_done.json"
_NAME_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


# ------------------------------------------------------------- the grid

def split_top_level(text: str, sep: str = ",") -> list[str]:
  """Splits on `sep` outside brackets and quotes: '(1,2),(3,4)' -> ['(1,2)', '(3,4)']."""
  parts, depth, quote, current = [], 0, "", []
  for ch in text:
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth < 0:
        raise ValueError(f"unbalanced {ch!r} in {text!r}")
    elif ch == sep and depth == 0:
      parts.append("".join(current))
      current = []
      continue
    current.append(ch)
  if depth or quote:
    raise ValueError(f"unbalanced brackets or quotes in {text!r}")
  parts.append("".join(current))
  return parts


def parse_value(text: str) -> Any:
  """'8' -> 8, '3e-4' -> 0.0003, 'true' -> True, '(64,128)' -> (64, 128),
  "'a,b'" -> 'a,b'; anything else stays the string it is."""
  text = text.strip()
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  if text.lower() in ("none", "null"):
    return None
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(value, tuple):
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)
  if isinstance(value, (bool, int, float, str)):
    return value
  return text  # dicts, sets, complex numbers: not config values


@dataclasses.dataclass(frozen=True)
class SweepAxis:
  key: str  # dotted config key, e.g. 'optim.lr'
  values: tuple[Any, ...]  # parsed values
  texts: tuple[str, ...]  # as the user wrote them (for names and overrides)


def parse_sweep(spec: str) -> SweepAxis:
  """'lora.rank=4,8,16' -> SweepAxis('lora.rank', (4, 8, 16), ('4', '8', '16'))."""
  key, sep, rest = spec.partition("=")
  key = key.strip()
  if key.startswith("--config."):
    key = key[len("--config."):]
  if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*",
                                            key):
    raise ValueError(f"--sweep={spec!r}: expected KEY=V1,V2,... with KEY a dotted config key "
                     f"(e.g. 'optim.lr=1e-4,3e-4')")
  texts = tuple(t.strip() for t in split_top_level(rest))
  if not texts or any(not t for t in texts):
    raise ValueError(f"--sweep={spec!r}: empty value in the list")
  if len(set(texts)) != len(texts):
    raise ValueError(f"--sweep={spec!r}: a value is listed twice")
  return SweepAxis(key, tuple(parse_value(t) for t in texts), texts)


def expand_grid(axes: Sequence[SweepAxis | str]) -> list[dict[str, Any]]:
  """The cartesian product, first axis slowest: a list of {key: value}."""
  axes = [parse_sweep(a) if isinstance(a, str) else a for a in axes]
  keys = [a.key for a in axes]
  if len(set(keys)) != len(keys):
    raise ValueError(f"a config key is swept twice: {keys}")
  return [dict(zip(keys, combo)) for combo in itertools.product(*(a.values for a in axes))]


def _value_text(value: Any) -> str:
  """A value as it goes on the command line (`--config.key=TEXT`)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, tuple):
    return "(" + ",".join(_value_text(v) if not isinstance(v, str) else repr(v) for v in value) + (
        ",)" if len(value) == 1 else ")")
  if value is None:
    return "None"
  return str(value) if isinstance(value, str) else repr(value)


def _name_token(value: Any, text: str | None = None) -> str:
  token = text if text is not None else _value_text(value)
  token = _NAME_SAFE.sub("-", token.strip("()[]'\" ")).strip("-")
  return token or "empty"


def short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Shortest dotted suffix of each key that no other key shares:
  ('optim.lr', 'lora.rank') -> lr, rank; encoder.num_layers vs decoder.num_layers
  keep their section."""
  out = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if not any(other != key and (other == suffix or other.endswith("." + suffix))
                 for other in keys):
        break
    out[key] = suffix
  return out


def run_name(point: dict[str, Any], texts: dict[str, str] | None = None) -> str:
  """{'lora.rank': 8, 'optim.lr': 3e-4} -> 'rank=8_lr=0.0003' (or 'lr=3e-4'
  when `texts` gives the value as the user wrote it)."""
  if not point:
    return "base"
  short = short_keys(list(point))
  texts = texts or {}
  return "_".join(f"{short[k]}={_name_token(v, texts.get(k))}" for k, v in point.items())


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict[str, Any]  # swept key -> value
  override_texts: dict[str, str]  # swept key -> value as written

  def config_args(self) -> list[str]:
    return [f"--config.{k}={self.override_texts.get(k, _value_text(v))}"
            for k, v in self.overrides.items()]


def plan_runs(axes: Sequence[SweepAxis | str]) -> list[Run]:
  """Grid points with unique, readable names."""
  axes = [parse_sweep(a) if isinstance(a, str) else a for a in axes]
  text_of = {(a.key, repr(v)): t for a in axes for v, t in zip(a.values, a.texts)}
  runs, seen = [], {}
  for point in expand_grid(axes):
    texts = {k: text_of[(k, repr(v))] for k, v in point.items()}
    name = run_name(point, texts)
    if name in seen:  # two values that sanitise alike ('a/b' and 'a-b')
      seen[name] += 1
      name = f"{name}_{seen[name]}"
    else:
      seen[name] = 1
    runs.append(Run(name, point, texts))
  return runs


# ------------------------------------------------------------ commands

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


def run_status(run_dir: str, evaluate: bool, args: Sequence[str] | None = None) -> str:
  """'done' (marker written), 'trained' (final checkpoint, not yet scored),
  'started' (a folder, no final checkpoint), 'changed' (finished, but with
  other train arguments than `args`) or 'missing'."""
  marker = os.path.join(run_dir, DONE_MARKER)
  if os.path.exists(marker):
    if args is not None:
      try:
        with open(marker) as f:
          recorded = json.load(f).get("args")
      except (OSError, json.JSONDecodeError):
        recorded = None
      if recorded is not None and list(recorded) != list(args):
        return "changed"
    return "done"
  if not os.path.isdir(run_dir):
    return "missing"
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


def execute_run(config: str, root: str, run: Run, extra: Sequence[str] = (), *,
                launcher: Sequence[str] | None = None, evaluate: str = "auto",
                eval_split: str = "test", eval_max_examples: int = 0) -> str:
  """Trains (resuming if the folder holds a checkpoint) and scores one run;
  returns its status: 'done', 'skipped' (already done) or 'failed'."""
  run_dir = os.path.join(root, run.name)
  args = [f"--config={config}", *run.config_args(), *extra]
  status = run_status(run_dir, evaluate != "never", args)
  if status == "done":
    logging.info("%s: already finished, skipped", run.name)
    return "skipped"
  if status == "changed":
    logging.info("%s: finished with other arguments; training again (it resumes from its "
                 "checkpoint, so e.g. a larger train.num_steps continues it)", run.name)
    os.remove(os.path.join(run_dir, DONE_MARKER))
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
    json.dump({"name": run.name, "overrides": run.overrides, "args": args, "evaluated": evaluated,
               "eval_split": eval_split if evaluated else None,
               "seconds": round(time.time() - start, 1)}, f, indent=2, default=str)
  return "done"


# ------------------------------------------------------------- results

def last_metrics(run_dir: str) -> dict[str, float]:
  """Final train and dev numbers of a run from its metrics.jsonl, as
  'train/<name>' and 'dev/<name>' (the last record of each split)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  last: dict[str, dict] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a killed run
          continue
        last[record.get("split", "train")] = record
  out: dict[str, float] = {}
  for split, record in last.items():
    out[f"{split}/step"] = record.get("step")
    for key, value in record.items():
      if key in ("step", "split") or not _is_number(value):
        continue
      if split == "train" and key not in ("loss", "token_accuracy", "grad_norm", "ctc_loss"):
        continue  # throughput and padding stats say nothing about the result
      out[f"{split}/{key}"] = value
  return out


def eval_metrics(run_dir: str, split: str) -> dict[str, float]:
  """Numbers of RUN/eval/<split>.json (from speechjax.evaluate) as '<split>/<name>'."""
  path = os.path.join(run_dir, "eval", f"{split}.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    summary = json.load(f)
  return {f"{split}/{k}": v for k, v in summary.items() if _is_number(v)}


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def collect_results(root: str, runs: Sequence[Run], eval_split: str = "test",
                    statuses: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """One row per run: name, swept values, status, then its metrics."""
  rows = []
  for run in runs:
    run_dir = os.path.join(root, run.name)
    status = (statuses or {}).get(run.name) or run_status(run_dir, evaluate=False)
    if status == "skipped":
      status = "done"
    row = {"run": run.name, **{k: _value_text(v) if isinstance(v, tuple) else v
                               for k, v in run.overrides.items()}, "status": status}
    row.update(last_metrics(run_dir))
    row.update(eval_metrics(run_dir, eval_split))
    rows.append(row)
  return rows


def primary_metric(rows: Sequence[dict], root: str, runs: Sequence[Run],
                   eval_split: str = "test") -> tuple[str | None, str]:
  """(column, 'min'|'max'): the config's eval.metric on the eval split when
  scored, else on dev, else the dev / train loss."""
  metric, mode = "loss", "min"
  for run in runs:
    cfg = read_run_config(os.path.join(root, run.name)).get("eval", {})
    if cfg.get("metric"):
      metric, mode = cfg["metric"], cfg.get("mode", "min")
      break
  for column in (f"{eval_split}/{metric}", f"dev/{metric}", "dev/loss", "train/loss"):
    if any(_is_number(r.get(column)) for r in rows):
      chosen_mode = mode if column.endswith("/" + metric) else "min"
      return column, chosen_mode
  return None, mode


def _columns(rows: Sequence[dict], swept: Sequence[str]) -> list[str]:
  head = ["run", *swept, "status"]
  rest = []
  for row in rows:
    for key in row:
      if key not in head and key not in rest:
        rest.append(key)
  split_order = {"train": 2, "dev": 1}
  rest.sort(key=lambda k: (split_order.get(k.split("/")[0], 0), k.endswith("/step"), k))
  return head + rest


_COUNTS = ("step", "checkpoint_step", "deletions", "insertions", "substitutions", "tasks")


def _headline_column(column: str, swept: Sequence[str]) -> bool:
  """The markdown table keeps the headline numbers; the csv keeps everything."""
  if column in ("run", "status") or column in swept:
    return True
  name = column.partition("/")[2]
  return not ("/" in name or name in _COUNTS or name.startswith(("num_", "best_")))


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def write_table(rows: Sequence[dict], root: str, swept: Sequence[str], metric: str | None = None,
                mode: str = "min") -> tuple[str, str]:
  """ROOT/sweep.csv (every number) and ROOT/sweep.md (the same, best run marked)."""
  columns = _columns(rows, swept)
  csv_path = os.path.join(root, "sweep.csv")
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({c: row.get(c, "") for c in columns})
  best = None
  if metric:
    scored = [r for r in rows if _is_number(r.get(metric))]
    if scored:
      best = (min if mode == "min" else max)(scored, key=lambda r: r[metric])["run"]
  lines = [f"# Sweep: {os.path.basename(os.path.abspath(root))}", ""]
  if metric:
    lines += [f"Best by `{metric}` ({mode}): **{best or 'none yet'}**", ""]
  md_columns = [c for c in columns if _headline_column(c, swept)]
  lines.append("| " + " | ".join(md_columns) + " |")
  lines.append("|" + "|".join("---" for _ in md_columns) + "|")
  for row in rows:
    cells = [_cell(row.get(c)) for c in md_columns]
    if row["run"] == best:
      cells[0] = f"**{cells[0]}**"
    lines.append("| " + " | ".join(cells) + " |")
  md_path = os.path.join(root, "sweep.md")
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return md_path, csv_path


def plot_results(rows: Sequence[dict], root: str, swept: Sequence[str], metric: str | None) -> str | None:
  """ROOT/sweep.png: the metric against the swept value when one numeric key
  is swept (one line per setting of the others), else one bar per run."""
  scored = [r for r in rows if metric and _is_number(r.get(metric))]
  if not scored:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  numeric = [k for k in swept if all(_is_number(r.get(k)) for r in scored)]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  if numeric and len({r[numeric[0]] for r in scored}) > 1:
    x_key = numeric[0]
    others = [k for k in swept if k != x_key]
    groups: dict[str, list[dict]] = {}
    for r in scored:
      label = ", ".join(f"{k}={_cell(r.get(k))}" for k in others) or metric
      groups.setdefault(label, []).append(r)
    for label, members in groups.items():
      members = sorted(members, key=lambda r: r[x_key])
      ax.plot([r[x_key] for r in members], [r[metric] for r in members], marker="o", label=label)
    values = [r[x_key] for r in scored]
    if min(values) > 0 and max(values) / min(values) >= 20:
      ax.set_xscale("log")
    ax.set_xlabel(x_key)
    if len(groups) > 1:
      ax.legend(fontsize=8)
  else:
    ax.barh([r["run"] for r in scored], [r[metric] for r in scored], color="#4c72b0")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=8)
  ax.set_title(f"{os.path.basename(os.path.abspath(root))}: {metric}")
  if numeric and len({r[numeric[0]] for r in scored}) > 1:
    ax.set_ylabel(metric)
  else:
    ax.set_xlabel(metric)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(root, "sweep.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def summarize(root: str, runs: Sequence[Run], swept: Sequence[str], eval_split: str = "test",
              statuses: dict[str, str] | None = None, metric: str = "") -> dict[str, Any]:
  rows = collect_results(root, runs, eval_split, statuses)
  if metric:
    mode = "max" if any(metric.endswith(m) for m in ("accuracy", "bleu", "chrf", "f1")) else "min"
  else:
    metric, mode = primary_metric(rows, root, runs, eval_split)
  md_path, csv_path = write_table(rows, root, swept, metric, mode)
  png_path = plot_results(rows, root, swept, metric)
  return {"rows": rows, "metric": metric, "markdown": md_path, "csv": csv_path, "plot": png_path}


# ----------------------------------------------------------------- plan

def save_plan(root: str, config: str, axes: Sequence[SweepAxis], extra: Sequence[str],
              runs: Sequence[Run]) -> None:
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"config": config, "sweep": [f"{a.key}={','.join(a.texts)}" for a in axes],
               "extra": list(extra), "runs": [r.name for r in runs]}, f, indent=2)


def load_plan(root: str) -> dict:
  path = os.path.join(root, "sweep.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: pass --config and --sweep, or point --workdir at a "
                            "sweep folder made by `speechjax.sweep --run` / `--print`")
  with open(path) as f:
    return json.load(f)


def check_keys(config: str, axes: Sequence[SweepAxis], extra: Sequence[str]) -> None:
  """Refuses a swept or extra key the config does not have, before any run starts."""
  from speechjax import runtime  # pylint: disable=g-import-not-at-top

  overrides = [f"--config.{a.key}=x" for a in axes] + [a for a in extra if a.startswith("--config.")]
  message = runtime.unknown_override_message(config, overrides)
  if message:
    raise ValueError(message)


def model_kind(config: str, run: Run, extra: Sequence[str]) -> str:
  """The model.kind a run will train (swept, overridden after `--`, or the config's)."""
  if "model.kind" in run.overrides:
    return str(run.overrides["model.kind"])
  for arg in reversed(list(extra)):
    if arg.startswith("--config.model.kind="):
      return arg.split("=", 1)[1]
  from speechjax import runtime  # pylint: disable=g-import-not-at-top

  try:
    return str(runtime._load_config(config).model.kind)  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("could not read model.kind from %s (%s); assuming a speech LLM", config, e)
    return "speech_llm"


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


# ------------------------------------------------------------------ main

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
    if FLAGS.run:
      for i, run in enumerate(runs):
        logging.info("run %d/%d: %s", i + 1, len(runs), run.name)
        statuses[run.name] = execute_run(config, root, run, extra, launcher=launcher,
                                         evaluate=FLAGS.evaluate, eval_split=FLAGS.eval_split,
                                         eval_max_examples=FLAGS.eval_max_examples)
  result = summarize(root, runs, swept, FLAGS.eval_split, statuses, FLAGS.metric)
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
