"""Dtype policy, block RMS and hyperparameter checks shared by the transforms."""

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype: Any) -> jnp.dtype:
  """The dtype the transforms compute and keep statistics in for `dtype`.

  float32 for bfloat16, float16 and float32 values; float64 for float64 values
  (under x64). Low-precision arithmetic never touches the statistics: f16 cannot
  hold eps1 = 1e-30 and overflows for squared gradients above ~256.

  Args:
    dtype: the dtype of a parameter, gradient or update.

  Returns:
    A real floating dtype of at least 32 bits.
  """
  real = jnp.finfo(dtype).dtype  # complex64 -> float32, complex128 -> float64
  return real if real.itemsize >= 4 else jnp.dtype(jnp.float32)


def upcast(x: jax.Array) -> jax.Array:
  """`x` in at least 32-bit precision, complex values kept complex."""
  return x.astype(upcast_dtype(x.dtype))


# XLA:CPU counts a float32 -> bfloat16 convert as expensive and will not compute it
# twice: an update narrowed at the end of one link and read by two kernels of the next
# (int8 momentum's block max and its values) is written to memory, a bfloat16 copy of
# the parameters each step (1.04x their bytes of temporaries, bfloat16 parameters with
# int8 momentum; 0.05x narrowed by bits, `benchmarks/results/step_time_cpu_bf16.md`).
# The same rounding done on the bits, integer adds and shifts, it recomputes in each
# kernel. It costs compile time (the 50m tree's bfloat16 step with int8 momentum:
# 13-16 s against 11 s), so `adafactor` asks for it only where int8 momentum follows
# (`narrowing_by_bits`). Other backends convert natively.
_HALF_ULP = 0x7FFF  # float32 bits below bfloat16's last bit, less one: ties go to even
_QUIET = 0x0040  # bfloat16's quiet-NaN bit
_BY_BITS: contextvars.ContextVar[bool] = contextvars.ContextVar("narrow_by_bits", default=False)


@contextlib.contextmanager
def narrowing_by_bits() -> Iterator[None]:
  """While tracing inside it, `narrow` rounds float32 to bfloat16 on the bits on CPU."""
  token = _BY_BITS.set(True)
  try:
    yield
  finally:
    _BY_BITS.reset(token)


@jax.custom_jvp
def _bfloat16_by_bits(x: jax.Array) -> jax.Array:
  """float32 `x` rounded to nearest bfloat16, ties to even, as ``x.astype(bfloat16)``.

  Infinities stay infinite, values past bfloat16's largest round to infinity, a NaN
  stays a NaN of its sign; subnormals round as other values (bfloat16 has
  float32's exponents).
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  odd = (bits >> 16) & jnp.uint32(1)
  rounded = (bits + jnp.uint32(_HALF_ULP) + odd) >> 16
  # A NaN whose payload lies in the dropped bits would round to an infinity.
  top = jnp.where(jnp.isnan(x), (bits >> 16) | jnp.uint32(_QUIET), rounded)
  return jax.lax.bitcast_convert_type(top.astype(jnp.uint16), jnp.bfloat16)


@_bfloat16_by_bits.defjvp
def _bfloat16_by_bits_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return _bfloat16_by_bits(x), dx.astype(jnp.bfloat16)  # as astype's derivative


def narrow(x: jax.Array, dtype: Any) -> jax.Array:
  """`x` in `dtype`, as ``x.astype(dtype)``; inside `narrowing_by_bits`, float32 ->
  bfloat16 by its bits on the CPU (see above), with the convert's values."""
  dtype = jnp.dtype(dtype)
  if not _BY_BITS.get() or x.dtype != jnp.float32 or dtype != jnp.bfloat16:
    return x.astype(dtype)
  return jax.lax.platform_dependent(x, cpu=_bfloat16_by_bits, default=lambda y: y.astype(dtype))


def upcast_dtype(dtype: Any) -> jnp.dtype:
  """`dtype` widened to at least 32 bits; complex stays complex."""
  dtype = jnp.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def as_dtype(value: jax.typing.ArrayLike, dtype: Any) -> jax.Array:
  """A hyperparameter (Python number, array or tracer) cast to `dtype`.

  Explicit, because `optax.inject_hyperparams` hands hyperparameters over in the
  parameters' dtype and strict dtype promotion rejects mixing them.
  """
  return jnp.asarray(value).astype(dtype)


