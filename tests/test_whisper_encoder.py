"""Whisper encoder: parity with HF transformers, short/padded inputs, conversion, LoRA."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
import torch

from speechjax.hf import whisper as hf_whisper
from speechjax.models import lora as lora_lib
from speechjax.models.encoders.whisper import (
  SinusoidalPositions,
  WhisperEncoder,
  WhisperEncoderConfig,
  encoder_output_length,
  encoder_output_mask,
  sinusoids,
  whisper_config,
)

transformers = pytest.importorskip("transformers")


def _tiny_hf_config(num_mel_bins=80, max_source_positions=1500):
  return transformers.WhisperConfig(
      vocab_size=64, num_mel_bins=num_mel_bins, d_model=64, encoder_layers=2,
      encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=1,
      decoder_attention_heads=4, decoder_ffn_dim=128, max_source_positions=max_source_positions,
      max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
      decoder_start_token_id=1)


def _save_random_hf(path, model_cls, num_mel_bins, seed):
  torch.manual_seed(seed)
  model = model_cls(_tiny_hf_config(num_mel_bins)).eval()
  with torch.no_grad():
    # HF init leaves LayerNorms at 1/0 and biases at 0; perturb everything so a
    # swapped or dropped tensor cannot go unnoticed.
    for name, p in model.named_parameters():
      if "embed_positions" not in name:
        p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


def _load(path, **overrides):
  """Through speechjax.hf.load_pretrained when the dispatcher is there, else the
  converter on the raw safetensors (same code path underneath)."""
  try:
    from speechjax.hf import load_pretrained
  except ImportError:
    load_pretrained = None
  if load_pretrained is not None and not overrides:
    model, params = load_pretrained(str(path), dtype=jnp.float32)
    return model, params
  with open(os.path.join(path, "config.json")) as f:
    cfg = hf_whisper.config_from_hf(json.load(f), **overrides)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  return WhisperEncoder(cfg), hf_whisper.params_from_hf(tensors.__getitem__, cfg)


def _hf_encoder_manual(encoder, features):
  """HF WhisperEncoder.forward insists on exactly 2*max_source_positions frames.
  For a shorter input we run its own submodules in the same order, slicing the
  position table to the first ceil(F/2) rows (what the forward would do if it
  allowed short inputs; the convs zero-pad by 1 on each side either way)."""
  with torch.no_grad():
    x = torch.nn.functional.gelu(encoder.conv1(features))
    x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[:x.shape[1]]
    for layer in encoder.layers:
      x = layer(x, None)
    return encoder.layer_norm(x).numpy()


@pytest.fixture(scope="module")
def hf_whisper_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("whisper80")
  model = _save_random_hf(path, transformers.WhisperModel, 80, seed=0)
  return path, model


def test_parity_with_hf_whisper_model_full_30s(hf_whisper_model):
  path, hf_model = hf_whisper_model
  model, params = _load(path)
  assert model.config.num_mel_bins == 80 and model.config.num_layers == 2
  rng = np.random.default_rng(0)
  features = rng.standard_normal((2, 80, 3000)).astype(np.float32)
  with torch.no_grad():
    want = hf_model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
  got = np.asarray(jax.jit(model.apply)({"params": params}, features))
  assert got.shape == (2, 1500, 64)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_parity_128_mels_conditional_generation_prefix_scanned(tmp_path):
  hf_model = _save_random_hf(tmp_path, transformers.WhisperForConditionalGeneration, 128, seed=1)
  with open(tmp_path / "config.json") as f:
    cfg = hf_whisper.config_from_hf(json.load(f), scan_layers=True)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  assert "model.encoder.conv1.weight" in tensors
  params = hf_whisper.params_from_hf(lambda name: tensors[name], cfg)
  assert params["layers"]["fc1"]["kernel"].shape == (2, 64, 128)
  features = np.random.default_rng(1).standard_normal((1, 128, 3000)).astype(np.float32)
  with torch.no_grad():
    want = hf_model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
  got = np.asarray(jax.jit(WhisperEncoder(cfg).apply)({"params": params}, features))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_short_input_matches_hf_layers_on_sliced_positions(hf_whisper_model):
  path, hf_model = hf_whisper_model
  model, params = _load(path)
  features = np.random.default_rng(2).standard_normal((2, 80, 400)).astype(np.float32)
  want = _hf_encoder_manual(hf_model.encoder, torch.from_numpy(features))
  got = np.asarray(model.apply({"params": params}, features))
  assert got.shape == (2, 200, 64)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_padded_batch_equals_each_example_alone(hf_whisper_model):
  path, _ = hf_whisper_model
  model, params = _load(path)
  apply = jax.jit(model.apply)
  lengths = [400, 251, 100]  # row 0 is unpadded; rows 1 and 2 are compared alone
  rng = np.random.default_rng(3)
  features = rng.standard_normal((3, 80, 400)).astype(np.float32)
  mask = (np.arange(400)[None] < np.array(lengths)[:, None]).astype(np.int32)
  batch = np.asarray(apply({"params": params}, features, mask))
  out_mask = np.asarray(encoder_output_mask(mask))
  assert out_mask.shape == (3, 200)
  for i, n in enumerate(lengths):
    m = encoder_output_length(n)
    assert out_mask[i].sum() == m and out_mask[i, :m].all()
    if i == 0:
      continue
    alone = np.asarray(apply({"params": params}, features[i:i + 1, :, :n]))
    assert alone.shape == (1, m, 64)
    np.testing.assert_allclose(batch[i, :m], alone[0], atol=1e-5, rtol=0)
  # Garbage in the padded frames must not leak into valid outputs.
  noisy = np.where(mask[:, None, :] > 0, features, 1e3)
  noisy_out = np.asarray(apply({"params": params}, noisy, mask))
  np.testing.assert_allclose(noisy_out * out_mask[..., None], batch * out_mask[..., None],
                             atol=1e-5, rtol=0)


def test_params_to_hf_round_trip(hf_whisper_model):
  path, hf_model = hf_whisper_model
  with open(path / "config.json") as f:
    cfg = hf_whisper.config_from_hf(json.load(f))
  tensors = load_file(str(path / "model.safetensors"))
  params = hf_whisper.params_from_hf(tensors, cfg)  # a Mapping works as well as a getter
  exported = hf_whisper.params_to_hf(params, cfg, prefix="encoder.")
  encoder_keys = {k for k in tensors if k.startswith("encoder.")}
  assert set(exported) == encoder_keys
  for k, v in exported.items():
    np.testing.assert_array_equal(v, tensors[k])
  # The scanned layout exports the same tensors.
  scanned = dataclasses.replace(cfg, scan_layers=True)
  exported_scanned = hf_whisper.params_to_hf(hf_whisper.params_from_hf(tensors, scanned), scanned,
                                             prefix="encoder.")
  for k, v in exported_scanned.items():
    np.testing.assert_array_equal(v, tensors[k])


def test_config_from_hf_and_bad_inputs():
  cfg = hf_whisper.config_from_hf(_tiny_hf_config(128).to_dict(), dtype="bfloat16")
  assert (cfg.num_mel_bins, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.ffn_dim) == (
      128, 64, 2, 4, 128)
  assert cfg.dtype == "bfloat16"
  with pytest.raises(ValueError, match="model_type"):
    hf_whisper.config_from_hf({"model_type": "llama"})
  with pytest.raises(KeyError, match="conv1.weight"):
    hf_whisper.params_from_hf({}, cfg)
  assert whisper_config("large-v3").num_mel_bins == 128
  model = WhisperEncoder(WhisperEncoderConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64,
                                              max_source_positions=50))
  with pytest.raises(ValueError, match="max_source_positions"):
    model.init(jax.random.key(0), jnp.zeros((1, 80, 101)))
  with pytest.raises(ValueError, match="mel bins"):
    model.init(jax.random.key(0), jnp.zeros((1, 64, 100)))


def _random_params(abstract, seed=0):
  """Noise of the right shapes: compiling the real initialisers costs more on CPU
  than the forward passes under test."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if getattr(path[-1], "key", None) == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    std = 0.5 / np.sqrt(leaf.shape[-2]) if len(leaf.shape) >= 2 else 0.1
    return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


