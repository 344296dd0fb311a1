"""The factored second-moment estimate of Adafactor (Algorithms 4 and 5).

For a matrix the second moment is kept as row and column averages, R (n) and
C (m), and rebuilt as the rank-1 estimate ``V = R C / mean(R)``; vectors, and any
parameter that is not factored, keep the whole second moment. Tensors of higher
rank are batches of matrices: the two factored axes are chosen once, in `init`,
by a factoring rule (`_factoring.py`), and the other axes are batch axes.

The statistics are stored with the reduced axis kept as size 1 (``v_row`` is
n x 1, ``v_col`` is 1 x m), so their shapes say which axes they average over:
`update` needs no factoring decision of its own, the state is its only record.
"""

import collections.abc
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import (
    _clipping,
    _factoring,
    _grouping,
    _numerics,
    _schedules,
    _shapes,
    _sharding,
)


class FactoredMoment(NamedTuple):
  """Second-moment statistics of one factored parameter.

  Attributes:
    v_row: moving average of ``mean(G^2 + eps1)`` over the column axis; the
      parameter's shape with the column axis set to 1.
    v_col: moving average of ``mean(G^2 + eps1)`` over the row axis; the
      parameter's shape with the row axis set to 1.
  """

  v_row: jax.Array
  v_col: jax.Array


class ScaleByFactoredRmsState(NamedTuple):
  """State of `scale_by_factored_rms`.

  Attributes:
    count: number of updates made so far (int32, saturating).
    nu: per parameter, a `FactoredMoment` for a factored parameter or an array
      of the parameter's shape for one that is not.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  nu: optax.Updates


def _with_unit_axis(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  return shape[:axis] + (1,) + shape[axis + 1 :]


def _mean_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Mean of `x` over the axes where `shape` is 1, keeping them as size 1."""
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return jnp.mean(x, axis=axes, keepdims=True) if axes else x


def _moving_average(previous: jax.Array, value: jax.Array, b2: jax.Array) -> jax.Array:
  b2 = b2.astype(value.dtype)
  return (b2 * previous.astype(value.dtype) + (1 - b2) * value).astype(previous.dtype)


def accumulate(grad: jax.Array, nu: Any, b2: jax.Array, eps: jax.typing.ArrayLike) -> Any:
  """One step of the moving averages of ``G^2 + eps1`` (Algorithm 4/5, R_t, C_t, V_t)."""
  if isinstance(nu, FactoredMoment):
    # Each mean squares its own G: one shared G^2 would be written to memory.
    g_row, g_col = _numerics.unshared(grad, copies=2)
    means = mean_squares(g_row, g_col, nu, eps)
  else:
    means = mean_squares(grad, grad, nu, eps)
  return moving_average(nu, means, b2)


def mean_squares(g_row: jax.Array, g_col: jax.Array, nu: Any, eps: Any) -> Any:
  """``mean(G^2) + eps1`` over the axes `nu`'s statistics average over, shaped like them.

  Row means are read from `g_row` and column means from `g_col`, both the
  same G: given as two (`_numerics.unshared`) names, each reduction squares G
  itself. eps1 is added to the means, ``mean(G^2) + eps1 = mean(G^2 + eps1)``,
  so no full-size ``G^2 + eps1`` is formed. Works as well on a stack of
  equally shaped parameters (a leading axis on every array).
  """
  dtype = _numerics.compute_dtype(g_row.dtype)
  eps = _numerics.as_dtype(eps, dtype)

  def mean_square(g, shape):
    return _mean_to_shape(jnp.square(jnp.abs(_numerics.upcast(g))).astype(dtype), shape) + eps

  if isinstance(nu, FactoredMoment):
    return FactoredMoment(mean_square(g_row, nu.v_row.shape), mean_square(g_col, nu.v_col.shape))
  # Unfactored (same shape as G), or a row-only / column-only estimate.
  return mean_square(g_row, nu.shape)


