"""`--dry_run`: every split opened, a batch read from each, the tokenizer loaded, the
step lowered without weights; and a clear, early error for each way a recipe's
data settings can be wrong."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import test_recipes  # tests/ is on sys.path: the recipes' toy overrides
import tiny_runs

from speechjax import dry_run
from speechjax.data import build as build_cli

SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-other", "test-clean")


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
  """A LibriSpeech tree of tones (2 speakers, 4 utterances a split), built; and a tokenizer."""
  from speechjax.projects.spoken_commands.tokenizer import domain_texts, train_bpe_tokenizer

  root = tmp_path_factory.mktemp("dry_run")
  for split in SPLITS:
    for speaker, chapter in (("19", "198"), ("84", "121123")):
      folder = root / "raw" / split / speaker / chapter
      folder.mkdir(parents=True)
      lines = []
      for utt in range(2):
        uid = f"{speaker}-{chapter}-{utt:04d}"
        t = np.arange(int((1.0 + 0.3 * utt) * 16000)) / 16000
        sf.write(str(folder / f"{uid}.flac"), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
        lines.append(f"{uid} TURN ON THE LIGHTS")
      (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
  build_cli.main(["librispeech", f"--manual_dir={root / 'raw'}", f"--data_dir={root / 'tfds'}",
                  "--num_workers=1"])
  train_bpe_tokenizer(domain_texts(), vocab_size=320).save_pretrained(str(root / "tokenizer"))
  return str(root / "tfds"), str(root / "tokenizer")


def _slam(librispeech, **extra):
  from transformers import AutoTokenizer

  data_dir, tokenizer = librispeech
  config = test_recipes.load_recipe("slam_asr")
  config.lock()
  vocab = len(AutoTokenizer.from_pretrained(tokenizer))
  config.update_from_flattened_dict({**test_recipes.toy_overrides(data_dir, tokenizer, vocab), **extra})
  return config


def test_dry_run_opens_every_split_and_lowers_the_step(librispeech):
  summary = dry_run.dry_run(_slam(librispeech))
  assert summary["splits_named"] == {"train_split": ["train_clean_100", "train_clean_360", "train_other_500"],
                                     "eval_split": ["dev_other"], "test_split": ["test_clean"]}
  splits = summary["splits"]
  assert splits["train_clean_100+train_clean_360+train_other_500"]["examples"] == 12
  assert splits["dev_other"]["examples"] == 4 and splits["test_clean"]["examples"] == 4
  # A training batch of 8 rows at the smallest of the recipe's buckets (10 s of 128-mel frames).
  assert splits["train_clean_100+train_clean_360+train_other_500"]["batch"]["features"] == [8, 128, 1000]
  assert splits["test_clean"]["batch"]["asr"]["features"] == [8, 128, 1000]
  assert summary["audio"] == {"largest_bucket_samples": 480000, "encoder_inputs": 3000, "encoder_window": 3000}
  assert summary["batch_shards"] == 8 and summary["trainable_params"] > 0
  assert summary["lowered_batch"]["encoder_inputs"] == 3000
  assert "dry run OK" in dry_run.format_summary(summary)


@pytest.mark.parametrize("override,message", [
    ({"data.eval_split": "dev_clean"},
     r"data.eval_split='dev_clean': dataset 'librispeech' .* has no split 'dev_clean'; its splits: dev_other, "
     r"test_clean, train_clean_100"),
    ({"data.train_split": "train_clean100+train_clean_360"}, r"no split 'train_clean100'"),
    ({"data.name": "libri_speech"}, r"data.name='libri_speech'.*datasets there: librispeech"),
    ({"data.batch_size": 12},
     r"data.batch_size=12 does not divide over the mesh's batch axes \(data=1, fsdp=8: 8 shards"),
    ({"data.audio_buckets_seconds": (10.0, 40.0)},
     r"the largest bucket, 40 s, is 4000 mel frames \(hop 160\) but the encoder reads at most 3000 mel "
     r"frames \(max_source_positions=1500: 30 s\)"),
    ({"data.token_buckets": (64, 128)},
     r"the 'asr' prompt takes \d+ tokens \(300 audio slots .*largest token bucket is 128"),
])
def test_dry_run_fails_early_naming_the_setting(librispeech, override, message):
  with pytest.raises(dry_run.DryRunError, match=message):
    dry_run.dry_run(_slam(librispeech, **override))


def test_train_dry_run_command(librispeech, tmp_path):
  """The command a recipe's docstring shows, with the overrides given on the command line."""
  from transformers import AutoTokenizer

  data_dir, tokenizer = librispeech
  vocab = len(AutoTokenizer.from_pretrained(tokenizer))
  overrides = [f"--config.{k}={v}" for k, v in test_recipes.toy_overrides(data_dir, tokenizer, vocab).items()
               if k.startswith("model.") or k in ("data.data_dir", "data.batch_size", "data.eval_batch_size")]
  command = [sys.executable, "-m", "speechjax.train", "--config=configs/slam_asr.py",
             f"--workdir={tmp_path / 'run'}", "--dry_run", *overrides]
  env = tiny_runs.subprocess_env(devices=8)
  result = tiny_runs.run(command, env=env, timeout=300)
  assert "dry run OK" in result.stdout and "split test_clean: 4 examples" in result.stdout
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  failed = subprocess.run(command + ["--config.data.test_split=test_other"], cwd=tiny_runs.REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert failed.returncode == 1
  assert "data.test_split='test_other'" in failed.stderr and "its splits: dev_other" in failed.stderr
