"""Schedules of the paper: the second-moment decay b2_t and the step size rho_t.

Every schedule here is a plain function of optax's update count, the number of
updates made before this one (0 on the first update), the same convention as
`optax.scale_by_schedule`. The paper counts steps from 1: ``t = count + 1``.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adafactor_optax import _numerics

Schedule = Callable[[jax.Array], jax.Array]


def _float(x: jax.typing.ArrayLike) -> jax.Array:
  """`x` in JAX's default float: float32, or float64 under x64."""
  return jnp.asarray(x, dtype=float)


def _step(count: jax.typing.ArrayLike, offset: jax.typing.ArrayLike = 0) -> jax.Array:
  """The paper's t = count + 1 - offset as a float, never below 1."""
  # In floating point: count + 1 would wrap an int32 count that has saturated at 2**31 - 1.
  t = _float(count) + 1 - _float(offset)
  return jnp.maximum(t, 1)


def increasing_decay(
    exponent: jax.typing.ArrayLike = 0.8, offset: jax.typing.ArrayLike = 0
) -> Schedule:
  """The increasing decay ``b2_t = 1 - t^(-c)`` (Algorithm 6).

  ``b2_1 = 0``, so the first statistics are the first squared gradient and no
  bias correction is needed. For ``c <= 1`` old gradients fade; ``c = 1`` is a
  running average.

  Args:
    exponent: c > 0; the paper proposes 0.8 and also tries 0.5 and 1.0.
    offset: for fine-tuning, the count at which the schedule restarts (as
      `decay_offset` of `optax.adafactor`). Before it, ``t`` is clamped to 1
      (``b2 = 0``) instead of going negative.

  Returns:
    A schedule ``count -> b2_t``.

  Example:
    >>> import adafactor_optax as ao
    >>> float(ao.increasing_decay(0.8)(0)), round(float(ao.increasing_decay(1.0)(3)), 2)
    (0.0, 0.75)
  """
  _numerics.check("exponent", exponent, lambda c: c > 0, "> 0")

  def schedule(count):
    return 1.0 - _step(count, offset) ** -_float(exponent)

  return schedule


def bias_corrected_decay(b2: jax.typing.ArrayLike = 0.999) -> Schedule:
  """Adam's constant b2 with the bias correction folded in (Algorithm 3).

  ``b2_t = b2 (1 - b2^(t-1)) / (1 - b2^t)``: a moving average with this decay
  and zero initial state equals Adam's bias-corrected average with decay `b2`.

  Args:
    b2: the constant decay, in [0, 1).

  Returns:
    A schedule ``count -> b2_t``.
  """
  _numerics.check("b2", b2, lambda b: 0 <= b < 1, "in [0, 1)")
  # 1 - b2^t as -expm1(t log b2): in float32 the direct form loses five digits
  # to cancellation for b2 = 0.999; log b2 is taken in float64 when b2 is known.
  concrete = _numerics.concrete_value(b2)
  log_b2 = np.log(concrete) if concrete is not None else None

  def schedule(count):
    t = _step(count)
    log_beta = _float(log_b2) if log_b2 is not None else jnp.log(_float(b2))
    return _float(b2) * jnp.expm1((t - 1.0) * log_beta) / jnp.expm1(t * log_beta)

  return schedule


def inverse_sqrt_step(
    max_step: jax.typing.ArrayLike = 1e-2,
    warmup_rate: jax.typing.ArrayLike | None = None,
) -> Schedule:
  """The paper's step schedule ``s_t = min(max_step, 1/sqrt(t))``.

  With `warmup_rate` it is the paper's warmup schedule
  ``s_t = min(max_step, warmup_rate * t, 1/sqrt(t))`` (the paper uses 1e-6 and
  no cap). Used as the relative step rho_t it is Algorithm 6's default.

  Args:
    max_step: the cap (1e-2 in the paper).
    warmup_rate: slope of a linear warmup, or None for no warmup.

  Returns:
    A schedule ``count -> s_t``.
  """
  _numerics.check("max_step", max_step, lambda s: s > 0, "> 0")
  if warmup_rate is not None:
    _numerics.check("warmup_rate", warmup_rate, lambda s: s > 0, "> 0")

  def schedule(count):
    t = _step(count)
    step = jnp.minimum(_float(max_step), jax.lax.rsqrt(t))
    if warmup_rate is not None:
      step = jnp.minimum(step, _float(warmup_rate) * t)
    return step

  return schedule
