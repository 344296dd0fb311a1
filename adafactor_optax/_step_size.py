"""Relative step size (Algorithm 4, line alpha_t)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import _factoring, _grouping, _numerics, _schedules, _shapes


class RelativeStepSizeState(NamedTuple):
  """State of `relative_step_size`: the number of updates so far."""

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do


def alpha(
    p_rms: jax.Array, step_size: jax.typing.ArrayLike, eps2: jax.typing.ArrayLike
) -> jax.Array:
  """``alpha_t = max(eps2, RMS(X_{t-1})) rho_t``, given RMS(X_{t-1}) (per block)."""
  return _numerics.as_dtype(step_size, p_rms.dtype) * jnp.maximum(
      _numerics.as_dtype(eps2, p_rms.dtype), p_rms)


def step_scale(
    param: jax.Array,
    step_size: jax.typing.ArrayLike,
    eps2: jax.typing.ArrayLike,
    batch_axes: tuple[int, ...] = (),
) -> jax.Array:
  """`alpha` of one parameter, per block, in at least float32."""
  return alpha(_numerics.block_rms(param, batch_axes), step_size, eps2)


def relative_step_size(
    step_size: optax.ScalarOrSchedule | None = None,
    *,
    eps2: jax.typing.ArrayLike = 1e-3,
    factor_rule: Any = None,
) -> optax.GradientTransformation:
  """Scales each parameter's update by ``alpha_t = max(eps2, RMS(X_{t-1})) rho_t``.

  The step is relative to the parameter's own scale, so parameters of very
  different scales move at the same relative rate; eps2 lets parameters that
  start at zero move at all. RMS is taken over one parameter, in at least
  float32.

  Args:
    step_size: rho_t, a constant or any optax schedule of the update count.
      Default: the paper's ``min(1e-2, 1/sqrt(t))`` (`inverse_sqrt_step()`).
    eps2: the floor of the parameter scale (1e-3 in the paper).
    factor_rule: the `factor_rule` of `scale_by_factored_rms`: the batch axes
      of its `FactorSpec` values index blocks with a parameter scale of their own
      (the layers of a scanned stack). None or a named rule: one per
      parameter.

  Returns:
    An `optax.GradientTransformation`; its update needs `params`.

  Example:
    >>> import jax.numpy as jnp
    >>> import adafactor_optax as ao
    >>> tx = ao.relative_step_size()
    >>> params = {"w": jnp.full((2, 2), 3.0)}
    >>> u, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
    >>> round(float(u["w"][0, 0]), 6)  # rho_1 = 1e-2, RMS(X) = 3
    0.03
  """
  _numerics.check("eps2", eps2, lambda e: e >= 0, ">= 0")
  block_rule = _factoring.block_axes_rule(factor_rule)
  if step_size is None:
    step_size = _schedules.inverse_sqrt_step()
  elif not callable(step_size):
    _numerics.check("step_size", step_size, lambda s: s >= 0, ">= 0")

  def init_fn(params):
    del params
    return RelativeStepSizeState(count=jax.numpy.zeros([], jax.numpy.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("relative_step_size needs params: call update(updates, state, params).")
    _shapes.check_shapes("relative_step_size", "parameter", params,
                         jax.tree.map(jax.numpy.shape, updates), "its update")
    rho = step_size(state.count) if callable(step_size) else step_size
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    blocks = [_factoring.batch_axes(block_rule, p, u.shape) for p, u in paths_leaves]

    def scale(updates, params, *, plan):
      # RMS(X) of an X of its own: a bfloat16 X upcast once, for the RMS and
      # for the parameter update, would be a full-size float32 buffer.
      p_rms = _grouping.block_rms_per_leaf(
          lambda p: p, blocks, *_grouping.unshared([params], plan=plan)[0], plan=plan)
      wide = [_numerics.upcast(u) * alpha(r, rho, eps2).astype(_numerics.upcast_dtype(u.dtype))
              for u, r in zip(updates, p_rms)]
      return [_numerics.narrow(w, u.dtype) for w, u in zip(wide, updates)]

    updates = jax.tree.unflatten(treedef, _grouping.per_backend(
        scale, [u for _, u in paths_leaves],
        treedef.flatten_up_to(params)))  # type: ignore[attr-defined]  # (no stub)
    return updates, RelativeStepSizeState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
