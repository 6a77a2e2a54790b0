"""Training objectives: what loss a model kind is trained with (kept with the
models, so a model bundle carries its own loss and the trainer only runs it).

Every objective returns the loss already divided by normalisers computed on the
*whole* global batch (token count, labelled-example count). Summing the losses
of micro-batches therefore gives exactly the loss of the full batch, which is
what makes gradient accumulation equal to one large batch.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(logits, targets, mask):
  """Summed cross-entropy over masked positions, and the number of correct
  argmax predictions there (a cheap token accuracy)."""
  logits = logits.astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.sum(xent * mask), jnp.sum(correct * mask)


@dataclasses.dataclass(frozen=True)
class Objective:
  """`loss(variables, batch, rngs, deterministic, norms) -> (loss, stats)`.

  `stats` are sums (tokens seen, correct tokens, ...) that the step adds over
  micro-batches and the loop turns into rates.
  """

  normalizers: Callable[[dict], dict]
  loss: Callable[..., tuple[jax.Array, dict]]
  # Name of the batch field adversarial training perturbs (None: not supported).
  input_field: str | None = None


def audio_inputs(batch) -> tuple[jax.Array, jax.Array, bool]:
  """(audio, mask, from_states): a frozen encoder's stored states when the
  batch carries them (data/encoder_cache.py), else the encoder's input features."""
  if "encoder_states" in batch:
    return batch["encoder_states"], batch["encoder_state_mask"], True
  return batch["features"], batch["feature_mask"], False


def _lm_normalizers(batch):
  return {"tokens": jnp.maximum(jnp.sum(batch["target_mask"]), 1.0)}


def causal_lm_objective(model) -> Objective:
  """Plain next-token prediction for text-only LM pretraining."""

  def loss(variables, batch, rngs, deterministic, norms):
    logits = model.apply(variables, batch["input_ids"], attention_mask=batch["attention_mask"],
                         deterministic=deterministic, rngs=rngs)
    xent, correct = token_cross_entropy(logits, batch["targets"], batch["target_mask"])
    return xent / norms["tokens"], {"lm_loss_sum": xent, "tokens": jnp.sum(batch["target_mask"]),
                                    "correct_tokens": correct}

  return Objective(_lm_normalizers, loss)


def text_classifier_objective(model) -> Objective:
  """Cross-entropy of a text classifier's logits (models/bert.py) on
  `class_labels` (-1: no label, left out)."""

  def normalizers(batch):
    return {"examples": jnp.maximum(jnp.sum((batch["class_labels"] >= 0) * batch["example_mask"]), 1.0)}

  def loss(variables, batch, rngs, deterministic, norms):
    logits = model.apply(variables, batch["input_ids"], batch["attention_mask"], deterministic=deterministic,
                         rngs=rngs)["logits"].astype(jnp.float32)
    labels = batch["class_labels"]
    valid = ((labels >= 0) * batch["example_mask"]).astype(jnp.float32)
    xent = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0)) * valid)
    return xent / norms["examples"], {
        "cls_loss_sum": xent, "labelled": jnp.sum(valid),
        "correct_labels": jnp.sum((jnp.argmax(logits, -1) == labels) * valid)}

  return Objective(normalizers, loss)


def speech_llm_objective(model, lm_weight: float = 1.0, cls_weight: float = 0.0) -> Objective:
  """Cross-entropy on the answer tokens (transcript, translation, label as
  text), plus optionally a classification-head loss on `class_labels`."""
  use_head = cls_weight > 0

  def normalizers(batch):
    norms = _lm_normalizers(batch)
    if use_head:
      norms["examples"] = jnp.maximum(jnp.sum((batch["class_labels"] >= 0) * batch["example_mask"]), 1.0)
    return norms

  def loss(variables, batch, rngs, deterministic, norms):
    audio, audio_mask, from_states = audio_inputs(batch)
    args = (audio, audio_mask, batch["input_ids"], batch["attention_mask"])
    total = jnp.zeros((), jnp.float32)
    stats = {}
    targets, target_mask = batch["targets"], batch["target_mask"]
    if use_head:  # one forward pass gives both outputs
      logits, class_logits = model.apply(variables, *args, deterministic=deterministic, rngs=rngs,
                                         from_states=from_states, method="logits_and_classes")
    else:  # the LM head only where a label can be (not the audio slots)
      logits, positions = model.apply(variables, *args, deterministic=deterministic, rngs=rngs,
                                      from_states=from_states, method="text_logits")
      targets = jnp.take_along_axis(targets, positions, axis=1)
      target_mask = jnp.take_along_axis(target_mask, positions, axis=1)
    if lm_weight > 0:
      xent, correct = token_cross_entropy(logits, targets, target_mask)
      total += lm_weight * xent / norms["tokens"]
      stats.update(lm_loss_sum=xent, tokens=jnp.sum(target_mask), correct_tokens=correct)
    if use_head:
      class_logits = class_logits.astype(jnp.float32)
      labels = batch["class_labels"]
      valid = ((labels >= 0) * batch["example_mask"]).astype(jnp.float32)
      xent = optax.softmax_cross_entropy_with_integer_labels(class_logits, jnp.maximum(labels, 0))
      total += cls_weight * jnp.sum(xent * valid) / norms["examples"]
      stats.update(cls_loss_sum=jnp.sum(xent * valid), labelled=jnp.sum(valid),
                   correct_labels=jnp.sum((jnp.argmax(class_logits, -1) == labels) * valid))
    return total, stats

  return Objective(normalizers, loss, input_field="features")


def ctc_objective(model, blank_id: int = 0) -> Objective:
  """CTC on encoder outputs (audio-encoder pretraining). The batch carries
  `ctc_labels` [B, L] and `ctc_label_mask` [B, L]."""

  def normalizers(batch):
    return {"examples": jnp.maximum(jnp.sum(batch["example_mask"]), 1.0),
            "tokens": jnp.maximum(jnp.sum(batch["ctc_label_mask"]), 1.0)}

  def loss(variables, batch, rngs, deterministic, norms):
    audio, audio_mask, from_states = audio_inputs(batch)
    logits, frame_mask = model.apply(variables, audio, audio_mask, deterministic=deterministic, rngs=rngs,
                                     from_states=from_states)
    per_example = optax.ctc_loss(logits.astype(jnp.float32), 1.0 - frame_mask.astype(jnp.float32),
                                 batch["ctc_labels"], 1.0 - batch["ctc_label_mask"].astype(jnp.float32),
                                 blank_id=blank_id)
    per_example = per_example * batch["example_mask"]
    # Normalise by label tokens (as wav2vec2 does with ctc_loss_reduction='mean'
    # summed over the batch) so long and short batches weigh alike.
    total = jnp.sum(per_example)
    return total / norms["tokens"], {"ctc_loss_sum": total, "tokens": jnp.sum(batch["ctc_label_mask"])}

  return Objective(normalizers, loss, input_field="features")