def row_mean_update(nu: FactoredMoment, means: FactoredMoment, b2: jax.Array) -> jax.Array:
  """mean(R_t) = b2 mean(R_{t-1}) + (1 - b2) mean(this step's row means).

  The mean of `moving_average`'s R_t, taken of the small inputs instead of R_t
  itself, so that R_t is written by a plain elementwise loop (a reduction of
  R_t would compute it inside a reduction kernel, which XLA:GPU cannot write
  in place over the donated R_{t-1}). In the compute dtype, shaped like a
  mean of R over its row axis.
  """
  dtype = means.v_row.dtype
  b2 = b2.astype(dtype)
  previous = _mean_to_shape(nu.v_row.astype(dtype), nu.v_col.shape)
  return b2 * previous + (1 - b2) * _mean_to_shape(means.v_row, nu.v_col.shape)


def moving_average(nu: Any, means: Any, b2: jax.Array) -> Any:
  """``b2 nu + (1 - b2) means``, each statistic kept in its own dtype."""
  return jax.tree.map(lambda v, m: _moving_average(v, m, b2), nu, means)


def _inverse_sqrt_factors(nu: Any, dtype: Any, row_mean: Any = None) -> tuple[jax.Array, ...]:
  """Arrays whose product (broadcast) is ``V^-1/2``: two small ones when factored.

  The factored form is ``(R / mean(R))^-1/2`` and ``C^-1/2``, never the
  product ``R C``, which underflows in float32 once both are near eps1 = 1e-30.
  """
  if isinstance(nu, FactoredMoment):
    v_row = nu.v_row.astype(dtype)
    if row_mean is None:
      row_mean = _mean_to_shape(v_row, nu.v_col.shape)
    row_mean = row_mean.astype(dtype)
    return jax.lax.rsqrt(v_row / row_mean), jax.lax.rsqrt(nu.v_col.astype(dtype))
  return (jax.lax.rsqrt(nu.astype(dtype)),)


def precondition(
    grad: jax.Array, nu: Any, row_mean: Any = None, *,
    narrow: Callable[[jax.Array, Any], jax.Array] | None = None
) -> jax.Array:
  """``U = G / sqrt(V)``, with ``V = R C / mean(R)`` for a factored parameter.

  Args:
    grad: G, the gradient of one parameter.
    nu: its statistics after `accumulate`.
    row_mean: mean(R), when known (`row_mean_update`); else taken of `nu`.
    narrow: ``(u, dtype) -> u in dtype``, how U is brought to the gradient's
      dtype; None: ``astype``. The update takes `_numerics.narrow`; RMS(U) keeps
      ``astype``, which XLA:CPU's library reduction fuses and integer
      rounding it does not.

  Returns:
    U, in the gradient's dtype.
  """
  dtype = _numerics.compute_dtype(grad.dtype)
  u = _numerics.upcast(grad)
  for factor in _inverse_sqrt_factors(nu, dtype, row_mean):
    u = u * factor.astype(u.dtype)
  return u.astype(grad.dtype) if narrow is None else narrow(u, grad.dtype)


def _check_params_dtypes(params: optax.Params) -> None:
  _shapes.check_arrays("scale_by_factored_rms", "parameter", params)

  def check(path, p):
    if not jnp.issubdtype(p.dtype, jnp.inexact):
      raise TypeError(
          f"scale_by_factored_rms: parameter {jax.tree_util.keystr(path)} has dtype "
          f"{p.dtype}; only floating-point parameters can be optimised. Leave it "
          "out of the tree given to the optimizer, or wrap the optimizer in "
          "optax.masked with a mask that is False for it."
      )

  jax.tree_util.tree_map_with_path(check, params)


