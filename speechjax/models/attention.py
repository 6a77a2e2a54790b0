"""Attention: masks, the attention kernel, the KV-cache update and the module.

`Attention` is general: causal or not, grouped-query heads, optional q/k
RMSNorm, rotary embeddings and a KV cache. Pass either a complete boolean
`mask` [B, 1|N, T, S] (e.g. `padding_mask(key_mask)` for a bidirectional
encoder with padded keys), `SeqLengths` (the first lengths[b] slots of row b
are real: see `real_slots_first`), or no mask; with `SeqLengths` or no mask
the module's `causal` flag decides between causal and full attention. Logits
and softmax run in float32 whatever the compute dtype.

Why `SeqLengths`: cuDNN's fused attention takes a padding mask only as
sequence lengths. A boolean mask reaches it as an additive bias, which it
reads at every tile and differentiates (a dbias output nobody uses), and a
mask that already holds the causal triangle stops it from skipping the tiles
above the diagonal. Models that use cuDNN attention therefore move each
row's real slots to the front before their layers (`real_slots_first`) and
put them back after (`restore_slots`); attention is the only operation that
mixes slots, so every real slot's output is unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechjax.models.layers import RMSNorm, apply_rope
from speechjax.models.lora import Dense, LoRAConfig


def padding_mask(key_mask: jax.Array) -> jax.Array:
  """[B,S] (1 = real) -> boolean [B,1,1,S] for bidirectional attention."""
  return key_mask.astype(bool)[:, None, None, :]


def causal_mask(query_slots: jax.Array, key_slots: jax.Array,
                key_mask: jax.Array | None = None, sliding_window: int = 0) -> jax.Array:
  """Boolean [B|1, 1, T, S]: key slot <= query slot, key real, within the window.

  query_slots [T] and key_slots [S] are positions in the key sequence (cache
  slots), not rotary positions, so left padding does not move the window.
  """
  q = query_slots[:, None]
  k = key_slots[None, :]
  mask = k <= q
  if sliding_window:
    mask = mask & (k > q - sliding_window)
  mask = mask[None, None]
  if key_mask is not None:
    mask = mask & key_mask.astype(bool)[:, None, None, :]
  return mask


class SeqLengths(NamedTuple):
  """A padding mask as sequence lengths: in row b, query and key slots
  [0, lengths[b]) are real and the rest padding (right padding). Self-attention
  over one sequence only (T == S, no KV cache). Outputs at padded query slots
  are zeros."""

  lengths: jax.Array  # [B] int32


def real_slots_first(x: jax.Array, real: jax.Array) -> tuple[jax.Array, SeqLengths, jax.Array]:
  """x [B,T,...], real [B,T] (1 = real slot) -> (x with each row's real slots
  moved to the front in their order, SeqLengths, order [B,T]): slot i of the
  result is slot order[b, i] of x. Undo with restore_slots(y, order)."""
  real = real.astype(bool)
  order = jnp.argsort(~real, axis=1, stable=True)
  lengths = jnp.sum(real, axis=1, dtype=jnp.int32)
  return take_slots(x, order), SeqLengths(lengths), order


def take_slots(x: jax.Array, order: jax.Array) -> jax.Array:
  """x [B,T,...] -> x[b, order[b, i]] for every row b and slot i."""
  index = order.reshape(order.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def restore_slots(x: jax.Array, order: jax.Array) -> jax.Array:
  """Inverse of real_slots_first's permutation: y[b, order[b, i]] = x[b, i]."""
  return take_slots(x, jnp.argsort(order, axis=1))


def seq_lengths_mask(mask: SeqLengths, length: int, causal: bool) -> jax.Array:
  """SeqLengths -> the equivalent boolean mask [B,1,T,T] (queries and keys
  real, and key <= query if causal)."""
  slots = jnp.arange(length)
  real = slots[None, :] < mask.lengths[:, None]  # [B,T]
  dense = real[:, None, :, None] & real[:, None, None, :]
  if causal:
    dense = dense & (slots[None, :] <= slots[:, None])[None, None]
  return dense


