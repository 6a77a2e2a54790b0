"""wav2vec2 / HuBERT / WavLM encoders: parity with transformers, HF conversion both
ways, the encoder contract, a speech LLM training on one, and wave batches."""

from __future__ import annotations

import dataclasses
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from speechjax.data import audio as audio_lib
from speechjax.data import batching, pipeline, sources
from speechjax.data import config as data_config
from speechjax.hf import load_pretrained
from speechjax.hf import wav2vec2 as w2v_io
from speechjax.models.decoder import DecoderConfig
from speechjax.models.encoders import encoder_config_from_dict, get_encoder, make_encoder
from speechjax.models.encoders.wav2vec2 import HubertConfig, Wav2Vec2Config, Wav2Vec2Encoder, WavLMConfig
from speechjax.models.encoders.wav2vec2_layers import relative_position_buckets
from speechjax.models.lora import LoRAConfig
from speechjax.models.objectives import speech_llm_objective
from speechjax.models.projector import ProjectorConfig
from speechjax.models.speech_llm import (
  AUDIO_PLACEHOLDER_ID,
  SpeechLLM,
  SpeechLLMConfig,
  init_inputs,
  num_audio_tokens,
)
from speechjax.projects.spoken_commands.tokenizer import train_bpe_tokenizer
from speechjax.trainer import optim, partition
from speechjax.trainer import step as step_lib

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=12)
LENGTHS = (1600, 1100)  # samples of the two waves of the padded batch

# name -> (HF model class, config overrides, our config class)
VARIANTS = {
    "wav2vec2_group_postln_nobias": (transformers.Wav2Vec2Model, {}, Wav2Vec2Config),
    "wav2vec2_layer_preln_bias_ctc": (transformers.Wav2Vec2ForCTC, dict(
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
        num_conv_pos_embeddings=15), Wav2Vec2Config),
    "hubert_group_postln": (transformers.HubertModel, {}, HubertConfig),
    "hubert_layer_preln_noprojnorm_ctc": (transformers.HubertForCTC, dict(
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
        feat_proj_layer_norm=False), HubertConfig),
    "wavlm_group_postln": (transformers.WavLMModel, dict(num_buckets=32, max_bucket_distance=64),
                           WavLMConfig),
    "wavlm_layer_preln_ctc": (transformers.WavLMForCTC, dict(
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, num_buckets=32,
        max_bucket_distance=64), WavLMConfig),
}
_CONFIGS = {transformers.Wav2Vec2Model: transformers.Wav2Vec2Config,
            transformers.Wav2Vec2ForCTC: transformers.Wav2Vec2Config,
            transformers.HubertModel: transformers.HubertConfig,
            transformers.HubertForCTC: transformers.HubertConfig,
            transformers.WavLMModel: transformers.WavLMConfig,
            transformers.WavLMForCTC: transformers.WavLMConfig}


def build_torch_model(model_cls, overrides, seed=0):
  """A tiny random HF model whose norms, biases and gates are perturbed too, so
  their ones / zeros initialisation cannot hide a wrong mapping."""
  torch.manual_seed(seed)
  model = model_cls(_CONFIGS[model_cls](**{**TINY, **overrides})).eval()
  with torch.no_grad():
    for param in model.parameters():
      if param.ndim == 1 or param.shape[0] == 1:
        param.add_(0.1 * torch.randn_like(param))
  return model


def base_model(model):
  return getattr(model, model.config.model_type, model)


def torch_hidden(model, waves, mask=None):
  with torch.no_grad():
    args = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return base_model(model)(torch.tensor(waves), **args).last_hidden_state.numpy()


