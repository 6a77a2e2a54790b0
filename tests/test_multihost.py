"""Multi-host training on one machine: processes on 127.0.0.1 with their own
fake CPU devices, started by launch/local.sh, must train exactly what one
process with all the devices trains, write one set of files, and leave a
checkpoint that a run with another process layout resumes from."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import tiny_runs

LOCAL_SH = os.path.join(tiny_runs.REPO, "launch", "local.sh")


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
  """One process x 4 devices and 2 processes x 2 devices, 10 steps each
  (built once per session: both xdist workers read the same runs)."""
  data_dir, tokenizer, _ = tiny_corpus

  def build(root):
    config = tiny_runs.write_config(root / "tiny.py", data_dir, tokenizer)
    cache = tiny_runs.compile_cache(tmp_path_factory)
    one, two = str(root / "one_process"), str(root / "two_processes")
    env = tiny_runs.subprocess_env()
    tiny_runs.run(["bash", LOCAL_SH, "-d", "4", f"--config={config}", f"--workdir={one}",
                   f"--config.compile_cache_dir={cache}"], env=env, log_path=root / "one.log")
    result = tiny_runs.run(
        ["bash", LOCAL_SH, "-n", "2", "-d", "2", "--port", str(tiny_runs.free_port()),
         "--log_dir", str(root / "logs"), "--", f"--config={config}", f"--workdir={two}"],
        env=env, log_path=root / "two.log")
    return dict(root=str(root), config=config, cache=cache, one=one, two=two, two_output=result.stdout)

  built = tiny_runs.build_once(tmp_path_factory, "multihost", build)
  return {**built, "root": pathlib.Path(built["root"])}


def test_two_processes_train_what_one_process_trains(runs):
  one = tiny_runs.read_metrics(runs["one"])
  two = tiny_runs.read_metrics(runs["two"])
  assert sorted(one) == sorted(two) == list(range(1, 11))  # logging.every_steps=1, one writer
  # The same global batches in the same order: equal up to float32 summation
  # order (gloo's cross-process all-reduce adds the per-device partial sums in
  # another order than one process' in-process reduction). Another data order
  # would show in the 3rd digit from the first step on.
  for step in one:
    np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=2e-6, err_msg=f"step {step}")
    np.testing.assert_allclose(two[step]["grad_norm"], one[step]["grad_norm"], rtol=1e-4)
  dev_one, dev_two = tiny_runs.read_metrics(runs["one"], "dev"), tiny_runs.read_metrics(runs["two"], "dev")
  np.testing.assert_allclose(dev_two[10]["loss"], dev_one[10]["loss"], rtol=1e-5)
  # One writer (process 0): each step logged once; process 1 logged no progress.
  with open(os.path.join(runs["two"], "metrics.jsonl")) as f:
    assert len([line for line in f if line.strip()]) == 11  # 10 train + 1 dev
  assert os.path.exists(os.path.join(runs["two"], "config.json"))
  assert os.path.isdir(os.path.join(runs["two"], "checkpoints", "last", "10"))
  assert "loop.py" not in open(runs["root"] / "logs" / "process_1.log").read()


def test_two_process_checkpoint_resumes_in_one_process(runs):
  """The 2x2 checkpoint restores onto a 1x4 mesh and training goes on to step
  12; the compilation cache the first one-process run filled is used."""
  assert any(name.startswith("jit_train_step") for name in os.listdir(runs["cache"]))
  resumed = str(runs["root"] / "resumed")
  shutil.copytree(runs["two"], resumed)
  result = tiny_runs.run(
      ["bash", LOCAL_SH, "-d", "4", f"--config={runs['config']}", f"--workdir={resumed}",
       "--config.train.num_steps=12", f"--config.compile_cache_dir={runs['cache']}"],
      env=tiny_runs.subprocess_env(JAX_LOG_COMPILES="1"), log_path=runs["root"] / "resumed.log")
  assert "Persistent compilation cache hit for 'jit_train_step'" in result.stdout
  # Resumed, not restarted: steps 1-10 are the 2-process run's, logged once each.
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  steps = [r["step"] for r in records if r["split"] == "train"]
  assert steps == list(range(1, 13))
  train = tiny_runs.read_metrics(resumed)
  assert all(np.isfinite(train[s]["loss"]) for s in (11, 12))
  assert os.path.isdir(os.path.join(resumed, "checkpoints", "last", "12"))


def test_two_processes_evaluate_what_one_process_evaluates(runs):
  """evaluate on 2 hosts x 2 devices: each host decodes its half of the test
  rows, and process 0 writes the same predictions and scores, in the same
  order, as one process with 4 devices writes; so it does with the tensor
  axis across the hosts, where both decode every row."""
  workdir, env = runs["two"], tiny_runs.subprocess_env()
  common = ["--module", "speechjax.evaluate", "--", f"--workdir={workdir}", "--split=test",
            "--checkpoint=last", "--max_examples=24"]
  tiny_runs.run(["bash", LOCAL_SH, "-d", "4"] + common + ["--name=one_host"], env=env,
                log_path=runs["root"] / "eval_one.log")
  tiny_runs.run(["bash", LOCAL_SH, "-n", "2", "-d", "2", "--port", str(tiny_runs.free_port()),
                 "--log_dir", str(runs["root"] / "eval_logs")] + common + ["--name=two_hosts"],
                env=env, log_path=runs["root"] / "eval_two.log")
  out = os.path.join(workdir, "eval")

  def read(name):
    with open(os.path.join(out, f"{name}.json")) as f:
      summary = json.load(f)
    with open(os.path.join(out, f"{name}.predictions.jsonl")) as f:
      return summary, [json.loads(line) for line in f]

  one, one_rows = read("one_host")
  two, two_rows = read("two_hosts")
  assert len(one_rows) == one["num_examples"] > 8  # more than one batch of 8
  assert two_rows == one_rows  # same rows, same order, same answers
  assert {k: v for k, v in two.items() if k != "rows_decoded_per_host"} == \
      {k: v for k, v in one.items() if k != "rows_decoded_per_host"}
  assert one["rows_decoded_per_host"] == [one["num_examples"]]
  # Each host decoded its 4 rows of every batch of 8 (the last batch's padding rows are not answers).
  assert sum(two["rows_decoded_per_host"]) == two["num_examples"]
  assert all(0 < n < two["num_examples"] for n in two["rows_decoded_per_host"])
  # One writer: process 1 wrote no files (only process 0's names are there) and printed no summary.
  assert sorted(n for n in os.listdir(out) if n.startswith("two_hosts")) == [
      "two_hosts.json", "two_hosts.predictions.jsonl", "two_hosts.report.md"]
  assert '"num_examples"' not in open(runs["root"] / "eval_logs" / "process_1.log").read()

  # Tensor parallelism across both hosts (batch axes of size 1): each host holds
  # every row, so both decode all of them together, and the files are the same.
  tiny_runs.run(["bash", LOCAL_SH, "-n", "2", "-d", "2", "--port", str(tiny_runs.free_port()),
                 "--log_dir", str(runs["root"] / "eval_tp_logs")] + common + ["--name=tensor_across_hosts",
                                                                              "--mesh=1,1,4"],
                env=env, log_path=runs["root"] / "eval_tp.log")
  tp, tp_rows = read("tensor_across_hosts")
  assert tp_rows == one_rows
  assert {k: v for k, v in tp.items() if k != "rows_decoded_per_host"} == \
      {k: v for k, v in one.items() if k != "rows_decoded_per_host"}
  assert tp["rows_decoded_per_host"] == [tp["num_examples"]] * 2


@pytest.mark.slow
def test_sigterm_on_one_host_stops_every_host_at_one_step(runs):
  """SIGTERM reaches process 1 only: both processes agree on one step, save one
  complete checkpoint of it together and exit 0 (no process is left waiting
  in a collective for the one that stopped)."""
  workdir = str(runs["root"] / "preempted")
  port = tiny_runs.free_port()
  env = tiny_runs.subprocess_env(devices=2)
  procs = []
  for i in range(2):
    cmd = [env["PYTHON"], "-m", "speechjax.train", f"--config={runs['config']}", f"--workdir={workdir}",
           "--config.train.num_steps=100000", "--config.checkpoint.every_steps=100000",
           "--config.eval.every_steps=0", f"--config.compile_cache_dir={runs['cache']}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, cwd=tiny_runs.REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  try:
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
        break
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=400)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  summaries = [json.loads([line for line in out.splitlines() if line.startswith('{"final_step"')][-1])
               for out in outputs]
  assert [s["stopped_by"] for s in summaries] == ["signal", "signal"]
  step = summaries[0]["final_step"]
  assert summaries[1]["final_step"] == step and step >= 3
  last = os.path.join(workdir, "checkpoints", "last")
  assert sorted(os.listdir(last)) == [str(step)]  # one complete checkpoint, no temporary folder
  assert max(tiny_runs.read_metrics(workdir)) == step


def test_local_sh_fails_when_a_process_fails(tmp_path):
  env = tiny_runs.subprocess_env()
  result = subprocess.run(
      ["bash", LOCAL_SH, "-n", "2", "--log_dir", str(tmp_path), "--",
       f"--config={tmp_path / 'missing.py'}", f"--workdir={tmp_path / 'w'}"],
      cwd=tiny_runs.REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert "failed" in result.stderr
  help_text = subprocess.run(["bash", LOCAL_SH, "--help"], capture_output=True, text=True,
                             check=True).stdout
  assert "--num_processes" in help_text


def test_hosts_feed_their_rows_of_the_one_process_batches(tiny_corpus):
  """What each of 2 hosts feeds, stacked in process order, is the batch one
  process makes: same examples, same order, same padded shapes (the bucket is
  the global batch's, so hosts never disagree on shapes)."""
  import grain
  from transformers import AutoTokenizer

  from speechjax.data import config as data_config
  from speechjax.data import pipeline, sources

  data_dir, tokenizer, _ = tiny_corpus
  config = data_config.default_data_config()
  config.update(data_dir=data_dir, batch_size=8, eval_batch_size=8, worker_threads=1,
                audio_buckets_seconds=(2.0, 3.0, 4.0, 5.0), token_buckets=(32, 48, 64, 128))
  tok = AutoTokenizer.from_pretrained(tokenizer)
  audio_tokens = lambda frames: (frames + 1) // 2 // 4
  source, info = sources.open_source(config, "train")
  hosts = [grain.sharding.ShardOptions(i, 2, drop_remainder=True) for i in range(2)]

  def first(shard, n=4):
    iterator = pipeline.make_train_iterator(source, info, tok, audio_tokens, config,
                                            shard_options=shard)
    return [next(iterator) for _ in range(n)]

  single = first(grain.sharding.NoSharding())
  per_host = [first(shard) for shard in hosts]
  for k, batch in enumerate(single):
    for key in pipeline.BATCH_KEYS:
      parts = [h[k][key] for h in per_host]
      assert parts[0].shape == parts[1].shape, (k, key)
      np.testing.assert_array_equal(np.concatenate(parts), batch[key], err_msg=f"batch {k} {key}")

  dev, dev_info = sources.open_source(config, "dev")
  whole = list(pipeline.make_eval_iterator(dev, dev_info, tok, audio_tokens, config))
  split = [list(pipeline.make_eval_iterator(dev, dev_info, tok, audio_tokens, config,
                                            shard_options=shard)) for shard in hosts]
  assert len(split[0]) == len(split[1]) == len(whole)
  for k, batch in enumerate(whole):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([split[0][k][key], split[1][k][key]]),
                                    batch[key], err_msg=f"dev batch {k} {key}")