# On CPU, attention whose float32 logits [B, N, T, S] exceed this many bytes
# runs `attend_in_blocks`: XLA:CPU computes and reads a logits tensor larger
# than the caches at a fraction of its matmul rate (Whisper tiny's encoder,
# 32 clips x 255 frames: 190-250 ms per layer for jax.nn.dot_product_attention,
# 60-80 ms in blocks of this size; bench/attention_bench.py).
CPU_LOGITS_BLOCK_BYTES = 2 << 20


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          bias: jax.Array | None = None, *, is_causal: bool = False,
                          scale: float | None = None, implementation: str | None = None) -> jax.Array:
  """jax.nn.dot_product_attention (q [B,T,N,D], k/v [B,S,K,D], mask and bias
  [B|1, N|1, T|1, S]), except that with no implementation named, a program
  lowered for CPU computes logits larger than CPU_LOGITS_BLOCK_BYTES in
  blocks (`attend_in_blocks`). Where the default backend is CPU the choice is
  made per platform at lowering (jax.lax.platform_dependent, which traces
  both), so a program lowered for GPU or TPU, e.g. an ahead-of-time TPU
  compile on a CPU host, gets JAX's attention."""
  def jax_attention(q, k, v, mask, bias):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale,
                                        implementation=implementation)

  b, t, n, _ = q.shape
  if (implementation is not None or b * n * t * k.shape[1] * 4 <= CPU_LOGITS_BLOCK_BYTES
      or jax.default_backend() != "cpu"):  # on an accelerator host, skip tracing the CPU branch
    return jax_attention(q, k, v, mask, bias)

  def in_blocks(q, k, v, mask, bias):
    return attend_in_blocks(q, k, v, mask, bias, is_causal=is_causal, scale=scale)

  return jax.lax.platform_dependent(q, k, v, mask, bias, cpu=in_blocks, default=jax_attention)