def test_init_positions_axes_and_bf16():
  cfg = WhisperEncoderConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64,
                             max_source_positions=60, scan_layers=True)
  model = WhisperEncoder(cfg)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 80, 120)), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  boxed = jax.tree_util.tree_leaves(abstract["params"],
                                    is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed)
  names = nn.get_partition_spec(abstract)["params"]
  assert names["layers"]["fc1"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")
  assert names["conv1"]["kernel"] == jax.sharding.PartitionSpec("conv_kernel", "mel", "embed")
  positions = SinusoidalPositions(60, 32).init(jax.random.key(0), 1)["params"]
  table = np.asarray(nn.unbox(positions)["embedding"])
  np.testing.assert_allclose(table, sinusoids(60, 32), atol=1e-6)
  from transformers.models.whisper.modeling_whisper import sinusoids as hf_sinusoids
  np.testing.assert_allclose(table, hf_sinusoids(60, 32).numpy(), atol=1e-5)

  params = _random_params(abstract["params"])
  f32 = jax.jit(model.apply)({"params": params}, x)
  bf16_model = WhisperEncoder(dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16"))
  bf16_params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
  bf16 = jax.jit(bf16_model.apply)({"params": bf16_params}, x)
  assert bf16.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - f32))) < 0.1


def test_lora_targets_remat_dropout_and_frozen_positions():
  lora = lora_lib.LoRAConfig(rank=4, targets=(r"layers_\d+/self_attn/(q_proj|v_proj)$",))
  cfg = WhisperEncoderConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64,
                             max_source_positions=50, lora=lora)
  model = WhisperEncoder(cfg)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 80, 100)), jnp.float32)
  mask = jnp.asarray(np.arange(100)[None] < np.array([[100], [61]]), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, mask)
  assert sorted(abstract["lora"]["layers_0"]["self_attn"]) == ["q_proj", "v_proj"]
  assert "fc1" not in abstract["lora"]["layers_0"]
  variables = {"params": _random_params(abstract["params"]),
               "lora": _random_params(abstract["lora"], seed=1)}
  out_mask = encoder_output_mask(mask)[..., None]

  def loss(variables, model=model, **kw):
    return jnp.sum(model.apply(variables, x, mask, **kw) * out_mask)

  grads = jax.jit(jax.grad(loss))(variables)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  # Positions are frozen: no gradient reaches the table; everything else learns.
  assert not np.asarray(grads["params"]["embed_positions"]["embedding"]).any()
  assert np.abs(np.asarray(grads["params"]["layers_0"]["fc1"]["kernel"])).sum() > 0
  assert np.abs(np.asarray(grads["lora"]["layers_0"]["self_attn"]["q_proj"]["lora_b"])).sum() > 0

  # Remat (unrolled and scanned) and dropout trace through the same gradient; only
  # shapes are checked here, since compiling them on CPU costs seconds each.
  for scan in (False, True):
    heavy = WhisperEncoder(dataclasses.replace(cfg, num_layers=2, scan_layers=scan,
                                               remat_policy="full", attention_dropout=0.1,
                                               residual_dropout=0.1))
    heavy_vars = jax.eval_shape(heavy.init, jax.random.key(0), x, mask)
    shapes = jax.eval_shape(jax.grad(lambda v: loss(
        v, model=heavy, deterministic=False, rngs={"dropout": jax.random.key(1)})), heavy_vars)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(heavy_vars)