def test_initialize_distributed_is_a_no_op_for_one_plain_process(monkeypatch):
  from speechjax import parallel

  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False
  # One SLURM task (salloc + plain python) is not a cluster.
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert parallel.initialize_distributed() is False
  monkeypatch.setenv("SPEECHJAX_DISTRIBUTED", "0")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
  assert parallel.initialize_distributed() is False


def test_slurm_one_task_per_node_keeps_every_gpu(monkeypatch):
  from speechjax import parallel

  local_ids = parallel._slurm_local_device_ids  # pylint: disable=protected-access
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
  monkeypatch.setenv("SLURM_LOCALID", "0")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x2)")
  assert local_ids() == [0, 1, 2, 3]  # one task per node: all of them
  monkeypatch.setenv("SLURM_LOCALID", "1")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4(x2)")
  assert local_ids() == [1]  # one task per GPU
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2")
  assert local_ids() == [2, 3]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # --gpus-per-task=1: the task sees one
  assert local_ids() == [0]
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
  assert local_ids() is None  # CPU: JAX's default


def test_process_rows_of_a_one_process_mesh():
  from speechjax import parallel

  mesh = parallel.make_mesh((-1, 1, 1))
  assert parallel.process_batch_rows(mesh, parallel.DEFAULT_RULES, 16) == slice(0, 16)


