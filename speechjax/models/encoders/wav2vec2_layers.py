"""Building blocks of the wav2vec2-family encoders (wav2vec2, HuBERT, WavLM).

The convolutional feature extractor that turns 16 kHz samples into frames,
the convolutional positional embedding, WavLM's bucketed relative position
bias, and a self-attention that adds an optional (gated) bias. Submodules are
named like HF's so checkpoints convert key by key (speechjax/hf/wav2vec2.py).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.models import attention
from speechjax.models import layers as L
from speechjax.models.lora import Dense, LoRAConfig

# torch's nn.GroupNorm / nn.LayerNorm default, which HF's conv layers keep.
CONV_NORM_EPS = 1e-5


def conv_output_length(length, kernels: Sequence[int], strides: Sequence[int]):
  """Frames after a stack of unpadded convs: floor((L - k) / s) + 1 per layer,
  never below 0. Works on ints and on integer arrays alike."""
  for kernel, stride in zip(kernels, strides):
    length = (length - kernel) // stride + 1
    length = max(length, 0) if isinstance(length, int) else jnp.maximum(length, 0)
  return length


def prefix_mask(lengths: jax.Array, width: int) -> jax.Array:
  """[B] lengths -> [B, width] bool, True on the first `length` positions."""
  return jnp.arange(width)[None, :] < lengths[:, None]


class WaveConv(nn.Module):
  """Unpadded or 'same'-padded 1-D conv over [B, W, C] with optional bias and
  channel groups (Conv1d in speechjax/models/conv.py has neither); kernel
  [k, in/groups, out] as torch's [out, in/groups, k] transposed."""

  features: int
  kernel_size: int
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  groups: int = 1
  use_bias: bool = True
  kernel_axes: tuple[str | None, str | None, str | None] = ("conv_kernel", None, None)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"), self.kernel_axes),
        (self.kernel_size, x.shape[-1] // self.groups, self.features), self.param_dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride,),
        padding=[self.padding], dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=self.groups)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (self.kernel_axes[2],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class MaskedGroupNorm(nn.Module):
  """GroupNorm with one group per channel (HF's `feat_extract_norm='group'`):
  each channel is normalised over time. Statistics cover the valid frames
  only, so a padded example is normalised exactly as it would be alone."""

  eps: float = CONV_NORM_EPS
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
                       (channels,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                      (channels,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    weight = (jnp.ones(x.shape[:2], jnp.float32) if valid is None
              else valid.astype(jnp.float32))[:, :, None]
    count = jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1.0)
    mean = jnp.sum(x32 * weight, axis=1, keepdims=True) / count
    var = jnp.sum(jnp.square(x32 - mean) * weight, axis=1, keepdims=True) / count
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class ConvLayer(nn.Module):
  """One feature-extractor conv, its norm ('group', 'layer' or none) and the activation."""

  features: int
  kernel: int
  stride: int
  use_bias: bool = False
  norm: str = ""
  activation: str = "gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    x = WaveConv(self.features, self.kernel, self.stride, use_bias=self.use_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="conv")(x)
    if self.norm == "layer":
      x = L.LayerNorm(CONV_NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="layer_norm")(x)
    elif self.norm == "group":
      valid = None
      if lengths is not None:
        valid = prefix_mask(conv_output_length(lengths, [self.kernel], [self.stride]), x.shape[1])
      x = MaskedGroupNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                          name="layer_norm")(x, valid)
    return L.activation_fn(self.activation)(x)


class FeatureExtractor(nn.Module):
  """Samples [B, S] -> frames [B, T, conv_dim[-1]].

  norm 'group': GroupNorm after the first conv only (wav2vec2-base, HuBERT
  base); 'layer': LayerNorm over channels after every conv (large models).
  `lengths` [B] (valid samples per row) or None restricts the group norm's
  statistics to valid frames; the unpadded convs otherwise let a real frame
  see only real samples.
  """

  conv_dim: Sequence[int]
  conv_kernel: Sequence[int]
  conv_stride: Sequence[int]
  conv_bias: bool = False
  norm: str = "group"
  activation: str = "gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, waves: jax.Array, lengths: jax.Array | None) -> jax.Array:
    x = waves[:, :, None]
    for i, (dim, kernel, stride) in enumerate(zip(self.conv_dim, self.conv_kernel,
                                                 self.conv_stride)):
      norm = self.norm if self.norm == "layer" or i == 0 else ""
      x = ConvLayer(dim, kernel, stride, self.conv_bias, norm, self.activation, self.dtype,
                    self.param_dtype, name=f"conv_layers_{i}")(x, lengths)
      if lengths is not None:
        lengths = conv_output_length(lengths, [kernel], [stride])
    return x


class PositionalConvEmbedding(nn.Module):
  """HF's convolutional relative positions: a grouped conv of width `kernel`
  over the frames, 'same' padding (one frame less on the right for an even
  width), then the activation. The kernel is the effective (weight-normed)
  one; speechjax/hf/wav2vec2.py folds weight_g / weight_v into it on load."""

  kernel: int
  groups: int
  activation: str = "gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = self.kernel // 2
    y = WaveConv(x.shape[-1], self.kernel, padding=(pad, pad - (1 - self.kernel % 2)),
                 groups=self.groups, kernel_axes=("conv_kernel", None, "embed"), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="conv")(x)
    return L.activation_fn(self.activation)(y)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """WavLM's [length, length] bucket ids of (key - query): half the buckets
  per direction, exact below num_buckets/4, log-spaced up to max_distance.
  float32 arithmetic and truncation as HF computes them, so ids agree."""
  relative = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  # Distances below max_exact take the exact branch; clamping them keeps log finite.
  far = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
  far = far / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  far = np.minimum((np.float32(max_exact) + far).astype(np.int64), half - 1)
  return buckets + np.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
  """WavLM's bucketed bias table -> [heads, T, T] (HF keeps it in layer 0's
  attention as rel_attn_embed and passes the result down to every layer)."""

  num_buckets: int
  max_distance: int
  num_heads: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    table = self.param("embedding",
                       nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None)),
                       (self.num_buckets, self.num_heads), self.param_dtype)
    ids = relative_position_buckets(length, self.num_buckets, self.max_distance)
    return jnp.take(table.astype(jnp.float32), jnp.asarray(ids), axis=0).transpose(2, 0, 1)


