"""Stochastic rounding of low-precision parameters (bfloat16, float16).

With bfloat16 parameters, round-to-nearest loses every update smaller than half
a unit in the last place (ulp) of the parameter: 8 bits of significand keep
``1 + 1e-4`` at 1 forever. Stochastic rounding rounds the exact sum ``X + u`` up
or down at random, with the probability of each neighbour proportional to its
closeness, so the stored parameter is unbiased, ``E[X_new] = X + u``, and small
updates accumulate in expectation. The tensor2tensor implementation of
Adafactor (Shazeer & Stern, arXiv:1804.04235) stored bfloat16 parameters this
way.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import _leafwise, _numerics


class StochasticRoundingState(NamedTuple):
  """State of `stochastic_rounding`: the number of updates so far (int32)."""

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do


def is_low_precision(dtype) -> bool:
  """Whether parameters of `dtype` are rounded stochastically (floats under 32 bits)."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def round_stochastically(x: jax.Array, dtype, bits: jax.Array) -> jax.Array:
  """Float32 `x` rounded to the narrower float `dtype`, up or down at random.

  With ``lo <= |x| <= hi`` the two neighbours of ``|x|`` in `dtype`, the result
  has magnitude `hi` with probability ``(|x| - lo) / (hi - lo)``, else `lo`
  (with x's sign): ``E[result] = x`` exactly, and the result is never more
  than one ulp of `dtype` from `x`. Computed on the float32 bits: the k
  significand bits that `dtype` drops (16 for bfloat16; 13 for float16 in its
  normal range, more below it) get k random bits added and are then cleared,
  which carries into the kept bits with exactly that probability. NaN and
  infinities stay what they are; a value within an ulp of `dtype`'s largest
  finite value can round up to infinity.

  Args:
    x: float32 values.
    dtype: the narrow target dtype (bfloat16, float16).
    bits: random uint32 of `x`'s shape.

  Returns:
    `x` in `dtype`.
  """
  wide, narrow = jnp.finfo(jnp.float32), jnp.finfo(dtype)
  raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
  sign, magnitude = raw & jnp.uint32(0x80000000), raw & jnp.uint32(0x7FFFFFFF)
  drop = jnp.uint32(wide.nmant - narrow.nmant)
  tiny = None
  if narrow.minexp > wide.minexp:  # float16: coarser grids below its normal range
    exponent = (magnitude >> wide.nmant).astype(jnp.int32) + (wide.minexp - 1)
    drop = drop + jnp.clip(narrow.minexp - exponent, 0, 24).astype(jnp.uint32)
    # Below the smallest subnormal the neighbours are 0 and `tiny`, more than
    # a binade of x apart: draw directly, `tiny` with probability |x| / tiny.
    smallest = jnp.float32(narrow.smallest_subnormal)
    uniform = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
    up = uniform < jax.lax.bitcast_convert_type(magnitude, jnp.float32) / smallest
    tiny = jnp.where(up, jax.lax.bitcast_convert_type(smallest, jnp.uint32), jnp.uint32(0))
  mask = (jnp.uint32(1) << jnp.minimum(drop, jnp.uint32(wide.nmant))) - jnp.uint32(1)
  rounded = (magnitude + (bits & mask)) & ~mask
  if tiny is not None:
    rounded = jnp.where(drop > wide.nmant, tiny, rounded)
  # NaN and infinities (all exponent bits set) are kept as they are.
  rounded = jnp.where(magnitude >= jnp.uint32(0x7F800000), magnitude, rounded)
  return jax.lax.bitcast_convert_type(sign | rounded, jnp.float32).astype(dtype)


def rounded_update(param: jax.Array, update: jax.Array, bits: jax.Array) -> jax.Array:
  """The update that moves `param` to ``SR(param + update)`` under `optax.apply_updates`.

  The new value ``X_new = SR(X + u)`` is rounded stochastically from the sum
  computed in float32, and returned as the difference ``X_new - X``, in
  `update`'s dtype. For bfloat16 or float16 `X` and `u`, ``X + u`` is exact in
  float32 for terms up to 16 binades apart (further apart, `u` is far below
  half an ulp of `X`). When ``|u| <= |X|`` (every update that stochastic
  rounding is for), ``X_new - X`` is exact in the parameter's dtype, so
  `optax.apply_updates`' ``(X + (X_new - X)).astype(X.dtype)`` is `X_new`
  itself; for a larger update (the parameter more than doubles or changes
  sign) the difference can need one more bit, and the result can then land
  one ulp from `X_new`. Both tested exhaustively over bfloat16 pairs
  (tests/test_rounding.py).
  """
  wide = _numerics.compute_dtype(param.dtype)
  x = param.astype(wide)
  new = round_stochastically(x + update.astype(wide), param.dtype, bits)
  return (new.astype(wide) - x).astype(update.dtype)


