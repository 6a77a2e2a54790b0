"""Optimizers and learning-rate schedules from the config (optax).

The optimizer only ever sees the trainable pytree (LoRA, projector, ...), so its
state is sized by the trainables, never by the frozen base model.
"""

from __future__ import annotations

import re

import jax
import optax

from speechjax.trainer.adamw import fused_adamw

VALID_OPTIMIZERS = ("adamw", "adafactor", "sgd")
VALID_SCHEDULES = ("cosine", "linear", "constant")

# Norm scales and biases are not decayed (standard practice since BERT).
NO_DECAY_PATTERN = re.compile(r"(bias|scale|norm|layernorm|embed_positions|lora_b)", re.I)


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine / linear decay to
  `lr * end_lr_fraction` at `num_steps`, or constant."""
  lr = float(optim_cfg.lr)
  warmup = int(optim_cfg.warmup_steps)
  end = lr * float(optim_cfg.end_lr_fraction)
  decay_steps = max(num_steps - warmup, 1)
  kind = optim_cfg.schedule
  if kind not in VALID_SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r}; valid: {VALID_SCHEDULES}")
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
  """True for leaves that get weight decay (matrices), False for norms/biases."""

  def keep(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return leaf.ndim >= 2 and not NO_DECAY_PATTERN.search(name.rsplit("/", 1)[-1])

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim_cfg, num_steps)
  name = optim_cfg.name
  if name not in VALID_OPTIMIZERS:
    raise ValueError(f"optim.name={name!r}; valid: {VALID_OPTIMIZERS}")
  clip_norm = optim_cfg.clip_norm if optim_cfg.clip_norm and optim_cfg.clip_norm > 0 else None
  if name == "adamw":
    # Clipping, AdamW and the NaN/Inf guard in one fused elementwise pass (the
    # train step skips its own select for it); equals clip_by_global_norm + adamw.
    opt = fused_adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay, mask=decay_mask, clip_norm=clip_norm)
    return opt, schedule
  if name == "adafactor":
    opt = optax.adafactor(schedule, weight_decay_rate=optim_cfg.weight_decay or None,
                          weight_decay_mask=decay_mask)
  else:
    opt = optax.chain(
        optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=optim_cfg.momentum or None))
  if clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
  return opt, schedule
