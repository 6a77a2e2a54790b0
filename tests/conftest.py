"""Test environment: CPU only, 8 fake devices for sharding tests, no hub calls.

These must be set before JAX or transformers is imported anywhere.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
  """A 64/16/16-utterance synthetic corpus and a BPE tokenizer, built once per
  session: (data_dir for config.data.data_dir, tokenizer folder, corpus root)."""
  from speechjax.data import synth
  from speechjax.data.tokenizer import domain_texts, train_bpe_tokenizer

  root = tmp_path_factory.mktemp("tiny_corpus")
  synth.build(str(root), num_train=64, num_dev=16, num_test=16, seed=0, workers=1)
  tok_dir = root / "tokenizer"
  train_bpe_tokenizer(domain_texts(), vocab_size=512).save_pretrained(str(tok_dir))
  return str(root / "tfds"), str(tok_dir), str(root)
