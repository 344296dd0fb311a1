"""Update clipping (Algorithm 4, line Uc_t)."""

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import _numerics


def clipping_denominator(rms: jax.Array, threshold: jax.typing.ArrayLike) -> jax.Array:
  """``max(1, RMS(U) / d)``, the divisor of update clipping, in `rms`'s dtype."""
  return jnp.maximum(1, rms / _numerics.as_dtype(threshold, rms.dtype))


def clip_to_rms(u: jax.Array, rms: jax.Array, threshold: jax.typing.ArrayLike) -> jax.Array:
  """``Uc = U / max(1, RMS(U) / d)`` given ``RMS(U)`` (per block), in `u`'s dtype."""
  u_wide = _numerics.upcast(u)
  return (u_wide / clipping_denominator(rms, threshold).astype(u_wide.dtype)).astype(u.dtype)


def clip_by_block_rms(
    threshold: jax.typing.ArrayLike = 1.0, *, batch_axes: _numerics.BatchAxes = None
) -> optax.GradientTransformation:
  """Scales each parameter's update down to an RMS of at most `threshold`.

  ``Uc = U / max(1, RMS(U) / d)``, with RMS taken over one parameter (a block)
  and computed in at least float32, so float16 updates cannot overflow in it.
  Updates whose RMS is below d are left unchanged.

  Args:
    threshold: d > 0, the largest RMS an update may have (the paper uses 1).
    batch_axes: ``(path, shape) -> axes`` whose slices are clipped separately
      (the layers of a scanned stack); None: each parameter is one block.

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

  def clip(u, batch_axes):
    return clip_to_rms(u, _numerics.block_rms(u, batch_axes), threshold)

  def update_fn(updates, state, params=None):
    del params
    return _numerics.map_blocks(clip, batch_axes, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
