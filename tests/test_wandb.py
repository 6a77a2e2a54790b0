"""Weights & Biases logging (the optional `speechjax[wandb]` extra) in offline
mode: the run files hold the logged metrics, and a resumed run logs into the
same W&B run. Skipped when wandb is not installed."""

import glob
import json
import os
import struct
import sys

import ml_collections
import pytest

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'speechjax[wandb]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402  pylint: disable=wrong-import-position

_BLOCK, _HEADER = 32768, 7  # the .wandb file is a LevelDB-style log of protobuf Records


def offline_history(path: str) -> list[dict]:
  """The history rows ({key: value}) of an offline run's run-<id>.wandb file."""
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    data = f.read()
  ident, _, _ = struct.unpack("<4sHB", data[:_HEADER])
  assert ident == b":W&B", f"{path} is not a W&B datastore"
  rows, pending, pos = [], b"", _HEADER
  while pos + _HEADER <= len(data):
    if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
      pos += _BLOCK - pos % _BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
    if length == 0 and kind == 0:
      break
    pending += data[pos + _HEADER:pos + _HEADER + length]
    pos += _HEADER + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      if record.WhichOneof("record_type") == "history":
        rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item})
  return rows


def _flushed_run_files(wandb_dir) -> list[str]:
  """The offline run files, once the W&B service (which writes them) has shut
  down: at the end of a process that happens by itself, in a test it is asked for."""
  wandb.teardown()
  return sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb")))


def _wandb_cfg(mode="offline"):
  return ml_collections.ConfigDict(dict(enabled=True, project="speechjax-test", mode=mode))


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
  folder = tmp_path / "wandb_files"
  folder.mkdir()
  monkeypatch.setenv("WANDB_DIR", str(folder))
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_MODE", "offline")
  return folder


def test_offline_files_hold_the_metrics_and_a_resumed_run_continues_it(tmp_path, wandb_dir):
  from speechjax.trainer.metric_writer import MetricWriter

  workdir = str(tmp_path / "run")
  writer = MetricWriter(workdir, tensorboard=False, wandb_cfg=_wandb_cfg(), config_dict={"seed": 0})
  writer.write(1, "train", {"loss": 2.5, "lr": 1e-3})
  writer.write(2, "train", {"loss": 1.5, "lr": 1e-3})
  writer.write(2, "dev", {"loss": 1.75, "wer": 0.5})
  writer.close()
  [first] = _flushed_run_files(wandb_dir)
  rows = offline_history(first)
  assert [(r["_step"], r.get("train/loss")) for r in rows] == [(1, 2.5), (2, 1.5)]
  assert rows[-1]["dev/loss"] == 1.75 and rows[-1]["dev/wer"] == 0.5

  # Resuming: the same W&B run id, so the history continues in one run.
  resumed = MetricWriter(workdir, tensorboard=False, wandb_cfg=_wandb_cfg(), config_dict={"seed": 0})
  resumed.write(3, "train", {"loss": 1.0, "lr": 1e-3})
  resumed.close()
  files = _flushed_run_files(wandb_dir)
  with open(os.path.join(workdir, "wandb_run_id")) as f:
    run_id = f.read().strip()
  assert len(files) == 2 and all(os.path.basename(p) == f"run-{run_id}.wandb" for p in files)


def test_an_unknown_mode_names_the_key_and_the_valid_modes(tmp_path, wandb_dir):
  del wandb_dir
  from speechjax.trainer.metric_writer import MetricWriter

  with pytest.raises(ValueError, match=r"logging.wandb.mode='ofline'; valid: online, offline, disabled"):
    MetricWriter(str(tmp_path / "run"), tensorboard=False, wandb_cfg=_wandb_cfg("ofline"))


@pytest.mark.slow  # trains a tiny run: ~1 min on 2 shared cores
def test_a_training_run_logs_its_metrics_offline(tiny_corpus, tmp_path, wandb_dir):
  from speechjax.train import build_trainer

  data_dir, tok_dir, _ = tiny_corpus
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.model.tokenizer = tok_dir
  config.train.num_steps = 3
  config.checkpoint.every_steps = 3
  config.logging.tensorboard = False
  config.logging.wandb.update(enabled=True, mode="offline", project="speechjax-test")
  workdir = str(tmp_path / "run")
  build_trainer(config, workdir).run()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}
  [path] = _flushed_run_files(wandb_dir)
  in_wandb = {r["_step"]: r["train/loss"] for r in offline_history(path) if "train/loss" in r}
  assert sorted(in_wandb) == [1, 2, 3]
  assert in_wandb == pytest.approx(logged)