def padded_batch(seed=1):
  rng = np.random.default_rng(seed)
  waves = rng.standard_normal((2, max(LENGTHS))).astype(np.float32)
  mask = (np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  return waves, mask


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
  model_cls, overrides, config_cls = VARIANTS[request.param]
  torch_model = build_torch_model(model_cls, overrides)
  folder = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(str(folder), safe_serialization=True)
  return dict(name=request.param, torch=torch_model, folder=str(folder), config_cls=config_cls,
              overrides=overrides)


def test_padded_batch_matches_transformers_and_each_wave_alone(variant):
  model, params = load_pretrained(variant["folder"], dtype=jnp.float32)
  cfg = model.config
  assert type(cfg) is variant["config_cls"] and isinstance(model, Wav2Vec2Encoder)
  assert cfg.do_stable_layer_norm == variant["overrides"].get("do_stable_layer_norm", False)
  waves, mask = padded_batch()
  garbage = np.where(mask > 0, waves, 50.0).astype(np.float32)  # padding must not matter
  ours = np.asarray(model.apply({"params": params}, garbage, mask))
  frames = cfg.output_length(waves.shape[1])
  assert ours.shape == (2, frames, 32)

  frame_mask = np.asarray(cfg.output_mask(mask))
  hf_mask = base_model(variant["torch"])._get_feature_vector_attention_mask(
      frames, torch.tensor(mask)).numpy()
  np.testing.assert_array_equal(frame_mask, hf_mask)
  for row, length in enumerate(LENGTHS):
    alone = torch_hidden(variant["torch"], waves[row:row + 1, :length])[0]
    assert alone.shape[0] == frame_mask[row].sum() == cfg.output_length(length)
    np.testing.assert_allclose(ours[row, :alone.shape[0]], alone, atol=1e-4, rtol=0)

  reference = torch_hidden(variant["torch"], waves, mask)
  if cfg.feat_extract_norm == "layer":
    # HF's batch agrees on real frames; its group norm takes statistics over the padding.
    for row in range(2):
      np.testing.assert_allclose(ours[row][frame_mask[row]], reference[row][frame_mask[row]],
                                 atol=1e-4, rtol=0)
  unmasked = np.asarray(model.apply({"params": params}, waves))
  np.testing.assert_allclose(unmasked, torch_hidden(variant["torch"], waves), atol=1e-4, rtol=0)


def test_export_loads_into_transformers_unchanged(variant):
  model, params = load_pretrained(variant["folder"], dtype=jnp.float32)
  cfg = model.config
  hf_config = w2v_io.config_to_hf(cfg)
  assert hf_config["model_type"] == cfg.model_type
  base_cls = {"wav2vec2": transformers.Wav2Vec2Model, "hubert": transformers.HubertModel,
              "wavlm": transformers.WavLMModel}[cfg.model_type]
  hf_cfg_cls = base_cls.config_class
  hf_fields = {k: v for k, v in hf_config.items() if k != "architectures"}
  fresh = base_cls(hf_cfg_cls(**hf_fields)).eval()
  state = {k: torch.tensor(v) for k, v in w2v_io.params_to_hf(params, cfg).items()}
  missing, unexpected = fresh.load_state_dict(state, strict=False)
  assert set(missing) == {"masked_spec_embed"} and not unexpected
  waves, _ = padded_batch(seed=3)
  np.testing.assert_allclose(torch_hidden(fresh, waves), torch_hidden(variant["torch"], waves),
                             atol=1e-5, rtol=0)


def test_positional_conv_reads_every_weight_norm_naming():
  model = build_torch_model(transformers.Wav2Vec2Model, {})
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  conv = "encoder.pos_conv_embed.conv"
  g = state[f"{conv}.parametrizations.weight.original0"]
  v = state[f"{conv}.parametrizations.weight.original1"]
  effective = model.encoder.pos_conv_embed.conv.weight.detach().numpy()  # torch's own w = g v / |v|
  legacy = {k: x for k, x in state.items() if not k.startswith(f"{conv}.parametrizations")}
  plain = dict(legacy)
  legacy.update({f"{conv}.weight_g": g, f"{conv}.weight_v": v})
  plain[f"{conv}.weight"] = effective
  cfg = w2v_io.config_from_hf(model.config.to_dict())
  kernels = [w2v_io.params_from_hf(s, cfg)["pos_conv_embed"]["conv"]["kernel"]
             for s in (state, legacy, plain)]
  for kernel in kernels:
    np.testing.assert_allclose(kernel, effective.transpose(2, 1, 0), atol=1e-6)
  del legacy[f"{conv}.weight_g"]
  with pytest.raises(KeyError, match="positional conv weight"):
    w2v_io.params_from_hf(legacy, cfg)


def test_scanned_layers_equal_unrolled(tmp_path):
  model = build_torch_model(transformers.WavLMModel, dict(num_buckets=32, max_bucket_distance=64))
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  unrolled, params = load_pretrained(str(tmp_path))
  scanned, scanned_params = load_pretrained(str(tmp_path), scan_layers=True, remat_policy="full")
  assert scanned_params["layers"]["attention"]["gru_rel_pos_const"].shape == (2, 4)
  assert "rel_attn_embed" in scanned_params and "rel_attn_embed" not in scanned_params["layers"]
  waves, mask = padded_batch()
  np.testing.assert_allclose(scanned.apply({"params": scanned_params}, waves, mask),
                             unrolled.apply({"params": params}, waves, mask), atol=1e-5)


def test_output_length_and_mask_match_transformers_for_the_released_stack():
  cfg = Wav2Vec2Config()  # 7 convs, 320 samples a frame
  hf = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(num_hidden_layers=1))
  lengths = np.array([399, 400, 16000, 16319, 16320, 48000])
  expected = hf._get_feat_extract_output_lengths(torch.tensor(lengths)).numpy()
  assert [cfg.output_length(n) for n in lengths] == expected.tolist()
  assert cfg.output_length(16000) == 49 and cfg.frame_stride == 320 and cfg.output_length(100) == 0
  mask = (np.arange(48000)[None] < lengths[:, None]).astype(np.int32)
  ours = np.asarray(cfg.output_mask(mask))
  # HF marks every frame of a row too short for one frame as valid (index -1); here none is.
  assert not ours[0].any()
  hf_mask = hf._get_feature_vector_attention_mask(cfg.output_length(48000), torch.tensor(mask[1:]))
  np.testing.assert_array_equal(ours[1:], hf_mask.numpy())
  assert ours.sum(1).tolist() == expected.tolist()


