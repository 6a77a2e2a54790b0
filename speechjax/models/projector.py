"""Projectors from audio-encoder frames to the LLM's embedding space.

Every projector maps (x [B, N, d], mask [B, N], deterministic) to
(y [B, M, D], mask [B, M]) with M = projector_output_length(N, cfg), and is
built by `make_projector(cfg)`. Each kind is one line of the PROJECTORS
registry at the end of this file (module, output length, what it needs from
the LLM and the tokenizer):

  'frame_stack'  SLAM-ASR: concatenate k consecutive frames, then
                 linear -> ReLU -> linear.
  'conv'         strided conv1d downsampler + GELU + linear.
  'qformer'      SALMONN's window-level Q-Former: learned queries attend to the
                 frames of each window of W frames.
  'pool'         Qwen2-Audio: average pooling (stride 2) + linear.
  'ctc_compress' Speech-LLaMA's CTC compression with LegoSLM's soft tokens: a
                 CTC head over the LLM's tokenizer picks one frame per emitted
                 token (best path, repeats merged, blanks dropped); each becomes
                 its token distribution times the LLM's embedding table, plus a
                 learned linear map of the frame (zero at init). Always
                 `max_tokens` outputs, filled with the embedding of
                 `fill_token_id` after the last token and all valid, so the
                 k-th token sits at slot k whatever was said (a text LM
                 pretrained with `data.lm_slot_length` reads it as text).

All of them treat each output as a function of a fixed span of input frames
(independent of N) and zero or mask padded frames first, so changing padded
frames never changes a valid output, and an example padded into a batch gives
the same valid outputs as the example alone ('ctc_compress' reads every valid
frame, and likewise ignores padded ones). An output is valid iff its group
or window holds a valid frame ('conv': iff the frame its stride starts on is
valid); with prefix masks of length L that is the first
projector_output_length(L) outputs.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechjax.models import attention
from speechjax.models import layers as L
from speechjax.models.conv import Conv1d
from speechjax.models.ctc_adapter import CTCAdapter, CTCAdapterConfig
from speechjax.models.lora import Dense, LoRAConfig, as_lora_config
from speechjax.registry import Registry


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """output_dim 0 means "the LLM's hidden size" (SpeechLLM fills it in).

  hidden_dim is the MLP width of 'frame_stack' and the conv channels of
  'conv'. The qformer_* fields size the Q-Former (SALMONN: 2 layers of BERT
  width 768, 1 query per 17-frame window). 'ctc_compress' emits max_tokens
  slots; ctc_vocab_size (the tokenizer's size + 1 blank) and fill_token_id
  (the pad token) are filled in from the tokenizer when 0 / -1; its CTC head
  reads the encoder through a CTCAdapter (models/ctc_adapter.py) of
  ctc_adapter_layers blocks over ctc_frame_stack stacked frames (0 and 1: none).
  The 'ctc' model kind builds its head from these same fields.
  """

  kind: str = "frame_stack"
  output_dim: int = 0
  hidden_dim: int = 2048
  stack_factor: int = 5
  conv_kernel: int = 3
  conv_stride: int = 2
  window_size: int = 17
  num_queries: int = 1
  qformer_layers: int = 2
  qformer_dim: int = 768
  qformer_heads: int = 12
  qformer_ffn_dim: int = 3072
  pool_factor: int = 2
  max_tokens: int = 32
  ctc_vocab_size: int = 0
  fill_token_id: int = -1
  ctc_adapter_layers: int = 0
  ctc_adapter_dim: int = 256
  ctc_adapter_heads: int = 4
  ctc_adapter_ffn_dim: int = 1024
  ctc_frame_stack: int = 1
  ctc_time_masks: int = 0
  ctc_time_mask_frames: int = 5
  ctc_state_dropout: float = 0.0
  dropout: float = 0.0
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  lora: LoRAConfig = LoRAConfig()

  def __post_init__(self):
    object.__setattr__(self, "lora", as_lora_config(self.lora))
    if self.kind not in PROJECTORS:
      raise ValueError(f"ProjectorConfig.kind={self.kind!r}; expected one of {PROJECTORS.names()}")
    for name in ("stack_factor", "conv_kernel", "conv_stride", "window_size", "num_queries",
                 "pool_factor", "max_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"ProjectorConfig.{name}={getattr(self, name)} must be >= 1")
    self.ctc_adapter()  # its own checks
    if self.kind == "qformer" and self.qformer_dim % self.qformer_heads:
      raise ValueError(f"ProjectorConfig: qformer_dim={self.qformer_dim} is not divisible by "
                       f"qformer_heads={self.qformer_heads}")


  def ctc_adapter(self) -> CTCAdapterConfig:
    return CTCAdapterConfig(layers=self.ctc_adapter_layers, dim=self.ctc_adapter_dim,
                            heads=self.ctc_adapter_heads, ffn_dim=self.ctc_adapter_ffn_dim,
                            frame_stack=self.ctc_frame_stack, dropout=self.dropout,
                            time_masks=self.ctc_time_masks, time_mask_frames=self.ctc_time_mask_frames,
                            state_dropout=self.ctc_state_dropout, dtype=self.dtype,
                            param_dtype=self.param_dtype)


def _ceil_div(a: int, b: int) -> int:
  return -(-int(a) // int(b))


def _check_inputs(name, x, mask):
  if x.ndim != 3 or mask.shape != x.shape[:2]:
    raise ValueError(f"{name}: expected x [batch, frames, dim] and mask [batch, frames], got "
                     f"{x.shape} and {mask.shape}")


def _zero_padded(x, mask):
  return jnp.where(mask.astype(bool)[..., None], x, jnp.zeros((), x.dtype))


def _group(x, mask, size):
  """Pads frames up to a multiple of `size`, then [B,N,d] -> [B,N/size,size,d]."""
  b, n, d = x.shape
  pad = (-n) % size
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  m = (n + pad) // size
  return x.reshape(b, m, size, d), mask.reshape(b, m, size)


def _dtypes(cfg):
  return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def _output_dim(cfg):
  if cfg.output_dim <= 0:
    raise ValueError("ProjectorConfig.output_dim is 0: set it to the LLM's hidden size "
                     "(SpeechLLM does this from its decoder config)")
  return cfg.output_dim


class FrameStackProjector(nn.Module):
  """SLAM-ASR's projector: stack k frames, linear -> ReLU -> linear."""

  config: ProjectorConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = _dtypes(cfg)
    _check_inputs("FrameStackProjector", x, mask)
    b, _, d = x.shape
    k = cfg.stack_factor
    groups, group_mask = _group(_zero_padded(x.astype(dtype), mask), mask.astype(bool), k)
    stacked = groups.reshape(b, groups.shape[1], k * d)
    h = Dense(cfg.hidden_dim, kernel_axes=("embed", "mlp"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="fc1")(stacked, deterministic)
    h = nn.Dropout(cfg.dropout)(jax.nn.relu(h), deterministic=deterministic)
    y = Dense(_output_dim(cfg), kernel_axes=("mlp", "embed"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="fc2")(h, deterministic)
    return y, group_mask.any(-1).astype(mask.dtype)


class ConvProjector(nn.Module):
  """Strided conv1d downsampler + GELU + linear.

  Output j reads frames [j*s - (k-1)//2, j*s - (k-1)//2 + k), zeros outside
  the input; there are ceil(N/s) outputs.
  """

  config: ProjectorConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = _dtypes(cfg)
    _check_inputs("ConvProjector", x, mask)
    n = x.shape[1]
    k, s = cfg.conv_kernel, cfg.conv_stride
    out_len = projector_output_length(n, cfg)
    pad_lo = (k - 1) // 2
    pad_hi = max(0, (out_len - 1) * s + k - n - pad_lo)
    h = Conv1d(cfg.hidden_dim, k, s, padding=(pad_lo, pad_hi),
               kernel_axes=("conv_kernel", "embed", "mlp"), dtype=dtype, param_dtype=pdtype,
               name="conv")(_zero_padded(x.astype(dtype), mask))[:, :out_len]
    h = nn.Dropout(cfg.dropout)(L.gelu_exact(h), deterministic=deterministic)
    y = Dense(_output_dim(cfg), kernel_axes=("mlp", "embed"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="proj")(h, deterministic)
    return y, mask[:, ::s][:, :out_len]


class PoolProjector(nn.Module):
  """Qwen2-Audio: masked average over `pool_factor` frames, then linear."""

  config: ProjectorConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = _dtypes(cfg)
    _check_inputs("PoolProjector", x, mask)
    groups, group_mask = _group(_zero_padded(x.astype(dtype), mask), mask.astype(bool),
                                cfg.pool_factor)
    counts = group_mask.astype(jnp.float32).sum(-1, keepdims=True)
    pooled = groups.astype(jnp.float32).sum(2) / jnp.maximum(counts, 1.0)
    y = Dense(_output_dim(cfg), kernel_axes=("mlp", "embed"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="proj")(pooled.astype(dtype), deterministic)
    return y, group_mask.any(-1).astype(mask.dtype)


class CrossAttention(nn.Module):
  """Queries [B,Q,E] attend to memory [B,S,d]; projections named like BERT's
  (query/key/value/out) so the LLM's default LoRA targets do not match them."""

  num_heads: int
  dropout_rate: float = 0.0
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, memory, mask=None, deterministic: bool = True):
    b, q_len, features = queries.shape
    n = self.num_heads
    d = features // n

    def proj(name, axes):
      return Dense(features, kernel_axes=axes, lora=self.lora, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

    q = proj("query", ("embed", "heads"))(queries, deterministic).reshape(b, q_len, n, d)
    k = proj("key", ("embed", "kv_heads"))(memory, deterministic).reshape(b, -1, n, d)
    v = proj("value", ("embed", "kv_heads"))(memory, deterministic).reshape(b, -1, n, d)
    rng = self.make_rng("dropout") if not deterministic and self.dropout_rate > 0 else None
    out = attention.attend(q, k, v, mask, dropout_rate=self.dropout_rate, deterministic=deterministic,
                   dropout_rng=rng)
    return proj("out", ("heads", "embed"))(out.reshape(b, q_len, features), deterministic)


class QFormerLayer(nn.Module):
  """Pre-LN: self-attention over the queries, cross-attention to the window, FFN."""

  config: ProjectorConfig

  @nn.compact
  def __call__(self, queries, frames, frame_mask, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = _dtypes(cfg)
    attn = dict(num_heads=cfg.qformer_heads, dropout_rate=cfg.dropout, lora=cfg.lora,
                dtype=dtype, param_dtype=pdtype)
    norm = dict(dtype=dtype, param_dtype=pdtype)
    dropout = nn.Dropout(cfg.dropout)

    h = L.LayerNorm(**norm, name="self_attn_norm")(queries)
    h = CrossAttention(**attn, name="self_attn")(h, h, None, deterministic)
    queries = queries + dropout(h, deterministic=deterministic)
    h = L.LayerNorm(**norm, name="cross_attn_norm")(queries)
    h = CrossAttention(**attn, name="cross_attn")(h, frames, frame_mask, deterministic)
    queries = queries + dropout(h, deterministic=deterministic)
    h = L.LayerNorm(**norm, name="ffn_norm")(queries)
    h = Dense(cfg.qformer_ffn_dim, kernel_axes=("embed", "mlp"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="fc1")(h, deterministic)
    h = Dense(cfg.qformer_dim, kernel_axes=("mlp", "embed"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="fc2")(L.gelu_exact(h), deterministic)
    return queries + dropout(h, deterministic=deterministic)


class WindowQFormerProjector(nn.Module):
  """SALMONN's window-level Q-Former.

  Frames are cut into windows of W frames (stride W); each window is an
  independent batch item in which `num_queries` learned queries cross-attend
  to the window's valid frames. A window with no valid frame is masked in the
  output (its queries still see a finite, meaningless softmax).
  """

  config: ProjectorConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = _dtypes(cfg)
    _check_inputs("WindowQFormerProjector", x, mask)
    b, _, d = x.shape
    w, q = cfg.window_size, cfg.num_queries
    # SALMONN normalises the encoder output before the Q-Former (ln_speech).
    x = L.LayerNorm(dtype=dtype, param_dtype=pdtype, name="input_norm")(x)
    windows, window_mask = _group(x, mask.astype(bool), w)
    num_windows = windows.shape[1]
    frames = windows.reshape(b * num_windows, w, d)
    frame_mask = attention.padding_mask(window_mask.reshape(b * num_windows, w))

    query_init = nn.initializers.normal(0.02)
    queries = self.param("queries", nn.with_logical_partitioning(query_init, ("queries", "embed")),
                         (q, cfg.qformer_dim), pdtype)
    h = jnp.broadcast_to(queries.astype(dtype), (b * num_windows, q, cfg.qformer_dim))
    for i in range(cfg.qformer_layers):
      h = QFormerLayer(cfg, name=f"layers_{i}")(h, frames, frame_mask, deterministic)
    h = L.LayerNorm(dtype=dtype, param_dtype=pdtype, name="output_norm")(h)
    y = Dense(_output_dim(cfg), kernel_axes=("mlp", "embed"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="proj")(h, deterministic)
    y = y.reshape(b, num_windows * q, y.shape[-1])
    out_mask = jnp.repeat(window_mask.any(-1), q, axis=1)
    return y, out_mask.astype(mask.dtype)


def ctc_compress_slots(logits: jax.Array, mask: jax.Array, max_tokens: int) -> jax.Array:
  """One-hot [B, N, max_tokens]: frame n -> slot k when n is the k-th frame of
  the best CTC path that emits a token (argmax not blank, not a repeat of the
  previous frame's argmax); later tokens than max_tokens are dropped."""
  best = jnp.argmax(logits, axis=-1)
  previous = jnp.pad(best[:, :-1], ((0, 0), (1, 0)))  # a blank before the first frame
  emits = mask.astype(bool) & (best != 0) & (best != previous)
  slot = jnp.cumsum(emits, axis=1) - 1
  return emits[..., None] & (slot[..., None] == jnp.arange(max_tokens))


class CTCCompressProjector(nn.Module):
  """See the module docstring ('ctc_compress'). Needs the LLM's embedding
  table [V, D] (`token_table`); the CTC head comes from CTC pretraining."""

  config: ProjectorConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True, token_table=None):
    cfg = self.config
    dtype, pdtype = _dtypes(cfg)
    _check_inputs("CTCCompressProjector", x, mask)
    if token_table is None:
      raise ValueError("CTCCompressProjector needs token_table (the LLM's embedding table)")
    if cfg.ctc_vocab_size != token_table.shape[0] + 1 or not 0 <= cfg.fill_token_id < token_table.shape[0]:
      raise ValueError(f"CTCCompressProjector: ctc_vocab_size={cfg.ctc_vocab_size} must be the "
                       f"LLM vocabulary ({token_table.shape[0]}) + 1 blank, and fill_token_id="
                       f"{cfg.fill_token_id} one of its ids")
    if cfg.ctc_adapter().enabled:
      x, mask = CTCAdapter(cfg.ctc_adapter(), name="ctc_adapter")(x, mask, deterministic)
    logits = Dense(cfg.ctc_vocab_size, kernel_axes=("mlp", "vocab"), dtype=jnp.float32,
                   param_dtype=pdtype, name="ctc_head")(x.astype(jnp.float32))
    table = token_table.astype(jnp.float32)
    soft = jax.nn.softmax(logits[..., 1:], axis=-1) @ table  # blank left out
    learned = Dense(table.shape[1], kernel_axes=("mlp", "embed"), dtype=dtype, param_dtype=pdtype,
                    kernel_init=nn.initializers.zeros_init(), name="proj")(x.astype(dtype))
    frames = nn.Dropout(cfg.dropout)(soft + learned.astype(jnp.float32), deterministic=deterministic)
    one_hot = ctc_compress_slots(logits, mask, cfg.max_tokens)
    y = jnp.einsum("bnk,bnd->bkd", one_hot.astype(jnp.float32), frames)
    filled = one_hot.any(axis=1)[..., None]
    y = jnp.where(filled, y, table[cfg.fill_token_id])
    return y.astype(dtype), jnp.ones(y.shape[:2], mask.dtype)


# ------------------------------------------------------------- registry ---

@dataclasses.dataclass(frozen=True)
class ProjectorKind:
  """A registry entry.

  module_cls        built as module_cls(cfg); called (x, mask, deterministic)
                    or, when token_table_rows(cfg) > 0, with token_table= the
                    first token_table_rows(cfg) rows of the LLM's embeddings.
  output_length     (n encoder frames, cfg) -> outputs, a pure function of ints.
  token_table_rows  cfg -> rows of the LLM's embedding table the module reads.
  from_tokenizer    (config values dict, tokenizer) -> values with the fields
                    that follow the tokenizer filled in (None: none do).
  encoder_folder_params  subtrees that start from `<name>.safetensors` in the
                    pretrained encoder's folder (a head trained with it).
  """

  module_cls: type
  output_length: Callable[[int, ProjectorConfig], int]
  token_table_rows: Callable[[ProjectorConfig], int] = lambda cfg: 0
  from_tokenizer: Callable[[dict, Any], dict] | None = None
  encoder_folder_params: tuple[str, ...] = ()


def _ctc_fields_from_tokenizer(values: dict, tokenizer) -> dict:
  values = dict(values)
  if tokenizer is None and (values["ctc_vocab_size"] <= 0 or values["fill_token_id"] < 0):
    raise ValueError("projector kind 'ctc_compress' needs model.tokenizer (or "
                     "model.projector.ctc_vocab_size and fill_token_id)")
  if values["ctc_vocab_size"] <= 0:
    values["ctc_vocab_size"] = len(tokenizer) + 1
  if values["fill_token_id"] < 0:
    pad = tokenizer.pad_token_id
    values["fill_token_id"] = pad if pad is not None else tokenizer.eos_token_id
  return values


PROJECTORS: Registry[ProjectorKind] = Registry("projector kind")
PROJECTORS.register("frame_stack", ProjectorKind(FrameStackProjector,
                                                 lambda n, cfg: _ceil_div(n, cfg.stack_factor)))
PROJECTORS.register("conv", ProjectorKind(ConvProjector, lambda n, cfg: _ceil_div(n, cfg.conv_stride)))
PROJECTORS.register("qformer", ProjectorKind(
    WindowQFormerProjector, lambda n, cfg: _ceil_div(n, cfg.window_size) * cfg.num_queries))
PROJECTORS.register("pool", ProjectorKind(PoolProjector, lambda n, cfg: _ceil_div(n, cfg.pool_factor)))
PROJECTORS.register("ctc_compress", ProjectorKind(
    CTCCompressProjector, lambda n, cfg: cfg.max_tokens, lambda cfg: cfg.ctc_vocab_size - 1,
    _ctc_fields_from_tokenizer, encoder_folder_params=("ctc_adapter", "ctc_head")))


def projector_output_length(n: int, cfg: ProjectorConfig) -> int:
  """Output frames for n input frames."""
  return PROJECTORS.get(cfg.kind).output_length(n, cfg)


def make_projector(cfg: ProjectorConfig, name: str | None = None) -> nn.Module:
  """The projector module for cfg.kind."""
  return PROJECTORS.get(cfg.kind).module_cls(cfg, name=name)
