"""Projectors: output lengths, padding masks, batch invariance, reference maths."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechjax.models.projector import (
  PROJECTORS,
  ProjectorConfig,
  ctc_compress_slots,
  make_projector,
  projector_output_length,
)

D_IN, D_OUT = 12, 16


VOCAB = 10  # 'ctc_compress': the LLM's token table [VOCAB, D_OUT], CTC head VOCAB + 1 blank
TABLE = jnp.asarray(np.random.default_rng(7).standard_normal((VOCAB, D_OUT)), jnp.float32)


def _cfg(kind, **kw):
  base = dict(kind=kind, output_dim=D_OUT, hidden_dim=24, stack_factor=3, conv_kernel=3,
              conv_stride=2, window_size=4, num_queries=2, qformer_layers=2, qformer_dim=16,
              qformer_heads=2, qformer_ffn_dim=32, pool_factor=2, max_tokens=6,
              ctc_vocab_size=VOCAB + 1, fill_token_id=0)
  base.update(kw)
  return ProjectorConfig(**base)


def _extra(kind):
  return {"token_table": TABLE} if kind == "ctc_compress" else {}


def _prefix_mask(lengths, n):
  return (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


@pytest.fixture(scope="module", params=PROJECTORS.names())
def projector(request):
  cfg = _cfg(request.param)
  model = make_projector(cfg)
  x = jnp.zeros((1, 8, D_IN))
  # Shapes from eval_shape and noise for values: compiling initialisers is slow on CPU.
  extra = _extra(cfg.kind)
  variables = jax.eval_shape(functools.partial(model.init, **extra), jax.random.key(0), x,
                             jnp.ones((1, 8), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.5 / np.sqrt(a.shape[-2]) * rng.standard_normal(a.shape) if a.ndim > 1
                            else 1.0 + 0.1 * rng.standard_normal(a.shape), a.dtype),
      nn.unbox(variables["params"]))
  apply = jax.jit(lambda x, m: model.apply({"params": params}, x, m, **extra))
  return cfg, model, variables, apply


@pytest.mark.parametrize("n", [9, 16])
def test_output_lengths_odd_and_even(projector, n):
  cfg, _, _, apply = projector
  x = np.random.default_rng(n).standard_normal((2, n, D_IN)).astype(np.float32)
  y, mask = apply(x, np.ones((2, n), np.int32))
  m = projector_output_length(n, cfg)
  assert y.shape == (2, m, D_OUT) and mask.shape == (2, m)
  assert np.asarray(mask).all()
  assert np.isfinite(np.asarray(y)).all()


def test_padding_mask_respected_and_batch_invariant(projector):
  cfg, _, _, apply = projector
  n, lengths = 17, [17, 10, 5, 1]  # 1: a lone frame in a partly filled group/window
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, n, D_IN)).astype(np.float32)
  mask = _prefix_mask(lengths, n)
  y, out_mask = map(np.asarray, apply(x, mask))
  m_all = projector_output_length(n, cfg)
  expected_mask = _prefix_mask([projector_output_length(l, cfg) for l in lengths], m_all)
  np.testing.assert_array_equal(out_mask, expected_mask)

  # Garbage in padded frames changes nothing valid.
  noisy = np.where(mask[..., None] > 0, x, rng.standard_normal(x.shape) * 100).astype(np.float32)
  y_noisy, mask_noisy = map(np.asarray, apply(noisy, mask))
  np.testing.assert_array_equal(mask_noisy, out_mask)
  valid = out_mask.astype(bool)
  np.testing.assert_allclose(y_noisy[valid], y[valid], atol=1e-5)

  # Each example alone at its own length gives the batch's valid outputs.
  for i, l in enumerate(lengths):
    if l in (17, 5):  # row 0 is unpadded; 10 and 1 cover the rest (compiles are slow on CPU)
      continue
    alone, alone_mask = map(np.asarray, apply(x[i:i + 1, :l], np.ones((1, l), np.int32)))
    m = projector_output_length(l, cfg)
    assert alone.shape == (1, m, D_OUT) and alone_mask.all()
    np.testing.assert_allclose(y[i, :m], alone[0], atol=1e-5)


def test_every_param_has_logical_axes(projector):
  _, _, variables, _ = projector
  leaves = jax.tree_util.tree_leaves(variables["params"],
                                     is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  for v in leaves:
    assert len(v.names) == len(v.value.shape)


def test_frame_stack_matches_slam_asr_maths():
  cfg = _cfg("frame_stack")
  model = make_projector(cfg)
  x = np.random.default_rng(1).standard_normal((1, 7, D_IN)).astype(np.float32)
  variables = model.init(jax.random.key(1), x, np.ones((1, 7), np.int32))
  p = nn.unbox(variables["params"])
  y, _ = model.apply({"params": p}, x, np.ones((1, 7), np.int32))
  padded = np.concatenate([x, np.zeros((1, 2, D_IN), np.float32)], axis=1)
  stacked = padded.reshape(1, 3, 3 * D_IN)  # frames t, t+1, t+2 side by side
  h = np.maximum(stacked @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  want = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)


def test_pool_averages_only_valid_frames():
  cfg = _cfg("pool")
  model = make_projector(cfg)
  x = np.random.default_rng(2).standard_normal((1, 5, D_IN)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0]], np.int32)
  variables = model.init(jax.random.key(2), x, mask)
  p = nn.unbox(variables["params"])
  y, out_mask = model.apply({"params": p}, x, mask)
  np.testing.assert_array_equal(np.asarray(out_mask), [[1, 1, 0]])
  pooled = np.stack([(x[0, 0] + x[0, 1]) / 2, x[0, 2]])  # frame 3 is padding
  want = pooled @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(np.asarray(y)[0, :2], want, atol=1e-5)


def test_qformer_fully_padded_window_is_masked_and_grads_flow():
  cfg = _cfg("qformer", qformer_layers=1)
  model = make_projector(cfg)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 12, D_IN)), jnp.float32)
  mask = jnp.asarray(_prefix_mask([12, 3], 12))
  abstract = jax.eval_shape(model.init, jax.random.key(3), x, mask)
  assert abstract["params"]["queries"].value.shape == (2, 16)
  assert abstract["params"]["queries"].names == ("queries", "embed")
  rng = np.random.default_rng(4)
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
      nn.unbox(abstract["params"]))

  def loss(p):
    y, m = model.apply({"params": p}, x, mask)
    return jnp.sum(jnp.square(y) * m[..., None]), (y, m)

  (_, (y, out_mask)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  np.testing.assert_array_equal(np.asarray(out_mask), [[1] * 6, [1, 1, 0, 0, 0, 0]])
  assert np.isfinite(np.asarray(y)).all()
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert np.abs(np.asarray(grads["queries"])).sum() > 0


def test_config_errors():
  with pytest.raises(ValueError, match="kind"):
    ProjectorConfig(kind="mlp")
  with pytest.raises(ValueError, match="output_dim"):
    make_projector(ProjectorConfig(kind="pool")).init(
        jax.random.key(0), jnp.zeros((1, 4, 8)), jnp.ones((1, 4)))
  cfg = ProjectorConfig(kind="conv", lora={"rank": 2, "targets": ["proj$"]})
  assert cfg.lora.rank == 2 and cfg.lora.targets == ("proj$",)


def test_ctc_compress_keeps_one_frame_per_emitted_token():
  # Best path _ 3 3 _ 3 5 5 _ 2 (0 = blank): tokens 3, 3, 5, 2 from frames 1, 4, 5, 8.
  best = np.array([[0, 3, 3, 0, 3, 5, 5, 0, 2]])
  logits = 20.0 * jax.nn.one_hot(best, VOCAB + 1)
  one_hot = np.asarray(ctc_compress_slots(logits, np.ones((1, 9), np.int32), 6))
  np.testing.assert_array_equal(np.argwhere(one_hot[0]), [[1, 0], [4, 1], [5, 2], [8, 3]])
  # Tokens past max_tokens and padded frames are dropped.
  np.testing.assert_array_equal(np.argwhere(np.asarray(ctc_compress_slots(logits, np.ones((1, 9)), 2))[0]),
                                [[1, 0], [4, 1]])
  mask = (np.arange(9) < 5)[None].astype(np.int32)
  np.testing.assert_array_equal(np.argwhere(np.asarray(ctc_compress_slots(logits, mask, 6))[0]),
                                [[1, 0], [4, 1]])

  # With a CTC head that reads the frame's one-hot label sharply and the
  # learned map at its zero init, slot k is token k's embedding; then the fill.
  cfg = _cfg("ctc_compress")
  model = make_projector(cfg)
  frames = np.asarray(jax.nn.one_hot(best, D_IN))  # frame features = the label's one-hot
  variables = model.init(jax.random.key(0), frames, np.ones((1, 9), np.int32), token_table=TABLE)
  params = nn.unbox(variables["params"])
  params["ctc_head"] = {"kernel": 50.0 * np.eye(D_IN, VOCAB + 1, dtype=np.float32),
                        "bias": np.zeros(VOCAB + 1, np.float32)}
  y, out_mask = model.apply({"params": params}, frames, np.ones((1, 9), np.int32), token_table=TABLE)
  assert y.shape == (1, 6, D_OUT) and np.asarray(out_mask).all()
  expected = np.asarray(TABLE)[[3 - 1, 3 - 1, 5 - 1, 2 - 1, 0, 0]]  # label k is token k - 1
  np.testing.assert_allclose(np.asarray(y[0]), expected, atol=1e-4)

  with pytest.raises(ValueError, match="ctc_vocab_size"):
    make_projector(_cfg("ctc_compress", ctc_vocab_size=VOCAB)).init(
        jax.random.key(0), frames, np.ones((1, 9), np.int32), token_table=TABLE)
