"""AdamW with global-norm clipping and the NaN/Inf guard in one elementwise pass.

Same maths as optax.chain(optax.clip_by_global_norm(c), optax.adamw(...)):

    g     = g * min(1, c / ||g||)                       (if clip_norm)
    mu    = b1 * mu + (1 - b1) * g
    nu    = b2 * nu + (1 - b2) * g^2
    t     = count + 1
    step  = -lr(count) * (mu / (1 - b1^t) / (sqrt(nu / (1 - b2^t)) + eps) + wd * mask * p)

but when the step is not finite (a NaN/Inf loss or gradient) mu, nu and count
keep their old values and the parameter update is zero. The select sits inside
the same elementwise expression that writes each buffer, so XLA fuses it into
the loop that computes the new value; the train step then needs no separate
`jnp.where(finite, new, old)` over every parameter and moment. The parameter
step reads the moments as just written (an optimization_barrier keeps XLA from
recomputing them from the old ones inside the parameter loop), so every buffer
is updated in place: with the step-level guard, XLA:CPU copied both moment
buffers of every parameter each step to keep the old values alive.

The state mirrors the parameters (mu and nu have the params' tree structure,
so they take the params' shardings; count is a replicated scalar).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class FusedAdamWState(NamedTuple):
  count: jax.Array  # int32 scalar: applied (finite) steps so far
  mu: Any  # first moments, one per parameter leaf
  nu: Any  # second moments, one per parameter leaf


class SelfGuardedTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation whose `update(grads, state, params, *, finite=None,
  grad_norm=None)` leaves the state unchanged and returns zero updates when the
  step is not finite. The train step relies on it instead of selecting between
  old and new state itself."""


def guards_itself(optimizer) -> bool:
  return isinstance(optimizer, SelfGuardedTransformation)


def global_norm(tree) -> jax.Array:
  """L2 norm over every leaf (optax.tree.norm where optax has it)."""
  norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5
  return norm(tree) if norm is not None else optax.global_norm(tree)


def _resolve_mask(mask, params):
  if mask is None:
    return jax.tree_util.tree_map(lambda _: True, params)
  return mask(params) if callable(mask) else mask


def fused_adamw(learning_rate: float | Callable[[jax.Array], jax.Array],
                b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                weight_decay: float = 1e-4, mask: Any | Callable | None = None,
                clip_norm: float | None = None,
                lr_scale: Any | Callable | None = None) -> SelfGuardedTransformation:
  """AdamW (decoupled weight decay on the leaves where `mask` is true) with
  optional global-norm clipping of the incoming gradients, guarded against
  non-finite steps. `learning_rate` is a number or a schedule of the step count;
  `lr_scale` (a pytree of Python floats like the params, or a function of the
  params giving one) multiplies it leaf by leaf."""
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
  clip = clip_norm is not None and clip_norm > 0

  def init(params):
    return FusedAdamWState(count=jnp.zeros((), jnp.int32),
                           mu=jax.tree_util.tree_map(jnp.zeros_like, params),
                           nu=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update(grads, state, params=None, *, finite=None, grad_norm=None, **_):
    if params is None:
      raise ValueError("fused_adamw needs the params (for the weight decay)")
    if grad_norm is None and (clip or finite is None):
      grad_norm = global_norm(grads)
    ok = jnp.ones((), bool) if finite is None else jnp.asarray(finite, bool)
    if grad_norm is not None:
      ok = ok & jnp.isfinite(grad_norm)
    count = state.count
    t = (count + 1).astype(jnp.float32)
    bias1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
    bias2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t
    lr = jnp.asarray(schedule(count), jnp.float32)
    if clip:
      gscale = jnp.where(grad_norm < clip_norm, 1.0, clip_norm / grad_norm).astype(jnp.float32)
    decay = _resolve_mask(mask, params)
    scales = (jax.tree_util.tree_map(lambda _: 1.0, params) if lr_scale is None
              else lr_scale(params) if callable(lr_scale) else lr_scale)

    treedef = jax.tree_util.tree_structure(params)
    g_l, m_l, v_l, p_l, d_l = (treedef.flatten_up_to(x) for x in (grads, state.mu, state.nu, params, decay))
    s_l = treedef.flatten_up_to(scales)

    def moments(g, m, v):
      g = g.astype(m.dtype)
      if clip:
        g = g * gscale.astype(m.dtype)
      m_new = b1 * m + (1.0 - b1) * g
      v_new = b2 * v + (1.0 - b2) * (g * g)
      return jnp.where(ok, m_new, m), jnp.where(ok, v_new, v)

    mv = [moments(*xs) for xs in zip(g_l, m_l, v_l)]
    # The parameter step reads the moments just written rather than recomputing
    # them from the old ones: then each moment buffer is updated in place, and
    # XLA needs no copy of the old moments to keep them alive for the
    # parameter loop (it would fuse the moment maths into that loop otherwise).
    mv = jax.lax.optimization_barrier(mv)

    def param_step(m, v, p, d, scale):
      dtype = m.dtype
      step = (m / bias1.astype(dtype)) / (jnp.sqrt(v / bias2.astype(dtype)) + eps)
      if weight_decay:
        if isinstance(d, bool):
          step = step + weight_decay * p if d else step
        else:
          step = step + jnp.where(d, weight_decay, 0.0).astype(dtype) * p
      u = (-lr.astype(dtype) * float(scale)) * step
      return jnp.where(ok, u, jnp.zeros_like(u)).astype(p.dtype)

    updates = treedef.unflatten(
        [param_step(m, v, p, d, k) for (m, v), p, d, k in zip(mv, p_l, d_l, s_l)])
    mu = treedef.unflatten([m for m, _ in mv])
    nu = treedef.unflatten([v for _, v in mv])
    new_count = jnp.where(ok & (count < jnp.iinfo(jnp.int32).max), count + 1, count)
    return updates, FusedAdamWState(count=new_count, mu=mu, nu=nu)

  return SelfGuardedTransformation(init, update)
