"""Helpers for tests that start real training runs as subprocesses
(`python -m speechjax.train`, launch/local.sh, speechjax.sweep): a config file
for a speech LLM small enough to train 10 steps in seconds, and the environment
the subprocesses need (their own fake-device count, CPU, no network)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = '''"""A speech LLM of a few thousand parameters, for subprocess tests."""
from speechjax.config_base import base_config, decoder_section


def get_config(arg=None):
  c = base_config()
  c.model.encoder.update(d_model=32, num_layers=1, num_heads=2, ffn_dim=64)
  c.model.projector.update(hidden_dim=32, stack_factor=4)
  c.model.decoder = decoder_section("llama", vocab_size=512, hidden_size=32, intermediate_size=64,
                                    num_layers=1, num_heads=2, num_kv_heads=1)
  c.model.tokenizer = {tokenizer!r}
  c.data.data_dir = {data_dir!r}
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.tasks = ("asr",)
  c.data.task_weights = (1.0,)
  c.data.audio_buckets_seconds = (5.0,)
  c.data.token_buckets = (128,)
  c.data.worker_threads = 1
  c.data.prefetch_batches = 2
  c.train.num_steps = 10
  # A constant schedule keeps num_steps out of the compiled step, so a run
  # resumed with more steps reuses the compilation cache.
  c.optim.update(lr=1e-3, warmup_steps=2, schedule="constant")
  c.eval.every_steps = 10
  c.eval.max_batches = 1
  c.eval.task_metrics = False
  c.eval.decode.max_new_tokens = 4
  c.checkpoint.every_steps = 10
  c.checkpoint.keep = 2
  c.logging.every_steps = 1
  c.logging.tensorboard = False
  c.logging.progress_bar = False
  return c
'''


def write_config(path, data_dir: str, tokenizer: str) -> str:
  with open(path, "w") as f:
    f.write(_CONFIG.format(data_dir=data_dir, tokenizer=tokenizer))
  return str(path)


def subprocess_env(devices: int = 1, **extra) -> dict[str, str]:
  """This test process' environment, but with `devices` fake CPU devices (the
  test session itself runs with 8, set in conftest)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHON=sys.executable)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH", "")] if p])
  env.update(extra)
  return env


def run(cmd, *, env, timeout: float = 600, log_path=None) -> subprocess.CompletedProcess:
  """Runs a command from the repository root; on failure the assertion shows
  the end of its output."""
  result = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
  if log_path is not None:
    with open(log_path, "w") as f:
      f.write(result.stdout)
  assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout[-4000:]}"
  return result


def read_metrics(workdir, split: str = "train") -> dict[int, dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r for r in records if r["split"] == split}


def compile_cache(tmp_path_factory) -> str:
  """One persistent compilation cache for every subprocess run of the test
  session: runs with the same shapes and device count compile once."""
  return str(tmp_path_factory.getbasetemp() / "compile_cache")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tiny_task_config(data_dir: str, name: str, tokenizer: str, tasks, *, steps: int = 6, **data):
  """configs/tiny.py on a built dataset `name` (eval and test split 'test'), trained on
  `tasks` (equal weights) for `steps` steps with one checkpoint at the end; `data`
  overrides more data fields (e.g. token_buckets)."""
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import tiny  # pylint: disable=import-outside-toplevel

  config = tiny.get_config()
  config.data.update(data_dir=data_dir, name=name, eval_split="test", test_split="test", tasks=tuple(tasks),
                     task_weights=(1.0,) * len(tasks), **data)
  config.model.tokenizer = tokenizer
  config.train.num_steps = steps
  config.checkpoint.update(every_steps=steps, async_save=False)
  config.logging.tensorboard = False
  return config


def build_once(tmp_path_factory, name: str, build) -> dict:
  """A module fixture's expensive result, built once per test session however
  many xdist workers ask for it: the first builds it with `build(folder)` (a
  JSON-able dict) in a folder all workers share, holding a lock; the others
  wait on the lock and read the stored result. A failed build stores nothing
  and fails in every worker that asks."""
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest-N/, above popen-gwK/
  folder = shared / name
  with open(f"{folder}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = folder / "built.json"
    if done.exists():
      return json.loads(done.read_text())
    folder.mkdir(exist_ok=True)
    result = build(folder)
    done.write_text(json.dumps(result))
    return result