def moments_like(updates: optax.Updates, nu: optax.Updates) -> optax.Updates:
  """`nu` checked against `updates`, with each parameter's statistics as they were built.

  Frameworks may hand the state back with a `FactoredMoment` rebuilt as their
  own mapping (`flax.nnx.Optimizer` writes it back as an `nnx.State`); at a
  parameter's position such a mapping is turned back into a `FactoredMoment`.

  Raises:
    ValueError: when `updates` is not shaped like the parameters `nu` was
      built for: another tree structure, or a leaf of another shape (naming
      the leaf and both shapes; checked while tracing, so it costs nothing).
    TypeError: for a gradient that is not floating-point or complex.
  """

  def restore(_, v):
    return FactoredMoment(v["v_row"], v["v_col"]) if isinstance(v, collections.abc.Mapping) else v

  try:
    nu = jax.tree.map(restore, updates, nu)
  except ValueError as error:
    expected = jax.tree.structure(nu, is_leaf=lambda x: isinstance(x, FactoredMoment))
    raise ValueError(
        "scale_by_factored_rms: the gradients' tree structure differs from the "
        f"parameters' the state was built for.\n  gradients:  {jax.tree.structure(updates)}"
        f"\n  parameters: {expected}"
    ) from error
  _shapes.check_floating("scale_by_factored_rms", "gradient", updates)
  _shapes.check_shapes(
      "scale_by_factored_rms", "gradient", updates,
      jax.tree.map(lambda _, v: parameter_shape(v), updates, nu),
      "the parameter the state was built for")
  return nu


def parameter_shape(nu: Any) -> _shapes.Pattern:
  """The shape of the parameter that statistics `nu` were built for.

  A `FactoredMoment` gives it exactly: each axis is kept at the parameter's
  size by ``v_row`` or ``v_col`` (or is 1 in both). A single array is the
  parameter's shape, except that row-only or column-only statistics (two or
  more axes) keep one reduced axis as 1: a size-1 axis there matches any size.
  """
  if isinstance(nu, FactoredMoment):
    return tuple(c if r == 1 else r for r, c in zip(nu.v_row.shape, nu.v_col.shape))
  shape = tuple(nu.shape)
  return shape if len(shape) < 2 else tuple(None if n == 1 else n for n in shape)


def _constant(b2: jax.typing.ArrayLike) -> Callable[[jax.Array], jax.Array]:
  def schedule(count):
    del count
    return jnp.asarray(b2)

  return schedule


def _min_dim_size(min_dim_size_to_factor: int | None) -> int:
  """`min_dim_size_to_factor` as a Python int (None: the default), or a ValueError if traced."""
  if min_dim_size_to_factor is None:
    return _factoring.DEFAULT_MIN_DIM_SIZE_TO_FACTOR
  if (min_dim := _numerics.concrete_value(min_dim_size_to_factor)) is None:
    raise ValueError(
        "min_dim_size_to_factor is traced, but the state's shapes depend on it. "
        "optax.inject_hyperparams turns integers into traced hyperparameters inside "
        "a jitted init: leave min_dim_size_to_factor at its default (None), call "
        "init outside jit, or pass static_args=('min_dim_size_to_factor',)."
    )
  return int(min_dim)


def init_moment(param: jax.Array, spec: Any, stats_dtype: Any = None) -> Any:
  """Zero statistics for `param` under its `FactorSpec` `spec` (None: unfactored).

  Placed like the parameter (`_sharding.zeros_like_param`): a `FactoredMoment`
  for a factored spec, one array for an unfactored, row-only or column-only one.
  """
  dtype = _numerics.compute_dtype(param.dtype) if stats_dtype is None else stats_dtype
  if spec is None:
    return _sharding.zeros_like_param(param, param.shape, dtype)
  v_row = _sharding.zeros_like_param(param, _with_unit_axis(param.shape, spec.col), dtype)
  v_col = _sharding.zeros_like_param(param, _with_unit_axis(param.shape, spec.row), dtype)
  return {"factored": FactoredMoment(v_row, v_col), "row": v_row, "col": v_col}[spec.estimate]


def _is_whole(grad: jax.Array, nu: Any) -> bool:
  """Whether `nu` is an unfactored second moment, elementwise in G (computed with the update)."""
  return not isinstance(nu, FactoredMoment) and nu.shape == grad.shape