def attend_in_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                     bias: jax.Array | None = None, *, is_causal: bool = False, scale: float | None = None,
                     block_bytes: int = CPU_LOGITS_BLOCK_BYTES) -> jax.Array:
  """jax.nn.dot_product_attention's XLA math (float32 logits scaled after the
  product, bias added, masked slots at a large negative, float32 softmax,
  probabilities in v's dtype) computed a few batch rows and query slots at a
  time, so that each block's logits take at most `block_bytes`. Shapes as in
  `dot_product_attention`; grouped-query heads are read in place. Blocks run
  one after another (jax.lax.map), which suits a CPU and not an accelerator.
  """
  b, t, n, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = n // kv_heads
  scale = d ** -0.5 if scale is None else scale
  per_query = n * s * 4
  q_block = min(t, max(1, block_bytes // per_query))
  num_blocks = -(-t // q_block)
  rows = min(b, max(1, block_bytes // (per_query * q_block)))

  def by_head(x):  # [N|1, Q|1, S] -> [K|1, G|1, Q|1, S]
    return x[None] if x.shape[0] == 1 else x.reshape(kv_heads, groups, *x.shape[1:])

  def one_block(qb, first, kk, vv, mb, bb):  # qb [Q,N,D] from query slot `first`; kk/vv [S,K,D]
    size = qb.shape[0]
    logits = jnp.einsum("tkgd,skd->kgts", qb.reshape(size, kv_heads, groups, d), kk,
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    if bb is not None:
      logits = logits + by_head(bb).astype(jnp.float32)
    keep = None if mb is None else by_head(mb)
    if is_causal:
      triangle = first + jnp.arange(size)[:, None] >= jnp.arange(s)[None, :]
      keep = triangle if keep is None else keep & triangle
    if keep is not None:
      logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(vv.dtype)
    return jnp.einsum("kgts,skd->tkgd", probs, vv).reshape(size, n, d)

  def split_queries(x, axis):  # x's query axis (of size T) -> [num_blocks, ..., q_block, ...]
    if x is None or x.shape[axis] == 1:
      return None
    x = jnp.pad(x, [(0, num_blocks * q_block - t) if i == axis else (0, 0) for i in range(x.ndim)])
    x = x.reshape(*x.shape[:axis], num_blocks, q_block, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  def one_row(qr, kr, vr, mr, br):  # one batch row: [T,N,D], [S,K,D], [S,K,D], [N|1, T|1, S] or None
    if num_blocks == 1:
      return one_block(qr, 0, kr, vr, mr, br)
    blocks = (split_queries(qr, 0), jnp.arange(num_blocks) * q_block, split_queries(mr, 1), split_queries(br, 1))

    def step(args):
      qb, first, mb, bb = args
      mb = mr if mb is None else mb  # a mask or bias with one query row is the same for every block
      bb = br if bb is None else bb
      return one_block(qb, first, kr, vr, mb, bb)

    return jax.lax.map(step, blocks).reshape(num_blocks * q_block, n, d)[:t]

  # Row-wise inputs are mapped over; a mask or bias with one batch row is shared.
  mapped = {"q": q, "k": k, "v": v}
  shared = {}
  for name, x in (("mask", mask), ("bias", bias)):
    (mapped if x is not None and x.shape[0] == b and b > 1 else shared)[name] = x
  shared = {name: None if x is None else x[0] for name, x in shared.items()}

  def row(args):
    args = {**args, **shared}
    return one_row(args["q"], args["k"], args["v"], args["mask"], args["bias"])

  if rows >= b:
    return jax.vmap(row)(mapped)
  return jax.lax.map(row, mapped, batch_size=rows if rows > 1 else None)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | SeqLengths | None = None, *,
           is_causal: bool = False, scale: float | None = None, dropout_rate: float = 0.0,
           deterministic: bool = True, dropout_rng: jax.Array | None = None,
           implementation: str | None = None) -> jax.Array:
  """q [B,T,N,D], k/v [B,S,K,D] with N % K == 0 -> [B,T,N,D].

  Without dropout this is `dot_product_attention` (jax.nn's, GQA handled
  inside, fused kernels where the backend has them, large logits in blocks
  on CPU), or `attend_one_query` for a single masked query (a decoding step)
  unless 'xla' is asked for by name; with dropout the same math is written
  out so probabilities can be dropped.
  Fully masked rows (padding queries) give finite garbage, never NaN.
  """
  no_dropout = deterministic or dropout_rate == 0.0
  if isinstance(mask, SeqLengths):
    if q.shape[1] != k.shape[1]:
      raise ValueError(f"attend: SeqLengths masks self-attention over one sequence; got {q.shape[1]} "
                       f"queries and {k.shape[1]} keys")
    if not no_dropout:
      mask = seq_lengths_mask(mask, q.shape[1], is_causal)
    else:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                         query_seq_lengths=mask.lengths, key_value_seq_lengths=mask.lengths,
                                         implementation=implementation or None)
      real = jnp.arange(q.shape[1])[None, :] < mask.lengths[:, None]
      return jnp.where(real[:, :, None, None], out, 0).astype(out.dtype)
  # One masked query (a decoding step): no fused kernel pays for itself there,
  # and cuDNN's would take the mask as a bias.
  if no_dropout and q.shape[1] == 1 and mask is not None and implementation != "xla":
    return attend_one_query(q, k, v, mask, scale=scale)
  if no_dropout:
    return dot_product_attention(q, k, v, mask, is_causal=is_causal and mask is None, scale=scale,
                                 implementation=implementation or None)
  b, t, n, d = q.shape
  kv_heads = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kv_heads, n // kv_heads, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if mask is None and is_causal:
    mask = causal_mask(jnp.arange(t), jnp.arange(k.shape[1]))
  if mask is not None:
    # mask [B|1, N|1, T, S] -> [B|1, K|1, G|1, T, S]
    if mask.shape[1] == 1:
      mask = mask[:, :, None]
    else:
      mask = mask.reshape(mask.shape[0], kv_heads, n // kv_heads, *mask.shape[2:])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, n, d)


def attend_one_query(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                     scale: float | None = None) -> jax.Array:
  """attend() for one query position (a decoding step): q [B,1,N,D], k/v
  [B,S,K,D], mask [B|1, N|1, 1, S] -> [B,1,N,D].

  Written as multiply-and-sum over the cache's own [B,S,K,D] layout: XLA
  fuses each product with its reduction and reads the KV cache once where it
  lies, where a batched matmul first copies every layer's keys into a
  [B,K,D,S] layout (on CPU that copy costs as much as the attention).
  """
  b, _, n, d = q.shape
  kv_heads = k.shape[2]
  groups = n // kv_heads
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, 1, kv_heads, groups, d).astype(jnp.float32)
  logits = jnp.sum(qg * k[:, :, :, None, :].astype(jnp.float32), axis=-1) * scale  # [B,S,K,G]
  if mask is not None:
    m = mask[:, :, 0, :]  # [B|1, N|1, S]
    if m.shape[1] == 1:
      m = jnp.swapaxes(m, 1, 2)[:, :, :, None]  # [B|1, S, 1, 1]
    else:
      m = jnp.transpose(m.reshape(m.shape[0], kv_heads, groups, -1), (0, 3, 1, 2))  # [B|1, S, K, G]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=1)
  out = jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)  # [B,K,G,D]
  return out.reshape(b, 1, n, d).astype(q.dtype)


def update_kv_cache(cache, k: jax.Array, v: jax.Array):
  """Writes k/v [B,t,K,D] into a stacked cache at (layer, :, index) and reads the layer back.

  cache = (k_all [L,B,S,K,D], v_all, layer, index[, rows]). dynamic_update_slice on
  the whole stack lets XLA update the buffer in place instead of copying a
  layer's cache per step. With rows [B,S] (speechjax.models.transformer), slot
  j of row b is read from row rows[b, j]. Returns (k_layer, v_layer, (k_all, v_all)).
  """
  k_all, v_all, layer, index, *rows = cache
  layer = jnp.asarray(layer, jnp.int32)
  index = jnp.asarray(index, jnp.int32)
  zero = jnp.zeros((), jnp.int32)
  start = (layer, zero, index, zero, zero)
  k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
  v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
  k_layer = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(k.dtype)
  v_layer = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(v.dtype)
  if rows:
    slots = jnp.arange(k_layer.shape[1])[None, :]
    k_layer, v_layer = k_layer[rows[0], slots], v_layer[rows[0], slots]
  return k_layer, v_layer, (k_all, v_all)


class Attention(nn.Module):
  """Multi-head attention with GQA, optional q/k RMSNorm, RoPE and KV cache.

  Projections are named like HF (q_proj, k_proj, v_proj and `out_name`) so
  LoRA target patterns and checkpoint keys read naturally.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  causal: bool = True
  q_bias: bool = False
  k_bias: bool = False
  v_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  out_name: str = "o_proj"
  dropout_rate: float = 0.0
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               rope: tuple[jax.Array, jax.Array] | None = None, cache=None,
               deterministic: bool = True):
    """x [B,T,E] -> [B,T,E], or (out, (k_all, v_all)) when `cache` is given.

    mask: complete boolean mask [B|1, N|1, T, S], SeqLengths (no cache) or None
    (then `causal` alone).
    rope: (cos, sin) [B,T,D/2] from rope_cos_sin. cache: see update_kv_cache.
    """
    b, t, features = x.shape
    n, kv, d = self.num_heads, self.num_kv_heads, self.head_dim

    def proj(name, out, axes, bias):
      return Dense(out, use_bias=bias, kernel_axes=axes, lora=self.lora, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

    q = proj("q_proj", n * d, ("embed", "heads"), self.q_bias)(x, deterministic).reshape(b, t, n, d)
    k = proj("k_proj", kv * d, ("embed", "kv_heads"), self.k_bias)(x, deterministic)
    v = proj("v_proj", kv * d, ("embed", "kv_heads"), self.v_bias)(x, deterministic)
    k, v = k.reshape(b, t, kv, d), v.reshape(b, t, kv, d)
    if self.qk_norm:
      norm = dict(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
      q = RMSNorm(**norm, name="q_norm")(q)
      k = RMSNorm(**norm, name="k_norm")(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    new_cache = None
    if cache is not None:
      k, v, new_cache = update_kv_cache(cache, k, v)
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0:
      dropout_rng = self.make_rng("dropout")
    out = attend(q, k, v, mask, is_causal=self.causal, dropout_rate=self.dropout_rate,
                 deterministic=deterministic, dropout_rng=dropout_rng,
                 implementation=self.implementation)
    out = proj(self.out_name, features, ("heads", "embed"), self.o_bias)(
        out.reshape(b, t, n * d), deterministic)
    return out if cache is None else (out, new_cache)
