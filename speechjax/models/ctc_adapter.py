"""A small transformer between an audio encoder and its CTC head.

A pretrained encoder kept frozen (Whisper, wav2vec2, ...) hears well but its
states are not yet the units a CTC head should emit (the LLM tokenizer's ids,
or characters). The adapter learns that mapping at a fraction of the
encoder's cost: `frame_stack` consecutive encoder frames are concatenated
(Whisper's 20 ms frames, 4 to a frame, give 80 ms per adapter frame, enough
for BPE tokens), projected to `dim`, and run through `layers` pre-LN
transformer blocks (Whisper's block, without positions: the encoder's states
already carry them), then a final LayerNorm.

The CTC model ('ctc' kind, models/ctc.py) trains it with its head; a
'ctc_compress' projector runs the same adapter and head (subtrees
'ctc_adapter' and 'ctc_head', saved beside the encoder by
hf.export_whisper.export_whisper_encoder) to find the token slots.
With layers == 0 and frame_stack == 1 there is no adapter: the head reads the
encoder's states directly.

Training-time masking of the encoder's states (SpecAugment's time and feature
masks, applied to what the frozen encoder emits, so they work with stored
states: data.cache_encoder_states): `time_masks` spans of up to
`time_mask_frames` adapter frames are zeroed per example (at most
`time_mask_max_fraction` of its frames each), and each state channel is
zeroed with probability `state_dropout` (dropout on the input, the same
channel across time for an example, like a frequency mask). Both regularize a
head trained on few voices towards the ones it never heard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechjax.models import attention
from speechjax.models import layers as L
from speechjax.models.encoders.whisper import LAYER_NORM_EPS, WhisperEncoderConfig, WhisperEncoderLayer
from speechjax.models.lora import Dense


@dataclasses.dataclass(frozen=True)
class CTCAdapterConfig:
  layers: int = 0
  dim: int = 256
  heads: int = 4
  ffn_dim: int = 1024
  frame_stack: int = 1
  dropout: float = 0.0
  time_masks: int = 0
  time_mask_frames: int = 5
  time_mask_max_fraction: float = 0.2
  state_dropout: float = 0.0
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    if self.layers < 0 or self.frame_stack < 1:
      raise ValueError(f"CTCAdapterConfig: layers={self.layers} must be >= 0 and "
                       f"frame_stack={self.frame_stack} >= 1")
    if self.layers and self.dim % self.heads:
      raise ValueError(f"CTCAdapterConfig: dim={self.dim} is not divisible by heads={self.heads}")
    if self.time_masks < 0 or self.time_mask_frames < 1 or not 0.0 <= self.time_mask_max_fraction <= 1.0:
      raise ValueError(f"CTCAdapterConfig: time_masks={self.time_masks} must be >= 0, time_mask_frames="
                       f"{self.time_mask_frames} >= 1, time_mask_max_fraction="
                       f"{self.time_mask_max_fraction} in [0, 1]")
    if not 0.0 <= self.state_dropout < 1.0:
      raise ValueError(f"CTCAdapterConfig: state_dropout={self.state_dropout} must be in [0, 1)")

  @property
  def enabled(self) -> bool:
    return self.layers > 0 or self.frame_stack > 1 or self.masks_states

  @property
  def masks_states(self) -> bool:
    return self.time_masks > 0 or self.state_dropout > 0

  def output_length(self, n: int) -> int:
    return -(-n // self.frame_stack)


def stack_encoder_frames(x: jax.Array, mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """[B, N, D], [B, N] -> [B, ceil(N/k), k*D], [B, ceil(N/k)]: k frames side by
  side (zeros past the end); a stacked frame is valid iff its first frame is."""
  if k == 1:
    return x, mask
  b, n, d = x.shape
  pad = -n % k
  x = jnp.where(mask.astype(bool)[..., None], x, 0)
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, (n + pad) // k, k * d)
  return x, mask[:, ::k]


def time_mask(rng: jax.Array, mask: jax.Array, num_masks: int, max_width: int,
              max_fraction: float) -> jax.Array:
  """[B, N] valid-frame mask -> [B, N] bool, True where a frame is kept.

  Each of `num_masks` spans per row has a width uniform in [0, w] with
  w = min(max_width, floor(max_fraction * valid frames)) and starts uniformly
  inside the valid frames (SpecAugment's time masks)."""
  b, n = mask.shape
  valid = mask.astype(jnp.int32).sum(-1)  # [B]
  widest = jnp.minimum(max_width, jnp.floor(max_fraction * valid).astype(jnp.int32))  # [B]
  k_width, k_start = jax.random.split(rng)
  u_width = jax.random.uniform(k_width, (b, num_masks))
  u_start = jax.random.uniform(k_start, (b, num_masks))
  width = jnp.floor(u_width * (widest[:, None] + 1)).astype(jnp.int32)
  start = jnp.floor(u_start * jnp.maximum(valid[:, None] - width + 1, 1)).astype(jnp.int32)
  t = jnp.arange(n)[None, None, :]
  masked = ((t >= start[..., None]) & (t < (start + width)[..., None])).any(axis=1)
  return ~masked


class CTCAdapter(nn.Module):
  """(states [B, N, D], mask [B, N]) -> (hidden [B, ceil(N/k), dim], mask)."""

  config: CTCAdapterConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x, mask = stack_encoder_frames(x, mask, cfg.frame_stack)
    if cfg.masks_states and not deterministic:
      rng = self.make_rng("dropout")
      k_time, k_channel = jax.random.split(rng)
      if cfg.time_masks:
        keep = time_mask(k_time, mask, cfg.time_masks, cfg.time_mask_frames, cfg.time_mask_max_fraction)
        x = jnp.where(keep[..., None], x, 0).astype(x.dtype)
      if cfg.state_dropout:
        keep = jax.random.bernoulli(k_channel, 1.0 - cfg.state_dropout, (x.shape[0], 1, x.shape[2]))
        x = jnp.where(keep, x / (1.0 - cfg.state_dropout), 0).astype(x.dtype)
    if not cfg.layers:
      return x, mask
    x = L.LayerNorm(LAYER_NORM_EPS, dtype=dtype, param_dtype=pdtype, name="input_norm")(x)
    x = Dense(cfg.dim, kernel_axes=("mlp", "embed"), dtype=dtype, param_dtype=pdtype,
              name="input_proj")(x, deterministic)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    block = WhisperEncoderConfig(d_model=cfg.dim, num_heads=cfg.heads, ffn_dim=cfg.ffn_dim,
                                 num_layers=cfg.layers, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                 residual_dropout=cfg.dropout)
    attention_mask = attention.padding_mask(mask)
    for i in range(cfg.layers):
      x, _ = WhisperEncoderLayer(block, name=f"layers_{i}")(x, attention_mask, deterministic)
    return L.LayerNorm(LAYER_NORM_EPS, dtype=dtype, param_dtype=pdtype, name="output_norm")(x), mask