def test_slurm_sbatch_runs_train_in_every_task(tmp_path):
  """Run as a plain script with a stand-in `srun` that prints what it was given."""
  stub = tmp_path / "bin"
  stub.mkdir()
  (stub / "srun").write_text('#!/usr/bin/env bash\necho "srun $*"\n')
  (stub / "srun").chmod(0o755)
  env = dict(os.environ, PATH=f"{stub}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_NNODES="2",
             SLURM_NTASKS="2", SPEECHJAX_DIR=str(tmp_path), PYTHON="py")
  script = os.path.join(tiny_runs.REPO, "launch", "slurm.sbatch")
  out = subprocess.run(["bash", script, "--config=c.py:x", "--workdir=/shared/w"], env=env,
                       capture_output=True, text=True, check=True).stdout
  assert out.strip() == "srun --kill-on-bad-exit=1 py -m speechjax.train --config=c.py:x --workdir=/shared/w"
  outside = dict(env)
  outside.pop("SLURM_JOB_ID")
  assert subprocess.run(["bash", script, "--config=c.py"], env=outside, capture_output=True,
                        check=False).returncode == 2


def test_tpu_vm_sh_dry_run_names_only_what_it_was_given():
  script = os.path.join(tiny_runs.REPO, "launch", "tpu_vm.sh")
  out = subprocess.run(
      ["bash", script, "--dry_run", "--name=my-tpu", "--zone=zone-a", "--project=proj", "--create",
       "--accelerator=v4-16", "--version=tpu-ubuntu2204-base", "--delete", "--",
       "--config=configs/demo.py:speech", "--workdir=/mnt/shared/x"],
      capture_output=True, text=True, check=True).stdout.splitlines()
  assert out[0].startswith("gcloud compute tpus tpu-vm create my-tpu --zone=zone-a --project=proj "
                           "--accelerator-type=v4-16 --version=tpu-ubuntu2204-base")
  assert "tpu-vm scp" in out[1] and "--worker=all" in out[1]
  assert "speechjax.train" in out[-2] and "--worker=all" in out[-2]
  assert "--workdir=/mnt/shared/x" in out[-2]
  assert out[-1].startswith("gcloud compute tpus tpu-vm delete my-tpu --zone=zone-a --project=proj")
  missing = subprocess.run(["bash", script, "--dry_run", "--", "--config=c.py"],
                           capture_output=True, text=True, check=False)
  assert missing.returncode == 2 and "--name and --zone" in missing.stderr
