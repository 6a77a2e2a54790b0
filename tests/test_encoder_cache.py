"""data.cache_encoder_states: a frozen pretrained encoder's states are stored
once and training reads them; what trains and what the states hold is checked
against the encoder run on audio."""

from __future__ import annotations

import glob
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechjax.models.ctc import CTCConfig, CTCEncoder
from speechjax.models.ctc_adapter import CTCAdapterConfig
from speechjax.models.encoders.whisper import WhisperEncoder, WhisperEncoderConfig
from speechjax.tree import flatten

ENCODER = WhisperEncoderConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64)


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
  from speechjax.hf.export_whisper import export_whisper_encoder

  params = nn.unbox(WhisperEncoder(ENCODER).init(jax.random.key(3), jnp.zeros((1, 80, 40)))["params"])
  return export_whisper_encoder(str(tmp_path_factory.mktemp("pretrained") / "encoder"), ENCODER, params)


def _config(tiny_corpus, encoder_folder, mode="projector"):
  from speechjax.config_base import base_config

  data_dir, tokenizer, _ = tiny_corpus
  c = base_config()
  c.model.kind = "ctc"
  c.model.encoder_pretrained = encoder_folder
  c.model.tokenizer = tokenizer
  c.model.projector.update(ctc_adapter_layers=1, ctc_adapter_dim=16, ctc_adapter_heads=2,
                           ctc_adapter_ffn_dim=32, ctc_frame_stack=2)
  c.data.update(data_dir=data_dir, batch_size=8, eval_batch_size=8, audio_buckets_seconds=(5.0,),
                max_audio_seconds=5.0, worker_threads=1, prefetch_batches=1, cache_encoder_states=True)
  c.train.mode, c.train.num_steps = mode, 3
  c.optim.update(lr=1e-2, warmup_steps=0, schedule="constant")
  c.eval.update(every_steps=3, max_batches=1, task_metrics=False)
  c.checkpoint.every_steps = 3
  c.logging.update(every_steps=1, tensorboard=False, progress_bar=False)
  return c


def test_models_read_stored_states_as_they_read_audio():
  cfg = CTCConfig(encoder=ENCODER, token_vocab_size=20,
                  adapter=CTCAdapterConfig(layers=1, dim=16, heads=2, ffn_dim=32, frame_stack=3))
  model = CTCEncoder(cfg)
  rng = np.random.default_rng(0)
  features = rng.standard_normal((2, 80, 50)).astype(np.float32)
  mask = (np.arange(50)[None] < np.array([[50], [31]])).astype(np.int32)
  variables = model.init(jax.random.key(0), features, mask)
  logits, out_mask = model.apply(variables, features, mask)
  states = WhisperEncoder(ENCODER).apply({"params": variables["params"]["encoder"]}, features, mask)
  from_states, states_mask = model.apply(variables, states, ENCODER.output_mask(mask), from_states=True)
  assert logits.shape == (2, 9, 21)  # 50 mel frames -> 25 encoder frames -> 9 adapter frames
  np.testing.assert_array_equal(np.asarray(out_mask).sum(-1), [9, 6])
  np.testing.assert_array_equal(states_mask, out_mask)
  np.testing.assert_allclose(from_states, logits, atol=1e-5)


def test_ctc_head_trains_on_stored_states_and_the_encoder_stays_put(tiny_corpus, encoder_folder, tmp_path):
  from speechjax.data import encoder_cache
  from speechjax.hf import load_pretrained
  from speechjax.train import build_trainer

  config = _config(tiny_corpus, encoder_folder)
  trainer = build_trainer(config, str(tmp_path / "run"))
  metas = glob.glob(str(tmp_path / "run" / "encoder_cache" / "*" / "meta.json"))
  assert len(metas) == 1
  meta = json.load(open(metas[0]))
  cache = encoder_cache.EncoderStateCache(os.path.dirname(metas[0]))
  assert meta["count"] == len(cache) == 64 and meta["dim"] == 32

  # Example 0's stored states are the encoder's output on that clip alone (float16).
  from speechjax.data import sources
  source, _ = sources.open_source(config.data, "train")
  from speechjax.data.audio import int16_to_float
  from speechjax.data.features import log_mel
  wave = int16_to_float(np.asarray(source[0]["audio"]))
  encoder, params = load_pretrained(encoder_folder)
  alone = np.asarray(encoder.apply({"params": params}, np.asarray(log_mel(wave))[None]))[0]
  stored = cache.get(0)
  assert stored.shape == alone.shape
  np.testing.assert_allclose(stored, alone, atol=2e-2, rtol=1e-2)

  batch = next(iter(trainer.data.train))
  assert "features" not in batch and batch["encoder_states"].shape[::2] == (8, 32)
  before = {p: np.array(v) for p, v in flatten(nn.unbox(trainer.variables()["params"]), sep="/").items()}
  trainer.run()
  after = flatten(nn.unbox(trainer.variables()["params"]), sep="/")
  moved = {p for p in before if not np.array_equal(before[p], np.asarray(after[p]))}
  assert moved and all(p.startswith(("ctc_head/", "ctc_adapter/")) for p in moved), sorted(moved)
  assert any(p.startswith("ctc_adapter/") for p in moved) and "ctc_head/kernel" in moved
  np.testing.assert_array_equal(after["encoder/conv1/kernel"], params["conv1"]["kernel"])

  # evaluate scores the CTC run on its greedy transcripts, from audio (the
  # real encoder, not the stored states), against the manifest's text: the
  # same WER / CER as the training loop's dev metric (CTC labels as reference).
  from speechjax.evaluate import evaluate_run
  from speechjax.evaluation import scoring
  summary = evaluate_run(str(tmp_path / "run"), split="dev", checkpoint="last", progress=False)
  dev = scoring.ctc_metrics(trainer.bundle, trainer.variables(), trainer.data.dev_batches(0))
  assert summary["tasks"] == ["asr"] and summary["num_examples"] == 16
  assert summary["wer"] == pytest.approx(dev["wer"]) and summary["cer"] == pytest.approx(dev["cer"])
  rows = [json.loads(line) for line in open(tmp_path / "run" / "eval" / "dev.predictions.jsonl")]
  dev_source, _ = sources.open_source(config.data, "dev")
  from speechjax.data.tasks import as_text
  assert sorted(r["reference"] for r in rows) == sorted(as_text(dev_source[i]["text"]) for i in range(16))
  assert all(r["task"] == "asr" and r["id"] for r in rows)
  with pytest.raises(ValueError, match="'ctc' run transcribes only: task 'translate'"):
    evaluate_run(str(tmp_path / "run"), split="dev", tasks=("translate",), checkpoint="last", progress=False)

  # A second run with the same encoder and data reuses the stored states.
  stamp = os.path.getmtime(metas[0])
  config2 = _config(tiny_corpus, encoder_folder)
  config2.data.encoder_cache_dir = str(tmp_path / "run" / "encoder_cache")
  build_trainer(config2, str(tmp_path / "run2"))
  assert glob.glob(str(tmp_path / "run" / "encoder_cache" / "*" / "meta.json")) == metas
  assert os.path.getmtime(metas[0]) == stamp


