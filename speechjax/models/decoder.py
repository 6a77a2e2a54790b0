"""Llama-family decoder LLM (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) in one module.

The families differ only in switches of `DecoderConfig`: grouped-query heads
(num_kv_heads), q/k/v bias (Qwen2), q/k RMSNorm per head with an explicit
head_dim (Qwen3), RoPE theta and scaling (Llama 3.1 'llama3', 'linear',
'yarn'), a sliding window (Mistral), tied embeddings.

Module names follow HF (embed_tokens, layers_{i}/self_attn/q_proj, mlp/
gate_proj, input_layernorm, norm, lm_head), so checkpoints convert key by key
(speechjax/hf/llama.py) and LoRA target patterns read naturally. With
scan_layers=True the layers are one nn.scan named `layers` whose params have
a leading 'layers' axis.

    logits = Decoder(cfg).apply({'params': p}, input_ids)                 # [B,T,V] f32
    logits, cache = Decoder(cfg).apply(v, ids, attention_mask=m, cache=c)  # incremental
    hidden = Decoder(cfg).apply(v, ids, hidden_only=True)  # [B,T,H] final-norm states, no head;
    logits = Decoder(cfg).apply(v, hidden[:, -1:], method='lm_logits')  # the head where needed

The KV cache (transformer.init_cache) is one stacked array per k/v, [L,B,S,K,D], and an
int32 `index` = next free slot; a call with t tokens writes slots
[index, index+t). With a cache, attention_mask covers all S slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechjax.models import attention
from speechjax.models import layers as L
from speechjax.models.lora import Dense, LoRAConfig, as_lora_config
from speechjax.models.transformer import (
  build_mask,
  cache_slots,
  check_inputs,
  finish_outputs,
  make_layers,
  run_layers,
)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of a Llama-family decoder. 0 in num_kv_heads / head_dim
  means "same as num_heads" / "hidden_size // num_heads"; sliding_window 0 =
  full attention. dtype is the compute dtype, param_dtype the storage dtype
  (strings such as 'bfloat16' are fine). remat_policy: see
  layers.REMAT_POLICY_NAMES. attention_impl: '' (JAX picks), 'xla' or 'cudnn'
  (cuDNN's fused kernel; a padded full-sequence call then runs with each row's
  real slots moved to the front, the padding given as sequence lengths).
  """

  model_type: str = "llama"  # llama | mistral | qwen2 | qwen3 (used by HF export)
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 0
  head_dim: int = 0
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 4096
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_attention_factor: float = 0.0
  rope_truncate: bool = True
  attention_bias: bool = False  # bias on q, k, v and o (Llama's attention_bias)
  qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: int = 0
  tie_word_embeddings: bool = False
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_dropout: float = 0.0
  residual_dropout: float = 0.0
  attention_impl: str = ""
  lora: LoRAConfig = LoRAConfig()

  def __post_init__(self):
    object.__setattr__(self, "lora", as_lora_config(self.lora))
    if not self.num_kv_heads:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if not self.head_dim:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"DecoderConfig: hidden_size={self.hidden_size} is not divisible by "
                         f"num_heads={self.num_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig: head_dim={self.head_dim} must be even (rotary)")
    L.check_remat_policy(self.remat_policy)
    L.activation_fn(self.hidden_act)

  def rope(self):
    return L.rope_inv_freq(
        self.head_dim, self.rope_theta, self.rope_type, factor=self.rope_factor,
        low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
        original_max_position=self.rope_original_max_position, beta_fast=self.rope_beta_fast,
        beta_slow=self.rope_beta_slow, attention_factor=self.rope_attention_factor,
        truncate=self.rope_truncate)


