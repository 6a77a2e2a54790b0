"""The speech LLM: audio encoder -> projector -> decoder LLM (+ optional class head).

The encoder is any registered audio encoder (speechjax/models/encoders: Whisper
on log-mel features, wave encoders on samples), the projector any registered
kind, the decoder any registered decoder family; each is picked by its
config's `model_type` / `kind`. The tokenized prompt carries
AUDIO_PLACEHOLDER_ID (-1) at the audio slots, exactly num_audio_tokens(F, cfg)
of them per row for F padded encoder inputs (mel frames or samples).
The model replaces them, in order, with the projected audio frames (row-wise
gather by the running count of placeholders), and ANDs the projector's frame
mask into attention_mask at those slots, so padded audio frames are invisible
and, with positions = cumsum(attention_mask) - 1, do not shift the text after
them. A row padded into a batch therefore computes what it would alone.

Parameters sit in top-level subtrees 'encoder', 'projector', 'decoder' and
(when num_classes > 0) 'classifier', so freezing is a regex on the path. The
top-level LoRA config is pushed into every sub-config, so target patterns
such as r'^encoder/.*q_proj$' or r'^projector/fc1$' reach any Dense.

    model = SpeechLLM(cfg)
    variables = model.init(rngs, *init_inputs(cfg))
    logits = model.apply(variables, features, feature_mask, input_ids, attention_mask)
    logits, positions = model.apply(variables, ..., method="text_logits")  # what the loss uses
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.conventions import AUDIO_PLACEHOLDER_ID
from speechjax.models.decoder import DecoderConfig
from speechjax.models.encoders import encoder_config_from_dict, make_encoder
from speechjax.models.encoders.whisper import WhisperEncoderConfig
from speechjax.models.families import decoder_config_from_dict, make_decoder
from speechjax.models.heads import POOLINGS, ClassificationHead
from speechjax.models.lora import LoRAConfig, as_lora_config
from speechjax.models.projector import PROJECTORS, ProjectorConfig, make_projector, projector_output_length


def _from_dict(cls, value):
  if isinstance(value, Mapping):
    value = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(value).items()}
    return cls(**value)
  return value


@dataclasses.dataclass(frozen=True)
class SpeechLLMConfig:
  """The three parts plus the shared LoRA config and the optional class head.

  Sub-configs may be given as dicts (from ml_collections): their model_type
  picks the registered encoder (default 'whisper') and decoder family
  (default 'llama'). The `lora` of the sub-configs is ignored: the top-level
  one is used.
  """

  encoder: Any = WhisperEncoderConfig()
  projector: ProjectorConfig = ProjectorConfig()
  decoder: Any = DecoderConfig()
  lora: LoRAConfig = LoRAConfig()
  num_classes: int = 0
  classifier_pooling: str = "mean"
  classifier_dropout: float = 0.0

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("lora", as_lora_config(self.lora))
    set_("encoder", encoder_config_from_dict(self.encoder))
    set_("projector", _from_dict(ProjectorConfig, self.projector))
    set_("decoder", decoder_config_from_dict(self.decoder))
    if self.classifier_pooling not in POOLINGS:
      raise ValueError(f"SpeechLLMConfig.classifier_pooling={self.classifier_pooling!r}; "
                       f"expected one of {POOLINGS}")
    out_dim = self.projector.output_dim
    if out_dim and out_dim != self.decoder.hidden_size:
      raise ValueError(f"SpeechLLMConfig: projector.output_dim={out_dim} differs from the "
                       f"decoder's hidden_size={self.decoder.hidden_size} (use 0 to follow it)")

  def encoder_config(self):
    return dataclasses.replace(self.encoder, lora=self.lora)

  def projector_config(self) -> ProjectorConfig:
    return dataclasses.replace(self.projector, lora=self.lora,
                               output_dim=self.decoder.hidden_size)

  def decoder_config(self):
    return dataclasses.replace(self.decoder, lora=self.lora)


def num_audio_tokens(num_inputs: int, cfg: SpeechLLMConfig) -> int:
  """Placeholders a prompt needs for a batch padded to `num_inputs` encoder
  inputs (mel frames or samples, as the encoder's audio_input() says)."""
  return projector_output_length(cfg.encoder.output_length(num_inputs), cfg.projector)


def num_audio_tokens_from_states(num_states: int, cfg: SpeechLLMConfig) -> int:
  """Placeholders for a batch of `num_states` stored encoder states (from_states=True)."""
  return projector_output_length(num_states, cfg.projector)


def init_inputs(cfg: SpeechLLMConfig, batch_size: int = 1, num_frames: int = 8,
                num_text_tokens: int = 2):
  """Small (features, feature_mask, input_ids, attention_mask) for model.init;
  `num_frames` counts encoder inputs (mel frames or samples)."""
  m = num_audio_tokens(num_frames, cfg)
  features = np.zeros(cfg.encoder.audio_input().dummy_shape(batch_size, num_frames), np.float32)
  feature_mask = np.ones((batch_size, num_frames), np.int32)
  ids = np.concatenate([np.full((batch_size, m), AUDIO_PLACEHOLDER_ID, np.int32),
                        np.ones((batch_size, num_text_tokens), np.int32)], axis=1)
  return features, feature_mask, ids, np.ones_like(ids)


def check_placeholders(input_ids, num_audio: int) -> None:
  """Raises if a row of concrete input_ids does not hold exactly `num_audio`
  placeholders (under jit the ids are abstract and cannot be checked)."""
  try:
    ids = np.asarray(input_ids)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
          RuntimeError):  # traced, or sharded over several hosts
    return
  counts = np.sum(ids == AUDIO_PLACEHOLDER_ID, axis=1)
  bad = np.nonzero(counts != num_audio)[0]
  if bad.size:
    raise ValueError(
        f"SpeechLLM: every row of input_ids must hold exactly {num_audio} audio placeholders "
        f"({AUDIO_PLACEHOLDER_ID}) for these features (see num_audio_tokens); rows "
        f"{bad[:5].tolist()} hold {counts[bad[:5]].tolist()}")


