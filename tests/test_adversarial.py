"""Adversarial training (train.adversarial, FGSM / PGD in feature space): the
perturbation stays inside the epsilon ball and off padding frames, the step
trains with either method, and on a synthetic task a model trained against
FGSM keeps more of its accuracy under a test-time FGSM attack than one trained
plainly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from speechjax.models.objectives import Objective
from speechjax.trainer import optim
from speechjax.trainer import step as step_lib

CHANNELS, FRAMES, EPSILON = 24, 6, 0.4


def _adv_cfg(method, epsilon=EPSILON, steps=3, step_size=0.2, weight=1.0):
  return ml_collections.ConfigDict(dict(method=method, epsilon=epsilon, steps=steps,
                                        step_size=step_size, weight=weight))


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_perturbation_is_within_epsilon_and_only_on_real_frames(method):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, CHANNELS, FRAMES)), jnp.float32)
  lengths = np.array([FRAMES, 4, 1])
  valid = jnp.asarray((np.arange(FRAMES)[None, :] < lengths[:, None])[:, None, :], jnp.float32)
  weights = jnp.asarray(rng.standard_normal((CHANNELS, FRAMES)), jnp.float32)

  def loss_of_input(features):  # a smooth loss whose gradient is nonzero everywhere
    return jnp.sum(jnp.tanh(features * weights) ** 2 + features * weights)

  x_adv = step_lib.adversarial_input(loss_of_input, x, valid, _adv_cfg(method), jax.random.PRNGKey(3))
  delta = np.asarray(x_adv - x)
  real = np.broadcast_to(np.asarray(valid), delta.shape).astype(bool)
  assert np.all(np.abs(delta) <= EPSILON + 1e-6)
  assert np.all(delta[~real] == 0.0)  # padding frames untouched
  assert np.abs(delta[real]).mean() > 0.5 * EPSILON  # the real frames did move
  assert loss_of_input(x_adv) > loss_of_input(x)  # uphill: it is an attack
  if method == "fgsm":
    np.testing.assert_allclose(np.abs(delta[real]), EPSILON, rtol=1e-5)


class PooledClassifier(nn.Module):
  """Mean over the real frames of [batch, channels, frames] features -> 2 logits."""

  @nn.compact
  def __call__(self, features, mask):
    pooled = jnp.sum(features * mask[:, None, :], -1) / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1)
    return nn.Dense(2, name="head")(pooled)


def _classifier_objective(model):
  def normalizers(batch):
    return {"examples": jnp.asarray(batch["labels"].shape[0], jnp.float32)}

  def loss(variables, batch, rngs, deterministic, norms):
    del rngs, deterministic
    logits = model.apply(variables, batch["features"], batch["feature_mask"])
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).sum()
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["labels"])
    return xent / norms["examples"], {"xent_sum": xent, "correct": correct}

  return Objective(normalizers, loss, input_field="features")


def _gaussian_task(n, seed):
  """Class +-1 shifts channel 0 by 1.5 (robust) and every other channel by 0.3
  (each weak, together very predictive but easy to attack in L-inf)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  sign = (2 * labels - 1)[:, None]
  means = np.concatenate([np.full((1,), 1.5), np.full((CHANNELS - 1,), 0.3)])[None, :] * sign
  features = means[:, :, None] + rng.standard_normal((n, CHANNELS, FRAMES))
  mask = np.ones((n, FRAMES), np.float32)
  mask[: n // 2, FRAMES - 2:] = 0  # half the examples end early: padding frames exist
  return {"features": features.astype(np.float32), "feature_mask": mask, "labels": labels.astype(np.int32)}


def _train(method, steps=150):
  model = PooledClassifier()
  objective = _classifier_objective(model)
  data = _gaussian_task(512, seed=0)
  params = model.init(jax.random.PRNGKey(0), data["features"][:1], data["feature_mask"][:1])["params"]
  optim_cfg = ml_collections.ConfigDict(dict(name="adamw", lr=5e-2, schedule="constant", warmup_steps=0,
                                             end_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9,
                                             weight_decay=0.0, clip_norm=0.0))
  train_cfg = ml_collections.ConfigDict(dict(grad_accum_steps=1, adversarial=_adv_cfg(method)))
  opt, schedule = optim.make_optimizer(optim_cfg, num_steps=steps)
  state = step_lib.init_train_state({"params": params}, opt, jax.random.PRNGKey(1))
  train_step = jax.jit(step_lib.make_train_step(objective, opt, schedule, train_cfg))
  metrics = None
  for _ in range(steps):
    state, metrics = train_step(state, {}, data)
  return model, objective, state["trainable"], jax.device_get(metrics)


def _accuracy(model, objective, trainable, data, attack: bool):
  features = jnp.asarray(data["features"])
  if attack:
    valid = jnp.asarray(data["feature_mask"])[:, None, :]
    norms = objective.normalizers(data)

    def loss_of_input(x):
      return objective.loss(trainable, {**data, "features": x}, {}, True, norms)[0]

    features = step_lib.adversarial_input(loss_of_input, features, valid, _adv_cfg("fgsm"),
                                          jax.random.PRNGKey(0))
  logits = model.apply(trainable, features, data["feature_mask"])
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == data["labels"]))


