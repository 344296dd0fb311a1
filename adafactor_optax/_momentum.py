"""Momentum: an exponential moving average of the step (Table 2, row P)."""

import collections.abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import _numerics, _quantize, _shapes, _sharding


def _stored_shapes(ema: Any, quantized: bool) -> Any:
  """The shape of the array each leaf of `ema` stores (a `BlockQuantized`: its values')."""
  if not quantized:
    return jax.tree.map(jnp.shape, ema)
  return jax.tree.map(lambda q: jnp.shape(q["values"] if isinstance(q, collections.abc.Mapping)
                                          else q.values), ema, is_leaf=_quantize.is_quantized)


class EmaMomentumState(NamedTuple):
  """State of `ema_momentum`: the moving average, one array per parameter.

  With ``accumulator_dtype="int8"`` each is a `BlockQuantized` (int8 values and
  per-block float32 scales).
  """

  ema: optax.Updates


def ema_momentum(
    decay: jax.typing.ArrayLike = 0.9, *, accumulator_dtype: Any = None
) -> optax.GradientTransformation:
  """``m_t = b1 m_{t-1} + (1 - b1) step_t``; the update is m_t.

  The same as ``optax.ema(decay, debias=False, accumulator_dtype=...)`` and where
  `optax.adafactor` places it, but computed in at least float32 and returned in
  the updates' dtype, so bfloat16 updates with a float32 accumulator work under
  strict dtype promotion. The update is m_t as stored: with a bfloat16
  accumulator under float32 updates it is m_t rounded to bfloat16 (optax.ema
  returns the unrounded value).

  Args:
    decay: b1, in [0, 1).
    accumulator_dtype: dtype the average is stored in (bfloat16 halves its
      memory). Default: float32, or float64 for float64 parameters. Pass a string or `numpy.dtype` rather than `jnp.float32` when
      wrapping in `optax.inject_hyperparams`, which calls callables.
      ``"int8"`` (or `jnp.int8`): int8 values with one float32 scale (the
      absmax) per block of 128-255 elements along the last axis
      (`BlockQuantized`, at most 1.03 bytes per element), the average
      computed in float32 and rounded to nearest.

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ValueError: for a `decay` outside [0, 1), or an `accumulator_dtype` that
      is neither a floating dtype nor int8.
  """
  _numerics.check("decay", decay, lambda b: 0 <= b < 1, "in [0, 1)")
  quantized = is_int8(accumulator_dtype)

  def storage_dtype(x):
    if accumulator_dtype is None:
      return _numerics.upcast_dtype(x.dtype)
    return jnp.dtype(accumulator_dtype)

  def zeros(p):
    if quantized:
      return _quantize.zeros_like_param(p)
    return _sharding.zeros_like_param(p, p.shape, storage_dtype(p))

  def init_fn(params):
    return EmaMomentumState(ema=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    _shapes.check_shapes("ema_momentum", "update", updates, _stored_shapes(state.ema, quantized),
                         "its momentum")

    def average(u, m):
      u32 = _numerics.upcast(u)
      b1 = _numerics.as_dtype(decay, _numerics.compute_dtype(u32.dtype)).astype(u32.dtype)
      return (1 - b1) * u32 + b1 * m.astype(u32.dtype)

    if quantized:  # one BlockQuantized (or a framework's mapping of it) per update
      ema = jax.tree.map(
          lambda u, q: _quantize.quantize(average(u, _quantize.dequantize(q))),
          updates, state.ema)
      updates = jax.tree.map(lambda u, q: _quantize.dequantize(q, u.dtype), updates, ema)
      return updates, EmaMomentumState(ema=ema)
    ema = jax.tree.map(lambda u, m: average(u, m).astype(m.dtype), updates, state.ema)
    # The step is m_t as stored. With an accumulator narrower than the updates
    # (bfloat16 under float32 parameters) this rounds it once more than
    # optax.ema, and saves XLA from keeping the old m_{t-1} for a second
    # fusion (a copy of the momentum each step).
    updates = jax.tree.map(lambda m, u: m.astype(u.dtype), ema, updates)
    return updates, EmaMomentumState(ema=ema)

  return optax.GradientTransformation(init_fn, update_fn)


def is_int8(accumulator_dtype: Any) -> bool:
  """Whether `accumulator_dtype` asks for int8 (block-quantized) momentum."""
  return accumulator_dtype is not None and _checked_dtype(accumulator_dtype) == jnp.int8


def _checked_dtype(accumulator_dtype: Any) -> jnp.dtype:
  """`accumulator_dtype` as a dtype: floating or int8, else a ValueError naming it."""
  try:
    dtype = jnp.dtype(accumulator_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not (jnp.issubdtype(dtype, jnp.inexact) or dtype == jnp.int8):
    raise ValueError(
        "dtype_momentum (accumulator_dtype) must be a floating dtype or 'int8', "
        f"got {accumulator_dtype!r}."
    )
  return dtype
