"""8-bit storage with per-block scales, for the momentum accumulator.

An array is stored as int8 values and one float32 scale per block of
consecutive elements along its last axis (`num_blocks`: 128 to 255 elements,
a power-of-two number of blocks; one block when the axis has no such split):
the block's largest magnitude, so each block uses the full int8 range whatever
the others' scale. The scales have the array's shape with the last axis
divided into blocks, so they are sharded like their blocks by the same rule as
the rest of the state (`_sharding.py`), and an array of n elements costs at
most ``n + 4 n / 128`` bytes, 1.03 per element.
"""

import collections.abc
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

BLOCK_SIZE = 128
_LEVELS = 127  # int8 values in [-127, 127]: symmetric around zero


class BlockQuantized(NamedTuple):
  """An array stored in 8 bits.

  Attributes:
    values: int8, the array's shape; the element is ``values * scales / 127``.
    scales: float32, the array's shape with the last axis set to its number
      of blocks; each block's largest magnitude. A scalar array has a scalar
      scale.
  """

  values: jax.Array
  scales: jax.Array


def num_blocks(shape: Sequence[int]) -> int:
  """Blocks along the last axis: the most, a power of two, of equal size >= `BLOCK_SIZE`.

  A power of two, so that the blocks split evenly over mesh axes of
  power-of-two sizes, as the parameter's last axis does: 2048 -> 16 blocks of
  128, 768 -> 4 of 192, 50257 -> 1.
  """
  n = shape[-1] if len(shape) else 1
  blocks = 1
  while n % (2 * blocks) == 0 and n // (2 * blocks) >= BLOCK_SIZE:
    blocks *= 2
  return blocks


def scales_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """The shape of the scales of an array of `shape`."""
  shape = tuple(shape)
  return shape[:-1] + (num_blocks(shape),) if shape else ()


def _explicit_spec(x: jax.Array) -> Any:
  """`x`'s `PartitionSpec` when it is sharded over Explicit mesh axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(entry is None for entry in spec):
    return None  # Auto mode (the propagator decides), or unsharded
  return spec


def _axis_devices(entry: Any, mesh: Any) -> int:
  names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  count = 1
  for name in names:
    count *= sizes[name]
  return count


def _blocks(x: jax.Array) -> jax.Array:
  """`x` as ``(..., blocks, block_size)``; a scalar as ``(1, 1)``.

  Under Explicit mesh axes the reshape states where its result lies: the last
  axis' mesh axes move to the block axis when they divide the number of
  blocks, else that axis is gathered (an int8 momentum with fewer blocks than
  devices along it), as `state_shardings` replicates its scales.
  """
  if x.ndim == 0:
    return x.reshape(1, 1)
  nb = num_blocks(x.shape)
  shape = x.shape[:-1] + (nb, x.shape[-1] // nb)
  spec = _explicit_spec(x)
  if spec is None:
    return x.reshape(shape)
  entries = tuple(spec) + (None,) * (x.ndim - len(spec))
  last = entries[-1]
  if nb % _axis_devices(last, jax.typeof(x).sharding.mesh):
    last = None
  return jax.lax.reshape(x, shape, out_sharding=_on_mesh_of(x, (*entries[:-1], last, None)))


def _unblocks(blocks: jax.Array, like: jax.Array) -> jax.Array:
  """`blocks` back in the shape of `like`, and under Explicit axes in its sharding."""
  spec = _explicit_spec(like)
  if spec is None:
    return blocks.reshape(like.shape)
  return jax.lax.reshape(blocks, like.shape, out_sharding=_on_mesh_of(like, tuple(spec)))


def _on_mesh_of(x: jax.Array, entries: tuple[Any, ...]) -> NamedSharding:
  """A sharding on `x`'s mesh: a bare PartitionSpec needs a mesh context, eager code has none."""
  return NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec(*entries))


# On TPU, a float32 array (..., R, C) lies in tiles of 8 rows by 128 columns. When
# the blocks are 128 long and R a multiple of 8, `_tiles` views it as (..., R / 8,
# C / 128, 8, 128), one tile per last two axes, which the TPU compiler keeps as a
# bitcast: it reduces each block in the kernel that computes m_t, and broadcasts
# the scales back in the kernel that writes the values. The (..., blocks,
# block_size) reshape of `_blocks` is a relayout there (a float32 copy of m_t for
# the block max, the per-block factors broadcast to the parameter's size: 0.45x
# the parameter bytes of temporaries, v5p, 195 leaves). Other backends and
# shapes keep `_blocks`; both compute the same values.
_TILE = (8, 128)


