"""Classification head on decoder hidden states (the "tag2id" set-up).

Pool the LLM's final hidden states over the real (unmasked) positions, then
one linear layer to `num_classes` logits, trained with cross-entropy on the
example's class id. Used by SpeechLLM.classify for intent / emotion / speaker
tagging, where predicting a label id is cheaper and better calibrated than
generating the label as text.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from speechjax.models.lora import Dense, LoRAConfig

POOLINGS = ("mean", "last")


def masked_mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """hidden [B,T,H], mask [B,T] -> mean over masked-in positions [B,H] (float32).
  A row with no real position pools to zeros."""
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
  return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def last_token_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """The hidden state of each row's last real position [B,H] (float32); what a
  causal LM has seen the whole input at."""
  positions = jnp.arange(mask.shape[1])
  last = jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=1)
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


class ClassificationHead(nn.Module):
  """(hidden [B,T,H], mask [B,T]) -> class logits [B, num_classes] in float32."""

  num_classes: int
  pooling: str = "mean"
  dropout: float = 0.0
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
    if self.pooling not in POOLINGS:
      raise ValueError(f"ClassificationHead.pooling={self.pooling!r}; expected one of {POOLINGS}")
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
      raise ValueError(f"ClassificationHead: expected hidden [B,T,H] and mask [B,T], got "
                       f"{hidden.shape} and {mask.shape}")
    pool = masked_mean_pool if self.pooling == "mean" else last_token_pool
    pooled = nn.Dropout(self.dropout)(pool(hidden, mask), deterministic=deterministic)
    logits = Dense(self.num_classes, kernel_axes=("embed", "classes"), lora=self.lora,
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.normal(0.02), name="out_proj")(
                       pooled.astype(self.dtype), deterministic)
    return logits.astype(jnp.float32)


def classification_loss(logits: jax.Array, labels: jax.Array,
                        weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy over labelled examples (labels >= 0; -1 = no label),
  optionally weighted (e.g. by example_mask). Returns (loss, number labelled)."""
  valid = (labels >= 0).astype(jnp.float32)
  if weights is not None:
    valid = valid * weights.astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         jnp.maximum(labels, 0))
  count = jnp.sum(valid)
  return jnp.sum(xent * valid) / jnp.maximum(count, 1.0), count
