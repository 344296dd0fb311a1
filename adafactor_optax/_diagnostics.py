"""Diagnostics of Adafactor's inner quantities, recorded into the optimizer state.

`record_diagnostics` is an identity transform: it passes its updates through
unchanged and keeps, in its state, what the paper plots and argues about:

- ``update_rms``: RMS(U_t) of each block's unclipped update (Figure 1),
  and ``update_rms_global``, RMS(U_t) over all parameters together;
- ``clipped_fraction``: the fraction of parameter elements whose block update
  was clipped this step (RMS(U_t) > d);
- ``b2``, ``rho``: the decay b2_t and relative step rho_t used this step;
  ``alpha``: each block's step size ``max(eps2, RMS(X_{t-1})) rho_t``.

A block is what clipping and the parameter scale act on: a whole parameter,
or with a factor rule's batch axes (``FactorSpec(..., batch=(0,))``, a scanned
stack of layers) each slice along them. A parameter's ``update_rms`` and
``alpha`` are then arrays over its batch axes (one value per layer), scalars
otherwise; ``update_rms_global`` and ``clipped_fraction`` pool the blocks by
their element counts.

`adafactor(..., diagnostics=True)` places it right after
`scale_by_factored_rms`, where the updates are U_t. It costs nothing when left
out; when in, a few reductions per parameter. Read the values with
`optax.tree_utils.tree_get(state, "update_rms")` or all at once with
`get_diagnostics(state)`.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import _factoring, _numerics, _shapes, _step_size

DIAGNOSTIC_NAMES = (
    "update_rms", "update_rms_global", "clipped_fraction", "b2", "rho", "alpha")


class AdafactorDiagnosticsState(NamedTuple):
  """State of `record_diagnostics`: the values of the latest update.

  Attributes:
    diagnostics_count: number of updates recorded so far (int32, saturating).
    update_rms: per parameter, RMS of the unclipped update U_t per block
      (float32; a scalar, or an array over the parameter's batch axes).
    update_rms_global: RMS of U_t over all parameters' elements together.
    clipped_fraction: fraction of parameter elements in blocks with
      RMS(U_t) > d (0 when clipping is off).
    b2: the decay b2_t of this step.
    rho: the step size rho_t of this step.
    alpha: per parameter, ``max(eps2, RMS(X_{t-1})) * rho_t`` per block
      (shaped as `update_rms`), or rho_t when the step is absolute.
  """

  diagnostics_count: jax.Array
  update_rms: optax.Updates
  update_rms_global: jax.Array
  clipped_fraction: jax.Array
  b2: jax.Array
  rho: jax.Array
  alpha: optax.Updates


def _at(schedule: Any, count: jax.Array) -> jax.Array:
  value = schedule(count) if callable(schedule) else schedule
  return jnp.asarray(value).astype(jnp.float32)


def _blocks(block_rule: Any, tree: Any) -> Any:
  """Each leaf's batch axes: the blocks whose values are recorded."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _factoring.batch_axes(block_rule, path, x.shape), tree)


def _per_block(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """`x` (a block value broadcasting against its leaf) as an array over `axes`."""
  return x.reshape([n for a, n in enumerate(x.shape) if a in axes]).astype(jnp.float32)


def _zeros(x: Any, axes: tuple[int, ...]) -> jax.Array:
  return jnp.zeros([x.shape[a] for a in axes], jnp.float32)


def _pooled_mean(tree: Any, *, updates: Any, rms: Any) -> jax.Array:
  """The mean over every element of `updates` of a per-block value (`tree`, like `rms`).

  Each block's value counts once per element of its block; zero-size leaves (RMS
  NaN) hold no elements and are left out.
  """
  block_size = jax.tree.map(lambda u, r: jnp.float32(u.size / max(r.size, 1)), updates, rms)
  total = jnp.asarray(max(sum(u.size for u in jax.tree.leaves(updates)), 1), jnp.float32)
  sums = jax.tree.map(lambda x, u, n: jnp.sum(x) * n if u.size else jnp.zeros([], jnp.float32),
                      tree, updates, block_size)
  return sum(jax.tree.leaves(sums), jnp.zeros([], jnp.float32)) / total


def record_diagnostics(
    *,
    decay: Callable[[jax.Array], jax.Array] | jax.typing.ArrayLike,
    step_size: optax.ScalarOrSchedule,
    eps2: jax.typing.ArrayLike | None = 1e-3,
    clipping_threshold: jax.typing.ArrayLike | None = 1.0,
    factor_rule: Any = None,
) -> optax.GradientTransformation:
  """Records RMS(U_t), the clipped fraction, b2_t, rho_t and alpha_t; updates pass through.

  Place it where the updates are the unclipped U_t, i.e. right after
  `scale_by_factored_rms`, and give it the same schedules as the chain.

  Args:
    decay: the b2_t schedule (or constant) given to `scale_by_factored_rms`.
    step_size: rho_t, the schedule (or constant) given to `relative_step_size`,
      or the absolute learning rate.
    eps2: the floor of the parameter scale; None when the step is absolute
      (``multiply_by_parameter_scale=False``): alpha_t is then rho_t.
    clipping_threshold: d of `clip_by_block_rms`, None when clipping is off.
    factor_rule: the `factor_rule` given to `clip_by_block_rms` and
      `relative_step_size`: the batch axes of its `FactorSpec` values are the
      blocks whose values are recorded. None or a named rule: each parameter
      is one block.

  Returns:
    An `optax.GradientTransformation` whose update needs `params` (for
    alpha_t) unless `eps2` is None.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import adafactor_optax as ao
    >>> tx = ao.adafactor(diagnostics=True)
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.full((4, 3), 0.5)}, state, params)
    >>> d = ao.get_diagnostics(state)
    >>> # U_1 = G / |G| = 1 everywhere; b2_1 = 0; rho_1 = min(1e-2, 1/sqrt(1))
    >>> [round(float(d[k]), 6) for k in ("update_rms_global", "b2", "rho")]
    [1.0, 0.0, 0.01]
  """

  block_rule = _factoring.block_axes_rule(factor_rule)

  def init_fn(params):
    axes = _blocks(block_rule, params)
    return AdafactorDiagnosticsState(
        diagnostics_count=jnp.zeros([], jnp.int32),
        update_rms=jax.tree.map(_zeros, params, axes),
        update_rms_global=jnp.zeros([], jnp.float32),
        clipped_fraction=jnp.zeros([], jnp.float32),
        b2=jnp.zeros([], jnp.float32),
        rho=jnp.zeros([], jnp.float32),
        alpha=jax.tree.map(_zeros, params, axes),
    )

  def update_fn(updates, state, params=None):
    if eps2 is not None and params is None:
      raise ValueError("record_diagnostics needs params: call update(updates, state, params).")
    if eps2 is not None:
      _shapes.check_shapes("record_diagnostics", "parameter", params,
                           jax.tree.map(jnp.shape, updates), "its update")
    count = state.diagnostics_count
    rho = _at(step_size, count)
    axes = _blocks(block_rule, updates)
    rms = jax.tree.map(lambda u, a: _per_block(_numerics.block_rms(u, a), a), updates, axes)
    pooled = functools.partial(_pooled_mean, updates=updates, rms=rms)
    if clipping_threshold is None:
      clipped = jnp.zeros([], jnp.float32)
    else:
      d = jnp.asarray(clipping_threshold).astype(jnp.float32)
      clipped = pooled(jax.tree.map(lambda r: (r > d).astype(jnp.float32), rms))
    if eps2 is None:
      alpha = jax.tree.map(lambda r: jnp.broadcast_to(rho, r.shape), rms)
    else:
      alpha = jax.tree.map(
          lambda p, a: _per_block(_step_size.step_scale(p, rho, eps2, a), a), params, axes)
    new_state = AdafactorDiagnosticsState(
        diagnostics_count=optax.safe_increment(count),
        update_rms=rms,
        update_rms_global=jnp.sqrt(pooled(jax.tree.map(jnp.square, rms))),
        clipped_fraction=clipped,
        b2=_at(decay, count),
        rho=rho,
        alpha=alpha,
    )
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def get_diagnostics(opt_state: optax.OptState) -> dict[str, Any]:
  """The values recorded by `record_diagnostics` anywhere in `opt_state`.

  Args:
    opt_state: the state of a chain holding `record_diagnostics`, e.g. of
      ``adafactor(diagnostics=True)``, possibly wrapped (nnx.Optimizer's
      ``opt_state``, `optax.MultiSteps`, ...).

  Returns:
    A dict ``{name: value}`` for the names in ``DIAGNOSTIC_NAMES``.

  Raises:
    KeyError: when the state holds no diagnostics.
  """
  values = {name: optax.tree_utils.tree_get(opt_state, name) for name in DIAGNOSTIC_NAMES}
  if any(v is None for v in values.values()):
    raise KeyError("no diagnostics in this state: build it with adafactor(diagnostics=True) "
                   "or put record_diagnostics(...) in the chain.")
  return values
