"""speechjax.sweep: grid expansion, run names, value parsing, result tables,
re-runs keyed on each run's resolved config (with a stand-in trainer), and one
real two-run sweep of a tiny speech LLM (trained, scored, skipped on re-run)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys

import pytest
import tiny_runs

from speechjax import sweep

# ------------------------------------------------------------------ units

@pytest.mark.parametrize("text, value", [
    ("8", 8), ("-3", -3), ("3e-4", 3e-4), ("0.5", 0.5), ("true", True), ("False", False),
    ("none", None), ("adamw", "adamw"), ("configs/x.py", "configs/x.py"), ("'a,b'", "a,b"),
    ("(64,128)", (64, 128)), ("(128,)", (128,)), ("[1, 2]", (1, 2)), ("('q', 'v')", ("q", "v")),
    ("1e-4x", "1e-4x"), ("{1: 2}", "{1: 2}"),
])
def test_parse_value(text, value):
  parsed = sweep.parse_value(text)
  assert parsed == value and type(parsed) is type(value)


def test_split_top_level_respects_brackets_and_quotes():
  assert sweep.split_top_level("(64,128),(128,)") == ["(64,128)", "(128,)"]
  assert sweep.split_top_level("'a,b',c") == ["'a,b'", "c"]
  assert sweep.split_top_level("1,2,3") == ["1", "2", "3"]
  with pytest.raises(ValueError, match="unbalanced"):
    sweep.split_top_level("(1,2")


def test_parse_sweep_and_bad_specs():
  axis = sweep.parse_sweep("--config.lora.rank=4,8,16")
  assert axis.key == "lora.rank" and axis.values == (4, 8, 16) and axis.texts == ("4", "8", "16")
  assert sweep.parse_sweep("data.token_buckets=(64,128),(128,)").values == ((64, 128), (128,))
  for bad in ("lora.rank", "=1,2", "lora.rank=", "lora.rank=1,,2", "lora.rank=1,1", "a b=1"):
    with pytest.raises(ValueError):
      sweep.parse_sweep(bad)


def test_expand_grid_is_the_cartesian_product_first_axis_slowest():
  grid = sweep.expand_grid(["lora.rank=4,8,16", "optim.lr=1e-4,3e-4"])
  assert len(grid) == 6
  assert grid[0] == {"lora.rank": 4, "optim.lr": 1e-4}
  assert grid[1] == {"lora.rank": 4, "optim.lr": 3e-4}
  assert grid[-1] == {"lora.rank": 16, "optim.lr": 3e-4}
  assert sweep.expand_grid([]) == [{}]
  with pytest.raises(ValueError, match="twice"):
    sweep.expand_grid(["optim.lr=1,2", "optim.lr=3"])


def test_run_names_are_readable_and_unique():
  runs = sweep.plan_runs(["lora.rank=4,8", "optim.lr=1e-4,3e-4"])
  assert [r.name for r in runs] == ["rank=4_lr=1e-4", "rank=4_lr=3e-4", "rank=8_lr=1e-4",
                                    "rank=8_lr=3e-4"]
  assert runs[1].config_args() == ["--config.lora.rank=4", "--config.optim.lr=3e-4"]
  # Same last component: the section stays in the name.
  names = [r.name for r in sweep.plan_runs(["model.encoder.num_layers=1",
                                            "model.decoder.num_layers=2,4"])]
  assert names == ["encoder.num_layers=1_decoder.num_layers=2",
                   "encoder.num_layers=1_decoder.num_layers=4"]
  odd = sweep.plan_runs(["data.token_buckets=(64,128),(128,)", "data.template='a/b','a-b'",
                         "logging.tensorboard=true"])
  assert odd[0].name == "token_buckets=64-128_template=a-b_tensorboard=true"
  assert odd[1].name == "token_buckets=64-128_template=a-b_tensorboard=true_2"
  assert len({r.name for r in odd}) == len(odd)
  assert sweep.run_name({"optim.lr": 3e-4}) == "lr=0.0003"
  assert sweep.run_name({}) == "base"


def test_print_commands_for_a_cluster(tmp_path):
  runs = sweep.plan_runs(["lora.rank=4,8"])
  out = io.StringIO()
  sweep.print_commands("cfg.py", str(tmp_path), runs, ["--config.train.num_steps=5"],
                       launcher=["sbatch", "launch/slurm.sbatch"], evaluate="auto",
                       eval_split="test", eval_max_examples=0, out=out)
  lines = [l for l in out.getvalue().splitlines() if not l.startswith("#")]
  assert lines[0] == (f"sbatch launch/slurm.sbatch --config=cfg.py --workdir={tmp_path}/rank=4 "
                      "--config.lora.rank=4 --config.train.num_steps=5")
  assert lines[1].endswith("--workdir=" + f"{tmp_path}/rank=8 --config.lora.rank=8 "
                           "--config.train.num_steps=5")
  # Scoring comes after all training (a scheduler runs the train lines later).
  assert lines[2] == f"python -m speechjax.evaluate --workdir={tmp_path}/rank=4 --split=test"
  assert lines[4] == f"python -m speechjax.sweep --workdir={tmp_path} --collect"
  assert len(lines) == 5


def _fake_run(root, name, *, kind, dev_loss, wer=None, done=True):
  run_dir = os.path.join(root, name)
  os.makedirs(os.path.join(run_dir, "eval"))
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump({"model": {"kind": kind}, "train": {"num_steps": 10},
               "eval": {"metric": "wer" if wer is not None else "loss", "mode": "min"}}, f)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 10, "split": "train", "loss": 2.0, "steps_per_sec": 9.0}) + "\n")
    f.write(json.dumps({"step": 10, "split": "dev", "loss": dev_loss}) + "\n")
    f.write('{"step": 11, "split": "tr')  # a line cut by a killed run
  if wer is not None:
    with open(os.path.join(run_dir, "eval", "test.json"), "w") as f:
      json.dump({"wer": wer, "asr/wer": wer, "num_examples": 16, "tasks": ["asr"]}, f)
  if done:
    open(os.path.join(run_dir, sweep.DONE_MARKER), "w").close()


def test_collect_results_tables_and_plot(tmp_path):
  root = str(tmp_path)
  runs = sweep.plan_runs(["lora.rank=4,8,16"])
  _fake_run(root, "rank=4", kind="speech_llm", dev_loss=1.5, wer=0.30)
  _fake_run(root, "rank=8", kind="speech_llm", dev_loss=1.4, wer=0.25)
  result = sweep.summarize(root, runs, ["lora.rank"])
  assert result["metric"] == "test/wer"
  rows = {r["run"]: r for r in result["rows"]}
  assert rows["rank=8"]["dev/loss"] == 1.4 and rows["rank=8"]["train/loss"] == 2.0
  assert "train/steps_per_sec" not in rows["rank=8"]
  assert rows["rank=16"]["status"] == "missing"
  with open(result["csv"]) as f:
    table = list(csv.DictReader(f))
  assert table[0]["lora.rank"] == "4" and table[1]["test/wer"] == "0.25"
  assert {"run", "lora.rank", "status", "test/wer", "test/asr/wer", "dev/loss"} <= set(table[0])
  markdown = open(result["markdown"]).read()
  assert "**rank=8**" in markdown and "test/asr/wer" not in markdown
  assert os.path.getsize(result["plot"]) > 1000


def test_run_status(tmp_path):
  root = str(tmp_path)
  assert sweep.run_status(os.path.join(root, "nothing"), evaluate=True) == "missing"
  _fake_run(root, "lm", kind="lm", dev_loss=1.0, done=False)
  assert sweep.run_status(os.path.join(root, "lm"), evaluate=True) == "started"
  os.makedirs(os.path.join(root, "lm", "checkpoints", "last", "10"))
  assert sweep.run_status(os.path.join(root, "lm"), evaluate=True) == "done"  # lm: no evaluate
  _fake_run(root, "speech", kind="speech_llm", dev_loss=1.0, done=False)
  os.makedirs(os.path.join(root, "speech", "checkpoints", "last", "10"))
  assert sweep.run_status(os.path.join(root, "speech"), evaluate=True) == "trained"
  with open(os.path.join(root, "speech", sweep.DONE_MARKER), "w") as f:
    json.dump({"args": ["--config=a.py"]}, f)
  assert sweep.run_status(os.path.join(root, "speech"), True, ["--config=a.py"]) == "done"
  assert sweep.run_status(os.path.join(root, "speech"), True, ["--config=b.py"]) == "changed"
  assert sweep.wants_evaluation({"model": {"kind": "ctc"}}, "auto") is False
  assert sweep.wants_evaluation({"model": {"kind": "ctc"}}, "always") is True


# ------------------------------------------------ re-runs keyed on the resolved config

_CONFIG_FILE = """
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict({"kind": "lm"})
  config.optim = ml_collections.ConfigDict({"lr": 0.001})
  config.train = ml_collections.ConfigDict({"num_steps": 3})
  return config
