"""Decoder LLM modules on random weights: KV cache, scan/remat, dropout, call contract."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechjax.models import attention
from speechjax.models import layers as L
from speechjax.models.decoder import Decoder, DecoderConfig
from speechjax.models.families import decoder_config_from_dict, make_decoder
from speechjax.models.gpt2 import GPT2, GPT2Config
from speechjax.models.transformer import init_cache

VOCAB = 64
LLAMA = DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=12, qk_norm=True, qkv_bias=True,
                      sliding_window=4, rope_theta=1000.0)
GPT = GPT2Config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                 max_position_embeddings=32)


def init(cfg, seed=0):
  """Random params from numpy: model.init would compile an RNG program per test."""
  ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(make_decoder(cfg).init, jax.random.key(0), ids))["params"]
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape) + (1.0 if len(s.shape) == 1 else 0.0),
                            s.dtype), shapes)


def tokens(seed=0, batch=2, length=10):
  ids = np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[0, :2] = 0  # left padding
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("cfg", [LLAMA, dataclasses.replace(LLAMA, scan_layers=True), GPT],
                         ids=["llama", "llama_scan", "gpt2"])
def test_kv_cache_decoding_matches_full_forward(cfg):
  model = make_decoder(cfg)
  params = init(cfg)
  ids, mask = tokens()
  full = jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=mask))(params)

  max_len = 12  # more slots than tokens: unused slots are masked out
  slot_mask = jnp.pad(mask, ((0, 0), (0, max_len - ids.shape[1])))

  @jax.jit
  def step(p, new_ids, cache):
    return model.apply({"params": p}, new_ids, attention_mask=slot_mask, cache=cache)

  cache = init_cache(cfg, 2, max_len, jnp.float32)
  assert cache["k"].shape == (cfg.num_layers, 2, max_len, cfg.num_kv_heads, cfg.head_dim)
  prefill, cache = step(params, ids[:, :6], cache)
  pieces = [prefill]
  for t in range(6, 10):
    logits, cache = step(params, ids[:, t:t + 1], cache)
    pieces.append(logits)
  assert int(cache["index"]) == 10
  incremental = np.concatenate([np.asarray(p) for p in pieces], axis=1)
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(incremental[real], np.asarray(full)[real], atol=1e-5, rtol=0)


def stack_layers(params, key):
  layers = [params.pop(f"{key}_{i}") for i in range(2)]
  params[key] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
  return params


def test_scan_and_remat_give_same_logits_and_grads():
  params = init(LLAMA)
  unrolled = dataclasses.replace(LLAMA, remat_policy="full")
  scanned = dataclasses.replace(LLAMA, scan_layers=True, remat_policy="dots_saveable")
  scanned_params = stack_layers(dict(params), "layers")
  ids, mask = tokens(1)

  def loss(model, p):
    logits = model.apply({"params": p}, ids, attention_mask=mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  for cfg, p in ((unrolled, params), (scanned, scanned_params)):
    assert "remat" in str(jax.make_jaxpr(lambda p, cfg=cfg: loss(Decoder(cfg), p))(p))
  assert "remat" not in str(jax.make_jaxpr(lambda p: loss(Decoder(LLAMA), p))(params))
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(Decoder(unrolled), p)))(params)
  got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(Decoder(scanned), p)))(
      scanned_params)
  np.testing.assert_allclose(got_loss, ref_loss, atol=1e-6)
  np.testing.assert_allclose(got_grads["layers"]["mlp"]["up_proj"]["kernel"][1],
                             ref_grads["layers_1"]["mlp"]["up_proj"]["kernel"], atol=1e-6)
  np.testing.assert_allclose(got_grads["embed_tokens"]["embedding"],
                             ref_grads["embed_tokens"]["embedding"], atol=1e-6)


def test_scanned_params_have_layer_axis():
  cfg = dataclasses.replace(LLAMA, scan_layers=True)
  boxed = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  specs = nn.get_partition_spec(boxed)["params"]
  assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "heads")
  assert specs["layers"]["self_attn"]["k_proj"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "kv_heads")
  assert specs["embed_tokens"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert specs["lm_head"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")


@pytest.mark.parametrize("cfg", [LLAMA, GPT], ids=["llama", "gpt2"])
def test_embeds_hidden_and_embed_method(cfg):
  model = make_decoder(cfg)
  params = init(cfg)
  ids, mask = tokens(2)

  @jax.jit
  def run(p):
    embeds = model.apply({"params": p}, ids, method="embed")
    from_ids = model.apply({"params": p}, ids, attention_mask=mask, return_hidden=True)
    from_embeds = model.apply({"params": p}, inputs_embeds=embeds, attention_mask=mask)
    return embeds, from_ids, from_embeds

  embeds, (logits, hidden), from_embeds = run(params)
  assert embeds.shape == (2, 10, 32) and hidden.shape == (2, 10, 32)
  assert logits.shape == (2, 10, VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_allclose(from_embeds, logits, atol=1e-6)


def test_dropout_needs_rng_and_is_off_when_deterministic():
  cfg = dataclasses.replace(LLAMA, residual_dropout=0.3, attention_dropout=0.3)
  params = init(LLAMA)
  ids, mask = tokens(3)

  @jax.jit
  def run(p, rng):
    kw = dict(attention_mask=mask)
    return (Decoder(cfg).apply({"params": p}, ids, **kw),
            Decoder(LLAMA).apply({"params": p}, ids, **kw),
            Decoder(cfg).apply({"params": p}, ids, deterministic=False, rngs={"dropout": rng},
                               **kw))

  eval_logits, plain, train_logits = run(params, jax.random.key(1, impl="unsafe_rbg"))
  np.testing.assert_allclose(eval_logits, plain, atol=1e-6)
  assert np.all(np.isfinite(train_logits))
  assert np.abs(np.asarray(train_logits - plain)).max() > 1e-3


def test_attention_dropout_path_matches_fused_kernel():
  """The written-out path (used under dropout) is the same math as the fused one, GQA included."""
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(2, 5, 4, 8), jnp.float32)
  k = jnp.asarray(rng.randn(2, 7, 2, 8), jnp.float32)
  v = jnp.asarray(rng.randn(2, 7, 2, 8), jnp.float32)
  key_mask = jnp.asarray([[1] * 7, [0, 0] + [1] * 5])
  mask = attention.causal_mask(jnp.arange(5) + 2, jnp.arange(7), key_mask, sliding_window=3)

  @jax.jit
  def both(q, k, v, mask):
    fused = attention.attend(q, k, v, mask)
    written = attention.attend(q, k, v, mask, dropout_rate=1e-9, deterministic=False,
                       dropout_rng=jax.random.key(0, impl="unsafe_rbg"))
    return fused, written

  for m in (mask, attention.padding_mask(key_mask)):
    fused, written = both(q, k, v, m)
    np.testing.assert_allclose(written, fused, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "per_head", "shared"])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "per_row"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_in_blocks_is_jax_attention(mask_kind, bias_kind, is_causal):
  """Values and gradients of attend_in_blocks equal jax.nn.dot_product_attention's for
  grouped-query heads, more keys than queries, and block sizes that split the queries
  unevenly (5 blocks of 8 for 37 queries), group batch rows, or take everything at once."""
  b, t, s, n, kv, d = 3, 37, 41, 4, 2, 8
  rng = np.random.RandomState(2)
  q = jnp.asarray(rng.randn(b, t, n, d), jnp.float32)
  k, v = (jnp.asarray(rng.randn(b, s, kv, d), jnp.float32) for _ in range(2))
  mask = {"none": None, "padding": attention.padding_mask(jnp.asarray(np.arange(s)[None] < [[s], [20], [3]])),
          "per_head": jnp.asarray(rng.rand(b, n, t, s) > 0.3),
          "shared": jnp.asarray(rng.rand(1, 1, t, s) > 0.3)}[mask_kind]
  bias = {"none": None, "shared": jnp.asarray(rng.randn(1, n, t, s), jnp.float32),
          "per_row": jnp.asarray(rng.randn(b, n, t, s), jnp.float32)}[bias_kind]

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * jnp.cos(out)), out

  want_grads, want = jax.grad(lambda *a: loss(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask, is_causal=is_causal), *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  per_query = n * s * 4  # bytes of one query's logits
  for block_bytes in (8 * per_query, 2 * t * per_query, 10**9):  # 5 query blocks; 2 rows a block; all
    blocks = jax.jit(jax.grad(lambda *a: loss(lambda q, k, v: attention.attend_in_blocks(
        q, k, v, mask, bias, is_causal=is_causal, block_bytes=block_bytes), *a), argnums=(0, 1, 2), has_aux=True))
    grads, got = blocks(q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, atol=2e-5)


def _compiled_text(fn, *args, devices=None):
  if devices is None:
    return jax.jit(fn).lower(*args).compile().as_text()
  mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in args]
  return jax.jit(fn).lower(*abstract).compile().as_text()


def test_large_attention_runs_in_blocks_in_a_cpu_program_only():
  """dot_product_attention: logits over CPU_LOGITS_BLOCK_BYTES run in blocks (a while loop)
  in a program lowered for CPU, with jax's values; smaller ones, a named implementation and
  a program lowered for TPU get jax.nn.dot_product_attention itself."""
  from speechjax.compilation import topology  # pylint: disable=import-outside-toplevel

  rng = np.random.RandomState(3)
  b, t, n, d = 4, 200, 6, 16  # 4 x 6 x 200 x 200 float32 logits: 3.7 MiB
  assert b * n * t * t * 4 > attention.CPU_LOGITS_BLOCK_BYTES
  q, k, v = (jnp.asarray(rng.randn(b, t, n, d), jnp.float32) for _ in range(3))
  mask = attention.padding_mask(jnp.asarray(np.arange(t)[None] < [[t], [150], [90], [10]]))
  ours = lambda q, k, v, m: attention.dot_product_attention(q, k, v, m)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v, mask), jax.nn.dot_product_attention(q, k, v, mask=mask),
                             atol=2e-6)
  assert "while(" in _compiled_text(ours, q, k, v, mask)
  small = [x[:1, :100] for x in (q, k, v)] + [mask[:1, :, :, :100]]
  assert "while(" not in _compiled_text(ours, *small)
  named = lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, implementation="xla")
  assert "while(" not in _compiled_text(named, q, k, v, mask)
  if topology.libtpu_available():
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    tpu = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                       chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    assert "while(" not in _compiled_text(ours, q, k, v, mask, devices=tpu)


def test_bad_inputs_raise_clear_errors():
  model = Decoder(LLAMA)
  params = init(LLAMA)
  ids, mask = tokens()
  with pytest.raises(ValueError, match="exactly one of input_ids"):
    model.apply({"params": params})
  with pytest.raises(ValueError, match="attention_mask has shape"):
    model.apply({"params": params}, ids, attention_mask=mask[:, :5])
  with pytest.raises(ValueError, match="cache slots"):
    model.apply({"params": params}, ids, attention_mask=mask, cache=init_cache(LLAMA, 2, 12))
  with pytest.raises(ValueError, match="KV cache 'k' has shape"):
    model.apply({"params": params}, ids, cache=init_cache(GPT, 2, 12))
  with pytest.raises(ValueError, match="num_kv_heads"):
    DecoderConfig(num_heads=4, num_kv_heads=3, hidden_size=32)
  with pytest.raises(ValueError, match="remat_policy"):
    DecoderConfig(remat_policy="sometimes")
  assert isinstance(make_decoder(GPT), GPT2)


def test_config_from_ml_collections_dict():
  cfg = DecoderConfig(**{**dataclasses.asdict(LLAMA), "lora": {"rank": 4, "targets": ["q_proj$"]}})
  assert cfg.lora.rank == 4 and cfg.lora.targets == ("q_proj$",)
  assert hash(cfg)
  gpt = decoder_config_from_dict({**dataclasses.asdict(GPT), "dtype": "bfloat16"})
  assert isinstance(gpt, GPT2Config) and gpt.head_dim == 8 and gpt.num_kv_heads == 4


def test_rope_table_equals_computed_cos_sin():
  inv_freq, scale = L.rope_inv_freq(12, 1000.0, "yarn", factor=4.0, original_max_position=16)
  assert scale != 1.0  # the table must carry the attention scale too
  positions = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 7)), jnp.int32)
  want = L.rope_cos_sin(positions, inv_freq, scale)
  got = L.rope_cos_sin(positions, inv_freq, scale, num_positions=50)
  for w, g in zip(want, got):
    assert g.shape == (2, 7, 6) and g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=0)


def test_default_positions_give_the_same_logits_as_explicit_ones():
  # Default positions read RoPE from a table, explicit ones compute it.
  model, params = Decoder(LLAMA), init(LLAMA)
  ids, mask = tokens(4)
  table = model.apply({"params": params}, ids, attention_mask=mask)
  computed = model.apply({"params": params}, ids, attention_mask=mask,
                         positions=L.default_positions(mask, 2, ids.shape[1]))
  np.testing.assert_allclose(table, computed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [LLAMA, GPT], ids=["llama", "gpt2"])
def test_hidden_only_then_lm_logits_equals_the_full_call(cfg):
  model, params = make_decoder(cfg), init(cfg)
  ids, mask = tokens(5)
  logits, hidden = model.apply({"params": params}, ids, attention_mask=mask, return_hidden=True)
  only = model.apply({"params": params}, ids, attention_mask=mask, hidden_only=True)
  np.testing.assert_allclose(only, hidden, atol=1e-6)
  head = model.apply({"params": params}, only[:, 3:], method="lm_logits")
  np.testing.assert_allclose(head, logits[:, 3:], atol=1e-5)
  with pytest.raises(ValueError, match="hidden_only"):
    model.apply({"params": params}, ids, attention_mask=mask, hidden_only=True,
                cache=init_cache(cfg, 2, 12, jnp.float32))


def test_silu_gated_values_and_gradients_equal_autodiff():
  rng = np.random.RandomState(0)
  gate = jnp.asarray(rng.normal(0, 6, (5, 7)), jnp.float32)  # saturated tails included
  up = jnp.asarray(rng.normal(0, 1, (5, 7)), jnp.float32)
  weight = jnp.asarray(rng.normal(0, 1, (5, 7)), jnp.float32)
  plain = lambda g, u: jnp.sum(weight * jax.nn.silu(g) * u)
  fused = lambda g, u: jnp.sum(weight * L.silu_gated(g, u))
  np.testing.assert_allclose(fused(gate, up), plain(gate, up), rtol=1e-6)
  for got, want in zip(jax.grad(fused, (0, 1))(gate, up), jax.grad(plain, (0, 1))(gate, up)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert L.gated_activation("silu", gate, up).shape == (5, 7)
  np.testing.assert_allclose(L.gated_activation("gelu", gate, up),
                             jax.nn.gelu(gate, approximate=False) * up, atol=1e-6)


def test_gelu_exact_equals_jax_gelu_values_and_gradients():
  x = jnp.asarray(np.random.RandomState(1).normal(0, 4, (6, 9)), jnp.float32)
  np.testing.assert_allclose(L.gelu_exact(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(L.gelu_exact(v)))(x),
                             jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=False)))(x),
                             atol=2e-6)
  assert L.gelu_exact(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_gelu_exact_backward_keeps_fewer_temporaries_than_autodiff():
  # Autodiff computes the derivative in the forward pass and keeps it for the
  # backward: one more [rows, ffn] buffer per layer.
  plain = lambda v: 0.5 * v * (1.0 + jax.lax.erf(v * np.float32(1 / np.sqrt(2))))

  def temp_bytes(act):
    def loss(ws, x):
      for w1, w2 in ws:
        x = x + act(x @ w1) @ w2
      return jnp.sum(x)

    rs = np.random.RandomState(0)
    ws = [(jnp.asarray(rs.normal(0, 0.05, (64, 256)), jnp.float32),
           jnp.asarray(rs.normal(0, 0.05, (256, 64)), jnp.float32)) for _ in range(4)]
    compiled = jax.jit(jax.grad(loss)).lower(ws, jnp.ones((512, 64), jnp.float32)).compile(
        {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"})
    return compiled.memory_analysis().temp_size_in_bytes

  ours, autodiff = temp_bytes(L.gelu_exact), temp_bytes(plain)
  assert ours < 0.8 * autodiff, (ours, autodiff)


@pytest.fixture
def cudnn_as_xla(monkeypatch):
  """On CPU, XLA's attention stands in for cuDNN's kernel: the model code around
  it (padding moved to sequence lengths) runs as it does on a GPU."""
  fused = jax.nn.dot_product_attention

  def standin(*args, implementation=None, **kwargs):
    return fused(*args, implementation="xla" if implementation == "cudnn" else implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", standin)


def test_seq_lengths_attention_equals_the_boolean_mask():
  rng = np.random.RandomState(1)
  q = jnp.asarray(rng.randn(2, 6, 4, 8), jnp.float32)
  k = jnp.asarray(rng.randn(2, 6, 2, 8), jnp.float32)
  v = jnp.asarray(rng.randn(2, 6, 2, 8), jnp.float32)
  lengths = attention.SeqLengths(jnp.asarray([6, 4], jnp.int32))
  real = np.arange(6)[None, :] < np.asarray(lengths.lengths)[:, None]
  for causal in (True, False):
    dense = attention.seq_lengths_mask(lengths, 6, causal)
    want = attention.attend(q, k, v, dense)
    got = attention.attend(q, k, v, lengths, is_causal=causal)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
    assert np.all(np.asarray(got)[~real] == 0)  # padded queries: zeros
    written = attention.attend(q, k, v, lengths, is_causal=causal, dropout_rate=1e-9, deterministic=False,
                               dropout_rng=jax.random.key(0, impl="unsafe_rbg"))
    np.testing.assert_allclose(np.asarray(written)[real], np.asarray(want)[real], atol=1e-5)
  with pytest.raises(ValueError, match="SeqLengths masks self-attention"):
    attention.attend(q, k[:, :5], v[:, :5], lengths)


def test_real_slots_first_round_trip():
  x = jnp.arange(2 * 5 * 3).reshape(2, 5, 3)
  real = jnp.asarray([[0, 1, 0, 1, 1], [1, 1, 1, 0, 0]])
  packed, lengths, order = attention.real_slots_first(x, real)
  assert lengths.lengths.tolist() == [3, 3]
  np.testing.assert_array_equal(packed[0, :3], x[0, jnp.asarray([1, 3, 4])])  # real slots, in order
  np.testing.assert_array_equal(packed[1, :3], x[1, :3])
  np.testing.assert_array_equal(attention.restore_slots(packed, order), x)


@pytest.mark.parametrize("stack", [{}, {"scan_layers": True, "remat_policy": "full"}], ids=["unrolled", "scan_remat"])
def test_cudnn_decoder_with_padding_holes_equals_the_masked_decoder(cudnn_as_xla, stack):
  """attention_impl='cudnn' moves real slots to the front and passes lengths; at every
  real position logits and gradients equal those of the boolean-mask decoder."""
  cfg = dataclasses.replace(LLAMA, sliding_window=0, **stack)
  params = init(cfg)
  ids, _ = tokens(length=9)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1],  # left padding
                      [1, 1, 1, 0, 0, 1, 1, 1, 0]])  # holes (padded audio slots) and right padding
  real = np.asarray(mask, bool)

  def loss_and_logits(cfg, p):
    logits = Decoder(cfg).apply({"params": p}, ids, attention_mask=mask)
    return jnp.sum(jnp.where(mask[..., None] > 0, jnp.tanh(logits), 0.0)), logits

  grad = jax.jit(jax.grad(loss_and_logits, argnums=1, has_aux=True), static_argnums=0)
  want_g, want = grad(cfg, params)
  got_g, got = grad(dataclasses.replace(cfg, attention_impl="cudnn"), params)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
  for g, w in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(want_g)):
    np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-4)
  assert np.abs(np.asarray(got)[real] - np.asarray(want)[real]).max() < 2e-5


def test_cudnn_decoder_decodes_one_token_without_the_fused_kernel():
  """A decoding step (one query against the KV cache) takes the one-query path
  with attention_impl='cudnn' too: on CPU, where no cuDNN exists, it runs and
  matches the default decoder's step."""
  cfg = dataclasses.replace(LLAMA, sliding_window=0)
  params = init(cfg)
  ids, mask = tokens(length=6)
  slot_mask = jnp.pad(mask, ((0, 0), (0, 2)))
  cache = init_cache(cfg, 2, 8, jnp.float32)
  cache = dict(cache, index=jnp.asarray(5, jnp.int32))
  step = lambda c: Decoder(c).apply({"params": params}, ids[:, 5:6], attention_mask=slot_mask, cache=cache)[0]
  np.testing.assert_allclose(jax.jit(step, static_argnums=0)(dataclasses.replace(cfg, attention_impl="cudnn")),
                             jax.jit(step, static_argnums=0)(cfg), atol=1e-6)