class DecoderLayer(nn.Module):
  """Pre-norm block. Scan-shaped: (carry, mask, rope, slots, deterministic)
  -> (carry, None), carry = (x, k_all, v_all, layer_index)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, carry, mask, rope, slots, deterministic: bool = True):
    cfg = self.config
    x, k_all, v_all, layer = carry
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=pdtype)
    dropout = nn.Dropout(cfg.residual_dropout)

    h = L.RMSNorm(**norm, name="input_layernorm")(x)
    cache = None if k_all is None else (k_all, v_all, layer, *slots)
    qkv_bias = cfg.qkv_bias or cfg.attention_bias
    out = attention.Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        causal=True, q_bias=qkv_bias, k_bias=qkv_bias, v_bias=qkv_bias,
        o_bias=cfg.attention_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.rms_norm_eps,
        dropout_rate=cfg.attention_dropout, lora=cfg.lora, dtype=dtype, param_dtype=pdtype,
        implementation=cfg.attention_impl or None, name="self_attn",
    )(h, mask=mask, rope=rope, cache=cache, deterministic=deterministic)
    if cache is not None:
      out, (k_all, v_all) = out
    x = x + dropout(out, deterministic=deterministic)

    h = L.RMSNorm(**norm, name="post_attention_layernorm")(x)
    h = L.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias,
                   lora=cfg.lora, dtype=dtype, param_dtype=pdtype, name="mlp")(h, deterministic)
    x = x + dropout(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, k_all, v_all, layer + 1), None


class Decoder(nn.Module):
  """Causal LM. See the module docstring for the call conventions."""

  config: DecoderConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed_tokens = L.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                    param_dtype=pdtype)
    self.layers = make_layers(DecoderLayer, cfg)
    self.norm = L.RMSNorm(cfg.rms_norm_eps, dtype=dtype, param_dtype=pdtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense(cfg.vocab_size, use_bias=False, kernel_axes=("embed", "vocab"),
                           lora=cfg.lora, dtype=dtype, param_dtype=pdtype,
                           kernel_init=nn.initializers.normal(0.02))
    self.inv_freq, self.rope_scale = cfg.rope()

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B,T,H] in the compute dtype."""
    return self.embed_tokens(input_ids)

  def lm_logits(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
    """The LM head on final-norm hidden states [..., H] -> logits [..., V] (compute dtype)."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden, deterministic)

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds=None, positions=None,
               attention_mask=None, cache=None, deterministic: bool = True,
               return_hidden: bool = False, hidden_only: bool = False):
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("Decoder: pass exactly one of input_ids [B,T] or inputs_embeds [B,T,H]")
    if hidden_only and cache is not None:
      raise ValueError("Decoder: hidden_only=True is for full-sequence calls; it drops the cache")
    x = self.embed_tokens(input_ids) if inputs_embeds is None else (
        inputs_embeds.astype(jnp.dtype(cfg.dtype)))
    batch, length = x.shape[:2]
    check_inputs(cfg, batch, length, attention_mask, cache)
    offset = 0 if cache is None else cache["index"]
    num_positions = None  # a bound is known only for the positions computed here
    if positions is None:
      positions = L.default_positions(attention_mask, batch, length, offset)
      num_positions = length if cache is None else cache["k"].shape[2]
    order = None
    if cfg.attention_impl == "cudnn" and cache is None and attention_mask is not None and not cfg.sliding_window:
      # cuDNN takes padding as sequence lengths (attention module docstring).
      x, mask, order = attention.real_slots_first(x, attention_mask)
      positions = attention.take_slots(jnp.broadcast_to(positions, (batch, length)), order)
    else:
      mask = build_mask(length, attention_mask, cache, cfg.sliding_window)
    rope = L.rope_cos_sin(positions, self.inv_freq, self.rope_scale, num_positions=num_positions)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    k_all = v_all = slots = None
    if cache is not None:
      k_all, v_all, slots = cache["k"], cache["v"], cache_slots(cache, length)
    carry = (x, k_all, v_all, jnp.zeros((), jnp.int32))
    x, k_all, v_all, _ = run_layers(self.layers, carry, mask, rope, slots, deterministic)
    if order is not None:
      x = attention.restore_slots(x, order)

    hidden = self.norm(x)
    if hidden_only:  # the caller applies lm_logits where it needs logits
      return hidden
    logits = self.lm_logits(hidden, deterministic)
    return finish_outputs(logits, hidden, cache, (k_all, v_all), length, return_hidden, slots)
