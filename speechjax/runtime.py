"""Process set-up shared by the command-line entry points: multi-host
initialisation, compilation cache, logging, and readable config errors."""

from __future__ import annotations

import logging
import os
import sys

import jax


def define_distributed_flags() -> None:
  """--coordinator_address / --num_processes / --process_id: a multi-process
  job started by hand or by launch/local.sh (other launchers set JAX_* or are
  detected: parallel.initialize_distributed)."""
  from absl import flags
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (0 = auto-detect / single).")
  flags.DEFINE_integer("process_id", -1, "This process' index (-1 = auto-detect).")


def use_compile_cache(cache_dir: str) -> None:
  """XLA's compiled programs are kept in `cache_dir` (nothing when empty), so a
  later process compiling the same program for the same devices reads it."""
  if not cache_dir:
    return
  # A gs:// path works too (shared by the hosts of a pod); abspath would mangle it.
  jax.config.update("jax_compilation_cache_dir", cache_dir if "://" in cache_dir else os.path.abspath(cache_dir))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # JAX's default (1 s) leaves out the log-mel programs of each audio bucket
    # (0.4-0.6 s each on 2 CPU cores), which every decoding start would then compile again.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def setup(config, flags_values=None) -> None:
  from speechjax import parallel, run_paths

  run_paths.expand_config_paths(config)  # `~` and $VARS in every path the run reads
  if flags_values is not None:
    parallel.initialize_distributed(
        getattr(flags_values, "coordinator_address", ""), getattr(flags_values, "num_processes", 0),
        getattr(flags_values, "process_id", -1))
  use_compile_cache(config.get("compile_cache_dir", ""))
  # Our progress at INFO; the libraries' (orbax, tfds) chatter only when it matters.
  logging.getLogger("speechjax").setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)


def write_config(config, workdir: str, step: int = 0) -> None:
  """Process 0 records the config of a start from `step`: W/config.<step>.json
  (never overwriting an older start's record) and W/config.json, the latest
  (speechjax.trainer.config_record)."""
  if jax.process_index() != 0:
    return
  from speechjax import run_paths
  from speechjax.config_base import to_json
  from speechjax.trainer.config_record import record_start

  record_start(workdir, to_json(config), step)
  run_paths.record(config, workdir)  # lets the run folder be copied or moved


def shutdown() -> None:
  """Ends a multi-process run in one order on every process: the caller has
  closed its checkpoint managers (their async saves end in cross-process
  barriers), then jax.distributed shuts down here. Left to interpreter exit,
  the two happen in an order that can differ between processes, and one
  process waits in an orbax barrier while the other waits in JAX's shutdown
  barrier."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def valid_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    if hasattr(v, "items"):
      keys += valid_keys(v, f"{prefix}{k}.")
    else:
      keys.append(f"{prefix}{k}")
  return keys


def _load_config(config_arg: str):
  import importlib.util

  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("_speechjax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def unknown_override_message(config_arg: str, argv: list[str]) -> str | None:
  """Names the `--config.x=y` overrides that are not keys of the config, and
  lists the valid keys; None when every override is a valid key."""
  try:
    keys = valid_keys(_load_config(config_arg))
  except Exception:  # the config file itself is broken: the original error says more
    return None
  overrides = [a.split("=")[0][len("--config."):] for a in argv if a.startswith("--config.")]
  unknown = [k for k in overrides if k not in keys]
  if not unknown:
    return None
  return (f"unknown config key(s): {', '.join(unknown)}\nvalid keys of {config_arg}:\n  "
          + "\n  ".join(keys))


def run_with_config_errors(main) -> None:
  """absl app.run, but an unknown `--config.x=y` names the valid keys."""
  from absl import app

  try:
    app.run(main)
  except SystemExit:
    raise
  except Exception:  # an unknown override surfaces here, from flag parsing
    config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
    message = unknown_override_message(config_arg, sys.argv) if config_arg else None
    if message:
      print(message, file=sys.stderr)
      sys.exit(2)
    raise
