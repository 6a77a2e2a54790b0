"""A run folder is self-contained: copied or moved together with the neighbours
its config names, it still evaluates and transcribes from any working directory;
paths in a config expand `~` and environment variables."""

import json
import os
import shutil
import sys

import ml_collections
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.slow  # trains a run: ~2 min on 2 shared cores
def test_moved_run_folder_evaluates_and_transcribes_from_another_cwd(tiny_corpus, tmp_path, monkeypatch):
  from speechjax.evaluate import evaluate_run
  from speechjax.train import build_trainer
  from speechjax.transcriber import Transcriber

  data_dir, tok_dir, corpus_root = tiny_corpus
  # The layout of runs/demo: the run's inputs beside it, named relative to the launch folder.
  project = tmp_path / "project"
  shutil.copytree(tok_dir, project / "tokenizer")
  shutil.copytree(data_dir, project / "data" / "tfds")
  monkeypatch.chdir(project)
  config = tiny.get_config()
  config.data.data_dir = "data/tfds"
  config.model.tokenizer = "tokenizer"
  config.train.num_steps = 2
  config.checkpoint.every_steps = 2
  config.logging.tensorboard = False
  build_trainer(config, "runs/asr").run()
  with open(project / "runs" / "asr" / "config.json") as f:
    assert json.load(f)["model"]["tokenizer"] == "tokenizer"  # the config as launched
  with open(project / "runs" / "asr" / "paths.json") as f:
    assert json.load(f) == {"data.data_dir": "../../data/tfds", "model.tokenizer": "../../tokenizer"}

  moved = tmp_path / "elsewhere" / "copy"
  shutil.copytree(project, moved)
  shutil.rmtree(project)
  elsewhere = tmp_path / "unrelated_cwd"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  run_dir = str(moved / "runs" / "asr")
  summary = evaluate_run(run_dir, split="test", max_examples=4, progress=False)
  assert summary["num_examples"] == 4
  assert os.path.exists(os.path.join(run_dir, "eval", "test.json"))
  with open(os.path.join(corpus_root, "test.jsonl")) as f:
    wav = os.path.join(corpus_root, json.loads(f.readline())["audio"])
  [(path, text, error)] = Transcriber(run_dir)([wav])
  assert path == wav and error is None and isinstance(text, str)


def test_paths_expand_home_and_variables_and_resolve_against_the_run_folder(tmp_path, monkeypatch):
  from speechjax import run_paths

  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("SPEECHJAX_TEST_DATA", str(tmp_path / "store"))
  config = ml_collections.ConfigDict({
      "compile_cache_dir": "~/xla_cache",
      "model": {"tokenizer": "$SPEECHJAX_TEST_DATA/tok", "encoder_pretrained": "openai/whisper-tiny",
                "decoder_pretrained": ""},
      "data": {"data_dir": "${SPEECHJAX_TEST_DATA}/tfds", "train_split": "~/a.jsonl+~/b.jsonl",
               "eval_split": "dev", "test_split": "test", "lm_text_manifest": ""}})
  run_paths.expand_config_paths(config)
  assert config.compile_cache_dir == str(tmp_path / "home" / "xla_cache")
  assert config.model.tokenizer == str(tmp_path / "store" / "tok")
  assert config.data.data_dir == str(tmp_path / "store" / "tfds")
  assert config.data.train_split == f"{tmp_path}/home/a.jsonl+{tmp_path}/home/b.jsonl"
  assert config.model.encoder_pretrained == "openai/whisper-tiny"  # a hub id stays as given
  assert config.data.eval_split == "dev"

  # Every local path that exists is recorded relative to the run folder; a hub id,
  # or a path that does not exist, is not.
  (tmp_path / "store" / "tok").mkdir(parents=True)
  (tmp_path / "home").mkdir()
  for name in ("a.jsonl", "b.jsonl"):
    (tmp_path / "home" / name).write_text("")
  relative = run_paths.run_relative_paths(config, str(tmp_path / "home" / "run"))
  assert relative == {"data.train_split": "../a.jsonl+../b.jsonl", "model.tokenizer": "../../store/tok"}

  # Read back against where the run folder is now, else where the config said.
  moved = tmp_path / "moved"
  (moved / "run").mkdir(parents=True)
  (moved / "a.jsonl").write_text("")
  (moved / "b.jsonl").write_text("")
  with open(moved / "run" / "paths.json", "w") as f:
    json.dump(relative, f)
  run_paths.resolve(config, str(moved / "run"))
  assert config.data.train_split == f"{moved}/a.jsonl+{moved}/b.jsonl"
  assert config.model.tokenizer == str(tmp_path / "store" / "tok")  # not moved: as configured
  assert config.model.encoder_pretrained == "openai/whisper-tiny"
