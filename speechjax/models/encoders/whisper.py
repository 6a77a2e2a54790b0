"""The Whisper audio encoder (tiny ... large-v3), LoRA-aware, in Flax Linen.

Architecture as in HF `WhisperEncoder`: conv1d(k=3) + GELU, conv1d(k=3,
stride 2) + GELU, sinusoidal positions, pre-LN transformer blocks, final
LayerNorm. Submodules are named like HF so checkpoints convert key by key
(speechjax/hf/whisper.py).

Unlike HF, inputs may be shorter than 30 s: F mel frames give ceil(F/2) output
frames with the first ceil(F/2) rows of the position table, and a
`feature_mask` [B, F] marks padded frames, which are zeroed before each conv
(so a padded example sees exactly the zeros it would see alone) and removed
from attention as keys. Short utterances thus do not pay for 1500 frames.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.models import attention
from speechjax.models import layers as L
from speechjax.models.conv import Conv1d
from speechjax.models.encoders.base import AudioInput
from speechjax.models.lora import Dense, LoRAConfig, as_lora_config
from speechjax.models.sizes import whisper_size

LAYER_NORM_EPS = 1e-5  # HF Whisper uses torch's default.

@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
  """Encoder hyper-parameters; `whisper_config('small')` fills in a released size.

  dtype is the compute dtype, param_dtype the storage dtype (either may be a
  string such as 'bfloat16'). remat_policy: see layers.REMAT_POLICY_NAMES.
  attention_impl: '' (JAX picks), 'xla' or 'cudnn' (cuDNN's fused kernel;
  with a feature mask the layers then run on each row's real frames moved to
  the front, the padding given as sequence lengths).
  """

  model_type: str = "whisper"
  num_mel_bins: int = 80
  # Samples per mel frame of the features this encoder reads (160 = 10 ms,
  # what released Whisper checkpoints were trained on).
  hop_length: int = 160
  d_model: int = 384
  num_layers: int = 4
  num_heads: int = 6
  ffn_dim: int = 1536
  max_source_positions: int = 1500
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_dropout: float = 0.0
  residual_dropout: float = 0.0
  attention_impl: str = ""
  # Low frame rate input (as Paraformer's LFR): k consecutive mel frames are
  # concatenated into one before conv1, so the transformer runs at 2k mel
  # hops per frame (k times fewer frames). 1 is Whisper, the only value
  # transformers can run (conv1 reads num_mel_bins * k channels).
  frame_stack: int = 1
  lora: LoRAConfig = LoRAConfig()

  def __post_init__(self):
    object.__setattr__(self, "lora", as_lora_config(self.lora))
    if self.d_model % self.num_heads:
      raise ValueError(f"WhisperEncoderConfig: d_model={self.d_model} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.d_model % 2:
      raise ValueError(f"WhisperEncoderConfig: d_model={self.d_model} must be even "
                       "(sinusoidal positions)")
    L.check_remat_policy(self.remat_policy)
    if self.frame_stack < 1:
      raise ValueError(f"WhisperEncoderConfig: frame_stack={self.frame_stack} must be >= 1")

  # The encoder contract (speechjax/models/encoders/base.py).
  @property
  def hidden_size(self) -> int:
    return self.d_model

  def audio_input(self) -> AudioInput:
    return AudioInput("mel", n_mels=self.num_mel_bins, hop_length=self.hop_length)

  def output_length(self, input_length: int) -> int:
    return encoder_output_length(input_length, self.frame_stack)

  def output_mask(self, input_mask: jax.Array) -> jax.Array:
    return encoder_output_mask(input_mask, self.frame_stack)


def whisper_config(size: str, **overrides) -> WhisperEncoderConfig:
  """A released size ('tiny' ... 'large-v3'), with overrides."""
  return WhisperEncoderConfig(**{**whisper_size(size), **overrides})


def encoder_output_length(num_frames: int, frame_stack: int = 1) -> int:
  """Output frames for `num_frames` mel frames: ceil(F / (2 * frame_stack))
  (the stride-2 conv with padding 1, after stacking)."""
  return -(-int(num_frames) // (2 * int(frame_stack)))


def encoder_output_mask(feature_mask: jax.Array, frame_stack: int = 1) -> jax.Array:
  """[B, F] mel-frame mask -> [B, ceil(F/2k)] encoder-frame mask (k = frame_stack).

  Output frame j is centred on (stacked) input frame 2j, whose first mel
  frame is 2jk, so it is valid iff that frame is; for a prefix mask of
  length L this gives ceil(L/2k) valid frames.
  """
  return feature_mask[:, ::2 * int(frame_stack)]


def stack_frames(x: jax.Array, k: int) -> jax.Array:
  """[B, M, F] -> [B, M*k, ceil(F/k)]: k consecutive frames side by side
  (channel m*k + i holds mel bin m of frame i), zero-padding the last group."""
  if k == 1:
    return x
  b, m, f = x.shape
  x = jnp.pad(x, ((0, 0), (0, 0), (0, -f % k)))
  return x.reshape(b, m, -1, k).transpose(0, 1, 3, 2).reshape(b, m * k, -1)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """Whisper's position table [length, channels]: sin half then cos half."""
  log_increment = math.log(max_timescale) / (channels // 2 - 1)
  inv_timescales = np.exp(-log_increment * np.arange(channels // 2, dtype=np.float32))
  scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
  return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class SinusoidalPositions(nn.Module):
  """Whisper's fixed position table, stored as a param like HF stores it (so
  checkpoints load exactly) but never trained (stop_gradient)."""

  num_positions: int
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(
            lambda _, shape, dtype: jnp.asarray(sinusoids(*shape), dtype), (None, "embed")),
        (self.num_positions, self.features), self.param_dtype)
    return jax.lax.stop_gradient(table[:length])


class WhisperEncoderLayer(nn.Module):
  """Pre-LN block; returns (x, None) so it can be scanned."""

  config: WhisperEncoderConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    dropout = nn.Dropout(cfg.residual_dropout)

    h = L.LayerNorm(LAYER_NORM_EPS, dtype=dtype, param_dtype=pdtype,
                    name="self_attn_layer_norm")(x)
    h = attention.Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.d_model // cfg.num_heads,
        causal=False, q_bias=True, k_bias=False, v_bias=True, o_bias=True, out_name="out_proj",
        dropout_rate=cfg.attention_dropout, lora=cfg.lora, dtype=dtype, param_dtype=pdtype,
        implementation=cfg.attention_impl or None, name="self_attn",
    )(h, mask=attention_mask, deterministic=deterministic)
    x = x + dropout(h, deterministic=deterministic)

    h = L.LayerNorm(LAYER_NORM_EPS, dtype=dtype, param_dtype=pdtype, name="final_layer_norm")(x)
    h = Dense(cfg.ffn_dim, kernel_axes=("embed", "mlp"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="fc1")(h, deterministic)
    h = L.gelu_exact(h)
    h = Dense(cfg.d_model, kernel_axes=("mlp", "embed"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="fc2")(h, deterministic)
    x = x + dropout(h, deterministic=deterministic)
    return x, None


class WhisperEncoder(nn.Module):
  """input_features [B, n_mels, F] (F <= 2*max_source_positions), feature_mask
  [B, F] or None -> last hidden states [B, ceil(F/2), d_model]."""

  config: WhisperEncoderConfig

  @nn.compact
  def __call__(self, input_features: jax.Array, feature_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if input_features.ndim != 3 or input_features.shape[1] != cfg.num_mel_bins:
      raise ValueError(
          f"WhisperEncoder: input_features must be [batch, {cfg.num_mel_bins} mel bins, frames], "
          f"got shape {input_features.shape}")
    num_frames = input_features.shape[2]
    length = encoder_output_length(num_frames, cfg.frame_stack)
    if length > cfg.max_source_positions:
      raise ValueError(
          f"WhisperEncoder: {num_frames} mel frames give {length} positions, more than "
          f"max_source_positions={cfg.max_source_positions} (at most "
          f"{2 * cfg.frame_stack * cfg.max_source_positions} frames)")
    if feature_mask is not None and feature_mask.shape != (input_features.shape[0], num_frames):
      raise ValueError(f"WhisperEncoder: feature_mask shape {feature_mask.shape} does not match "
                       f"input_features {input_features.shape} (expected [batch, frames])")

    x = input_features.astype(dtype)
    frame_mask = attention_mask = None
    if feature_mask is not None:
      frame_mask = feature_mask.astype(bool)
      x = jnp.where(frame_mask[:, None, :], x, 0)
      frame_mask = frame_mask[:, ::cfg.frame_stack]  # a stacked frame is valid iff its first is
      attention_mask = attention.padding_mask(encoder_output_mask(frame_mask))
    x = stack_frames(x, cfg.frame_stack)

    conv = dict(kernel_size=3, padding=(1, 1), dtype=dtype, param_dtype=pdtype)
    x = Conv1d(cfg.d_model, in_layout="NCW", kernel_axes=("conv_kernel", "mel", "embed"),
               name="conv1", **conv)(x)
    x = L.gelu_exact(x)
    if frame_mask is not None:
      # conv2 must see zeros past the end of each example, as it would alone.
      x = jnp.where(frame_mask[:, :, None], x, 0)
    x = Conv1d(cfg.d_model, stride=2, kernel_axes=("conv_kernel", None, "embed"),
               name="conv2", **conv)(x)
    x = L.gelu_exact(x)

    positions = SinusoidalPositions(cfg.max_source_positions, cfg.d_model, pdtype,
                                    name="embed_positions")(length)
    x = x + positions.astype(dtype)
    x = nn.Dropout(cfg.residual_dropout)(x, deterministic=deterministic)
    order = None
    if cfg.attention_impl == "cudnn" and attention_mask is not None:
      # cuDNN takes padding as sequence lengths (speechjax.models.attention).
      x, attention_mask, order = attention.real_slots_first(x, encoder_output_mask(frame_mask))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    layer_cls = L.maybe_remat(WhisperEncoderLayer, cfg.remat_policy, static_argnums=(3,),
                              scanned=cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(layer_cls, variable_axes={"params": 0, "lora": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, name="layers")(x, attention_mask, deterministic)
    else:
      for i in range(cfg.num_layers):
        x, _ = layer_cls(cfg, name=f"layers_{i}")(x, attention_mask, deterministic)
    if order is not None:
      x = attention.restore_slots(x, order)
    return L.LayerNorm(LAYER_NORM_EPS, dtype=dtype, param_dtype=pdtype, name="layer_norm")(x)
