"""An audio encoder with a CTC head, for pretraining the encoder on its own.

Used as the first stage of a speech-LLM recipe when no pretrained Whisper is
at hand: the encoder learns to hear with a cheap alignment-free loss, then its
weights (the `encoder` subtree, identical in layout to the speech LLM's) are
exported as a Whisper folder and loaded like any pretrained encoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from speechjax.models.ctc_adapter import CTCAdapter, CTCAdapterConfig
from speechjax.models.encoders import encoder_config_from_dict, make_encoder
from speechjax.models.lora import Dense

BLANK = "_"  # index 0 of every CTC vocabulary


@dataclasses.dataclass(frozen=True)
class CTCConfig:
  """The head predicts `vocab`'s characters, or, with `vocab` empty, the
  `token_vocab_size` ids of the LLM's tokenizer (label = token id + 1), the
  units a 'ctc_compress' projector hands to the LLM. Index 0 is the blank.
  `adapter` (models/ctc_adapter.py) sits between the encoder and the head."""

  encoder: Any  # any registered audio encoder's config (or its dict)
  vocab: str = ""
  token_vocab_size: int = 0
  adapter: CTCAdapterConfig = CTCAdapterConfig()

  def __post_init__(self):
    object.__setattr__(self, "encoder", encoder_config_from_dict(self.encoder))
    if isinstance(self.adapter, dict):
      object.__setattr__(self, "adapter", CTCAdapterConfig(**self.adapter))
    if bool(self.vocab) == bool(self.token_vocab_size):
      raise ValueError("CTCConfig: set exactly one of vocab (characters) and token_vocab_size "
                       f"(tokenizer ids), got {self.vocab!r} and {self.token_vocab_size}")

  @property
  def vocab_size(self) -> int:
    return (len(self.vocab) if self.vocab else self.token_vocab_size) + 1


class CTCEncoder(nn.Module):
  """encoder inputs [B, n_mels, F] or [B, S], mask [B, F|S] -> (logits [B, N, V], mask [B, N]).

  With `from_states`, `features` are the encoder's own outputs [B, N, D] and
  `feature_mask` their mask [B, N] (a frozen encoder's states computed once,
  data/encoder_cache.py): the encoder is skipped, its weights untouched
  (init with audio inputs, so they exist).
  """

  config: CTCConfig

  @nn.compact
  def __call__(self, features, feature_mask=None, deterministic: bool = True, from_states: bool = False):
    enc_cfg = self.config.encoder
    encoder = make_encoder(enc_cfg, name="encoder")
    if from_states:
      hidden = features
      mask = (jnp.ones(hidden.shape[:2], jnp.int32) if feature_mask is None
              else feature_mask.astype(jnp.int32))
    else:
      hidden = encoder(features, feature_mask, deterministic)
      if feature_mask is None:
        mask = jnp.ones(hidden.shape[:2], jnp.int32)
      else:
        mask = enc_cfg.output_mask(feature_mask).astype(jnp.int32)
    if self.config.adapter.enabled:
      hidden, mask = CTCAdapter(self.config.adapter, name="ctc_adapter")(hidden, mask, deterministic)
    logits = Dense(self.config.vocab_size, kernel_axes=("embed", "vocab"), dtype=jnp.dtype(enc_cfg.dtype),
                   name="ctc_head")(hidden)
    return logits.astype(jnp.float32), mask.astype(jnp.int32)


def greedy_labels(logits: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
  """Best path label ids per row: argmax per frame, merge repeats, drop blanks."""
  best = np.asarray(jnp.argmax(logits, -1))
  mask = np.asarray(mask).astype(bool)
  out = []
  for row, valid in zip(best, mask):
    row = row[valid]
    keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
    out.append(row[keep])
  return out


def labels_to_text(ids, cfg: CTCConfig, tokenizer=None) -> str:
  """Label ids (1-based) -> text, whitespace-normalised."""
  ids = [int(i) for i in ids]
  if cfg.vocab:
    text = "".join(cfg.vocab[i - 1] for i in ids)
  else:
    if tokenizer is None:
      raise ValueError("CTC over tokenizer ids: decoding needs the tokenizer")
    text = tokenizer.decode([i - 1 for i in ids], skip_special_tokens=True)
  return " ".join(text.split())


def greedy_decode(logits: np.ndarray, mask: np.ndarray, cfg: CTCConfig, tokenizer=None) -> list[str]:
  """Best-path transcripts."""
  return [labels_to_text(ids, cfg, tokenizer) for ids in greedy_labels(logits, mask)]
