"""Train-step mechanics on a toy model: accumulation, NaN guard, LoRA-only
optimizer state, weight-decay masking, schedules, partitioning, and the fused
(self-guarded) AdamW against optax's clip + adamw."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from speechjax.models.lora import Dense, LoRAConfig
from speechjax.models.objectives import Objective, token_cross_entropy
from speechjax.trainer import adamw as adamw_lib
from speechjax.trainer import optim, partition
from speechjax.trainer import step as step_lib


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


# ------------------------------------------------- fused AdamW + NaN guard ---

def _opt_params(seed=0):
  rs = np.random.RandomState(seed)
  f = lambda *s: jnp.asarray(rs.randn(*s).astype(np.float32))
  return {"q_proj": {"kernel": f(4, 3), "bias": f(3), "lora_b": f(2, 3)},
          "norm": {"scale": f(3)}, "projector": {"kernel": f(3, 5)}}


def _random_grads(params, rs, scale):
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(scale * rs.randn(*p.shape).astype(np.float32)), params)


def _reference_optimizer(schedule, clip_norm, wd=0.1):
  ref = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd, mask=optim.decay_mask)
  return optax.chain(optax.clip_by_global_norm(clip_norm), ref) if clip_norm else ref


@pytest.mark.parametrize("clip_norm,grad_scale", [(0.5, 1.0), (1e3, 1.0), (None, 3.0)])
def test_fused_adamw_equals_optax_clip_adamw(clip_norm, grad_scale):
  optim_cfg, _ = configs()
  schedule = optim.learning_rate_schedule(optim_cfg, 10)
  fused = adamw_lib.fused_adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                                mask=optim.decay_mask, clip_norm=clip_norm)
  ref = _reference_optimizer(schedule, clip_norm)
  p_f = p_r = _opt_params()
  s_f, s_r = fused.init(p_f), ref.init(p_r)
  # mu / nu mirror the params (same tree structure, so the same shardings).
  assert jax.tree_util.tree_structure(s_f.mu) == jax.tree_util.tree_structure(p_f)
  assert jax.tree_util.tree_structure(s_f.nu) == jax.tree_util.tree_structure(p_f)
  upd_f, upd_r = jax.jit(fused.update), jax.jit(ref.update)
  rs = np.random.RandomState(1)
  clipped = []
  for _ in range(6):
    g = _random_grads(p_f, rs, grad_scale)
    clipped.append(clip_norm is not None and float(optax.tree.norm(g)) > clip_norm)
    u_f, s_f = upd_f(g, s_f, p_f)
    u_r, s_r = upd_r(g, s_r, p_r)
    p_f, p_r = optax.apply_updates(p_f, u_f), optax.apply_updates(p_r, u_r)
    for a, b in zip(jax.tree_util.tree_leaves(p_f), jax.tree_util.tree_leaves(p_r)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  if clip_norm == 0.5:
    assert all(clipped)
  elif clip_norm is not None:
    assert not any(clipped)
  adam_r = next(s for s in jax.tree_util.tree_leaves(
      s_r, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))
  assert int(s_f.count) == int(adam_r.count) == 6
  for ours, theirs in ((s_f.mu, adam_r.mu), (s_f.nu, adam_r.nu)):
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
      # Relative to the buffer's scale: a moment summed to ~0 keeps only absolute accuracy.
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "finite_false"])
def test_fused_adamw_non_finite_step_changes_nothing(bad):
  optim_cfg, _ = configs()
  fused = adamw_lib.fused_adamw(optim.learning_rate_schedule(optim_cfg, 10), weight_decay=0.1,
                                mask=optim.decay_mask, clip_norm=1.0)
  assert adamw_lib.guards_itself(fused)
  params = _opt_params()
  state = fused.init(params)
  rs = np.random.RandomState(2)
  update = jax.jit(fused.update)
  for _ in range(3):
    u, state = update(_random_grads(params, rs, 1.0), state, params)
    params = optax.apply_updates(params, u)
  grads = _random_grads(params, rs, 1.0)
  kwargs = {}
  if bad == "finite_false":  # e.g. a NaN loss whose gradients happen to be finite
    kwargs["finite"] = jnp.asarray(False)
  else:
    grads["q_proj"]["bias"] = grads["q_proj"]["bias"].at[1].set(
        np.nan if bad == "nan_grad" else np.inf)
  u, new_state = jax.jit(lambda g, s, p: fused.update(g, s, p, **kwargs))(grads, state, params)
  new_params = optax.apply_updates(params, u)
  for a, b in zip(jax.tree_util.tree_leaves((params, state)),
                  jax.tree_util.tree_leaves((new_params, new_state))):
    np.testing.assert_array_equal(a, b)
  assert int(new_state.count) == 3


def _legacy_step(model, optim_cfg, train_cfg):
  """The pre-fusion step: optax clip + adamw, guarded by the step's own select."""
  schedule = optim.learning_rate_schedule(optim_cfg, 10)
  opt = _reference_optimizer(schedule, optim_cfg.clip_norm, optim_cfg.weight_decay)
  assert not adamw_lib.guards_itself(opt)
  return opt, jax.jit(step_lib.make_train_step(toy_objective(model), opt, schedule, train_cfg))


