"""Train-step mechanics on a toy model: accumulation, NaN guard, LoRA-only
optimizer state, weight-decay masking, schedules, partitioning."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import flax.linen as nn

from speechjax.models.lora import Dense, LoRAConfig
from speechjax.trainer import optim, partition
from speechjax.trainer import step as step_lib
from speechjax.trainer.objectives import Objective, token_cross_entropy


class ToyLM(nn.Module):
  """Embedding -> LoRA'd q_proj -> vocab; enough to exercise the step."""
  vocab: int = 11
  width: int = 8
  lora: LoRAConfig = LoRAConfig(rank=2, targets=(r"q_proj$",))

  @nn.compact
  def __call__(self, ids, deterministic=True):
    x = nn.Embed(self.vocab, self.width, name="embed_tokens")(ids)
    x = x + Dense(self.width, kernel_axes=("embed", "heads"), lora=self.lora, name="q_proj")(x, deterministic)
    x = nn.LayerNorm(name="norm")(x)
    return Dense(self.vocab, kernel_axes=("embed", "vocab"), name="projector")(x)


def toy_objective(model):
  def normalizers(batch):
    return {"tokens": jnp.maximum(jnp.sum(batch["target_mask"]), 1.0)}

  def loss(variables, batch, rngs, deterministic, norms):
    logits = model.apply(variables, batch["input_ids"], deterministic=deterministic, rngs=rngs)
    xent, correct = token_cross_entropy(logits, batch["targets"], batch["target_mask"])
    return xent / norms["tokens"], {"lm_loss_sum": xent, "tokens": jnp.sum(batch["target_mask"]),
                                    "correct_tokens": correct}
  return Objective(normalizers, loss)


def configs(accum=1, adversarial="none"):
  optim_cfg = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-2, schedule="cosine", warmup_steps=2, end_lr_fraction=0.1,
      b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, weight_decay=0.1, clip_norm=1.0))
  train_cfg = ml_collections.ConfigDict(dict(
      grad_accum_steps=accum, mode="lora", top_n_layers=0, extra_trainable=(),
      adversarial=dict(method=adversarial, epsilon=0.1, steps=2, step_size=0.05, weight=0.5)))
  return optim_cfg, train_cfg


def make_batch(seed, b=8, t=6, vocab=11):
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, vocab, (b, t)).astype(np.int32)
  mask = (rs.rand(b, t) > 0.3).astype(np.float32)
  return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "target_mask": mask}


def setup(accum=1):
  model = ToyLM()
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32)))
  optim_cfg, train_cfg = configs(accum)
  trainable, frozen = partition.split_variables(variables, partition.trainable_patterns(train_cfg))
  opt, schedule = optim.make_optimizer(optim_cfg, num_steps=10)
  state = step_lib.init_train_state(trainable, opt, jax.random.PRNGKey(1))
  step = jax.jit(step_lib.make_train_step(toy_objective(model), opt, schedule, train_cfg))
  return state, frozen, step


def test_partition_keeps_frozen_out_of_optimizer():
  state, frozen, _ = setup()
  flat_t = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["trainable"])[0]}
  assert any("lora_a" in p for p in flat_t) and any("projector" in p for p in flat_t)
  assert not any("embed_tokens" in p for p in flat_t)
  # Optimizer state: two moments per trainable leaf, nothing for frozen weights.
  t_leaves = jax.tree_util.tree_leaves(state["trainable"])
  moments = [x for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim > 0]
  assert len(moments) == 2 * len(t_leaves)
  assert sum(x.size for x in moments) == 2 * sum(x.size for x in t_leaves)
  frozen_size = sum(x.size for x in jax.tree_util.tree_leaves(frozen))
  assert frozen_size > 0 and sum(x.size for x in moments) < 2 * (frozen_size + sum(x.size for x in t_leaves))


def test_join_restores_full_variables():
  model = ToyLM()
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32)))
  t, f = partition.split_variables(variables, (r"^projector/",))
  joined = partition.join_variables(t, f)
  assert jax.tree_util.tree_structure(joined) == jax.tree_util.tree_structure(variables)


def test_gradient_accumulation_equals_full_batch():
  batch = make_batch(0, b=8)
  s1, frozen, step1 = setup(accum=1)
  s4, _, step4 = setup(accum=4)
  for _ in range(3):
    s1, m1 = step1(s1, frozen, batch)
    s4, m4 = step4(s4, frozen, batch)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(s1["trainable"]), jax.tree_util.tree_leaves(s4["trainable"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_skips_update_and_is_counted():
  state, frozen, step = setup()
  before = jax.tree_util.tree_map(np.asarray, state["trainable"])
  bad = make_batch(1)
  bad["target_mask"] = bad["target_mask"] * np.nan
  state, metrics = step(state, frozen, bad)
  assert float(metrics["finite"]) == 0.0
  assert int(state["skipped"]) == 1 and int(state["bad_in_a_row"]) == 1
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state["trainable"])):
    np.testing.assert_array_equal(a, b)
  state, metrics = step(state, frozen, make_batch(2))
  assert float(metrics["finite"]) == 1.0 and int(state["bad_in_a_row"]) == 0 and int(state["skipped"]) == 1


def test_loss_falls():
  state, frozen, step = setup()
  batch = make_batch(3)
  losses = []
  for _ in range(10):
    state, m = step(state, frozen, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]


def test_weight_decay_mask_and_schedule():
  params = {"q_proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}, "norm": {"scale": jnp.ones((2,))}}
  mask = optim.decay_mask(params)
  assert mask["q_proj"]["kernel"] and not mask["q_proj"]["bias"] and not mask["norm"]["scale"]
  optim_cfg, _ = configs()
  sched = optim.learning_rate_schedule(optim_cfg, 10)
  assert float(sched(0)) == 0.0 and abs(float(sched(2)) - 1e-2) < 1e-9
  assert abs(float(sched(10)) - 1e-3) < 1e-7
  with pytest.raises(ValueError, match="valid"):
    optim_cfg.schedule = "step"
    optim.learning_rate_schedule(optim_cfg, 10)


def test_top_n_mode_and_bad_mode():
  cfg = ml_collections.ConfigDict(dict(mode="top_n", top_n_layers=2, extra_trainable=()))
  pats = partition.trainable_patterns(cfg, num_decoder_layers=4)
  variables = {"params": {"decoder": {f"layers_{i}": {"w": jnp.ones(1)} for i in range(4)},
                          "encoder": {"w": jnp.ones(1)}}}
  t, _ = partition.split_variables(variables, pats)
  assert sorted(t["params"]["decoder"]) == ["layers_2", "layers_3"]
  cfg.mode = "everything"
  with pytest.raises(ValueError, match="valid"):
    partition.trainable_patterns(cfg, 4)