def _tiled(shape: Sequence[int]) -> bool:
  """Whether the blocks of an array of `shape` are whole rows of TPU tiles."""
  return (len(shape) >= 2 and shape[-2] % _TILE[0] == 0
          and shape[-1] // num_blocks(shape) == _TILE[1])


def _tiles(x: jax.Array) -> jax.Array:
  """(..., R, C) as (..., R / 8, C / 128, 8, 128): its TPU tiles."""
  rows, lanes = _TILE
  lead, r, c = x.shape[:-2], x.shape[-2], x.shape[-1]
  return jnp.swapaxes(x.reshape(lead + (r // rows, rows, c // lanes, lanes)), -3, -2)


def _tile_scales(t: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Per-tile-row values (..., R / 8, C / 128, 8) in the scales' shape of `shape`."""
  return jnp.swapaxes(t, -2, -1).reshape(scales_shape(shape))


def _per_tile(s: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Scales-shaped `s` repeated over each block, in `shape`, through the tiles."""
  rows, lanes = _TILE
  lead, r, nb = tuple(shape[:-2]), shape[-2], num_blocks(shape)
  t = jnp.swapaxes(s.reshape(lead + (r // rows, rows, nb)), -2, -1)
  t = jax.lax.broadcast_in_dim(t, lead + (r // rows, nb, rows, lanes), tuple(range(len(lead) + 3)))
  return jnp.swapaxes(t, -3, -2).reshape(tuple(shape))


def _on_tpu_tiles(x: jax.Array) -> bool:
  """Whether `x` takes the tiled form on TPU: tiled blocks, no Explicit mesh axes."""
  return _tiled(x.shape) and _explicit_spec(x) is None


def _quantize_tiles(x: jax.Array) -> BlockQuantized:
  scales = _tile_scales(jnp.max(_tiles(jnp.abs(x)), axis=-1, initial=0), x.shape)
  inverse = jnp.where(scales > 0, _LEVELS / scales, 0).astype(x.dtype)
  return BlockQuantized(jnp.round(x * _per_tile(inverse, x.shape)).astype(jnp.int8), scales)


def _quantize_blocks(x: jax.Array) -> BlockQuantized:
  blocks = _blocks(x)
  scales = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True, initial=0)
  inverse = jnp.where(scales > 0, _LEVELS / scales, 0).astype(blocks.dtype)
  values = jnp.round(blocks * inverse).astype(jnp.int8)
  return BlockQuantized(_unblocks(values, x), scales.reshape(scales_shape(x.shape)))


# On CPU, the flat form. XLA:CPU wrote m_t in float32 for the block max (0.74x
# the parameter bytes of temporaries, 195 leaves): a float max goes to a library
# fusion (YNNPACK) that takes only the abs before it, and a max over more than 32
# elements becomes a reduce-window that XLA does not fuse with its producer. The
# largest magnitude is also the largest of the magnitudes' bits read as int32
# (unsigned floats order as their bits, infinities and NaN included), and an
# int32 max in two stages of at most 32 elements stays in XLA's own fusion, which
# computes m_t as it reads it. Two more things keep the int8 state updated in
# place rather than copied each step: the values are computed and read in the
# array's own shape, the per-block factors broadcast to it (XLA cannot write a
# buffer in place through the (..., blocks, block_size) reshape); and a NaN is
# stored as 0 by a select on m_t, an operation of two full-size operands, which
# XLA writes once for the update to read rather than recompute it from the old
# values in the update's own fusion. The blocks' bits for finite values; a NaN
# makes its block's scale NaN, as the float64 reference's max does (the library
# max skips it).
_STAGE = 32
_SMALLEST_NORMAL_BITS = 0x00800000  # float32's smallest normal, 2^-126, as int32 bits


def _stages(size: int) -> int | None:
  """The inner stage of a two-stage max over `size` elements (both <= 32), or None."""
  inner = max(k for k in range(1, _STAGE + 1) if size % k == 0)
  return inner if size // inner <= _STAGE else None


def _flat(x: jax.Array) -> bool:
  """Whether `x` takes the flat form on CPU: blocks that split, no Explicit mesh axes."""
  return (x.ndim >= 1 and _stages(x.shape[-1] // num_blocks(x.shape)) is not None
          and _explicit_spec(x) is None)


@jax.custom_jvp
def _block_max_by_bits(blocks: jax.Array) -> jax.Array:
  """Float32 `blocks` (..., blocks, size): each block's largest magnitude (..., blocks).

  Differentiable as the float max is (the bits carry no derivative): the tangent of
  the elements that attain the max, signed, averaged over them when they tie.
  """
  size = blocks.shape[-1]
  inner = _stages(size) or 1
  bits = jax.lax.bitcast_convert_type(blocks, jnp.int32) & jnp.int32(0x7FFFFFFF)
  bits = bits.reshape(blocks.shape[:-1] + (size // inner, inner))
  top = jnp.max(jnp.max(bits, axis=-1, initial=0), axis=-1, initial=0)
  # XLA:CPU flushes float32 subnormals to zero: the float max of a block of them is 0.
  top = jnp.where(top < _SMALLEST_NORMAL_BITS, 0, top)
  return jax.lax.bitcast_convert_type(top, jnp.float32)


@_block_max_by_bits.defjvp
def _block_max_by_bits_jvp(primals, tangents):
  (blocks,), (tangent,) = primals, tangents
  top = _block_max_by_bits(blocks)
  attains = jnp.abs(blocks) == top[..., None]
  ties = jnp.maximum(jnp.sum(attains, axis=-1), 1).astype(blocks.dtype)
  return top, jnp.sum(jnp.where(attains, jnp.sign(blocks) * tangent, 0), axis=-1) / ties


def _per_block(s: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Scales-shaped `s` repeated over each block, in `shape`."""
  shape = tuple(shape)
  nb = num_blocks(shape)
  lead = shape[:-1]
  blocks = jax.lax.broadcast_in_dim(s, lead + (nb, shape[-1] // nb), tuple(range(len(lead) + 1)))
  return blocks.reshape(shape)


def _quantize_flat(x: jax.Array) -> BlockQuantized:
  scales = _block_max_by_bits(_blocks(x)).reshape(scales_shape(x.shape))
  inverse = jnp.where(scales > 0, _LEVELS / scales, 0).astype(x.dtype)
  values = jnp.round(x * _per_block(inverse, x.shape)).astype(jnp.int8)
  return BlockQuantized(jnp.where(jnp.isnan(x), jnp.int8(0), values), scales)  # see above


def quantize(x: jax.Array) -> BlockQuantized:
  """`x` (float32) as int8 values rounded to nearest and per-block absmax scales."""
  forms = {}
  if _on_tpu_tiles(x):
    forms["tpu"] = _quantize_tiles
  if x.dtype == jnp.float32 and _flat(x):
    forms["cpu"] = _quantize_flat
  if forms:
    return jax.lax.platform_dependent(x, **forms, default=_quantize_blocks)
  return _quantize_blocks(x)


def is_quantized(x: Any) -> bool:
  """Whether `x` is a `BlockQuantized`, or a framework's mapping of one.

  Frameworks may hand state back as a mapping with keys ``values`` and
  ``scales`` (`flax.nnx.Optimizer` writes it back as an `nnx.State`).
  """
  return isinstance(x, BlockQuantized) or (
      isinstance(x, collections.abc.Mapping) and set(x) == {"values", "scales"})


def dequantize(q: BlockQuantized, dtype=jnp.float32) -> jax.Array:
  """The array `q` stands for, in `dtype` (computed in float32); `q` may be a mapping of it."""
  if isinstance(q, collections.abc.Mapping):
    q = BlockQuantized(q["values"], q["scales"])
  forms = {}
  if _on_tpu_tiles(q.values):
    forms["tpu"] = functools.partial(_dequantize_tiles, dtype=dtype)
  if _flat(q.values):
    forms["cpu"] = functools.partial(_dequantize_flat, dtype=dtype)
  if forms:
    return jax.lax.platform_dependent(
        q.values, q.scales, **forms, default=functools.partial(_dequantize_blocks, dtype=dtype))
  return _dequantize_blocks(q.values, q.scales, dtype=dtype)


def _dequantize_flat(values: jax.Array, scales: jax.Array, *, dtype: Any) -> jax.Array:
  step = (scales / _LEVELS).astype(jnp.float32)
  return (values.astype(jnp.float32) * _per_block(step, values.shape)).astype(dtype)


def _dequantize_tiles(values: jax.Array, scales: jax.Array, *, dtype: Any) -> jax.Array:
  step = (scales / _LEVELS).astype(jnp.float32)
  return (values.astype(jnp.float32) * _per_tile(step, values.shape)).astype(dtype)


def _dequantize_blocks(values: jax.Array, scales: jax.Array, *, dtype: Any) -> jax.Array:
  blocks = _blocks(values).astype(jnp.float32)
  step = (scales.reshape(blocks.shape[:-1] + (1,)) / _LEVELS).astype(jnp.float32)
  return _unblocks(blocks * step, values).astype(dtype)


def zeros_like_param(param: jax.Array) -> BlockQuantized:
  """Zeros for `param`, placed like it (see `_sharding.zeros_like_param`).

  Both arrays are selected from the parameter, never computed from its values,
  so a jitted `init` propagates the parameter's sharding to them: the values
  like the parameter, the scales like its blocks.
  """
  param = jnp.asarray(param)
  if not jnp.issubdtype(param.dtype, jnp.floating):
    raise TypeError(f"int8 momentum needs real floating parameters, got {param.dtype}.")
  source = jnp.abs(param)
  block_max = jnp.max(_blocks(source), axis=-1, initial=0).reshape(scales_shape(source.shape))
  return BlockQuantized(
      values=jnp.where(False, source, 0).astype(jnp.int8),
      scales=jnp.where(False, block_max, 0).astype(jnp.float32),
  )