def test_a_training_encoder_or_augmentation_is_refused(tiny_corpus, encoder_folder, tmp_path):
  from speechjax.train import build_trainer

  with pytest.raises(ValueError, match=r"train.mode='full'.*trains .* encoder weights"):
    build_trainer(_config(tiny_corpus, encoder_folder, mode="full"), str(tmp_path / "full"))
  config = _config(tiny_corpus, encoder_folder)
  config.data.augment.noise = True
  with pytest.raises(ValueError, match="data.augment turns on noise"):
    build_trainer(config, str(tmp_path / "noise"))
  assert not glob.glob(str(tmp_path / "*" / "encoder_cache" / "*.tmp-*"))


def test_speed_perturbation_is_stored_once_per_factor(tiny_corpus, encoder_folder, tmp_path):
  from speechjax.data import augment, sources
  from speechjax.data.audio import int16_to_float
  from speechjax.data.features import log_mel
  from speechjax.hf import load_pretrained
  from speechjax.train import build_trainer

  config = _config(tiny_corpus, encoder_folder)
  config.data.augment.update(speed=True, speed_factors=(0.9, 1.0, 1.1))
  build_trainer(config, str(tmp_path / "run"))
  from speechjax.data import encoder_cache
  folder, = glob.glob(str(tmp_path / "run" / "encoder_cache" / "*"))
  cache = encoder_cache.EncoderStateCache(folder, lambda frames: (frames + 1) // 2)
  assert cache.speed_factors == (0.9, 1.0, 1.1) and cache.num_copies == 3
  source, _ = sources.open_source(config.data, "train")
  wave = int16_to_float(np.asarray(source[5]["audio"]))
  # Copy k is the encoder's output on the clip played at speed_factors[k].
  encoder, params = load_pretrained(encoder_folder)
  for copy, factor in enumerate(cache.speed_factors):
    fast = augment.speed_perturb(wave, factor)
    assert cache.num_samples(5, copy) == fast.size
    alone = np.asarray(encoder.apply({"params": params}, np.asarray(log_mel(fast))[None]))[0]
    np.testing.assert_allclose(cache.get(5, copy), alone, atol=2e-2, rtol=1e-2)
  assert cache.num_samples(5, 0) > cache.num_samples(5, 1) > cache.num_samples(5, 2)
  # A training batch draws one copy per example, again at every batch.
  from transformers import AutoTokenizer

  from speechjax.data import batching
  from speechjax.data import prompts as prompts_lib
  _, info = sources.open_source(config.data, "train")
  prompts = prompts_lib.PromptBuilder(AutoTokenizer.from_pretrained(config.model.tokenizer), "plain", "French", True)
  maker = batching.BatchMaker(source, info, prompts, lambda frames: 0, config.data, train=True,
                              audio_input=encoder.config.audio_input(), encoder_states=cache)
  seen = set()
  for k in range(4):
    batch = maker(np.full(8, 5), np.ones(8, np.float32), k)
    rows = batch["encoder_state_mask"].sum(-1)
    assert set(rows) <= {cache.get(5, c).shape[0] for c in range(3)}
    seen |= set(rows)
  assert len(seen) == 3


def test_the_frozen_encoder_takes_its_weights_as_an_argument(tiny_corpus, encoder_folder):
  """Closed over, the weights would be compiled into the encoding program as
  constants (a 31 MB executable for Whisper tiny); as an argument they are not."""
  import re

  from speechjax import model_builder

  config = _config(tiny_corpus, encoder_folder)
  frozen = model_builder.frozen_encoder(config, model_builder.build(config))
  features, mask = np.zeros((2, 80, 40), np.float32), np.ones((2, 40), np.int32)
  hlo = frozen.encode.func.lower(*frozen.encode.args, features, mask).as_text()
  weights = sum(np.size(w) for w in jax.tree_util.tree_leaves(frozen.encode.args))
  assert weights > 30_000
  largest = max((len(blob) // 8 for blob in re.findall(r'dense<"0x([0-9A-Fa-f]+)"', hlo)), default=0)
  assert largest < 1000, f"a constant of {largest} float32 values in the encoding program"
  states, states_mask = frozen.encode(features, mask)
  assert states.shape == (2, 20, 32) and np.asarray(states_mask).sum() == 40
