"""wav2vec2, HuBERT and WavLM encoders on raw 16 kHz samples, LoRA-aware, in Flax Linen.

Architecture as in HF `Wav2Vec2Model` / `HubertModel` / `WavLMModel`: a conv
feature extractor (stride 320 = 20 ms frames for the released stack), a
feature projection (LayerNorm + Dense), a grouped convolutional positional
embedding, then post-LN blocks (base models) or pre-LN blocks with a final
LayerNorm (`do_stable_layer_norm`, the large / XL models). WavLM adds a
bucketed relative position bias, gated per head by the layer input; its
table is a top-level `rel_attn_embed` here (HF keeps it in layer 0), so every
layer has the same parameters and the stack can be scanned.

Padding: `input_mask` [B, S] marks real samples. Padded samples are zeroed,
the group norm of the first conv takes statistics over real frames only,
padded frames are zeroed before the positional conv and removed from
attention as keys, so a padded example gives the frames it gives alone. (HF's
group-norm models take statistics over the padding too; run alone, or with
a layer-norm extractor, the two agree.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechjax.models import attention
from speechjax.models import layers as L
from speechjax.models.encoders.base import AudioInput
from speechjax.models.encoders.wav2vec2_layers import (
  FeatureExtractor,
  PositionalConvEmbedding,
  RelativePositionBias,
  WaveSelfAttention,
  conv_output_length,
  prefix_mask,
)
from speechjax.models.lora import Dense, LoRAConfig, as_lora_config

FEAT_EXTRACT_NORMS = ("group", "layer")


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
  """Hyper-parameters named as in HF's Wav2Vec2Config (num_layers = num_hidden_layers,
  num_heads = num_attention_heads). Defaults are wav2vec2-base.

  normalize: whether the utterance is scaled to zero mean, unit variance
  before the encoder (the checkpoint's feature extractor `do_normalize`).
  residual_dropout is HF's hidden_dropout, applied to each residual branch.
  attention_impl: '' (JAX picks), 'xla' or 'cudnn' (cuDNN's fused kernel, the
  padding given as sequence lengths).
  """

  model_type: str = "wav2vec2"
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_extract_norm: str = "group"
  feat_extract_activation: str = "gelu"
  feat_proj_layer_norm: bool = True
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  do_stable_layer_norm: bool = False
  sample_rate: int = 16000
  normalize: bool = True
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_dropout: float = 0.0
  residual_dropout: float = 0.0
  attention_impl: str = ""
  lora: LoRAConfig = LoRAConfig()

  # WavLM's relative position bias; the WavLM config switches it on.
  relative_position_bias: ClassVar[bool] = False

  def __post_init__(self):
    name = type(self).__name__
    object.__setattr__(self, "lora", as_lora_config(self.lora))
    for key in ("conv_dim", "conv_kernel", "conv_stride"):
      object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))
    if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) > 0:
      raise ValueError(f"{name}: conv_dim {self.conv_dim}, conv_kernel {self.conv_kernel} and "
                       f"conv_stride {self.conv_stride} must be non-empty and of one length")
    if self.feat_extract_norm not in FEAT_EXTRACT_NORMS:
      raise ValueError(f"{name}: feat_extract_norm={self.feat_extract_norm!r}; valid: "
                       f"{', '.join(FEAT_EXTRACT_NORMS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"{name}: hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      raise ValueError(f"{name}: hidden_size={self.hidden_size} is not divisible by "
                       f"num_conv_pos_embedding_groups={self.num_conv_pos_embedding_groups}")
    L.activation_fn(self.hidden_act)
    L.activation_fn(self.feat_extract_activation)
    L.check_remat_policy(self.remat_policy)

  # The encoder contract (speechjax/models/encoders/base.py).
  def audio_input(self) -> AudioInput:
    return AudioInput("wave", sample_rate=self.sample_rate, normalize=self.normalize)

  def output_length(self, input_length: int) -> int:
    return conv_output_length(int(input_length), self.conv_kernel, self.conv_stride)

  def output_mask(self, input_mask: jax.Array) -> jax.Array:
    """[B, S] sample mask -> [B, T] frame mask: the first output_length(real
    samples) frames of each row (HF's feature-vector attention mask)."""
    lengths = jnp.sum(jnp.asarray(input_mask).astype(jnp.int32), axis=-1)
    frames = conv_output_length(lengths, self.conv_kernel, self.conv_stride)
    return prefix_mask(frames, self.output_length(input_mask.shape[-1]))

  @property
  def frame_stride(self) -> int:
    """Samples per output frame (320 for the released stack: 20 ms at 16 kHz)."""
    stride = 1
    for s in self.conv_stride:
      stride *= s
    return stride


@dataclasses.dataclass(frozen=True)
class HubertConfig(Wav2Vec2Config):
  """HuBERT: the wav2vec2 encoder (its feature projection's LayerNorm is optional,
  `feat_proj_layer_norm`); pretraining differs, the network does not."""

  model_type: str = "hubert"


@dataclasses.dataclass(frozen=True)
class WavLMConfig(Wav2Vec2Config):
  """WavLM: wav2vec2 plus a gated relative position bias of `num_buckets`
  buckets up to `max_bucket_distance` frames."""

  model_type: str = "wavlm"
  num_buckets: int = 320
  max_bucket_distance: int = 800

  relative_position_bias: ClassVar[bool] = True


class FeatureProjection(nn.Module):
  """conv_dim[-1] channels -> hidden_size: LayerNorm (optional in HuBERT) + Dense."""

  config: Wav2Vec2Config

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if cfg.feat_proj_layer_norm:
      x = L.LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="layer_norm")(x)
    x = Dense(cfg.hidden_size, kernel_axes=(None, "embed"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="projection")(x, deterministic)
    return nn.Dropout(cfg.residual_dropout)(x, deterministic=deterministic)


class FeedForward(nn.Module):
  config: Wav2Vec2Config

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    dense = dict(lora=cfg.lora, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    h = Dense(cfg.intermediate_size, kernel_axes=("embed", "mlp"), name="intermediate_dense",
              **dense)(x, deterministic)
    h = L.activation_fn(cfg.hidden_act)(h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = Dense(cfg.hidden_size, kernel_axes=("mlp", "embed"), name="output_dense",
              **dense)(h, deterministic)
    return nn.Dropout(cfg.residual_dropout)(h, deterministic=deterministic)


class Wav2Vec2EncoderLayer(nn.Module):
  """Post-LN (base) or pre-LN (`do_stable_layer_norm`) block; returns (x, None)
  so it can be scanned."""

  config: Wav2Vec2Config

  @nn.compact
  def __call__(self, x, attention_mask, position_bias, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype)
    self_attention = WaveSelfAttention(cfg.num_heads, gated_bias=position_bias is not None,
                                       dropout_rate=cfg.attention_dropout, lora=cfg.lora, dtype=dtype,
                                       param_dtype=pdtype, implementation=cfg.attention_impl or None,
                                       name="attention")
    dropout = nn.Dropout(cfg.residual_dropout)
    feed_forward = FeedForward(cfg, name="feed_forward")
    attention_norm = L.LayerNorm(**norm, name="layer_norm")
    final_norm = L.LayerNorm(**norm, name="final_layer_norm")
    if cfg.do_stable_layer_norm:
      h = self_attention(attention_norm(x), attention_mask, position_bias, deterministic)
      x = x + dropout(h, deterministic=deterministic)
      x = x + feed_forward(final_norm(x), deterministic)
    else:
      h = self_attention(x, attention_mask, position_bias, deterministic)
      x = attention_norm(x + dropout(h, deterministic=deterministic))
      x = final_norm(x + feed_forward(x, deterministic))
    return x, None


class Wav2Vec2Encoder(nn.Module):
  """waves [B, S] float samples, input_mask [B, S] or None -> last hidden states
  [B, output_length(S), hidden_size]. One module for the three families; the
  config's class decides whether WavLM's relative position bias is used."""

  config: Wav2Vec2Config

  @nn.compact
  def __call__(self, waves: jax.Array, input_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    name = type(self).__name__
    if waves.ndim != 2:
      raise ValueError(f"{name} ({cfg.model_type}): waves must be [batch, samples], got shape "
                       f"{waves.shape}")
    frames = cfg.output_length(waves.shape[1])
    if frames < 1:
      raise ValueError(f"{name} ({cfg.model_type}): {waves.shape[1]} samples are fewer than the "
                       f"conv stack's receptive field; no output frame")
    if input_mask is not None and input_mask.shape != waves.shape:
      raise ValueError(f"{name}: input_mask shape {input_mask.shape} does not match waves "
                       f"{waves.shape} (expected [batch, samples])")

    x = waves.astype(jnp.float32)
    lengths = frame_mask = attention_mask = None
    if input_mask is not None:
      x = jnp.where(input_mask.astype(bool), x, 0.0)
      lengths = jnp.sum(input_mask.astype(jnp.int32), axis=-1)
      frame_mask = cfg.output_mask(input_mask)
      if cfg.attention_impl == "cudnn":  # a prefix mask: cuDNN takes it as lengths (models.attention)
        attention_mask = attention.SeqLengths(jnp.sum(frame_mask, axis=-1, dtype=jnp.int32))
      else:
        attention_mask = frame_mask[:, None, None, :]
    x = FeatureExtractor(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, cfg.conv_bias,
                         cfg.feat_extract_norm, cfg.feat_extract_activation, dtype, pdtype,
                         name="feature_extractor")(x.astype(dtype), lengths)

    x = FeatureProjection(cfg, name="feature_projection")(x, deterministic)
    if frame_mask is not None:
      # The positional conv must see zeros past the end of each example, as it would alone.
      x = jnp.where(frame_mask[:, :, None], x, 0)
    x = x + PositionalConvEmbedding(cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups,
                                    cfg.feat_extract_activation, dtype, pdtype,
                                    name="pos_conv_embed")(x)
    norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype)
    if not cfg.do_stable_layer_norm:
      x = L.LayerNorm(**norm, name="layer_norm")(x)
    x = nn.Dropout(cfg.residual_dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    position_bias = None
    if cfg.relative_position_bias:
      position_bias = RelativePositionBias(cfg.num_buckets, cfg.max_bucket_distance, cfg.num_heads,
                                           pdtype, name="rel_attn_embed")(frames)

    layer_cls = L.maybe_remat(Wav2Vec2EncoderLayer, cfg.remat_policy, static_argnums=(4,),
                              scanned=cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(layer_cls, variable_axes={"params": 0, "lora": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, name="layers")(x, attention_mask, position_bias, deterministic)
    else:
      for i in range(cfg.num_layers):
        x, _ = layer_cls(cfg, name=f"layers_{i}")(x, attention_mask, position_bias, deterministic)
    if cfg.do_stable_layer_norm:
      x = L.LayerNorm(**norm, name="layer_norm")(x)
    return x
