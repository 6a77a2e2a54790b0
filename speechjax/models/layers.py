"""Transformer building blocks shared by the decoders and the encoders:
activations, rematerialisation, norms, embeddings, rotary positions, the
gated MLP. Attention lives in `speechjax.models.attention`.

Norms keep their statistics in float32 whatever the compute dtype. Every
parameter carries logical axis names (mapped to mesh axes by the rules in
speechjax/parallel.py) so the same modules shard under any rules.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.models.lora import Dense, LoRAConfig

default_embed_init = nn.initializers.normal(stddev=0.02)


def _gelu_erf(x: jax.Array) -> jax.Array:
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
  """The erf GELU, 0.5 x (1 + erf(x / sqrt 2)), written as PyTorch writes it.

  jax.nn.gelu(approximate=False) goes through erfc, which XLA:CPU evaluates
  at half the speed of erf (fp32 [800, 1536]: 2.7 vs 1.3 ms forward, 3.4 vs
  2.2 ms with the gradient); both agree with torch's GELU to 1e-6.

  The backward keeps only x and recomputes the derivative with autodiff's own
  expression: plain autodiff computes the derivative in the forward pass and
  keeps erf(x / sqrt 2) for it, one more activation-sized buffer per layer
  until the backward (bench model's full fine-tuning step: 335 -> 316 MiB of
  temporaries; the gradient differs from autodiff's by float32 rounding).
  """
  return _gelu_erf(x)


def _gelu_exact_fwd(x):
  return _gelu_erf(x), x


def _gelu_exact_bwd(x, grad):
  # The barrier keeps XLA from merging the recomputed erf with the forward's
  # (which would keep that one alive instead).
  return jax.vjp(_gelu_erf, jax.lax.optimization_barrier(x))[1](grad)


gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """HF `hidden_act` / `activation_function` names -> jax functions."""
  table = {
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
      "gelu": gelu_exact,
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
  }
  if name not in table:
    raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(table)}")
  return table[name]


@jax.custom_vjp
def silu_gated(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up whose backward keeps only `gate` and `up`.

  Plain autodiff saves sigmoid(gate) and silu(gate) too, and XLA:CPU then
  writes the forward as three elementwise passes, each materialised. Here
  the forward is one pass and the backward recomputes the sigmoid: on the
  bench model (bench/train_bench.py) the LoRA step's temporaries drop from
  200 to 178 MiB.
  """
  return jax.nn.silu(gate) * up


def _silu_gated_fwd(gate, up):
  return silu_gated(gate, up), (gate, up)


def _silu_gated_bwd(residuals, grad):
  gate, up = residuals
  # sigmoid in its tanh form: written like the forward's, XLA would merge the
  # two and keep the forward's sigmoid alive until the backward again.
  sig = 0.5 * jnp.tanh(0.5 * gate) + 0.5
  grad_sig = grad * sig
  return grad_sig * up * (1 + gate * (1 - sig)), grad_sig * gate


silu_gated.defvjp(_silu_gated_fwd, _silu_gated_bwd)


def gated_activation(name: str, gate: jax.Array, up: jax.Array) -> jax.Array:
  """act(gate) * up, the gated MLP's hidden layer."""
  if name in ("silu", "swish"):
    return silu_gated(gate, up)
  return activation_fn(name)(gate) * up


# ------------------------------------------------------------------ remat ---

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
REMAT_POLICY_NAMES = ("none",) + tuple(_REMAT_POLICIES)


def check_remat_policy(name: str) -> None:
  if name not in REMAT_POLICY_NAMES:
    raise ValueError(f"remat_policy={name!r}; expected one of {list(REMAT_POLICY_NAMES)}")


def maybe_remat(layer_cls, policy: str, static_argnums: tuple[int, ...] = (),
                scanned: bool = False):
  """nn.remat(layer_cls) with a named jax.checkpoint policy; 'none' = no remat.

  static_argnums count `self` as 0 (Flax convention). Inside nn.scan the loop
  already blocks CSE, so prevent_cse is only needed for unrolled layers.
  """
  check_remat_policy(policy)
  if policy == "none":
    return layer_cls
  return nn.remat(layer_cls, policy=_REMAT_POLICIES[policy], prevent_cse=not scanned,
                  static_argnums=static_argnums)


# ------------------------------------------------------------------ norms ---

class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis (Llama/Qwen/Mistral), float32 statistics."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with two-pass float32 statistics (GPT-2, Whisper)."""

  eps: float = 1e-5
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             (self.axis_name,)),
                       (features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.eps)
    y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (self.axis_name,)),
                        (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


# -------------------------------------------------------------- embedding ---

class Embedding(nn.Module):
  """Token (or position) table [num, features]; `attend` gives tied output logits."""

  num_embeddings: int
  features: int
  axes: tuple[str | None, str | None] = ("vocab", "embed")
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Callable[..., jax.Array] = default_embed_init

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


# ----------------------------------------------------------------- rotary ---

def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", *,
                  factor: float = 1.0, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0, original_max_position: int = 8192,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  attention_factor: float = 0.0,
                  truncate: bool = True) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim/2] and the cos/sin scale, as HF computes them.

  rope_type: 'default', 'linear' (position interpolation), 'llama3' (Llama
  3.1 wavelength-dependent scaling) or 'yarn'. attention_factor 0 means "the
  type's default" (1, or YaRN's 0.1 ln(factor) + 1).
  """
  # HF builds the table in float32; doing the same keeps logits within 1e-6.
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
  scale = 1.0
  if rope_type == "default":
    pass
  elif rope_type == "linear":
    inv_freq = (inv_freq / np.float32(factor)).astype(np.float32)
  elif rope_type == "llama3":
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = ((original_max_position / wavelen - low_freq_factor)
              / (high_freq_factor - low_freq_factor))
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  elif rope_type == "yarn":
    def correction_dim(rotations):
      return (head_dim * math.log(original_max_position / (rotations * 2 * math.pi))
              / (2 * math.log(theta)))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    pos_freqs = np.float32(theta) ** exponents
    inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation)
                + (1.0 / pos_freqs) * extrapolation).astype(np.float32)
    scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
  else:
    raise ValueError(f"unsupported rope_type {rope_type!r}; expected 'default', 'linear', "
                     "'llama3' or 'yarn'")
  if attention_factor:
    scale = float(attention_factor)
  return inv_freq, float(scale)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0, *,
                 num_positions: int | None = None) -> tuple[jax.Array, jax.Array]:
  """positions [B,T] -> (cos, sin) [B,T,head_dim/2] in float32.

  num_positions: a static bound (positions < num_positions). With it, cos and
  sin come from a [num_positions, head_dim/2] table computed once in numpy
  and gathered by position. Computed in the graph, XLA:CPU fuses the sin/cos
  into every fusion that applies RoPE (five per layer, forward and backward)
  and evaluates them once per head: the bench model's LoRA step
  (bench/train_bench.py) runs 1.07x faster with the table. The table is the
  float32 product then cos/sin, as HF computes it.
  """
  if num_positions is not None:
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * np.asarray(inv_freq, np.float32)
    cos_table = (np.cos(angles) * np.float32(scale)).astype(np.float32)
    sin_table = (np.sin(angles) * np.float32(scale)).astype(np.float32)
    index = jnp.clip(positions, 0, num_positions - 1)
    return jnp.take(cos_table, index, axis=0), jnp.take(sin_table, index, axis=0)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B,T,N,D] in HF's half-split layout (rotate_half), not interleaved."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class GatedMLP(nn.Module):
  """down(act(gate(x)) * up(x)) - the Llama/Qwen/Mistral feed-forward block."""

  hidden_size: int
  intermediate_size: int
  activation: str = "silu"
  use_bias: bool = False
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    def dense(name, out, axes):
      return Dense(out, use_bias=self.use_bias, kernel_axes=axes, lora=self.lora,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    gate = dense("gate_proj", self.intermediate_size, ("embed", "mlp"))(x, deterministic)
    up = dense("up_proj", self.intermediate_size, ("embed", "mlp"))(x, deterministic)
    h = gated_activation(self.activation, gate, up)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense("down_proj", self.hidden_size, ("mlp", "embed"))(h, deterministic)


def default_positions(attention_mask: jax.Array | None, batch: int, length: int,
                      offset: jax.Array | int = 0) -> jax.Array:
  """Rotary/learned positions [B,T]: cumsum(mask)-1 (clipped at 0), so padding
  does not shift real tokens; arange (+offset) without a mask.

  With a cache the mask covers all slots; positions of the `length` new tokens
  starting at slot `offset` are read from the cumulative sum over slots.
  """
  if attention_mask is None:
    pos = jnp.arange(length, dtype=jnp.int32)[None] + jnp.asarray(offset, jnp.int32)
    return jnp.broadcast_to(pos, (batch, length))
  pos = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
  if pos.shape[1] != length:
    pos = jax.lax.dynamic_slice_in_dim(pos, jnp.asarray(offset, jnp.int32), length, axis=1)
  return pos
