"""The training engine end to end on a tiny speech LLM and the real data
pipeline: sharding equivalence, optimizer state, exact resume after a hard
kill, preemption, NaN guard, config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from speechjax import parallel
from speechjax.train import build_trainer
from speechjax.trainer import checkpoint as ckpt_lib
from speechjax.trainer.loop import NonFiniteLossError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402  pylint: disable=wrong-import-position


def tiny_config(corpus, **overrides):
  data_dir, tok_dir, _ = corpus
  c = tiny.get_config()
  c.data.data_dir = data_dir
  c.model.tokenizer = tok_dir
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def cli_args(corpus, workdir, *extra):
  data_dir, tok_dir, _ = corpus
  return [sys.executable, "-m", "speechjax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", f"--config.model.tokenizer={tok_dir}", *extra]


def run_cli(args, env=None, **kwargs):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def logged(workdir, split="train", key="loss"):
  """{step: value}, the last record per step winning (a resumed run re-logs)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r["split"] == split and key in r:
        out[r["step"]] = r[key]
  return out


def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_mesh_2x2x2_matches_one_device(tiny_corpus, tmp_path):
  one = build_trainer(tiny_config(tiny_corpus, **{"mesh.shape": (1, 1, 1)}), str(tmp_path / "one"))
  eight = build_trainer(tiny_config(tiny_corpus, **{"mesh.shape": (2, 2, 2)}), str(tmp_path / "eight"))
  assert len(one.mesh.devices.flat) == 1 and eight.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  # Weights really are split over the mesh.
  specs = {x.sharding.spec for x in jax.tree_util.tree_leaves(eight.frozen)}
  assert any(any(a is not None for a in spec) for spec in specs)
  for step in range(20):
    batch = next(one.data.train)
    a = float(one.train_one(batch)["loss"])
    b = float(eight.train_one(batch)["loss"])
    assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
  for x, y in zip(leaves(one.state["trainable"]), leaves(eight.state["trainable"])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)

  # A checkpoint written on the 8-device mesh restores onto one device.
  assert eight.checkpoints.save(eight.state, {"data_state": eight.data.train.get_state()})
  eight.checkpoints.wait()
  restored = build_trainer(tiny_config(tiny_corpus, **{"mesh.shape": (1, 1, 1)}), str(tmp_path / "eight"))
  assert restored.step == 20
  for x, y in zip(leaves(eight.state["trainable"]), leaves(restored.state["trainable"])):
    np.testing.assert_array_equal(x, y)
  assert len(jax.tree_util.tree_leaves(restored.state["trainable"])[0].sharding.device_set) == 1


def test_optimizer_state_holds_only_trainables(tiny_corpus, tmp_path):
  trainer = build_trainer(tiny_config(tiny_corpus), str(tmp_path / "run"))
  trainable = jax.tree_util.tree_leaves(trainer.state["trainable"])
  frozen = jax.tree_util.tree_leaves(trainer.frozen)
  moments = [x for x in jax.tree_util.tree_leaves(trainer.state["opt_state"]) if x.ndim > 0]
  # AdamW: one first and one second moment per trainable leaf, nothing else.
  assert len(moments) == 2 * len(trainable)
  assert sum(x.nbytes for x in moments) == 2 * sum(x.nbytes for x in trainable)
  assert sum(x.size for x in frozen) > 5 * sum(x.size for x in trainable)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainer.state["trainable"])[0]]
  assert all("lora" in p or "projector" in p for p in paths), paths


