"""Fault injection: what survives what. Each test breaks something on purpose
(a write that fails half-way, a stale or broken index, a process killed while
it saves, a damaged checkpoint, a signal at a checkpoint step, a resume with a
changed config) and checks that nothing is lost and the error names what went
wrong. SIGTERM on one host of a two-process run lives in test_multihost.py
(test_sigterm_on_one_host_stops_every_host_at_one_step), beside its fixtures;
a hard kill right after a checkpoint, in test_trainer.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_runs

from speechjax.hf import checkpoint_io, load_pretrained
from speechjax.hf.export import export_hf
from speechjax.models.decoder import Decoder, DecoderConfig

CFG = DecoderConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                    num_kv_heads=1, max_position_embeddings=32)


def _params(seed):
  abstract = jax.eval_shape(Decoder(CFG).init, jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
  rs = np.random.default_rng(seed)
  unboxed = jax.tree_util.tree_map(lambda b: b.value if hasattr(b, "value") else b, abstract,
                                   is_leaf=lambda b: hasattr(b, "value"))
  return jax.tree_util.tree_map(lambda x: jnp.asarray(0.1 * rs.standard_normal(x.shape), jnp.float32),
                                unboxed)


def _embedding(folder):
  _, params = load_pretrained(folder)
  return np.asarray(params["embed_tokens"]["embedding"])


def _contents(folder):
  return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_export_that_fails_half_way_leaves_the_old_folder_intact(tmp_path, monkeypatch):
  folder = str(tmp_path / "lm")
  export_hf(folder, CFG, _params(0))
  before = _embedding(folder)
  files = _contents(folder)

  def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  # The config is written, then the weights fail: as when the disk fills up.
  monkeypatch.setattr(checkpoint_io, "save_safetensors", disk_full)
  with pytest.raises(OSError, match="No space left"):
    export_hf(folder, CFG, _params(1))
  monkeypatch.undo()
  assert _contents(folder) == files  # byte for byte, config.json included
  np.testing.assert_array_equal(_embedding(folder), before)
  assert [f for f in os.listdir(tmp_path) if f != "lm"] == []  # no temporary folder left behind

  export_hf(folder, CFG, _params(1))  # a successful export replaces it whole
  assert not np.array_equal(_embedding(folder), before)


def test_first_export_that_fails_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint_io, "save_safetensors",
                      lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
  with pytest.raises(OSError):
    export_hf(str(tmp_path / "lm"), CFG, _params(0))
  assert os.listdir(tmp_path) == []


def test_stale_index_is_ignored_for_a_newer_single_file(tmp_path):
  sharded, single = str(tmp_path / "sharded"), str(tmp_path / "single")
  export_hf(sharded, CFG, _params(0), max_shard_bytes=4_000)
  export_hf(single, CFG, _params(1))
  assert os.path.exists(os.path.join(sharded, checkpoint_io.INDEX_FILE))
  # A folder first written sharded, then re-written as one file by a tool that
  # does not clean up: the index and its shards are stale.
  stale = os.path.join(single, checkpoint_io.INDEX_FILE)
  for name in os.listdir(sharded):
    if name.startswith("model-") or name == checkpoint_io.INDEX_FILE:
      os.link(os.path.join(sharded, name), os.path.join(single, name))
  old = time.time() - 60
  os.utime(stale, (old, old))
  np.testing.assert_array_equal(_embedding(single), np.asarray(_params(1)["embed_tokens"]["embedding"]))


def test_index_naming_a_missing_shard_is_refused(tmp_path):
  folder = str(tmp_path / "sharded")
  export_hf(folder, CFG, _params(0), max_shard_bytes=4_000)
  with open(os.path.join(folder, checkpoint_io.INDEX_FILE)) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(os.path.join(folder, shard))
  with pytest.raises(FileNotFoundError, match=shard):
    load_pretrained(folder)


# --------------------------------------------------------- training runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(corpus, **overrides):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny  # pylint: disable=import-outside-toplevel

  data_dir, tok_dir, _ = corpus
  c = tiny.get_config()
  c.data.data_dir = data_dir
  c.model.tokenizer = tok_dir
  c.mesh.shape = (1, 1, 1)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _train_steps(trainer, n):
  for _ in range(n):
    trainer.train_one(next(trainer.data.train))


def _save(trainer):
  assert trainer.checkpoints.save(trainer.state, {"data_state": trainer.data.train.get_state()})
  trainer.checkpoints.wait()


def test_changed_config_is_refused_unless_the_policy_allows_it(tiny_corpus, tmp_path):
  from speechjax.train import build_trainer
  from speechjax.trainer.config_record import ConfigChangedError

  workdir = str(tmp_path / "run")
  first = build_trainer(_tiny(tiny_corpus), workdir)
  _train_steps(first, 2)
  _save(first)
  first.close()
  started = open(os.path.join(workdir, "config.0.json")).read()

  with pytest.raises(ConfigChangedError) as refused:
    build_trainer(_tiny(tiny_corpus, **{"lora.rank": 8, "optim.lr": 1e-2}), workdir)
  message = str(refused.value)
  assert "step 2" in message and "config.0.json" in message
  assert "lora.rank: 4 (checkpoint) -> 8 (now)" in message
  assert "optim.lr: 0.003 (checkpoint) -> 0.01 (now)" in message
  assert "resume_policy=allow_changes" in message and "train.num_steps" in message
  assert sorted(f for f in os.listdir(workdir) if f.startswith("config")) == ["config.0.json",
                                                                               "config.json"]

  # The keys that may change on resume: longer run, other logging/eval/checkpoint
  # cadence, another mesh shape.
  free = build_trainer(_tiny(tiny_corpus, **{"train.num_steps": 40, "logging.every_steps": 5,
                                             "eval.every_steps": 7, "checkpoint.keep": 5,
                                             "mesh.shape": (2, 1, 1)}), workdir)
  assert free.step == 2
  free.close()
  assert json.load(open(os.path.join(workdir, "config.2.json")))["train"]["num_steps"] == 40

  allowed = build_trainer(_tiny(tiny_corpus, **{"optim.lr": 1e-2,
                                                "resume_policy": "allow_changes"}), workdir)
  assert allowed.step == 2
  allowed.close()
  # Every start is on record, the first one untouched; config.json is the latest.
  assert open(os.path.join(workdir, "config.0.json")).read() == started
  assert json.load(open(os.path.join(workdir, "config.2-2.json")))["optim"]["lr"] == 1e-2
  assert json.load(open(os.path.join(workdir, "config.json")))["optim"]["lr"] == 1e-2


def test_unreadable_latest_checkpoint_falls_back_to_the_newest_readable(tiny_corpus, tmp_path,
                                                                        caplog):
  from speechjax.train import build_trainer

  workdir = str(tmp_path / "run")
  trainer = build_trainer(_tiny(tiny_corpus), workdir)
  _train_steps(trainer, 2)
  _save(trainer)
  at_step_2 = [np.asarray(x) for x in jax.tree_util.tree_leaves(trainer.state["trainable"])]
  _train_steps(trainer, 2)
  _save(trainer)
  trainer.close()
  # Damage step 4 on disk: one of its array files is lost.
  step_4 = os.path.join(workdir, "checkpoints", "last", "4", "trainable")
  data_files = [os.path.join(d, f) for d, _, files in os.walk(step_4) for f in files
                if "d" in os.path.relpath(d, step_4).split(os.sep)]
  assert data_files, os.listdir(step_4)
  for path in data_files:
    os.remove(path)

  with caplog.at_level(logging.WARNING, logger="speechjax"):
    resumed = build_trainer(_tiny(tiny_corpus), workdir)
  assert resumed.step == 2
  for x, y in zip(at_step_2, jax.tree_util.tree_leaves(resumed.state["trainable"])):
    np.testing.assert_array_equal(x, np.asarray(y))
  assert "checkpoint at step 4 is unreadable, skipped" in caplog.text
  moved = os.listdir(os.path.join(workdir, "checkpoints", "unreadable"))
  assert len(moved) == 1 and moved[0].startswith("last-4-")
  # Step 4 is trained and saved again, not skipped as already there.
  _train_steps(resumed, 2)
  assert resumed.checkpoints.save(resumed.state, {"data_state": resumed.data.train.get_state()})
  resumed.close()


def test_sigterm_at_a_checkpoint_step_saves_once_and_returns(tiny_corpus, tmp_path):
  """The signal lands while step 10 runs; step 10 is also a checkpoint step,
  so the preemption save finds the step already saved."""
  from speechjax.train import build_trainer
  from speechjax.trainer import checkpoint as ckpt_lib

  workdir = str(tmp_path / "run")
  trainer = build_trainer(_tiny(tiny_corpus, **{"checkpoint.every_steps": 5,
                                                "logging.every_steps": 5}), workdir)
  clean, drawn = trainer.data.train, []

  class SignalAtTen:
    def __next__(self):
      drawn.append(1)
      if len(drawn) == 10:
        os.kill(os.getpid(), signal.SIGTERM)
      return next(clean)

    def get_state(self):
      return clean.get_state()

    def set_state(self, state):
      clean.set_state(state)

  trainer.data.train = SignalAtTen()
  summary = trainer.run()
  assert summary["stopped_by"] == "signal" and summary["final_step"] == 10
  assert sorted(ckpt_lib.Checkpoints(workdir).last.all_steps()) == [5, 10]


def _run_train(corpus, workdir, *extra, env=None):
  data_dir, tok_dir, _ = corpus
  args = [sys.executable, "-m", "speechjax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", f"--config.model.tokenizer={tok_dir}",
          "--config.checkpoint.every_steps=5", *extra]
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})})


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == "train":
        out[record["step"]] = record["loss"]
  return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory):
  """The training run the interrupted ones are compared with (built once per session)."""
  def build(folder):
    result = _run_train(tiny_corpus, str(folder / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {str(step): loss for step, loss in _losses(str(folder / "run")).items()}

  return {int(step): loss for step, loss in tiny_runs.build_once(tmp_path_factory, "uninterrupted", build).items()}


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync_save", "async_save"])
def test_kill_during_a_save_resumes_from_the_last_complete_checkpoint(
    tiny_corpus, tmp_path, uninterrupted, async_save):
  from speechjax.trainer import checkpoint as ckpt_lib

  workdir = str(tmp_path / "run")
  flag = f"--config.checkpoint.async_save={async_save}"
  killed = _run_train(tiny_corpus, workdir, flag, env={"SPEECHJAX_KILL_DURING_CHECKPOINT": "10"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  # The save of step 10 never completed: it is not a checkpoint, step 5 is.
  assert ckpt_lib.Checkpoints(workdir).latest_step() == 5
  resumed = _run_train(tiny_corpus, workdir, flag)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  losses = _losses(workdir)  # steps 6-10 are logged twice; the resumed run's win
  assert sorted(losses) == list(range(1, 21))
  for step in range(1, 21):
    assert losses[step] == pytest.approx(uninterrupted[step], rel=1e-6), step
  assert ckpt_lib.Checkpoints(workdir).latest_step() == 20
