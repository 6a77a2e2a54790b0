"""A tiny speech LLM trained for two steps (configs/tiny.py on the `tiny_corpus`
fixture), built once per test session and shared by the tests of the user-facing
commands (transcribe, export, serve). It transcribes badly; those tests compare
what a command shows with what the library gives for the same input."""

from __future__ import annotations

import os
import shutil
import sys

import tiny_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained_tiny_run(tmp_path_factory, tiny_corpus) -> str:
  """The run folder, trained on first use (by one xdist worker) and reused by
  every later caller."""
  def build(folder):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny  # pylint: disable=import-outside-toplevel

    from speechjax.train import build_trainer

    data_dir, tok_dir, _ = tiny_corpus
    config = tiny.get_config()
    config.data.data_dir = data_dir
    config.model.tokenizer = tok_dir
    config.train.num_steps = 2
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    config.logging.tensorboard = False
    config.eval.decode.max_new_tokens = 6
    run_dir = folder / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a failed earlier build: start over, never resume it
    build_trainer(config, str(run_dir)).run()
    return {"run": str(run_dir)}

  return tiny_runs.build_once(tmp_path_factory, "trained_tiny_run", build)["run"]