def test_one_cpu_device_step_compiles_with_the_memory_optimised_schedule(tiny_corpus, tmp_path):
  # XLA:CPU's own choice for this step (a concurrency-ordered schedule) keeps
  # more temporaries alive; the trainer asks for the memory-optimised one.
  trainer = build_trainer(tiny_config(tiny_corpus, **{"mesh.shape": (1, 1, 1), "train.mode": "full"}),
                          str(tmp_path / "run"))
  batch = next(trainer.data.train)
  trainer.compile(batch)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                    parallel.shard_batch(batch, trainer.mesh, trainer.rules))
  with trainer._context():  # pylint: disable=protected-access
    xla_default = trainer.train_step.lower(trainer.state, trainer.frozen, abstract).compile(
        {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"}).memory_analysis()
  ours = trainer.memory_analysis.temp_size_in_bytes
  assert ours < 0.85 * xla_default.temp_size_in_bytes, (ours, xla_default.temp_size_in_bytes)


def test_resume_after_hard_kill_is_exact(tiny_corpus, tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  result = run_cli(cli_args(tiny_corpus, straight))
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_cli(cli_args(tiny_corpus, killed), env={"SPEECHJAX_KILL_AFTER_CHECKPOINT": "10"})
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert ckpt_lib.Checkpoints(killed).latest_step() == 10
  result = run_cli(cli_args(tiny_corpus, killed))
  assert result.returncode == 0, result.stderr[-3000:]

  a, b = logged(straight), logged(killed)
  assert sorted(a) == list(range(1, 21)) and sorted(b) == list(range(1, 21))
  for step in range(1, 21):
    assert a[step] == pytest.approx(b[step], rel=1e-6), step
  trainer_cfg = tiny_config(tiny_corpus)
  template = build_trainer(trainer_cfg, str(tmp_path / "template")).state["trainable"]
  ta, _, sa = ckpt_lib.restore_trainable(straight, template, "last")
  tb, _, sb = ckpt_lib.restore_trainable(killed, template, "last")
  assert sa == sb == 20
  for x, y in zip(leaves(ta), leaves(tb)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_sigterm_checkpoints_and_exits_cleanly(tiny_corpus, tmp_path):
  workdir = str(tmp_path / "run")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.Popen(cli_args(tiny_corpus, workdir, "--config.train.num_steps=100000",
                                   "--config.checkpoint.every_steps=100000"),
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  step = ckpt_lib.Checkpoints(workdir).latest_step()
  assert step is not None and step >= 3
  assert max(logged(workdir)) == step  # the checkpoint holds the last step trained
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints", "last")) if "tmp" in d]


class PoisonedFrom:
  """The clean iterator's batches, with features full of NaN from batch `first_bad` on."""

  def __init__(self, clean, first_bad: int):
    self.clean, self.first_bad, self.n = clean, first_bad, 0

  def __next__(self):
    batch = next(self.clean)
    self.n += 1
    if self.n >= self.first_bad:
      batch["features"] = np.full_like(batch["features"], np.nan)
    return batch

  def get_state(self):
    return self.clean.get_state()

  def set_state(self, state):
    self.clean.set_state(state)


def test_nan_guard_stops_with_last_good_checkpoint(tiny_corpus, tmp_path):
  workdir = str(tmp_path / "run")
  trainer = build_trainer(tiny_config(tiny_corpus, **{"train.max_bad_steps": 3, "logging.every_steps": 1,
                                                      "checkpoint.every_steps": 2}), workdir)
  # Clean batches for 4 steps, then features full of NaN.
  trainer.data.train = PoisonedFrom(trainer.data.train, first_bad=5)
  with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
    trainer.run()
  assert int(trainer.state["skipped"]) == 3
  assert ckpt_lib.Checkpoints(workdir).latest_step() == 4
  skipped = logged(workdir, key="skipped_steps")
  assert skipped[5] == 1 and skipped[7] == 1


def test_nan_guard_decides_every_step_not_only_at_log_steps(tiny_corpus, tmp_path):
  workdir = str(tmp_path / "run")
  trainer = build_trainer(tiny_config(tiny_corpus, **{"train.max_bad_steps": 3, "logging.every_steps": 100,
                                                      "checkpoint.every_steps": 100}), workdir)
  trainer.data.train = PoisonedFrom(trainer.data.train, first_bad=5)
  with pytest.raises(NonFiniteLossError) as stopped:
    trainer.run()
  # Steps 5, 6, 7 were non-finite; the guard reads a step once the next one is
  # queued, so the run stops at step 8 at the latest, not at the log step.
  assert "3 consecutive steps" in str(stopped.value) and "steps 5-7" in str(stopped.value)
  assert "the last finite loss was" in str(stopped.value) and "at step 4" in str(stopped.value)
  assert trainer.step <= 8


def test_early_stopping_never_takes_nan_as_best():
  from speechjax.trainer.loop import EarlyStopping

  stopper = EarlyStopping("loss", "min", patience=3)
  assert stopper.update({"loss": float("nan")}) is False
  assert stopper.best is None and stopper.bad_evals == 1
  assert stopper.update({"loss": 2.0}) is True and stopper.best == 2.0
  assert stopper.update({"loss": float("nan")}) is False and stopper.best == 2.0
  assert stopper.update({"loss": 1.5}) is True
  assert EarlyStopping("loss", "min", 3, {"best": float("nan"), "bad_evals": 0}).best is None


def test_float16_is_refused_with_a_pointer_to_bfloat16(tiny_corpus, tmp_path):
  from speechjax.trainer.loop import Trainer

  config = tiny_config(tiny_corpus, **{"model.dtype": "float16"})
  with pytest.raises(ValueError, match="model.dtype='float16'.*model.dtype='bfloat16'"):
    Trainer(config, str(tmp_path / "run"), bundle=object(), data=object())


def test_unknown_config_key_lists_valid_keys(tiny_corpus, tmp_path):
  result = run_cli(cli_args(tiny_corpus, str(tmp_path / "run"), "--config.optim.lrr=1e-3"))
  assert result.returncode != 0
  assert "unknown config key(s): optim.lrr" in result.stderr
  assert "optim.lr\n" in result.stderr and "train.num_steps" in result.stderr