def test_relative_position_buckets_match_transformers():
  attention = transformers.WavLMModel(transformers.WavLMConfig(
      num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=8,
      conv_dim=(8,), conv_kernel=(2,), conv_stride=(2,))).encoder.layers[0].attention
  hf = attention._relative_positions_bucket(
      torch.arange(900)[None, :] - torch.arange(900)[:, None]).numpy()
  np.testing.assert_array_equal(relative_position_buckets(900, 320, 800), hf)


def test_registry_config_and_contract():
  for name, cls in (("wav2vec2", Wav2Vec2Config), ("hubert", HubertConfig), ("wavlm", WavLMConfig)):
    spec = get_encoder(name)
    assert spec.config_cls is cls and spec.module_cls is Wav2Vec2Encoder
    assert spec.converter == "speechjax.hf.wav2vec2"
  cfg = encoder_config_from_dict({"model_type": "wavlm", "hidden_size": 32, "num_heads": 2,
                                  "conv_dim": [8, 8], "conv_kernel": [4, 2],
                                  "conv_stride": [2, 2], "normalize": False})
  assert isinstance(cfg, WavLMConfig) and cfg.conv_dim == (8, 8) and cfg.hidden_size == 32
  audio = cfg.audio_input()
  assert (audio.kind, audio.sample_rate, audio.normalize) == ("wave", 16000, False)
  assert isinstance(make_encoder(cfg), Wav2Vec2Encoder)
  with pytest.raises(ValueError, match="feat_extract_norm='batch'; valid: group, layer"):
    Wav2Vec2Config(feat_extract_norm="batch")
  with pytest.raises(ValueError, match="no output frame"):
    make_encoder(cfg).init(jax.random.key(0), jnp.zeros((1, 3)))


def test_config_from_hf_reads_the_feature_extractor_and_refuses_adapters():
  hf = transformers.HubertConfig(**{**TINY, "feat_proj_layer_norm": False}).to_dict()
  cfg = w2v_io.config_from_hf({**hf, "feature_extractor": {"do_normalize": False,
                                                           "sampling_rate": 16000}},
                              scan_layers=True)
  assert isinstance(cfg, HubertConfig) and not cfg.normalize and cfg.scan_layers
  assert (cfg.num_layers, cfg.num_heads, cfg.conv_stride) == (2, 4, (5, 2))
  assert not cfg.feat_proj_layer_norm and w2v_io.config_from_hf(hf).normalize
  with pytest.raises(ValueError, match="add_adapter"):
    w2v_io.config_from_hf({**hf, "add_adapter": True})
  with pytest.raises(ValueError, match="model_type 'whisper' is not one of"):
    w2v_io.config_from_hf({**hf, "model_type": "whisper"})