def random_bits(key: jax.Array, shape: tuple[int, ...], stream: Any = 0) -> jax.Array:
  """Random uint32 of `shape` from a JAX key, computed where they are used.

  Element ``i`` is a hash of the key's two words, of `stream` and of i's index
  along each axis (the ``lowbias32`` integer hash of C. Wellons, applied once
  per axis): elementwise arithmetic on ``iota``s, so XLA fuses it into the
  rounding that reads it (`jax.random.bits`' threefry is written to memory on
  XLA:CPU, a buffer of the parameter's size), and each device of a sharded
  computation computes only its own shard's values, equal to those on one
  device. Different streams (one per leaf) of one key are different hashes:
  a key derived per leaf with `jax.random.fold_in` would cost a threefry per
  leaf, which XLA:TPU runs as ~110 separate tiny instructions.
  """
  k = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  h = jnp.full(shape, _mix32(k[0] + jnp.asarray(stream).astype(jnp.uint32)), jnp.uint32)
  for axis in range(len(shape)):
    h = _mix32(h + jax.lax.broadcasted_iota(jnp.uint32, shape, axis))
  return _mix32(h ^ k[-1])


def _mix32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash with good avalanche (``lowbias32``)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _check_leaf(path, param) -> None:
  if not jnp.issubdtype(param.dtype, jnp.inexact):
    raise TypeError(
        f"stochastic_rounding: parameter {jax.tree_util.keystr(path)} has dtype "
        f"{param.dtype}; only floating-point parameters can be rounded. Mask it out "
        "with optax.masked."
    )


def stochastic_rounding(seed: int = 0) -> optax.GradientTransformation:
  """Makes `optax.apply_updates` round low-precision parameters stochastically.

  Put it at the end of a chain. For each bfloat16 or float16 parameter X with
  update u it returns ``SR(X + u) - X``, so that
  ``optax.apply_updates(params, updates)`` gives ``SR(X + u)``: X + u computed
  in float32, then rounded up or down at random with ``E[X_new] = X + u``,
  never more than one ulp from it (`rounded_update` says when the bfloat16
  addition in `apply_updates` is exact). Float32, float64 and complex
  parameters get their updates back untouched.

  The random bits come from ``fold_in(key(seed), count)``, with `count` the
  number of updates so far, kept in the state: no key is passed to `update`,
  and a resumed run draws the same bits (bit-identical). Each element's bits
  are a hash of that key, of the leaf's position in the tree and of the
  element's index (`random_bits`): leaves of one shape draw independent bits,
  and under sharding each device computes only its own shard's bits, the same
  as on one device, with no communication.

  Args:
    seed: seed of the random bits.

  Returns:
    An `optax.GradientTransformation`; its update needs `params`.

  Raises:
    TypeError: in `update`, for an integer or boolean parameter (naming it).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import adafactor_optax as ao
    >>> tx = ao.stochastic_rounding()
    >>> params = jnp.ones(10000, jnp.bfloat16)  # 1e-3 is an eighth of its ulp
    >>> u, _ = tx.update(jnp.full(10000, 1e-3, jnp.bfloat16), tx.init(params), params)
    >>> new = optax.apply_updates(params, u)
    >>> sorted(set(new.tolist())), round(float(new.astype(jnp.float32).mean()), 3)
    ([1.0, 1.0078125], 1.001)
  """

  def init_fn(params):
    del params
    return StochasticRoundingState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("stochastic_rounding needs params: call update(updates, state, params).")
    jax.tree_util.tree_map_with_path(_check_leaf, params)
    step_key = jax.random.fold_in(jax.random.key(seed), state.count)
    leaves, treedef = jax.tree.flatten(updates)
    out = []
    param_leaves = treedef.flatten_up_to(params)  # type: ignore[attr-defined]  # (no stub)
    first = _leafwise.first_leaf()  # traced where leaves share a trace
    for i, (u, p) in enumerate(zip(leaves, param_leaves)):
      if is_low_precision(p.dtype):
        u = rounded_update(p, u, random_bits(step_key, p.shape, stream=first + i))
      out.append(u)
    return jax.tree.unflatten(treedef, out), StochasticRoundingState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