def new_moments(
    grads: list, moments: list, blocks: list, *, b2: jax.Array, eps: Any, plan: _grouping.Plan
) -> tuple[list, list]:
  """Each leaf's statistics after this step, and mean(R_t) where the plan recomputes it.

  The row and column means of equally shaped leaves are reduced together
  where the plan groups (`_grouping.map_stacked`); an unfactored leaf's
  statistics are elementwise, computed with its update.

  Returns:
    The new statistics, and per leaf mean(R_t) (`row_mean_update`) or None.
  """
  keys = [_grouping.group_key([g, *jax.tree.leaves(v)], b)
          if plan.grouped and not _is_whole(g, v) else None
          for g, v, b in zip(grads, moments, blocks)]
  (g_row,), (g_col,) = _grouping.unshared([grads], copies=2, plan=plan)
  g_row, g_col = ([g if isinstance(v, FactoredMoment) else grad
                   for g, grad, v in zip(xs, grads, moments)] for xs in (g_row, g_col))

  def statistics(_, g_row, g_col, v):
    means = mean_squares(g_row, g_col, v, eps)
    if not (plan.from_inputs and isinstance(v, FactoredMoment)):
      return means, None
    return means, row_mean_update(v, means, b2)

  stats = _grouping.map_stacked(statistics, keys, g_row, g_col, moments)
  return [moving_average(v, m, b2) for v, (m, _) in zip(moments, stats)], [r for _, r in stats]


def update_rms(
    grads: list, old: list, new: list, row_means: list, blocks: list, *,
    b2: jax.Array, eps: Any, plan: _grouping.Plan
) -> list:
  """RMS(U_t) per block of each leaf, for the clipping.

  Of a U of its own, from unshared G and statistics where that keeps XLA
  from writing one shared U to memory. With `from_inputs`, an unfactored V_t
  is recomputed from V_{t-1} (`old`), so only the update writes it.
  """

  def u_of(g, v, r):
    if _is_whole(g, v) and plan.from_inputs:
      v = accumulate(g, v, b2, eps)  # V_{t-1} given: V_t recomputed
    return precondition(g, v, r)

  inputs = [o if plan.from_inputs and _is_whole(g, v) else v
            for g, v, o in zip(grads, new, old)]
  return _grouping.block_rms_per_leaf(
      u_of, blocks, *_grouping.unshared([grads, inputs, row_means], plan=plan)[0], plan=plan)


def factored_step(
    grads: list, moments: list, *, blocks: list, b2: jax.Array, eps: Any,
    clipping_threshold: Any, plan: _grouping.Plan
) -> tuple[list, list]:
  """One step on the flattened leaves: ``(U_t, clipped if asked; the new statistics)``."""
  moments_t, row_means = new_moments(grads, moments, blocks, b2=b2, eps=eps, plan=plan)
  updates = [precondition(g, v, r, narrow=_numerics.narrow)
             for g, v, r in zip(grads, moments_t, row_means)]
  if clipping_threshold is not None:
    rms = update_rms(grads, moments, moments_t, row_means, blocks, b2=b2, eps=eps, plan=plan)
    updates = [_clipping.clip_to_rms(u, r, clipping_threshold) for u, r in zip(updates, rms)]
  return updates, moments_t