def test_train_step_runs_with_fgsm_and_pgd_and_reports_the_adversarial_loss():
  for method in ("fgsm", "pgd"):
    _, _, _, metrics = _train(method, steps=3)
    assert np.isfinite(metrics["loss"]) and metrics["finite"] == 1.0
    # loss = clean + weight * adversarial, and the attack raises the loss.
    assert metrics["adv_loss"] > metrics["loss"] - metrics["adv_loss"]


def test_adversarial_training_loses_less_accuracy_under_attack():
  test = _gaussian_task(1024, seed=1)
  results = {}
  for method in ("none", "fgsm"):
    model, objective, trainable, _ = _train(method)
    results[method] = (_accuracy(model, objective, trainable, test, attack=False),
                       _accuracy(model, objective, trainable, test, attack=True))
  (plain_clean, plain_attacked), (adv_clean, adv_attacked) = results["none"], results["fgsm"]
  print(f"plain: clean {plain_clean:.3f} attacked {plain_attacked:.3f}; "
        f"fgsm-trained: clean {adv_clean:.3f} attacked {adv_attacked:.3f}")
  assert plain_clean > 0.9 and adv_clean > 0.8
  assert plain_clean - plain_attacked > (adv_clean - adv_attacked) + 0.15
  assert adv_attacked > plain_attacked + 0.15


@pytest.mark.parametrize("shape", [(4, 3, 8), (4, 8), (4, 2, 3, 8)], ids=["log_mel", "samples", "dialogue"])
def test_the_attack_follows_every_input_layout(shape):
  """Log-mel [B, C, F], raw samples [B, T] and a dialogue's segments
  [B, S, C, F], each with its mask over the last axis: the step trains, the
  adversarial input keeps the features' shape and padding is never perturbed."""
  rng = np.random.default_rng(0)
  features = rng.standard_normal(shape).astype(np.float32)
  mask = np.ones(shape[:-2] + shape[-1:] if len(shape) != 2 else shape, np.float32)
  mask[..., 5:] = 0.0
  batch = {"features": features, "feature_mask": mask, "targets": rng.standard_normal(shape[0]).astype(np.float32)}
  valid = step_lib.feature_validity(jnp.asarray(mask), jnp.asarray(features))
  assert jnp.broadcast_shapes(valid.shape, features.shape) == features.shape

  def loss(variables, b, rngs, deterministic, norms):
    del rngs, deterministic, norms
    pred = jnp.sum(jnp.tanh(b["features"] * variables["params"]["w"]).reshape(shape[0], -1), axis=1)
    err = jnp.mean((pred - b["targets"]) ** 2)
    return err, {"xent_sum": err}

  objective = Objective(lambda b: {}, loss, input_field="features")
  x_adv = step_lib.adversarial_input(
      lambda x: loss({"params": {"w": jnp.ones(shape[1:])}}, {**batch, "features": x}, {}, True, {})[0],
      jnp.asarray(features), valid, _adv_cfg("fgsm"), jax.random.PRNGKey(0))
  delta = np.asarray(x_adv) - features
  assert delta.shape == features.shape
  assert np.all(delta[..., 5:] == 0) and np.abs(delta[..., :5]).max() == pytest.approx(EPSILON)
  optim_cfg = ml_collections.ConfigDict(dict(name="adamw", lr=1e-2, schedule="constant", warmup_steps=0,
                                             end_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9,
                                             weight_decay=0.0, clip_norm=0.0))
  opt, schedule = optim.make_optimizer(optim_cfg, num_steps=2)
  state = step_lib.init_train_state({"params": {"w": jnp.ones(shape[1:])}}, opt, jax.random.PRNGKey(1))
  train_cfg = ml_collections.ConfigDict(dict(grad_accum_steps=1, adversarial=_adv_cfg("pgd")))
  state, metrics = jax.jit(step_lib.make_train_step(objective, opt, schedule, train_cfg))(state, {}, batch)
  assert np.isfinite(float(metrics["adv_loss"])) and float(metrics["finite"]) == 1.0
