"""SpeechLLM: audio placeholders, padded batches, class head, LoRA reach, KV-cache decode.

Variables are built from jax.eval_shape + numpy noise instead of model.init:
on CPU, compiling the initialisers of a whole speech LLM costs more than every
forward pass in this file together.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechjax.models.decoder import DecoderConfig
from speechjax.models.encoders.whisper import WhisperEncoderConfig
from speechjax.models.gpt2 import GPT2_LORA_TARGETS, GPT2Config
from speechjax.models.heads import classification_loss, masked_mean_pool
from speechjax.models.lora import LoRAConfig
from speechjax.models.objectives import speech_llm_objective
from speechjax.models.projector import ProjectorConfig
from speechjax.models.speech_llm import (
  AUDIO_PLACEHOLDER_ID,
  SpeechLLM,
  SpeechLLMConfig,
  init_inputs,
  num_audio_tokens,
  text_prediction_positions,
)
from speechjax.models.transformer import init_cache

PH = AUDIO_PLACEHOLDER_ID
LORA_TARGETS = (r"^encoder/.*q_proj$", r"^projector/fc1$", r"^(?!encoder/).*(q_proj|v_proj)$")


def _config(**kw):
  base = dict(
      encoder=WhisperEncoderConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64,
                                   max_source_positions=32),
      projector=ProjectorConfig(kind="frame_stack", hidden_dim=32, stack_factor=2),
      decoder=DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2),
      lora=LoRAConfig(rank=2, targets=LORA_TARGETS), num_classes=3)
  base.update(kw)
  return SpeechLLMConfig(**base)


def _random_variables(abstract, seed=0):
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if getattr(path[-1], "key", None) == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    std = 0.5 / np.sqrt(leaf.shape[-2]) if len(leaf.shape) >= 2 else 0.1
    return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


F_BATCH, F_SHORT = 24, 13  # mel frames of the two examples


@pytest.fixture(scope="module")
def setup():
  cfg = _config()
  model = SpeechLLM(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *init_inputs(cfg))
  variables = _random_variables(abstract)

  m_long, m_short = num_audio_tokens(F_BATCH, cfg), num_audio_tokens(F_SHORT, cfg)
  assert (m_long, m_short) == (6, 4)
  rng = np.random.default_rng(1)
  features = rng.standard_normal((2, 80, F_BATCH)).astype(np.float32)
  feature_mask = (np.arange(F_BATCH)[None] < np.array([[F_BATCH], [F_SHORT]])).astype(np.int32)
  features[1, :, F_SHORT:] = 50.0  # garbage in padded frames must not matter
  long_ids = [1, 5] + [PH] * m_long + [7, 8, 9]
  short_ids = [1, 5] + [PH] * m_long + [10, 11, 0]  # the pipeline pads audio to m_long slots
  input_ids = np.array([long_ids, short_ids], np.int32)
  attention_mask = np.ones_like(input_ids)
  attention_mask[1, -1] = 0
  batch = (features, feature_mask, input_ids, attention_mask)

  forward = jax.jit(lambda v, *b: model.apply(v, *b, method="logits_and_classes"))
  logits, classes = forward(variables, *batch)
  return dict(cfg=cfg, model=model, abstract=abstract, variables=variables, batch=batch,
              forward=forward, logits=np.asarray(logits), classes=np.asarray(classes),
              m_short=m_short)


def test_param_layout_axes_and_lora_reach(setup):
  abstract = setup["abstract"]
  assert set(abstract["params"]) == {"encoder", "projector", "decoder", "classifier"}
  lora = abstract["lora"]
  assert set(lora["encoder"]["layers_0"]["self_attn"]) == {"q_proj"}
  assert set(lora["projector"]) == {"fc1"}
  assert set(lora["decoder"]["layers_1"]["self_attn"]) == {"q_proj", "v_proj"}
  leaves = jax.tree_util.tree_leaves(abstract,
                                     is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  specs = nn.get_partition_spec(abstract)
  assert specs["params"]["classifier"]["out_proj"]["kernel"] == jax.sharding.PartitionSpec(
      "embed", "classes")
  assert specs["lora"]["projector"]["fc1"]["lora_b"] == jax.sharding.PartitionSpec(
      "lora_rank", "mlp")
  # The top-level LoRA config replaced whatever the sub-configs carried.
  cfg = setup["cfg"]
  assert cfg.encoder_config().lora == cfg.projector_config().lora == cfg.lora
  assert cfg.decoder_config().lora == cfg.lora
  assert cfg.projector_config().output_dim == cfg.decoder.hidden_size


def test_placeholder_embedding_matches_manual_construction(setup):
  model, variables, batch = setup["model"], setup["variables"], setup["batch"]
  features, feature_mask, input_ids, attention_mask = batch

  @jax.jit
  def run(v):
    embeds, mask = model.apply(v, *batch, method="embed_inputs")
    audio, audio_mask = model.apply(v, features, feature_mask, method="encode_audio")
    return embeds, mask, audio, audio_mask

  embeds, mask, audio, audio_mask = map(np.asarray, run(variables))
  assert audio.shape == (2, 6, 32)
  np.testing.assert_array_equal(audio_mask, [[1] * 6, [1] * 4 + [0] * 2])
  table = np.asarray(variables["params"]["decoder"]["embed_tokens"]["embedding"])
  for b in range(2):
    k = 0
    for t, token in enumerate(input_ids[b]):
      if token == PH:
        np.testing.assert_allclose(embeds[b, t], audio[b, k], atol=1e-6)
        assert mask[b, t] == attention_mask[b, t] * audio_mask[b, k]
        k += 1
      else:
        np.testing.assert_allclose(embeds[b, t], table[token], atol=1e-6)
        assert mask[b, t] == attention_mask[b, t]
    assert k == 6


def test_padded_batch_equals_example_alone(setup):
  cfg, logits, classes = setup["cfg"], setup["logits"], setup["classes"]
  features, _, input_ids, _ = setup["batch"]
  assert logits.shape == (2, input_ids.shape[1], cfg.decoder.vocab_size)
  assert classes.shape == (2, cfg.num_classes) and classes.dtype == np.float32

  m = setup["m_short"]
  alone_ids = np.array([[1, 5] + [PH] * m + [10, 11]], np.int32)
  alone = (features[1:, :, :F_SHORT], np.ones((1, F_SHORT), np.int32), alone_ids,
           np.ones_like(alone_ids))
  alone_logits, alone_classes = map(np.asarray, setup["forward"](setup["variables"], *alone))
  # Valid slots of row 1: BOS, 5, the first m audio slots, then 10, 11.
  valid = [0, 1] + list(range(2, 2 + m)) + [8, 9]
  np.testing.assert_allclose(logits[1, valid], alone_logits[0], atol=2e-5)
  np.testing.assert_allclose(classes[1], alone_classes[0], atol=2e-5)


def test_classification_loss_and_pooling():
  hidden = jnp.arange(12, dtype=jnp.float32).reshape(1, 4, 3)
  pooled = masked_mean_pool(hidden, jnp.array([[1, 1, 0, 0]]))
  np.testing.assert_allclose(pooled, [[1.5, 2.5, 3.5]])
  logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
  loss, count = classification_loss(logits, jnp.array([0, -1, 1]))
  assert float(count) == 2
  want = np.mean([np.log(1 + 2 * np.exp(-2.0)), np.log(1 + 2 * np.exp(-5.0))])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_grads_reach_projector_and_adapters(setup):
  model, variables, batch = setup["model"], setup["variables"], setup["batch"]
  params, lora = variables["params"], variables["lora"]

  def loss(trainable):
    merged = dict(params, projector=trainable["projector"])
    logits, classes = model.apply({"params": merged, "lora": trainable["lora"]}, *batch,
                                  method="logits_and_classes")
    labels = jnp.array([2, -1])
    cls_loss, _ = classification_loss(classes, labels)
    return jnp.mean(jnp.square(logits) * batch[3][..., None]) + cls_loss

  grads = jax.jit(jax.grad(loss))({"projector": params["projector"], "lora": lora})
  for g in jax.tree_util.tree_leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(grads["projector"]["fc2"]["kernel"])).sum() > 0
  assert np.abs(np.asarray(grads["lora"]["projector"]["fc1"]["lora_a"])).sum() > 0
  assert np.abs(np.asarray(grads["lora"]["encoder"]["layers_0"]["self_attn"]["q_proj"]
                           ["lora_a"])).sum() > 0


def test_decode_with_cache_matches_full_forward(setup):
  model, variables, batch, cfg = setup["model"], setup["variables"], setup["batch"], setup["cfg"]
  embeds, mask = jax.jit(lambda v: model.apply(v, *batch, method="embed_inputs"))(variables)
  b, t = mask.shape
  cache = init_cache(cfg.decoder_config(), b, t + 1, jnp.float32)
  slot_mask = jnp.concatenate([mask, jnp.ones((b, 1), mask.dtype)], axis=1)

  @jax.jit
  def prefill_and_step(v, cache, next_ids):
    logits, cache = model.apply(v, inputs_embeds=embeds, attention_mask=slot_mask, cache=cache,
                                method="decode")
    step_logits, cache = model.apply(v, input_ids=next_ids, attention_mask=slot_mask,
                                     cache=cache, method="decode")
    return logits, step_logits, cache["index"]

  next_ids = jnp.array([[3], [4]], jnp.int32)
  logits, step_logits, index = prefill_and_step(variables, cache, next_ids)
  assert int(index) == t + 1
  valid = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], setup["logits"][valid], atol=2e-5)

  # The step equals a cache-free pass over the sequence with the token appended.
  ids = np.concatenate([batch[2], np.asarray(next_ids)], axis=1)
  full = jax.jit(lambda v: model.apply(
      v, batch[0], batch[1], ids, np.concatenate([batch[3], np.ones((2, 1), np.int32)], 1)))(
          variables)
  np.testing.assert_allclose(np.asarray(step_logits)[:, 0], np.asarray(full)[:, -1], atol=2e-5)


def test_gpt2_qformer_scanned_variant_shapes():
  cfg = _config(
      encoder=WhisperEncoderConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64,
                                   max_source_positions=32, scan_layers=True),
      projector={"kind": "qformer", "window_size": 4, "num_queries": 2, "qformer_layers": 1,
                 "qformer_dim": 16, "qformer_heads": 2, "qformer_ffn_dim": 32},
      decoder={"model_type": "gpt2", "vocab_size": 40, "hidden_size": 32, "num_layers": 2,
               "num_heads": 2, "max_position_embeddings": 64, "scan_layers": True},
      lora={"rank": 2, "targets": list(GPT2_LORA_TARGETS) + [r"^projector/proj$"]},
      num_classes=0)
  assert isinstance(cfg.decoder, GPT2Config) and cfg.projector.kind == "qformer"
  model = SpeechLLM(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *init_inputs(cfg))
  assert "classifier" not in abstract["params"]
  assert abstract["params"]["encoder"]["layers"]["fc1"]["kernel"].value.shape == (2, 32, 64)
  assert set(abstract["lora"]) == {"projector", "decoder"}
  m = num_audio_tokens(30, cfg)
  assert m == 8  # 15 encoder frames -> 4 windows of 4 -> 2 queries each
  inputs = init_inputs(cfg, batch_size=2, num_frames=30, num_text_tokens=3)
  out = jax.eval_shape(lambda v: model.apply(v, *inputs), abstract)
  assert out.shape == (2, m + 3, 40)
  with pytest.raises(ValueError, match="num_classes"):
    jax.eval_shape(lambda v: model.apply(v, *inputs, method="classify"), abstract)


def test_wrong_placeholder_count_is_refused(setup):
  features, feature_mask, input_ids, attention_mask = setup["batch"]
  bad = input_ids.copy()
  bad[0, 2] = 3  # one placeholder short
  with pytest.raises(ValueError, match="exactly 6 audio placeholders"):
    setup["model"].apply(setup["variables"], features, feature_mask, bad, attention_mask)
  with pytest.raises(ValueError, match="output_dim"):
    _config(projector=ProjectorConfig(output_dim=7))


def test_frame_stacked_encoder_sets_the_audio_token_count():
  cfg = _config(encoder=WhisperEncoderConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64,
                                             max_source_positions=32, frame_stack=2))
  # ceil(F / 4) encoder frames (2 mel frames stacked, then the stride-2 conv), stacked by 2.
  assert (num_audio_tokens(24, cfg), num_audio_tokens(13, cfg)) == (3, 2)
  model = SpeechLLM(cfg)
  inputs = init_inputs(cfg, batch_size=2, num_frames=24)
  variables = model.init(jax.random.key(0), *inputs)
  assert model.apply(variables, *inputs).shape == (2, 3 + 2, 50)
  features, feature_mask, ids, attention = inputs
  with pytest.raises(ValueError, match="placeholder"):
    model.apply(variables, features, feature_mask, ids[:, 1:], attention[:, 1:])


def test_text_prediction_positions_keep_every_position_a_label_can_sit_on():
  ids = jnp.asarray([[PH, PH, 3, 4, 0],   # starts with audio: 4 positions qualify
                     [3, PH, PH, 4, 0],   # 3 qualify, one filler
                     [3, 4, 0, PH, PH]], jnp.int32)  # audio last
  got = np.asarray(text_prediction_positions(ids, 2))
  assert got.shape == (3, 4)
  np.testing.assert_array_equal(got[0], [1, 2, 3, 4])
  np.testing.assert_array_equal(got[1, :3], [2, 3, 4])
  assert got[1, 3] in (0, 1)  # a position whose next token is audio
  np.testing.assert_array_equal(got[2, :3], [0, 1, 4])


def test_text_logits_and_the_objective_equal_the_full_logits(setup):
  model, variables, batch = setup["model"], setup["variables"], setup["batch"]
  features, feature_mask, input_ids, attention_mask = batch
  logits, positions = jax.jit(lambda v, *b: model.apply(v, *b, method="text_logits"))(
      variables, *batch)
  m = num_audio_tokens(features.shape[-1], setup["cfg"])
  assert positions.shape == (2, input_ids.shape[1] - m + 1)
  full = np.asarray(model.apply(variables, *batch))
  np.testing.assert_allclose(logits, np.take_along_axis(full, np.asarray(positions)[..., None], 1),
                             atol=1e-5)
  # Labels as data/tasks.py builds them: the answer follows the audio directly, so the last
  # audio slot predicts the first answer token and must be kept.
  targets = np.concatenate([input_ids[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
  targets[targets < 0] = 0
  target_mask = np.zeros(input_ids.shape, np.float32)
  target_mask[:, 2 + m - 1:-1] = 1.0
  target_mask[1, -2:] = 0.0  # row 1 is padded at the end
  full_batch = dict(features=features, feature_mask=feature_mask, input_ids=input_ids,
                    attention_mask=attention_mask, targets=targets, target_mask=target_mask)
  objective = speech_llm_objective(model)
  norms = objective.normalizers(full_batch)
  loss, stats = objective.loss(variables, full_batch, None, True, norms)
  log_probs = jax.nn.log_softmax(full, axis=-1)
  xent = -np.take_along_axis(np.asarray(log_probs), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), np.sum(xent * target_mask) / target_mask.sum(),
                             rtol=1e-5)
  assert float(stats["tokens"]) == target_mask.sum()