def test_speech_llm_trains_on_a_wave_encoder():

  encoder = WavLMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
                        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                        num_buckets=16, max_bucket_distance=32)
  cfg = SpeechLLMConfig(
      encoder=encoder, projector=ProjectorConfig(kind="frame_stack", hidden_dim=32, stack_factor=4),
      decoder=DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=1,
                            num_heads=2, num_kv_heads=1),
      lora=LoRAConfig(rank=2, targets=(r"^encoder/.*q_proj$", r"^(?!encoder/).*(q_proj|v_proj)$")))
  model = SpeechLLM(cfg)
  variables = nn.unbox(model.init(jax.random.key(0), *init_inputs(cfg, num_frames=800)))
  assert "lora_a" in variables["lora"]["encoder"]["layers_0"]["attention"]["q_proj"]

  samples = 800
  m = num_audio_tokens(samples, cfg)
  assert m == -(-cfg.encoder.output_length(samples) // 4) == 20  # 79 frames, 4 per token
  waves, mask = padded_batch(seed=4)
  waves = waves[:, :samples]
  mask = (np.arange(samples)[None] < np.array([[800], [600]])).astype(np.int32)
  text = np.array([[5, 6, 7, 8], [9, 10, 11, 0]], np.int32)
  ids = np.concatenate([np.ones((2, 1), np.int32), np.full((2, m), AUDIO_PLACEHOLDER_ID, np.int32),
                        text], axis=1)
  attention = np.ones_like(ids)
  attention[1, -1] = 0
  targets = np.concatenate([ids[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
  targets[targets < 0] = 0
  target_mask = np.zeros(ids.shape, np.float32)
  target_mask[:, m:-1] = 1.0
  target_mask[1, -2:] = 0.0
  batch = dict(features=waves, feature_mask=mask, input_ids=ids, attention_mask=attention,
               targets=targets, target_mask=target_mask, class_labels=np.full(2, -1, np.int32),
               example_mask=np.ones(2, np.float32))

  optim_cfg = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-2, schedule="constant", warmup_steps=0, end_lr_fraction=0.1, b1=0.9,
      b2=0.999, eps=1e-8, momentum=0.9, weight_decay=0.0, clip_norm=1.0))
  train_cfg = ml_collections.ConfigDict(dict(
      grad_accum_steps=1, mode="lora", top_n_layers=0, extra_trainable=(),
      adversarial=dict(method="none", epsilon=0.1, steps=1, step_size=0.05, weight=0.5)))
  trainable, frozen = partition.split_variables(variables, partition.trainable_patterns(train_cfg))
  opt, schedule = optim.make_optimizer(optim_cfg, num_steps=6)
  state = step_lib.init_train_state(trainable, opt, jax.random.key(1))
  step = jax.jit(step_lib.make_train_step(speech_llm_objective(model), opt, schedule, train_cfg))

  def encoder_q(tree):
    return np.asarray(tree["lora"]["encoder"]["layers_0"]["attention"]["q_proj"]["lora_b"])

  encoder_lora = encoder_q(trainable)
  losses = []
  for _ in range(6):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.95 * losses[0]
  assert np.abs(encoder_q(state["trainable"]) - encoder_lora).max() > 0  # grads reach the encoder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Eight waves of 0.6 to 2.2 s in a manifest, and a BPE tokenizer of their texts."""
  out = tmp_path_factory.mktemp("wave_pipeline")
  rng = np.random.default_rng(3)
  words = ("turn on the lights", "play some music", "stop", "what time is it")
  rows = []
  for i, seconds in enumerate((0.6, 1.4, 2.2, 0.9, 1.8, 1.1, 2.0, 0.7)):
    wave = 0.05 * rng.standard_normal(int(seconds * 16000)) + 0.2  # an offset normalising removes
    audio_lib.write_wav(out / f"{i}.wav", wave.astype(np.float32))
    rows.append({"audio": f"{i}.wav", "text": words[i % len(words)], "id": str(i)})
  (out / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(out / "all.jsonl"), train_bpe_tokenizer(list(words) * 8, vocab_size=300)


def _data_config(manifest, **overrides):
  config = data_config.default_data_config()
  config.update(train_split=manifest, eval_split=manifest, batch_size=4, eval_batch_size=3,
                audio_buckets_seconds=(2.5, 5.0), token_buckets=(64, 128), shard_by_process=False,
                **overrides)
  return config


def test_pipeline_feeds_normalised_waves_to_a_wave_encoder(corpus):
  manifest, tok = corpus
  config = _data_config(manifest)
  audio_input = WavLMConfig().audio_input()
  assert audio_input.normalize
  assert batching.bucket_sizes_samples(config, audio_input) == (40000, 80000)
  source, info = sources.open_source(config, manifest)
  seen_inputs = []

  def count_audio_tokens(inputs):
    seen_inputs.append(inputs)
    return 3

  batch = next(pipeline.make_train_iterator(source, info, tok, count_audio_tokens, config,
                                            audio_input=audio_input))
  features, mask = batch["features"], batch["feature_mask"]
  assert features.dtype == np.float32 and mask.dtype == np.int32
  assert features.ndim == 2 and features.shape[1] in (40000, 80000)
  assert seen_inputs[-1] == features.shape[1]  # audio tokens are counted from samples
  lengths = np.round(batch["audio_seconds"] * 16000).astype(int)
  np.testing.assert_array_equal(mask, np.arange(features.shape[1])[None] < lengths[:, None])
  for row, length in enumerate(lengths):
    real = features[row, :length].astype(np.float64)
    assert abs(real.mean()) < 1e-4 and abs(real.std() - 1.0) < 1e-3
    assert not features[row, length:].any()

  raw_input = dataclasses.replace(audio_input, normalize=False)
  dev, dev_info = sources.open_source(config, manifest)
  eval_batch, meta = next(iter(pipeline.make_eval_iterator(
      dev, dev_info, tok, lambda n: 3, config, with_metadata=True, audio_input=raw_input)))
  for row in range(len(meta["id"])):
    wave = audio_lib.int16_to_float(np.asarray(dev[row]["audio"]))
    np.testing.assert_array_equal(eval_batch["features"][row, :wave.size], wave)
    assert eval_batch["feature_mask"][row].sum() == wave.size


def test_pipeline_keeps_log_mel_by_default_and_refuses_spec_augment_on_waves(corpus):
  manifest, tok = corpus
  config = _data_config(manifest)
  source, info = sources.open_source(config, manifest)
  assert batching.bucket_sizes_samples(config) == (40000, 80000)  # 2 * hop aligned already
  batch = next(pipeline.make_train_iterator(source, info, tok, lambda f: 3, config))
  assert batch["features"].shape[:2] == (4, 80)
  assert batch["feature_mask"].shape == (4, batch["features"].shape[2])
  config.augment.spec_augment = True
  with pytest.raises(ValueError, match="spec_augment masks log-mel features"):
    pipeline.make_train_iterator(source, info, tok, lambda f: 3, config,
                                 audio_input=Wav2Vec2Config().audio_input())
  with pytest.raises(ValueError, match="audio_input.kind='raw'; valid: mel, wave"):
    batching.bucket_sizes_samples(config, types.SimpleNamespace(kind="raw"))


def test_cudnn_attention_takes_the_padding_as_lengths(variant, monkeypatch):
  """attention_impl='cudnn' passes the frame mask as sequence lengths (WavLM's
  gated position bias beside them); XLA's attention stands in for cuDNN on CPU.
  Real frames equal the boolean-mask encoder's, padded frames' attention is zero."""
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, implementation=None, **k: fused(
      *a, implementation="xla" if implementation == "cudnn" else implementation, **k))
  model, params = load_pretrained(variant["folder"], dtype=jnp.float32)
  waves, mask = padded_batch()
  want = np.asarray(jax.jit(model.apply)({"params": params}, waves, mask))
  cudnn = type(model)(dataclasses.replace(model.config, attention_impl="cudnn"))
  got = np.asarray(jax.jit(cudnn.apply)({"params": params}, waves, mask))
  real = np.asarray(model.config.output_mask(mask), bool)
  assert not real.all()
  np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