def test_ctc_head_over_characters_or_tokenizer_ids_and_export(tmp_path):
  from speechjax.hf.checkpoint_io import load_extra_params
  from speechjax.hf.export_whisper import export_whisper_encoder
  from speechjax.models import ctc
  from speechjax.models.encoders.whisper import WhisperEncoderConfig
  from speechjax.projects.spoken_commands import tokenizer as tokenizer_lib

  enc = WhisperEncoderConfig(num_mel_bins=8, d_model=16, num_layers=1, num_heads=2, ffn_dim=32,
                             max_source_positions=16)
  with pytest.raises(ValueError, match="exactly one"):
    ctc.CTCConfig(encoder=enc)
  chars = ctc.CTCConfig(encoder=enc, vocab="ab ")
  assert chars.vocab_size == 4
  # Best path _ a a _ a b _ -> "aab".
  logits = np.asarray(jax.nn.one_hot(np.array([[0, 1, 1, 0, 1, 2, 0]]), 4))
  assert ctc.greedy_decode(logits, np.ones((1, 7)), chars) == ["aab"]

  tok = tokenizer_lib.train_bpe_tokenizer(["turn on the lights", "turn off the radio"] * 5, vocab_size=270)
  tokens = ctc.CTCConfig(encoder=enc, token_vocab_size=len(tok))
  ids = tok.encode("turn off the lights", add_special_tokens=False)
  path = [0] + [i + 1 for i in ids for _ in range(2)] + [0]  # each token twice, blanks around
  logits = np.asarray(jax.nn.one_hot(np.array([path]), tokens.vocab_size))
  assert ctc.greedy_decode(logits, np.ones((1, len(path))), tokens, tok) == ["turn off the lights"]
  with pytest.raises(ValueError, match="tokenizer"):
    ctc.labels_to_text([1], tokens)

  # The head travels with the exported encoder (a 'ctc_compress' projector starts from it).
  model = ctc.CTCEncoder(tokens)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 16)), jnp.ones((1, 16), jnp.int32))
  params = nn.unbox(variables["params"])
  folder = export_whisper_encoder(str(tmp_path / "enc"), enc, params["encoder"], ctc_head=params["ctc_head"])
  head = load_extra_params(folder, "ctc_head")
  np.testing.assert_array_equal(head["kernel"], np.asarray(params["ctc_head"]["kernel"]))
  assert head["bias"].shape == (tokens.vocab_size,)
  with pytest.raises(FileNotFoundError, match="ctc_head"):
    load_extra_params(str(tmp_path), "ctc_head")


