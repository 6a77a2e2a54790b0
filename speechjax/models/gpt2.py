"""GPT-2 causal LM: learned positions, pre-LayerNorm blocks, gelu_new, fused QKV.

Same call conventions and KV cache as speechjax.models.decoder.Decoder.
Module names follow HF's GPT2LMHeadModel: wte, wpe, h_{i} (or `h` when
scanned), ln_1, attn/c_attn (fused q|k|v), attn/c_proj, ln_2, mlp/c_fc,
mlp/c_proj, ln_f. HF stores these as Conv1D weights [in, out], which is our
kernel layout already, so conversion copies them without a transpose.

LoRA: as in PEFT (whose GPT-2 default target is `c_attn`), q/v adaptation is
done on the fused c_attn projection: use `LoRAConfig(targets=GPT2_LORA_TARGETS)`.
The default targets (q_proj|v_proj) match nothing in GPT-2. The adapter then
spans q, k and v together, exactly like PEFT's, so exported adapters load with
`fan_in_fan_out=True` (speechjax.hf.export.export_peft_adapter sets it).
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

GPT2_LORA_TARGETS = (r"^(?!encoder/).*attn/c_attn$",)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """intermediate_size 0 = 4 * hidden_size. Other shared fields as DecoderConfig."""

  model_type: str = "gpt2"
  vocab_size: int = 50257
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 0
  max_position_embeddings: int = 1024
  layer_norm_eps: float = 1e-5
  activation: str = "gelu_new"
  tie_word_embeddings: bool = True
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
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
    if not self.intermediate_size:
      object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"GPT2Config: hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    L.check_remat_policy(self.remat_policy)
    L.activation_fn(self.activation)

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


class GPT2Attention(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x, mask, cache, layer, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t, e = x.shape
    n, d = cfg.num_heads, cfg.head_dim
    # 'qkv' is not a rule name by default: the fused output stays unsharded so
    # the q|k|v split never crosses devices; shard it with a ('qkv', ...) rule.
    qkv = Dense(3 * e, kernel_axes=("embed", "qkv"), lora=cfg.lora, dtype=dtype,
                param_dtype=pdtype, name="c_attn")(x, deterministic)
    q, k, v = (y.reshape(b, t, n, d) for y in jnp.split(qkv, 3, axis=-1))
    if cfg.scale_attn_by_inverse_layer_idx:
      q = q / (jnp.asarray(layer, jnp.float32) + 1.0).astype(dtype)
    new_kv = None
    if cache is not None:
      k, v, new_kv = attention.update_kv_cache(cache, k, v)
    dropout_rng = None
    if not deterministic and cfg.attention_dropout > 0:
      dropout_rng = self.make_rng("dropout")
    out = attention.attend(q, k, v, mask, is_causal=True, scale=None if cfg.scale_attn_weights else 1.0,
                   dropout_rate=cfg.attention_dropout, deterministic=deterministic,
                   dropout_rng=dropout_rng, implementation=cfg.attention_impl or None)
    out = Dense(e, kernel_axes=("heads", "embed"), lora=cfg.lora, dtype=dtype,
                param_dtype=pdtype, name="c_proj")(out.reshape(b, t, e), deterministic)
    return out, new_kv


class GPT2Block(nn.Module):
  """Scan-shaped like decoder.DecoderLayer."""

  config: GPT2Config

  @nn.compact
  def __call__(self, carry, mask, rope, slots, deterministic: bool = True):
    del rope  # learned absolute positions are added once, before the blocks
    cfg = self.config
    x, k_all, v_all, layer = carry
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype)
    dropout = nn.Dropout(cfg.residual_dropout)

    cache = None if k_all is None else (k_all, v_all, layer, *slots)
    h, new_kv = GPT2Attention(cfg, name="attn")(L.LayerNorm(**norm, name="ln_1")(x), mask, cache,
                                                layer, deterministic)
    if new_kv is not None:
      k_all, v_all = new_kv
    x = x + dropout(h, deterministic=deterministic)

    h = L.LayerNorm(**norm, name="ln_2")(x)
    h = GPT2MLP(cfg, name="mlp")(h, deterministic)
    x = x + dropout(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, k_all, v_all, layer + 1), None


class GPT2MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h = Dense(cfg.intermediate_size, kernel_axes=("embed", "mlp"), lora=cfg.lora, dtype=dtype,
              param_dtype=pdtype, name="c_fc")(x, deterministic)
    h = L.activation_fn(cfg.activation)(h)
    return Dense(cfg.hidden_size, kernel_axes=("mlp", "embed"), lora=cfg.lora, dtype=dtype,
                 param_dtype=pdtype, name="c_proj")(h, deterministic)


class GPT2(nn.Module):
  """GPT-2 LM head model; call conventions as decoder.Decoder."""

  config: GPT2Config

  def setup(self):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.wte = L.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype)
    self.wpe = L.Embedding(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"),
                           dtype=dtype, param_dtype=pdtype,
                           embedding_init=nn.initializers.normal(0.01))
    self.h = make_layers(GPT2Block, cfg)
    self.ln_f = L.LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype)
    self.drop = nn.Dropout(cfg.residual_dropout)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense(cfg.vocab_size, use_bias=False, kernel_axes=("embed", "vocab"),
                           lora=cfg.lora, dtype=dtype, param_dtype=pdtype,
                           kernel_init=nn.initializers.normal(0.02))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B,T,H] (positions are added inside __call__)."""
    return self.wte(input_ids)

  def lm_logits(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
    """The LM head on final-norm hidden states [..., H] -> logits [..., V] (compute dtype)."""
    if self.config.tie_word_embeddings:
      return self.wte.attend(hidden)
    return self.lm_head(hidden, deterministic)

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds=None, positions=None,
               attention_mask=None, cache=None, deterministic: bool = True,
               return_hidden: bool = False, hidden_only: bool = False):
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("GPT2: pass exactly one of input_ids [B,T] or inputs_embeds [B,T,H]")
    if hidden_only and cache is not None:
      raise ValueError("GPT2: hidden_only=True is for full-sequence calls; it drops the cache")
    x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(cfg.dtype))
    batch, length = x.shape[:2]
    check_inputs(cfg, batch, length, attention_mask, cache)
    offset = 0 if cache is None else cache["index"]
    if positions is None:
      positions = L.default_positions(attention_mask, batch, length, offset)
    x = self.drop(x + self.wpe(positions), deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    mask = build_mask(length, attention_mask, cache)

    k_all = v_all = slots = None
    if cache is not None:
      k_all, v_all, slots = cache["k"], cache["v"], cache_slots(cache, length)
    carry = (x, k_all, v_all, jnp.zeros((), jnp.int32))
    x, k_all, v_all, _ = run_layers(self.h, carry, mask, None, slots, deterministic)

    hidden = self.ln_f(x)
    if hidden_only:  # the caller applies lm_logits where it needs logits
      return hidden
    logits = self.lm_logits(hidden, deterministic)
    return finish_outputs(logits, hidden, cache, (k_all, v_all), length, return_hidden, slots)
