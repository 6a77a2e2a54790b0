"""The jit-compiled train and eval steps.

State is a plain dict (big_vision style):

    state = {'step': int32, 'trainable': {...}, 'opt_state': ..., 'rng': key,
             'skipped': int32, 'bad_in_a_row': int32}

and the frozen base weights travel beside it, never through the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from speechjax.models.objectives import Objective
from speechjax.trainer.adamw import global_norm, guards_itself
from speechjax.trainer.partition import join_variables


def _split_micro(batch: dict, k: int) -> dict:
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} does not split into {k} micro-batches")
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])
  return jax.tree_util.tree_map(split, batch)


def feature_validity(feature_mask, x):
  """The feature mask, 1 on real frames, broadcastable against the input
  features: [B, F] for log-mel [B, C, F] -> [B, 1, F]; a dialogue's [B, S, F]
  for [B, S, C, F] -> [B, S, 1, F]; raw samples [B, T] take it as it is."""
  mask = feature_mask.astype(x.dtype)
  return mask[..., None, :] if x.ndim == mask.ndim + 1 else mask


def adversarial_input(loss_of_input: Callable, x, valid, cfg, rng):
  """FGSM (one signed-gradient step of size epsilon) or PGD (k steps of
  `step_size`, random start, projected back into the epsilon L-inf ball) on
  the input features. Padding frames are never perturbed."""
  eps = cfg.epsilon
  grad_fn = jax.grad(loss_of_input)
  if cfg.method == "fgsm":
    delta = eps * jnp.sign(grad_fn(x))
  elif cfg.method == "pgd":
    delta = jax.random.uniform(rng, x.shape, x.dtype, -eps, eps) * valid

    def body(_, d):
      d = d + cfg.step_size * jnp.sign(grad_fn(x + d))
      return jnp.clip(d, -eps, eps) * valid

    delta = jax.lax.fori_loop(0, cfg.steps, body, delta)
  else:
    raise ValueError(f"train.adversarial.method={cfg.method!r}; valid: none, fgsm, pgd")
  return jax.lax.stop_gradient(x + delta * valid)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation,
                    schedule: Callable, train_cfg, update_mask: Callable | None = None) -> Callable:
  """update_mask (partition.update_mask): zeroes the gradient and the update of
  parameter rows that must not train (scanned layers outside top-N)."""
  accum = int(train_cfg.grad_accum_steps)
  adv = train_cfg.adversarial
  use_adv = adv.method != "none"
  if use_adv and objective.input_field is None:
    raise ValueError("train.adversarial needs a model kind with input features")

  def micro_loss(trainable, frozen, micro, norms, rng):
    rngs = {"dropout": rng}

    def loss_with(t, m):
      return objective.loss(join_variables(t, frozen), m, rngs, False, norms)

    loss, stats = loss_with(trainable, micro)
    if use_adv:
      field = objective.input_field
      valid = feature_validity(micro["feature_mask"], micro[field])

      def loss_of_input(x):
        return loss_with(jax.lax.stop_gradient(trainable), {**micro, field: x})[0]

      x_adv = adversarial_input(loss_of_input, micro[field], valid, adv, jax.random.fold_in(rng, 1))
      adv_loss, _ = loss_with(trainable, {**micro, field: x_adv})
      stats = {**stats, "adv_loss": adv_loss}
      loss = loss + adv.weight * adv_loss
    return loss, stats

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  self_guarded = guards_itself(optimizer)

  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    norms = objective.normalizers(batch)
    trainable = state["trainable"]
    if accum == 1:
      (loss, stats), grads = grad_fn(trainable, frozen, batch, norms, rng)
    else:
      micros = _split_micro(batch, accum)

      def body(carry, xs):
        i, micro = xs
        (l, s), g = grad_fn(trainable, frozen, micro, norms, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, (l, s, g)), None

      zero_stats = jax.eval_shape(lambda: grad_fn(trainable, frozen, jax.tree_util.tree_map(
          lambda x: x[0], micros), norms, rng)[0][1])
      init = (jnp.zeros((), jnp.float32),
              jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zero_stats),
              jax.tree_util.tree_map(jnp.zeros_like, trainable))
      (loss, stats, grads), _ = jax.lax.scan(body, init, (jnp.arange(accum), micros))

    if update_mask is not None:
      grads = update_mask(grads)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite loss or gradient leaves weights and optimizer state as they were.
    if self_guarded:
      # The optimizer selects inside its fused elementwise update (zero update,
      # old moments), so there is no separate copy of every buffer here.
      updates, new_opt_state = optimizer.update(grads, state["opt_state"], trainable,
                                                finite=finite, grad_norm=grad_norm)
      if update_mask is not None:  # weight decay must not move masked rows either
        updates = update_mask(updates)
      new_trainable = optax.apply_updates(trainable, updates)
    else:
      updates, new_opt_state = optimizer.update(grads, state["opt_state"], trainable)
      if update_mask is not None:
        updates = update_mask(updates)
      keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
      new_trainable = keep(optax.apply_updates(trainable, updates), trainable)
      new_opt_state = keep(new_opt_state, state["opt_state"])
    new_state = {
        "step": state["step"] + 1,
        "trainable": new_trainable,
        "opt_state": new_opt_state,
        "rng": state["rng"],
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        "bad_in_a_row": jnp.where(finite, 0, state["bad_in_a_row"] + 1),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "finite": finite.astype(jnp.float32), **stats}
    return new_state, metrics

  return train_step


def make_eval_step(objective: Objective) -> Callable:
  """Summed loss statistics on one batch (no dropout); the loop averages."""

  def eval_step(trainable, frozen, batch):
    norms = {k: jnp.ones((), jnp.float32) for k in objective.normalizers(batch)}
    _, stats = objective.loss(join_variables(trainable, frozen), batch, {}, True, norms)
    return stats

  return eval_step


def compiler_options(devices) -> dict[str, str]:
  """XLA options for compiling the train step on `devices` (those of the mesh
  it runs on).

  On one CPU device: the memory-optimised schedule. By default XLA:CPU orders
  a program for concurrency whenever that costs under twice the memory of the
  memory-optimised order; on the full fine-tuning step of the bench model
  (bench.memory_probe --mode=full) that order holds 100 MiB more temporaries
  (436 vs 335 MiB) and is not faster: the same losses, step time ratio 0.96
  to 0.99 in favour of the memory-optimised order (A/B interleaved on a
  2-core CPU). A program with collectives (several devices) keeps XLA's
  choice, the concurrency-ordered schedule.
  """
  devices = list(devices)
  if len(devices) == 1 and devices[0].platform == "cpu":
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  return {}


def init_train_state(trainable, optimizer, rng) -> dict[str, Any]:
  return {
      "step": jnp.zeros((), jnp.int32),
      "trainable": trainable,
      "opt_state": optimizer.init(trainable),
      "rng": rng,
      "skipped": jnp.zeros((), jnp.int32),
      "bad_in_a_row": jnp.zeros((), jnp.int32),
  }