"""

# Stands in for speechjax.train: parses the config as it does, writes RUN/config.json
# and a final checkpoint folder, and records each launch (lr, and whether it found
# a checkpoint already there, i.e. resumed).
_FAKE_TRAIN = """
import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder")


def main(argv):
  del argv
  workdir, config = _WORKDIR.value, _CONFIG.value
  checkpoints = os.path.join(workdir, "checkpoints")
  with open(os.environ["LAUNCH_LOG"], "a") as f:
    f.write(json.dumps({"run": os.path.basename(workdir), "lr": config.optim.lr,
                        "resumed": os.path.isdir(checkpoints)}) + "\\n")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
  os.makedirs(os.path.join(checkpoints, "last", str(config.train.num_steps)), exist_ok=True)


app.run(main)
"""


def test_rerun_keys_runs_on_the_resolved_config(tmp_path, monkeypatch):
  config = tmp_path / "config.py"
  config.write_text(_CONFIG_FILE)
  trainer = tmp_path / "fake_train.py"
  trainer.write_text(_FAKE_TRAIN)
  launch_log = tmp_path / "launches.jsonl"
  monkeypatch.setenv("LAUNCH_LOG", str(launch_log))
  root = tmp_path / "sweep"
  runs = {r.name: r for r in sweep.plan_runs(["seed=1,2"])}

  def execute(name, extra):
    return sweep.execute_run(str(config), str(root), runs[name], extra,
                             launcher=[sys.executable, str(trainer)])

  def launches():
    if not launch_log.exists():
      return []
    records = [json.loads(line) for line in launch_log.read_text().splitlines()]
    launch_log.unlink()
    return records

  assert [execute(name, []) for name in runs] == ["done", "done"]
  assert launches() == [{"run": "seed=1", "lr": 0.001, "resumed": False},
                        {"run": "seed=2", "lr": 0.001, "resumed": False}]
  marker = json.loads((root / "seed=1" / sweep.DONE_MARKER).read_text())
  assert marker["config_fingerprint"] == sweep.config_fingerprint(
      json.loads((root / "seed=1" / "config.json").read_text()))

  # The same settings spelled differently: nothing to do.
  assert [execute(name, ["--config.optim.lr=1e-3"]) for name in runs] == ["skipped", "skipped"]
  assert launches() == []

  # seed=1 with another lr trains from scratch, its old folder kept aside; seed=2,
  # unchanged, is skipped.
  assert execute("seed=1", ["--config.optim.lr=0.01"]) == "done"
  assert execute("seed=2", []) == "skipped"
  assert launches() == [{"run": "seed=1", "lr": 0.01, "resumed": False}]
  assert json.loads((root / "seed=1" / "config.json").read_text())["optim"]["lr"] == 0.01
  aside = [p.name for p in root.iterdir() if p.name.startswith("seed=1.replaced-")]
  assert len(aside) == 1
  assert json.loads((root / aside[0] / "config.json").read_text())["optim"]["lr"] == 0.001

  # Only more steps asked for (train.num_steps may change on resume): the same
  # run is resumed to the new length, in its own folder, not retrained.
  (root / "seed=2" / sweep.DONE_MARKER).unlink()
  assert sweep.run_status(str(root / "seed=2"), True, fingerprint=sweep.config_fingerprint(
      sweep.resolve_config(str(config), ["--config.seed=2"]))) == "done"
  assert sweep.config_fingerprint(sweep.resolve_config(str(config), ["--config.seed=2"])) == \
      sweep.config_fingerprint(sweep.resolve_config(str(config), ["--config.seed=2",
                                                                  "--config.train.num_steps=4"]))
  assert sweep.run_status(str(root / "seed=2"), True, num_steps=4) == "started"
  assert execute("seed=2", ["--config.train.num_steps=4"]) == "done"
  assert launches() == [{"run": "seed=2", "lr": 0.001, "resumed": True}]
  assert (root / "seed=2" / "checkpoints" / "last" / "4").is_dir()
  assert (root / "seed=2" / "checkpoints" / "last" / "3").is_dir()  # the same folder, extended
  assert not [p for p in root.iterdir() if p.name.startswith("seed=2.replaced-")]
  assert execute("seed=2", ["--config.train.num_steps=4"]) == "skipped"
  # Asked for fewer steps than the folder holds: its results are another run's.
  assert sweep.run_status(str(root / "seed=2"), True, num_steps=3) == "changed"

  # The table leaves out the numbers of a folder whose config is not the plan's.
  for name in runs:
    (root / name / "metrics.jsonl").write_text('{"step": 3, "split": "dev", "loss": 1.5}\n')
  fingerprints = sweep.run_fingerprints(str(config), list(runs.values()),
                                        ["--config.train.num_steps=4"])
  rows = sweep.collect_results(str(root), list(runs.values()), fingerprints=fingerprints)
  assert [row["status"] for row in rows] == ["changed", "done"]
  assert "dev/loss" not in rows[0] and rows[1]["dev/loss"] == 1.5


# ------------------------------------------------------------ a real sweep

def test_sweep_runs_scores_skips_and_tabulates(tiny_corpus, tmp_path, tmp_path_factory):
  data_dir, tokenizer, _ = tiny_corpus
  config = tiny_runs.write_config(tmp_path / "tiny.py", data_dir, tokenizer)
  root = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "speechjax.sweep", f"--config={config}", f"--workdir={root}",
         "--sweep=seed=1,2", "--sweep=optim.lr=1e-3", "--eval_max_examples=2", "--",
         f"--config.compile_cache_dir={tiny_runs.compile_cache(tmp_path_factory)}"]
  env = tiny_runs.subprocess_env(devices=4)  # as test_multihost's runs: shared compilations
  first = tiny_runs.run(cmd, env=env, log_path=tmp_path / "first.log")
  names = ["seed=1_lr=1e-3", "seed=2_lr=1e-3"]
  for name in names:
    run_dir = root / name
    assert (run_dir / sweep.DONE_MARKER).exists(), first.stdout[-3000:]
    assert (run_dir / "checkpoints" / "last" / "10").is_dir()
    summary = json.loads((run_dir / "eval" / "test.json").read_text())  # a speech LLM: scored
    assert summary["num_examples"] == 2
  with open(root / "sweep.csv") as f:
    table = list(csv.DictReader(f))
  assert [row["run"] for row in table] == names
  assert [row["seed"] for row in table] == ["1", "2"] and table[0]["optim.lr"] == "0.001"
  for column in ("test/wer", "dev/loss", "train/loss"):
    assert all(float(row[column]) >= 0 for row in table), column
  assert "seed=1_lr=1e-3" in (root / "sweep.md").read_text()
  assert (root / "sweep.png").stat().st_size > 1000
  assert json.loads((root / "sweep.json").read_text())["runs"] == names

  marker_times = [(root / n / sweep.DONE_MARKER).stat().st_mtime for n in names]
  second = tiny_runs.run(cmd, env=env, log_path=tmp_path / "second.log")
  assert second.stdout.count("already finished, skipped") == 2
  assert [(root / n / sweep.DONE_MARKER).stat().st_mtime for n in names] == marker_times
  # The grid is remembered: --collect needs only the folder.
  collected = tiny_runs.run([sys.executable, "-m", "speechjax.sweep", f"--workdir={root}",
                             "--collect"], env=env)
  assert "seed=2_lr=1e-3" in collected.stdout