def test_frame_stack_low_frame_rate_masks_and_export(tmp_path):
  from speechjax.hf import load_pretrained
  from speechjax.hf.export_whisper import export_whisper_encoder
  from speechjax.models.encoders.whisper import stack_frames

  # Channel m*k + i holds mel bin m of frame i of each group; the tail is zero-padded.
  x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
  stacked = np.asarray(stack_frames(jnp.asarray(x), 2))
  assert stacked.shape == (2, 6, 3)
  np.testing.assert_array_equal(stacked[:, 0::2, :2], x[:, :, 0:4:2])
  np.testing.assert_array_equal(stacked[:, 1::2, :2], x[:, :, 1:4:2])
  np.testing.assert_array_equal(stacked[:, 1::2, 2], 0)

  cfg = WhisperEncoderConfig(num_mel_bins=8, d_model=16, num_layers=2, num_heads=2, ffn_dim=32,
                             max_source_positions=32, frame_stack=2)
  model = WhisperEncoder(cfg)
  lengths = [47, 30, 9]  # none a multiple of 2k = 4
  rng = np.random.default_rng(5)
  features = rng.standard_normal((3, 8, 47)).astype(np.float32)
  mask = (np.arange(47)[None] < np.array(lengths)[:, None]).astype(np.int32)
  params = nn.unbox(model.init(jax.random.key(1), features, mask)["params"])
  assert params["conv1"]["kernel"].shape == (3, 16, 16)
  batch = np.asarray(model.apply({"params": params}, features, mask))
  out_mask = np.asarray(encoder_output_mask(mask, 2))
  assert batch.shape == (3, 12, 16) and out_mask.shape == (3, 12)
  for i, n in enumerate(lengths):
    m = encoder_output_length(n, 2)
    assert m == -(-n // 4) and out_mask[i].sum() == m and out_mask[i, :m].all()
    alone = np.asarray(model.apply({"params": params}, features[i:i + 1, :, :n]))
    assert alone.shape == (1, m, 16)
    np.testing.assert_allclose(batch[i, :m], alone[0], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="frame_stack"):
    WhisperEncoderConfig(frame_stack=0)

  # The export records frame_stack, and loading it back rebuilds the same encoder.
  folder = export_whisper_encoder(str(tmp_path / "enc"), cfg, params)
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f)["frame_stack"] == 2
  loaded, loaded_params = load_pretrained(folder)
  assert loaded.config.frame_stack == 2
  np.testing.assert_allclose(np.asarray(loaded.apply({"params": loaded_params}, features, mask)),
                             batch, atol=1e-6, rtol=0)
  # A plain Whisper export stays an HF config (no extra key).
  plain = export_whisper_encoder(str(tmp_path / "plain"), dataclasses.replace(cfg, frame_stack=1),
                                 {**params, "conv1": {k: v[:, :8] if k == "kernel" else v
                                                      for k, v in params["conv1"].items()}})
  with open(os.path.join(plain, "config.json")) as f:
    assert "frame_stack" not in json.load(f)


def test_cudnn_encoder_with_padding_equals_the_masked_encoder(hf_whisper_model, monkeypatch):
  """attention_impl='cudnn' runs the layers on real frames moved to the front with
  sequence lengths; XLA's attention stands in for cuDNN's kernel on CPU."""
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, implementation=None, **k: fused(
      *a, implementation="xla" if implementation == "cudnn" else implementation, **k))
  path, _ = hf_whisper_model
  model, params = _load(path)
  features = np.random.default_rng(5).standard_normal((2, 80, 300)).astype(np.float32)
  mask = (np.arange(300)[None] < np.array([[300], [137]])).astype(np.int32)
  want = np.asarray(jax.jit(model.apply)({"params": params}, features, mask))
  cudnn = WhisperEncoder(dataclasses.replace(model.config, attention_impl="cudnn"))
  got = np.asarray(jax.jit(cudnn.apply)({"params": params}, features, mask))
  real = np.asarray(encoder_output_mask(mask), bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
