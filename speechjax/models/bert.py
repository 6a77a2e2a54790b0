"""BERT-style encoder-only text model (BERT, MiniLM and other `model_type:
bert` checkpoints; RoBERTa's position numbering as an option), with the
pooler and the sequence-classification head of BertForSequenceClassification.

    model = Bert(BertConfig(num_labels=13))
    out = model.apply(variables, input_ids, attention_mask=mask)
    out["hidden"]   # [B, T, H] last_hidden_state
    out["pooled"]   # [B, H]    tanh(dense(hidden[:, 0])), BertModel's pooler_output
    out["logits"]   # [B, num_labels] (num_labels > 0)

Post-LayerNorm blocks (LayerNorm(x + sublayer(x))), learned absolute and
token-type embeddings, erf GELU. Module names mirror HF's so the converter
(speechjax.hf.bert) is a table: {word,position,token_type}_embeddings and
embeddings_norm, layer_{i}/{query,key,value,attention_output,attention_norm,
intermediate,output,output_norm}, pooler, classifier.

LoRA (`lora.targets`, e.g. BERT_LORA_TARGETS: query and value as PEFT's BERT
default) adapts any of these Dense layers; the classifier head then trains in
full beside it (train.mode='lora' trains what is not frozen: see
docs/training_modes.md).
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

BERT_LORA_TARGETS = (r"/(query|value)$",)
POSITION_STYLES = ("absolute", "roberta")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """position_style 'roberta': positions count from pad_token_id + 1 over the
  non-pad tokens (RoBERTa's create_position_ids_from_input_ids); 'absolute':
  0, 1, 2, ... (BERT). num_labels 0: no classification head."""

  model_type: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  position_style: str = "absolute"
  num_labels: int = 0
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  attention_dropout: float = 0.0
  residual_dropout: float = 0.0
  classifier_dropout: float = 0.0
  lora: LoRAConfig = LoRAConfig(targets=BERT_LORA_TARGETS)

  def __post_init__(self):
    object.__setattr__(self, "lora", as_lora_config(self.lora))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.position_style not in POSITION_STYLES:
      raise ValueError(f"BertConfig: position_style={self.position_style!r}; valid: {POSITION_STYLES}")
    if self.num_labels < 0:
      raise ValueError(f"BertConfig: num_labels={self.num_labels} must be >= 0")
    L.activation_fn(self.hidden_act)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def position_ids(input_ids: jax.Array, cfg: BertConfig) -> jax.Array:
  if cfg.position_style == "roberta":
    # RoBERTa numbers only real tokens, from pad_token_id + 1; pads sit at pad_token_id.
    real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None], input_ids.shape)


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t, h = x.shape
    n, d = cfg.num_heads, cfg.head_dim
    dense = lambda features, axes, name: Dense(features, kernel_axes=axes, lora=cfg.lora, dtype=dtype,
                                               param_dtype=pdtype, name=name)
    norm = lambda name: L.LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name=name)
    dropout = nn.Dropout(cfg.residual_dropout)

    q, k, v = (dense(h, ("embed", "heads"), name)(x, deterministic).reshape(b, t, n, d)
               for name in ("query", "key", "value"))
    dropout_rng = None
    if not deterministic and cfg.attention_dropout > 0:
      dropout_rng = self.make_rng("dropout")
    out = attention.attend(q, k, v, mask, dropout_rate=cfg.attention_dropout, deterministic=deterministic,
                           dropout_rng=dropout_rng)
    out = dense(h, ("heads", "embed"), "attention_output")(out.reshape(b, t, h), deterministic)
    x = norm("attention_norm")(x + dropout(out, deterministic=deterministic))
    y = dense(cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x, deterministic)
    y = dense(h, ("mlp", "embed"), "output")(L.activation_fn(cfg.hidden_act)(y), deterministic)
    x = norm("output_norm")(x + dropout(y, deterministic=deterministic))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Bert(nn.Module):
  """(input_ids [B, T], attention_mask [B, T] (1 = token), token_type_ids) ->
  {'hidden', 'pooled', 'logits' (with num_labels)}."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, deterministic: bool = True) -> dict[str, jax.Array]:
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    embed = lambda num, axes, name: L.Embedding(num, cfg.hidden_size, axes=axes, dtype=dtype,
                                                param_dtype=pdtype, name=name)
    x = (embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(
             position_ids(input_ids, cfg))
         + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids))
    x = L.LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="embeddings_norm")(x)
    x = nn.Dropout(cfg.residual_dropout)(x, deterministic=deterministic)
    mask = attention.padding_mask(attention_mask.astype(bool))
    for i in range(cfg.num_layers):
      x = BertLayer(cfg, name=f"layer_{i}")(x, mask, deterministic)
    pooled = jnp.tanh(Dense(cfg.hidden_size, kernel_axes=("embed", "mlp"), lora=cfg.lora, dtype=dtype,
                            param_dtype=pdtype, name="pooler")(x[:, 0], deterministic))
    out = {"hidden": x, "pooled": pooled}
    if cfg.num_labels:
      h = nn.Dropout(cfg.classifier_dropout)(pooled, deterministic=deterministic)
      out["logits"] = Dense(cfg.num_labels, kernel_axes=("embed", None), dtype=dtype, param_dtype=pdtype,
                            name="classifier")(h, deterministic).astype(jnp.float32)
    return out
