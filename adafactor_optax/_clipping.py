"""Update clipping (Algorithm 4, line Uc_t)."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import _factoring, _grouping, _numerics


def clipping_denominator(rms: jax.Array, threshold: jax.typing.ArrayLike) -> jax.Array:
  """``max(1, RMS(U) / d)``, the divisor of update clipping, in `rms`'s dtype."""
  return jnp.maximum(1, rms / _numerics.as_dtype(threshold, rms.dtype))


def clip_to_rms(u: jax.Array, rms: jax.Array, threshold: jax.typing.ArrayLike) -> jax.Array:
  """``Uc = U / max(1, RMS(U) / d)`` given ``RMS(U)`` (per block), in `u`'s dtype."""
  u_wide = _numerics.upcast(u)
  return _numerics.narrow(u_wide / clipping_denominator(rms, threshold).astype(u_wide.dtype),
                          u.dtype)


def clip_by_block_rms(
    threshold: jax.typing.ArrayLike = 1.0, *, factor_rule: Any = None
) -> optax.GradientTransformation:
  """Scales each parameter's update down to an RMS of at most `threshold`.

  ``Uc = U / max(1, RMS(U) / d)``, with RMS taken over one parameter (a block)
  and computed in at least float32, so float16 updates cannot overflow in it.
  Updates whose RMS is below d are left unchanged.

  Args:
    threshold: d > 0, the largest RMS an update may have (the paper uses 1).
    factor_rule: the `factor_rule` of `scale_by_factored_rms`: the batch axes
      of its `FactorSpec` values index separately clipped blocks (the layers of a
      scanned stack). None or a named rule: each parameter is one block.

  Returns:
    A stateless `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp
    >>> import adafactor_optax as ao
    >>> tx = ao.clip_by_block_rms(1.0)
    >>> u, _ = tx.update({"w": jnp.full((2, 2), 4.0)}, tx.init(None))
    >>> float(u["w"][0, 0])
    1.0
  """
  _numerics.check("threshold", threshold, lambda d: d > 0, "> 0")

  block_rule = _factoring.block_axes_rule(factor_rule)

  def update_fn(updates, state, params=None):
    del params
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [u for _, u in paths_leaves]
    blocks = [_factoring.batch_axes(block_rule, p, u.shape) for p, u in paths_leaves]

    def clip(leaves, *, plan):
      rms = _grouping.block_rms_per_leaf(
          lambda u: u, blocks, *_grouping.unshared([leaves], plan=plan)[0], plan=plan)
      return [clip_to_rms(u, r, threshold) for u, r in zip(leaves, rms)]

    return jax.tree.unflatten(treedef, _grouping.per_backend(clip, leaves)), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
