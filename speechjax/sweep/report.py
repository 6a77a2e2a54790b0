"""A sweep's results: each run's final train / dev numbers and its scores,
ROOT/sweep.csv (every number), ROOT/sweep.md (the headline numbers, best run
marked) and ROOT/sweep.png (the metric against the swept value)."""

from __future__ import annotations

from collections.abc import Sequence
import csv
import json
import math
import os
from typing import Any

from speechjax.sweep.grid import Run, value_text
from speechjax.sweep.runner import read_run_config, run_status


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
                    statuses: dict[str, str] | None = None,
                    fingerprints: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """One row per run: name, swept values, status, then its metrics.

  `fingerprints` ({run name: config fingerprint}) marks a folder that holds a
  run of another config as 'changed', and its numbers are left out.
  """
  rows = []
  for run in runs:
    run_dir = os.path.join(root, run.name)
    status = (statuses or {}).get(run.name) or run_status(
        run_dir, evaluate=False, fingerprint=(fingerprints or {}).get(run.name))
    if status == "skipped":
      status = "done"
    row = {"run": run.name, **{k: value_text(v) if isinstance(v, tuple) else v
                               for k, v in run.overrides.items()}, "status": status}
    if status != "changed":
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
              statuses: dict[str, str] | None = None, metric: str = "",
              fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
  """Collects every run's numbers and writes the csv, markdown and plot; returns
  {'rows', 'metric', 'markdown', 'csv', 'plot'} ('plot' None when nothing is scored)."""
  rows = collect_results(root, runs, eval_split, statuses, fingerprints)
  if metric:
    mode = "max" if any(metric.endswith(m) for m in ("accuracy", "bleu", "chrf", "f1")) else "min"
  else:
    metric, mode = primary_metric(rows, root, runs, eval_split)
  md_path, csv_path = write_table(rows, root, swept, metric, mode)
  png_path = plot_results(rows, root, swept, metric)
  return {"rows": rows, "metric": metric, "markdown": md_path, "csv": csv_path, "plot": png_path}