def unshared(tree: Any, copies: int = 1) -> Any:
  """`tree` under names of its own, for reductions to read: `copies` of it.

  XLA:CPU fuses a reduction only with inputs that have no other use. An
  intermediate shared by a reduction and another consumer (one ``G^2`` for the
  row and the column means, one ``U`` for RMS(U) and the clipped update, one
  upcast of a bfloat16 ``X`` for RMS(X) and the new ``X``) is therefore written
  to memory in full, then read back: two extra passes over a parameter-sized
  buffer. Values passed through one optimization barrier are new names that
  XLA's common-subexpression elimination cannot merge with the originals or
  with each other, so each reduction recomputes its intermediates from the
  inputs. Operands already in memory are not copied. All copies must come from
  one call: XLA merges two identical barriers.

  Args:
    tree: arrays (a pytree) that one or more reductions read.
    copies: how many separately named copies to return.

  Returns:
    The tree itself when ``copies == 1``, else a tuple of `copies` trees.
  """
  out = jax.lax.optimization_barrier((tree,) * copies)
  return out[0] if copies == 1 else out


def block_rms(x: jax.Array, batch_axes: tuple[int, ...] = ()) -> jax.Array:
  """RMS(x) = sqrt(mean(|x|^2)) per block, in `compute_dtype`.

  Args:
    x: one parameter (or its update).
    batch_axes: axes indexing separate blocks (the layers of a scanned stack);
      by default the whole array is one block.

  Returns:
    A scalar, or with `batch_axes` an array that broadcasts against `x`.
  """
  squares = jnp.square(jnp.abs(upcast(x)))
  if not batch_axes:
    return safe_sqrt(jnp.mean(squares))
  block = tuple(a for a in range(x.ndim) if a not in batch_axes)
  return safe_sqrt(jnp.mean(squares, axis=block, keepdims=True))


@jax.custom_jvp
def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` for ``x >= 0``, whose derivative at 0 is 0 instead of infinite.

  RMS(X) of a zero-initialised parameter (a bias) is ``sqrt(0)``; through
  `jax.grad` the infinite derivative of sqrt there meets the zero derivative
  of ``mean(X^2)`` and gives NaN (inf * 0), which spreads to every
  meta-gradient (a learning rate, an initialisation) taken through an update.
  0 is the derivative of RMS along every direction in which it is smooth at
  X = 0 (the subgradient of a norm there that is closest to 0), and in Adafactor the
  parameter scale ``max(eps2, RMS(X))`` is flat below eps2 anyway. The value
  is ``jnp.sqrt(x)`` itself, bit for bit, and inside the same fusion.

  Args:
    x: non-negative values (a mean of squares).

  Returns:
    ``jnp.sqrt(x)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from adafactor_optax import _numerics
    >>> float(jax.grad(_numerics.safe_sqrt)(jnp.float32(0.0)))
    0.0
    >>> float(jax.grad(_numerics.safe_sqrt)(jnp.float32(4.0)))  # 1 / (2 sqrt(4))
    0.25
  """
  return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = jnp.sqrt(x)
  positive = x > 0
  # The where keeps 1 / (2 y) from being evaluated at y = 0 (inf * 0 = NaN).
  slope = jnp.where(positive, 0.5 / jnp.where(positive, y, 1).astype(y.dtype), 0).astype(y.dtype)
  return y, slope * t


def concrete_value(value: Any) -> float | None:
  """`value` as a float, or None when it is traced (inject_hyperparams, jit)."""
  try:
    return float(np.asarray(value))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None
  except TypeError:
    return None


def check(name: str, value: Any, ok, requirement: str) -> None:
  """Raises ValueError naming `name` when a concrete `value` fails `ok`.

  Traced values (hyperparameters injected by `optax.inject_hyperparams` and
  read inside `jax.jit`) cannot be checked and are let through.

  Args:
    name: the argument's name, as the user wrote it.
    value: the argument.
    ok: predicate on the value as a float.
    requirement: what the value must be, for the message.
  """
  if callable(value):
    return
  v = concrete_value(value)
  if v is not None and not ok(v):
    raise ValueError(f"{name} must be {requirement}, got {value!r}.")
