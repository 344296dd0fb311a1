"""Skipping steps whose gradients are not finite."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import _grouping


class SkipNonFiniteState(NamedTuple):
  """State of `skip_non_finite`.

  Attributes:
    inner_state: the wrapped transformation's state.
    skipped: how many steps were skipped so far (int32, saturating).
  """

  inner_state: Any
  skipped: jax.Array


def all_finite(tree: Any) -> jax.Array:
  """True when every element of every leaf of `tree` is finite.

  Read as ``isfinite(max |x|)`` (XLA's max propagates NaN): a float reduction
  that fuses with its input, where ``all(isfinite(x))`` makes XLA:CPU write a
  full-size boolean array first. Equally shaped leaves are reduced together
  where the backend's plan groups them (`_grouping`); on CPU each leaf passes
  `_numerics.unshared`, which keeps the upcast of a bfloat16 leaf its own.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)

  def check(leaves, *, plan):
    keys = [_grouping.group_key([x]) if plan.grouped else None for x in leaves]
    (leaves,) = _grouping.unshared([leaves], plan=plan)[0]
    finite = _grouping.map_stacked(
        lambda _, x: jnp.isfinite(jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim)), initial=0)),
        keys, leaves)
    return jnp.stack(finite).all()

  return _grouping.per_backend(check, leaves)


def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that a step with any NaN or Inf gradient changes nothing.

  On such a step the updates are zero and `inner`'s state is kept as it was, so
  neither the parameters nor the statistics see the bad values; `skipped`
  counts these steps. Unlike `optax.apply_if_finite`, a run of bad steps never
  falls through to applying them. Works inside `jax.jit`: both branches are
  computed and selected elementwise.

  Args:
    inner: the transformation to protect.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> import adafactor_optax as ao
    >>> tx = ao.skip_non_finite(ao.adafactor())
    >>> params = jnp.ones(3)
    >>> u, state = tx.update(jnp.array([1.0, jnp.nan, 2.0]), tx.init(params), params)
    >>> u.tolist(), int(state.skipped)
    ([0.0, 0.0, 0.0], 1)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SkipNonFiniteState(inner.init(params), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    finite = all_finite(updates)
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    inner_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), new_inner, state.inner_state
    )
    skipped = jnp.where(finite, state.skipped, optax.safe_increment(state.skipped))
    return new_updates, SkipNonFiniteState(inner_state, skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