def attend_with_bias(q, k, v, bias, mask, *, dropout_rate: float, dropout_rng,
                     implementation: str | None):
  """q/k/v [B,T,N,D], bias [B,N,T,S] or None, mask [B,1,1,S], attention.SeqLengths
  (outputs at padded frames are then zeros) or None -> [B,T,N,D]."""
  if isinstance(mask, attention.SeqLengths):
    if dropout_rng is None or dropout_rate == 0.0:
      bias = None if bias is None else bias.astype(q.dtype)
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, query_seq_lengths=mask.lengths,
                                         key_value_seq_lengths=mask.lengths, implementation=implementation or None)
      real = jnp.arange(q.shape[1])[None, :] < mask.lengths[:, None]
      return jnp.where(real[:, :, None, None], out, 0).astype(out.dtype)
    mask = attention.seq_lengths_mask(mask, q.shape[1], causal=False)
  if dropout_rng is None or dropout_rate == 0.0:
    bias = None if bias is None else bias.astype(q.dtype)
    return attention.dot_product_attention(q, k, v, mask, bias, implementation=implementation or None)
  logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (q.shape[-1] ** -0.5)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
  return jnp.einsum("bnts,bsnd->btnd", probs, v)


class WaveSelfAttention(nn.Module):
  """Bidirectional multi-head attention with biased q/k/v/out projections
  (named like HF). With `position_bias` [N, T, T] (WavLM) the bias is gated
  per head and query by gru_rel_pos_linear on the layer input, as WavLM does."""

  num_heads: int
  gated_bias: bool = False
  dropout_rate: float = 0.0
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None,
               deterministic: bool = True) -> jax.Array:
    b, t, features = x.shape
    n = self.num_heads
    d = features // n

    def proj(name, axes):
      return Dense(features, kernel_axes=axes, lora=self.lora, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

    q = proj("q_proj", ("embed", "heads"))(x, deterministic).reshape(b, t, n, d)
    k = proj("k_proj", ("embed", "heads"))(x, deterministic).reshape(b, t, n, d)
    v = proj("v_proj", ("embed", "heads"))(x, deterministic).reshape(b, t, n, d)
    bias = None
    if self.gated_bias:
      const = self.param("gru_rel_pos_const",
                         nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
                         (n,), self.param_dtype)
      gate = Dense(8, kernel_axes=(None, None), dtype=jnp.float32, param_dtype=self.param_dtype,
                   name="gru_rel_pos_linear")(x.reshape(b, t, n, d).astype(jnp.float32))
      gate = jax.nn.sigmoid(gate.reshape(b, t, n, 2, 4).sum(-1))
      gate = gate[..., 0] * (gate[..., 1] * const.astype(jnp.float32) - 1.0) + 2.0  # [B,T,N]
      bias = gate.transpose(0, 2, 1)[..., None] * position_bias[None]
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0:
      dropout_rng = self.make_rng("dropout")
    out = attend_with_bias(q, k, v, bias, mask, dropout_rate=self.dropout_rate,
                           dropout_rng=dropout_rng, implementation=self.implementation)
    return proj("out_proj", ("heads", "embed"))(out.reshape(b, t, features), deterministic)