def test_fused_train_step_matches_guarded_optax_step():
  state, frozen, step = setup()
  optim_cfg, train_cfg = configs()
  opt, legacy = _legacy_step(ToyLM(), optim_cfg, train_cfg)
  ref_state = step_lib.init_train_state(state["trainable"], opt, jax.random.PRNGKey(1))
  bad = make_batch(9)
  bad["target_mask"] = bad["target_mask"] * np.nan
  for i, batch in enumerate([make_batch(4), make_batch(5), bad, make_batch(6), make_batch(7)]):
    opt_before = jax.tree_util.tree_map(np.asarray, state["opt_state"])
    state, m = step(state, frozen, batch)
    ref_state, m_ref = legacy(ref_state, frozen, batch)
    assert float(m["finite"]) == float(m_ref["finite"]) == (0.0 if i == 2 else 1.0)
    if i == 2:  # the NaN loss left the optimizer state (moments and count) as it was
      for a, b in zip(jax.tree_util.tree_leaves(opt_before), jax.tree_util.tree_leaves(state["opt_state"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(state["trainable"]),
                    jax.tree_util.tree_leaves(ref_state["trainable"])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(state["skipped"]) == int(ref_state["skipped"]) == 1
  assert int(state["opt_state"].count) == 4


def test_unguarded_optimizer_keeps_the_step_select():
  model = ToyLM()
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32)))
  optim_cfg, train_cfg = configs()
  optim_cfg.name = "sgd"
  trainable, frozen = partition.split_variables(variables, partition.trainable_patterns(train_cfg))
  opt, schedule = optim.make_optimizer(optim_cfg, num_steps=10)
  assert not adamw_lib.guards_itself(opt)
  state = step_lib.init_train_state(trainable, opt, jax.random.PRNGKey(1))
  step = jax.jit(step_lib.make_train_step(toy_objective(model), opt, schedule, train_cfg))
  state, _ = step(state, frozen, make_batch(1))
  state, _ = step(state, frozen, make_batch(2))
  before = jax.tree_util.tree_map(np.asarray, state)
  bad = make_batch(3)
  bad["target_mask"] = bad["target_mask"] * np.nan
  state, metrics = step(state, frozen, bad)
  assert float(metrics["finite"]) == 0.0 and int(state["skipped"]) == 1
  for a, b in zip(jax.tree_util.tree_leaves((before["trainable"], before["opt_state"])),
                  jax.tree_util.tree_leaves((state["trainable"], state["opt_state"]))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_lr_multipliers_scale_each_parameter_update(name):
  # The trainable pytree's layout: collections first, as partition.split_variables makes it.
  params = {"params": {"encoder": {"w": jnp.ones((3, 2))}, "projector": {"w": jnp.ones((3, 2))}},
            "lora": {"decoder": {"w": jnp.ones((3, 2))}}}
  grads = jax.tree_util.tree_map(lambda x: 0.3 * x, params)

  def first_update(rules):
    cfg = ml_collections.ConfigDict(dict(
        name=name, lr=0.1, schedule="constant", warmup_steps=0, end_lr_fraction=1.0, b1=0.9,
        b2=0.999, eps=1e-8, momentum=0.0, weight_decay=0.0, clip_norm=0.0, lr_multipliers=rules))
    opt, _ = optim.make_optimizer(cfg, num_steps=10)
    updates, _ = opt.update(grads, opt.init(params), params)
    return updates

  plain = first_update(())
  scaled = first_update(((r"^encoder/", 0.1), (r"^decoder/", 0.0), (r"^encoder/", 5.0)))
  enc, proj, dec = (("params", "encoder"), ("params", "projector"), ("lora", "decoder"))
  get = lambda tree, keys: tree[keys[0]][keys[1]]["w"]
  np.testing.assert_allclose(get(scaled, enc), 0.1 * get(plain, enc), rtol=1e-6)
  np.testing.assert_array_equal(get(scaled, dec), 0.0)  # factor 0 freezes
  np.testing.assert_array_equal(get(scaled, proj), get(plain, proj))
  assert float(jnp.abs(get(plain, enc)).min()) > 0


def test_lr_multipliers_refuse_a_malformed_rule():
  with pytest.raises(ValueError, match=r"optim.lr_multipliers\[1\]"):
    optim.lr_multipliers(((r"^encoder/", 0.1), (r"^decoder/",)))


def test_compiler_options_ask_for_the_memory_optimised_schedule_on_one_cpu_device():
  cpus = jax.devices("cpu")
  assert step_lib.compiler_options(cpus[:1]) == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  # With collectives (several devices) XLA keeps its own choice.
  assert step_lib.compiler_options(cpus[:2]) == {}