def scale_by_factored_rms(
    *,
    decay: Callable[[jax.Array], jax.Array] | jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-30,
    factored: bool = True,
    min_dim_size_to_factor: int | None = None,
    factor_rule: Any = None,
    stats_dtype: Any = None,
    clipping_threshold: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformation:
  """Scales updates by a factored estimate of their second moment.

  For a parameter factored over rows and columns (Algorithm 4)::

    R_t = b2_t R_{t-1} + (1 - b2_t) mean_cols(G_t^2 + eps1)
    C_t = b2_t C_{t-1} + (1 - b2_t) mean_rows(G_t^2 + eps1)
    U_t = G_t / sqrt(R_t C_t / mean(R_t))

  and for any other parameter (Algorithm 5)
  ``V_t = b2_t V_{t-1} + (1 - b2_t) (G_t^2 + eps1)``, ``U_t = G_t / sqrt(V_t)``.
  Means instead of the paper's sums give the same V_t. Complex gradients use
  ``|G|^2``.

  Args:
    decay: the schedule ``count -> b2_t`` (count = updates so far), or a
      constant b2. Default `increasing_decay()`: ``1 - t^-0.8``.
    eps: eps1, added to G^2 before the averages.
    factored: whether to factor at all; False keeps every second moment whole.
    min_dim_size_to_factor: factor the two largest axes when both have at least
      this many elements (`factored_axes`). None: 128, as optax.
    factor_rule: which axes each parameter factors (see `FactorSpec`): None or
      "largest" (the two largest, as optax), "last_two" (tensor2tensor,
      PyTorch, HF), a callable ``(path, shape) -> FactorSpec | None |
      DEFAULT_FACTORING``, or a pytree of those with the parameters'
      structure. None keeps a parameter's second moment whole;
      `DEFAULT_FACTORING` gives it what the default rule gives it (e.g.
      `stacked_layers` for the rest of a scanned model).
    stats_dtype: dtype the statistics are stored in. Default: float32, or
      float64 for float64 parameters. They are always computed in at least
      float32.
    clipping_threshold: d; when given, the updates are clipped to
      ``U / max(1, RMS(U) / d)`` here, equal to following this transform with
      ``clip_by_block_rms(d)`` (with the factor rule's batch axes as blocks) and
      faster. None: no clipping.

  Returns:
    An `optax.GradientTransformation`. Updates keep the gradients' dtype.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import adafactor_optax as ao
    >>> tx = ao.scale_by_factored_rms(min_dim_size_to_factor=2)
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> state.nu["w"].v_row.shape, state.nu["w"].v_col.shape
    ((4, 1), (1, 3))
    >>> updates, state = tx.update({"w": jnp.full((4, 3), 0.5)}, state, params)
    >>> float(updates["w"][0, 0])
    1.0

  References:
    Shazeer & Stern, Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost, ICML 2018. https://arxiv.org/abs/1804.04235
  """
  _numerics.check("eps", eps, lambda e: e >= 0, ">= 0")
  _numerics.check(
      "min_dim_size_to_factor", min_dim_size_to_factor, lambda n: n >= 1 and n == int(n),
      "an integer >= 1")
  if clipping_threshold is not None:
    _numerics.check("clipping_threshold", clipping_threshold, lambda d: d > 0, "> 0")
  block_rule = _factoring.block_axes_rule(factor_rule, factored=factored)
  if decay is None:
    decay = _schedules.increasing_decay()
  elif not callable(decay):
    _numerics.check("decay", decay, lambda b: 0 <= b < 1, "in [0, 1) or a schedule")
    decay = _constant(decay)

  def init_fn(params):
    _check_params_dtypes(params)
    rule = _factoring.resolve(factor_rule, factored=factored,
                              min_dim_size_to_factor=_min_dim_size(min_dim_size_to_factor))
    nu = jax.tree_util.tree_map_with_path(
        lambda path, p: init_moment(p, rule(path, p.shape), stats_dtype), params)
    return ScaleByFactoredRmsState(count=jnp.zeros([], jnp.int32), nu=nu)

  def update_fn(updates, state, params=None):
    del params
    nu = moments_like(updates, state.nu)
    paths_grads, treedef = jax.tree_util.tree_flatten_with_path(updates)
    step = functools.partial(
        factored_step, blocks=[_factoring.batch_axes(block_rule, p, g.shape)
                               for p, g in paths_grads],
        b2=jnp.asarray(decay(state.count)), eps=eps, clipping_threshold=clipping_threshold)
    new_updates, moments = _grouping.per_backend(
        step, [g for _, g in paths_grads],
        treedef.flatten_up_to(nu))  # type: ignore[attr-defined]  # (no stub)
    return jax.tree.unflatten(treedef, new_updates), ScaleByFactoredRmsState(
        optax.safe_increment(state.count), jax.tree.unflatten(treedef, moments))

  return optax.GradientTransformation(init_fn, update_fn)