def merge_audio_embeddings(token_embeds: jax.Array, audio: jax.Array, audio_mask: jax.Array,
                           input_ids: jax.Array, attention_mask: jax.Array):
  """Places audio [B,M,H] at the placeholder slots of token_embeds [B,T,H].

  The k-th placeholder of a row takes the row's k-th audio frame; the slot's
  attention mask becomes attention_mask AND audio_mask[k].
  """
  is_audio = input_ids == AUDIO_PLACEHOLDER_ID
  slot = jnp.clip(jnp.cumsum(is_audio, axis=1, dtype=jnp.int32) - 1, 0, audio.shape[1] - 1)
  audio_at = jnp.take_along_axis(audio.astype(token_embeds.dtype), slot[..., None], axis=1)
  embeds = jnp.where(is_audio[..., None], audio_at, token_embeds)
  audio_valid = jnp.take_along_axis(audio_mask.astype(attention_mask.dtype), slot, axis=1)
  mask = jnp.where(is_audio, attention_mask * audio_valid, attention_mask)
  return embeds, mask


def text_prediction_positions(input_ids: jax.Array, num_audio: int) -> jax.Array:
  """[B, T - num_audio + 1] positions (in order) whose next token is not an
  audio placeholder: the only ones a loss can supervise, since a target that
  is a placeholder is never a label (data/prompts.py masks it). Each row has
  num_audio placeholders, so T - num_audio or T - num_audio + 1 positions
  qualify (one more when the row starts with audio); a row with one fewer
  is topped up with a position that predicts audio, which carries no label.
  """
  length = input_ids.shape[1]
  keep = min(length, length - num_audio + 1)
  next_is_audio = jnp.pad(input_ids[:, 1:] == AUDIO_PLACEHOLDER_ID, ((0, 0), (0, 1)))
  order = jnp.argsort(next_is_audio.astype(jnp.int32), axis=1, stable=True)
  return order[:, :keep].astype(jnp.int32)


