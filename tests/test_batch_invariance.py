"""A test-set score does not depend on the evaluation batch size or padding, and
covers the whole split.

For a speech LLM on a log-mel encoder (Whisper) and on a wave encoder
(wav2vec2), sixteen clips of very different lengths (0.2 - 1.9 s) are run once
as one batch of 16 (every clip padded to the largest bucket and the longest
prompt) and once one at a time (each in its own smallest bucket): the logits of
each example's answer tokens agree to 1e-4 in fp32 and the greedy transcripts
are the same. Then a split holding clips longer than the largest bucket is
scored: every example is, the long ones in chunks joined before scoring.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from speechjax.config_base import base_config, decoder_section, encoder_section
from speechjax.data import audio as audio_lib
from speechjax.data import pipeline, sources
from speechjax.evaluation import scoring

SECONDS = tuple(np.round(np.linspace(0.2, 1.9, 16)[np.argsort(np.arange(16) % 4, kind="stable")], 3))
BUCKETS = (0.5, 2.0)
ENCODERS = {
    "whisper": lambda: encoder_section("whisper", d_model=32, num_layers=1, num_heads=2, ffn_dim=64),
    # Layer norm in the feature encoder: group norm over time (wav2vec2-base) sees the padding.
    "wav2vec2": lambda: encoder_section("wav2vec2", hidden_size=32, num_layers=1, num_heads=2,
                                        intermediate_size=64, conv_dim=(16, 16, 16), conv_kernel=(10, 4, 4),
                                        conv_stride=(5, 4, 4), feat_extract_norm="layer",
                                        do_stable_layer_norm=True, num_conv_pos_embeddings=8,
                                        num_conv_pos_embedding_groups=2),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  from speechjax.projects.spoken_commands.tokenizer import domain_texts, train_bpe_tokenizer

  path = tmp_path_factory.mktemp("tokenizer")
  train_bpe_tokenizer(domain_texts(), vocab_size=320).save_pretrained(str(path))
  return str(path)


def _bundle(encoder: str, tokenizer_dir: str):
  from speechjax import model_builder

  c = base_config()
  c.model.encoder = ENCODERS[encoder]()
  c.model.projector.update(kind="frame_stack", hidden_dim=32, stack_factor=4)
  c.model.decoder = decoder_section("llama", vocab_size=384, hidden_size=32, intermediate_size=64,
                                    num_layers=2, num_heads=2, num_kv_heads=1)
  c.model.tokenizer = tokenizer_dir
  c.data.update(audio_buckets_seconds=BUCKETS, token_buckets=(64, 256), eval_batch_size=16,
                worker_threads=1, max_audio_seconds=2.0)
  bundle = model_builder.build(c)
  variables = nn.unbox(bundle.init_fn(jax.random.PRNGKey(1)))
  # Random weights scaled up so logits differ clearly between tokens.
  variables["params"] = jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim >= 2 else x, variables["params"])
  return c, bundle, scoring.inference_variables(variables, bundle.model_config.lora)


def _clips(seconds, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  clips = []
  for i, s in enumerate(seconds):
    n = int(s * audio_lib.SAMPLE_RATE)
    t = np.arange(n) / audio_lib.SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.05 * rng.standard_normal(n)
    clips.append({"audio": audio_lib.float_to_int16(wave.astype(np.float32)), "text": "turn on the lights",
                  "id": f"clip{i}"})
  return clips


def _answer_logits(bundle, variables, data_cfg, source, info, batch_size) -> list[np.ndarray]:
  """Per example, the logits [answer tokens + EOS, vocab] of a teacher-forced pass."""
  cfg = {**data_cfg.to_dict(), "eval_batch_size": batch_size}
  apply = jax.jit(lambda v, b: bundle.module.apply(v, b["features"], b["feature_mask"], b["input_ids"],
                                                   b["attention_mask"]))
  out = []
  for batch in pipeline.make_eval_iterator(source, info, bundle.tokenizer, bundle.num_audio_tokens, cfg,
                                           task="asr", audio_input=bundle.audio_input):
    logits = np.asarray(apply(variables, batch))
    for row in np.flatnonzero(batch["example_mask"] > 0):
      out.append(logits[row][batch["target_mask"][row] > 0])
  return out


@pytest.mark.slow
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_batch_size_and_padding_do_not_change_logits_or_transcripts(encoder, tokenizer_dir):
  config, bundle, variables = _bundle(encoder, tokenizer_dir)
  source = _clips(SECONDS)
  info = sources.scan_info(source)
  together = _answer_logits(bundle, variables, config.data, source, info, len(source))
  alone = _answer_logits(bundle, variables, config.data, source, info, 1)
  assert len(together) == len(alone) == len(source)
  for i, (a, b) in enumerate(zip(together, alone)):
    assert a.shape == b.shape and a.shape[0] > 1
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f"{encoder} clip {i} ({SECONDS[i]:.2f} s)")
  # The clips differ, so equal logits are not an accident of ignoring the audio.
  assert np.abs(together[0] - together[1]).max() > 1e-2

  decode = ml_collections.ConfigDict(dict(method="greedy", beam_size=1, length_penalty=1.0,
                                          max_new_tokens=5, temperature=1.0, top_p=1.0))
  texts = {}
  for size in (len(source), 1):
    cfg = {**config.data.to_dict(), "eval_batch_size": size}
    result = scoring.evaluate_task(bundle, variables, source, info, cfg, "asr", decode)
    texts[size] = [p["prediction"] for p in result.predictions]
    assert result.num_chunked == 0 and len(result.predictions) == len(source)
  assert texts[len(source)] == texts[1] and any(texts[1])


def test_clips_longer_than_the_largest_bucket_are_chunked_and_scored(tokenizer_dir):
  config, bundle, variables = _bundle("whisper", tokenizer_dir)
  seconds = (0.6, 4.5, 1.2, 2.6)  # two clips longer than the 2 s bucket
  source = _clips(seconds, seed=3)
  info = sources.scan_info(source)
  decode = ml_collections.ConfigDict(dict(method="greedy", beam_size=1, length_penalty=1.0,
                                          max_new_tokens=4, temperature=1.0, top_p=1.0))
  result = scoring.evaluate_task(bundle, variables, source, info, config.data, "asr", decode)
  assert [p["id"] for p in result.predictions] == ["clip0", "clip1", "clip2", "clip3"]
  assert result.num_chunked == 2 and result.num_skipped == 0
  assert result.metrics["num_reference_words"] == 4 * 4  # every reference is scored

  # A long clip's prediction is its chunks' predictions, joined.
  from speechjax import generation
  long_clip = source[1]
  pieces = generation.chunk_audio(long_clip["audio"], audio_lib.SAMPLE_RATE, BUCKETS[-1])
  assert len(pieces) == 3
  chunk_source = [{**long_clip, "audio": p, "id": f"clip1#{k}"} for k, p in enumerate(pieces)]
  per_chunk = scoring.evaluate_task(bundle, variables, chunk_source, sources.scan_info(chunk_source),
                                    config.data, "asr", decode)
  assert result.predictions[1]["prediction"] == generation.join_transcripts(
      [p["prediction"] for p in per_chunk.predictions])

  summary = scoring.summarize([result])
  assert summary["num_examples"] == 4 and summary["asr/num_chunked"] == 2
  assert summary["asr/normalizer"] == "english"
  report = scoring.report_markdown({**summary, "split": "test_clean", "checkpoint_step": 7}, "test_clean")
  assert "split `test_clean`, checkpoint step 7, 4 examples scored" in report
  assert "`english` normalizer" in report and "substitutions" in report and "(2 longer than" in report
