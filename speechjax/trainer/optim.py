"""Optimizers and learning-rate schedules from the config (optax).

The optimizer only ever sees the trainable pytree (LoRA, projector, ...), so its
state is sized by the trainables, never by the frozen base model.
"""

from __future__ import annotations

from collections.abc import Callable
import re
from typing import Any

import jax
import optax

from speechjax.trainer.adamw import fused_adamw
from speechjax.tree import path_names

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
  if not lr >= 0:
    raise ValueError(f"optim.lr={optim_cfg.lr!r}; valid: a learning rate >= 0")
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps={warmup}; valid: a number of steps >= 0")
  if not 0.0 <= float(optim_cfg.end_lr_fraction) <= 1.0:
    raise ValueError(f"optim.end_lr_fraction={optim_cfg.end_lr_fraction!r}; valid: 0 to 1 "
                     "(the final learning rate as a fraction of optim.lr)")
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
    keys = path_names(path)
    return leaf.ndim >= 2 and not NO_DECAY_PATTERN.search(keys[-1] if keys else "")

  return jax.tree_util.tree_map_with_path(keep, params)


# Top-level keys of the trainable pytree (trainer.partition.split_variables).
COLLECTIONS = ("params", "lora")


def lr_multipliers(rules) -> Callable[[Any], Any] | None:
  """`optim.lr_multipliers` (("regex", factor), ...) -> a function giving each
  parameter's factor (first matching regex, else 1); None when there are no
  rules. A malformed rule is refused with its index. Paths are matched as
  `train.mode`'s patterns are, inside the variable collection: `encoder/...`,
  `decoder/layers_0/self_attn/q_proj/lora_a` (no leading `params/`, `lora/`)."""
  compiled = []
  for i, rule in enumerate(rules or ()):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], (int, float)) and rule[1] >= 0):
      raise ValueError(f"optim.lr_multipliers[{i}]={rule!r}: expected (regex, factor >= 0)")
    try:
      compiled.append((re.compile(rule[0]), float(rule[1])))
    except re.error as e:
      raise ValueError(f"optim.lr_multipliers[{i}]={rule!r}: {rule[0]!r} is not a valid regex ({e})") from None
  if not compiled:
    return None

  def factors(params):
    def factor(path, _):
      keys = path_names(path)
      if keys and keys[0] in COLLECTIONS:
        keys = keys[1:]
      name = "/".join(keys)
      return next((f for pattern, f in compiled if pattern.search(name)), 1.0)
    return jax.tree_util.tree_map_with_path(factor, params)

  return factors


def _scale_updates(factors) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    scales = factors(updates)
    return jax.tree_util.tree_map(lambda u, k: u * k if k != 1.0 else u, updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(optim_cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim_cfg, num_steps)
  name = optim_cfg.name
  if name not in VALID_OPTIMIZERS:
    raise ValueError(f"optim.name={name!r}; valid: {VALID_OPTIMIZERS}")
  clip_norm = optim_cfg.clip_norm if optim_cfg.clip_norm and optim_cfg.clip_norm > 0 else None
  factors = lr_multipliers(optim_cfg.get("lr_multipliers", ()))
  if name == "adamw":
    # Clipping, AdamW and the NaN/Inf guard in one fused elementwise pass (the
    # train step skips its own select for it); equals clip_by_global_norm + adamw.
    opt = fused_adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay, mask=decay_mask, clip_norm=clip_norm,
                      lr_scale=factors)
    return opt, schedule
  if name == "adafactor":
    opt = optax.adafactor(schedule, weight_decay_rate=optim_cfg.weight_decay or None,
                          weight_decay_mask=decay_mask)
  else:
    opt = optax.chain(
        optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=optim_cfg.momentum or None))
  if factors is not None:
    opt = optax.chain(opt, _scale_updates(factors))
  if clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
  return opt, schedule