class SpeechLLM(nn.Module):
  """See the module docstring; the methods are listed there."""

  config: SpeechLLMConfig

  def setup(self):
    cfg = self.config
    self.encoder = make_encoder(cfg.encoder_config())
    self.projector = make_projector(cfg.projector_config())
    dec_cfg = cfg.decoder_config()
    self.decoder = make_decoder(dec_cfg)
    if cfg.num_classes > 0:
      self.classifier = ClassificationHead(
          cfg.num_classes, cfg.classifier_pooling, cfg.classifier_dropout, lora=cfg.lora,
          dtype=jnp.dtype(dec_cfg.dtype), param_dtype=jnp.dtype(dec_cfg.param_dtype))

  def encode_audio(self, features: jax.Array, feature_mask: jax.Array | None = None,
                   deterministic: bool = True, from_states: bool = False) -> tuple[jax.Array, jax.Array]:
    """features [B,n_mels,F] or waves [B,S] -> (audio embeddings [B,M,H], mask [B,M]).
    from_states: `features` are the encoder's output states [B,N,D] (a frozen
    encoder's, stored once: data/encoder_cache.py) and `feature_mask` their
    mask [B,N]; the encoder is skipped.
    Several clips per row (dialogue batches): features [B,S,...] with
    feature_mask [B,S,F]; each clip is encoded and projected on its own, and
    row b's embeddings are its S clips' in order: [B,S*M,H], mask [B,S*M]."""
    if feature_mask is not None and feature_mask.ndim == 3:
      rows, segments = feature_mask.shape[:2]
      audio, mask = self.encode_audio(features.reshape((rows * segments,) + features.shape[2:]),
                                      feature_mask.reshape((rows * segments,) + feature_mask.shape[2:]),
                                      deterministic, from_states)
      # A segment with no input (a row's unused clip slot) is masked whatever its
      # projector says: 'ctc_compress' marks all its slots valid (fill tokens).
      used = feature_mask.any(axis=-1)[..., None]
      mask = mask.reshape(rows, segments, mask.shape[1]) * used.astype(mask.dtype)
      return (audio.reshape(rows, segments * audio.shape[1], audio.shape[2]),
              mask.reshape(rows, segments * mask.shape[2]))
    if from_states:
      hidden = features
      mask = (jnp.ones(hidden.shape[:2], jnp.int32) if feature_mask is None
              else feature_mask.astype(jnp.int32))
    else:
      hidden = self.encoder(features, feature_mask, deterministic)
      if feature_mask is None:
        mask = jnp.ones(hidden.shape[:2], jnp.int32)
      else:
        mask = self.config.encoder.output_mask(feature_mask).astype(jnp.int32)
    rows = PROJECTORS.get(self.config.projector.kind).token_table_rows(self.config.projector)
    if rows:  # e.g. 'ctc_compress': soft tokens over the LLM's own embeddings
      return self.projector(hidden, mask, deterministic, token_table=self.decoder.embed(jnp.arange(rows)))
    return self.projector(hidden, mask, deterministic)

  def embed_inputs(self, features, feature_mask, input_ids, attention_mask=None,
                   deterministic: bool = True, from_states: bool = False) -> tuple[jax.Array, jax.Array]:
    """-> (inputs_embeds [B,T,H], attention_mask [B,T]) with audio in place."""
    if input_ids.ndim != 2 or input_ids.shape[0] != features.shape[0]:
      raise ValueError(f"SpeechLLM: input_ids must be [batch, length] with the features' batch "
                       f"{features.shape[0]}, got {input_ids.shape}")
    check_placeholders(input_ids, self._num_audio(features, from_states, feature_mask))
    audio, audio_mask = self.encode_audio(features, feature_mask, deterministic, from_states)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    elif attention_mask.shape != input_ids.shape:
      raise ValueError(f"SpeechLLM: attention_mask {attention_mask.shape} does not match "
                       f"input_ids {input_ids.shape}")
    is_audio = input_ids == AUDIO_PLACEHOLDER_ID
    tokens = self.decoder.embed(jnp.where(is_audio, 0, input_ids))
    embeds, mask = merge_audio_embeddings(tokens, audio, audio_mask, input_ids,
                                          jnp.asarray(attention_mask))
    return nn.with_logical_constraint(embeds, ("batch", "length", "embed")), mask

  def _num_audio(self, features, from_states: bool, feature_mask=None) -> int:
    """Placeholders per row; S clips per row (feature_mask [B,S,F]) take S times a clip's."""
    segments = feature_mask.shape[1] if feature_mask is not None and feature_mask.ndim == 3 else 1
    if from_states:
      return segments * num_audio_tokens_from_states(features.shape[-2], self.config)
    return segments * num_audio_tokens(features.shape[-1], self.config)

  def __call__(self, features, feature_mask, input_ids, attention_mask=None, *,
               deterministic: bool = True, return_hidden: bool = False, from_states: bool = False):
    """-> logits [B,T,V] float32 (and final hidden [B,T,H] with return_hidden)."""
    embeds, mask = self.embed_inputs(features, feature_mask, input_ids, attention_mask,
                                     deterministic, from_states)
    out = self.decoder(inputs_embeds=embeds, attention_mask=mask, deterministic=deterministic,
                       return_hidden=return_hidden or self._init_classifier())
    if self._init_classifier():
      self.classifier(out[1], mask, deterministic)  # creates its params during init
      return out if return_hidden else out[0]
    return out

  def text_logits(self, features, feature_mask, input_ids, attention_mask=None, *,
                  deterministic: bool = True, from_states: bool = False) -> tuple[jax.Array, jax.Array]:
    """Logits only where a label can be: -> (logits [B,K,V] float32, positions [B,K]),
    K = T - num_audio + 1 (see text_prediction_positions).

    Equal to `__call__`'s logits at those positions. The LM head and the
    softmax skip the audio slots, which in speech tasks are most of the
    sequence: with a 150k vocabulary the head is a large share of the step.
    """
    embeds, mask = self.embed_inputs(features, feature_mask, input_ids, attention_mask,
                                     deterministic, from_states)
    hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask, deterministic=deterministic,
                          hidden_only=True)
    positions = text_prediction_positions(input_ids, self._num_audio(features, from_states, feature_mask))
    hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
    return self.decoder.lm_logits(hidden, deterministic).astype(jnp.float32), positions

  def _init_classifier(self) -> bool:
    return self.config.num_classes > 0 and self.is_initializing()

  def decode(self, inputs_embeds=None, input_ids=None, positions=None, attention_mask=None,
             cache=None, deterministic: bool = True):
    """The decoder alone with a KV cache: prefill with inputs_embeds (from
    embed_inputs), then step with input_ids. -> (logits, cache)."""
    return self.decoder(input_ids, inputs_embeds=inputs_embeds, positions=positions,
                        attention_mask=attention_mask, cache=cache, deterministic=deterministic)

  def classify(self, features, feature_mask, input_ids, attention_mask=None,
               deterministic: bool = True) -> jax.Array:
    """-> class logits [B, num_classes] (float32) from pooled decoder states."""
    return self.logits_and_classes(features, feature_mask, input_ids, attention_mask,
                                   deterministic=deterministic)[1]

  def logits_and_classes(self, features, feature_mask, input_ids, attention_mask=None, *,
                         deterministic: bool = True, from_states: bool = False) -> tuple[jax.Array, jax.Array]:
    """Token logits and class logits from one forward pass (for a joint loss).
    Under jit, unused token logits are dead code and cost nothing."""
    if self.config.num_classes <= 0:
      raise ValueError("SpeechLLM.classify needs SpeechLLMConfig.num_classes > 0")
    embeds, mask = self.embed_inputs(features, feature_mask, input_ids, attention_mask,
                                     deterministic, from_states)
    logits, hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask,
                                  deterministic=deterministic, return_hidden=True)
    return logits, self.classifier(hidden, mask, deterministic)

