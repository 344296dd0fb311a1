"""Optimizer state that is sharded like the parameters it belongs to.

Every array of this package's state is the shape of its parameter, or that
shape with some axes set to 1 (the reduced axes of a `FactoredMoment`), or a
scalar count. So the state's sharding follows from the parameters' by one rule:
an axis kept at the parameter's size keeps the parameter's mesh axes, an axis
reduced to 1 is replicated, an axis divided into blocks (the per-block scales
of int8 momentum, `_quantize.py`) keeps them, and scalars are replicated. A factored matrix
sharded ``P('data', 'model')`` has ``v_row`` sharded ``P('data', None)`` and
``v_col`` ``P(None, 'model')``: each device holds only its own slice of the
row and column statistics, and the update step communicates O(n + m) values per
matrix, never O(n m).

Two halves of the same rule live here:

- `zeros_like_param` builds the zeros of `init` from the parameter, so that
  `jax.jit(tx.init)(params)` places the state like the parameters in both mesh
  modes: in Explicit mode the sharding is part of the parameter's type, in Auto
  mode the data dependence lets the sharding propagator see it.
- `state_partition_specs` and `state_shardings` compute the same placement
  without running anything (`jax.eval_shape`), for `out_shardings`, for
  checkpoint restore targets, and for any other place that needs the state's
  shardings before the state exists.

Flax trainers that read the state's shardings from the state itself (linen's
boxes over a whole TrainState, NNX's Variable metadata) need neither:
`with_flax_metadata` (`_flax.py`, applied by `adafactor`) boxes each state
array with names by this same rule.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec


def zeros_like_param(
    param: jax.Array | jax.ShapeDtypeStruct, shape: Sequence[int], dtype: Any
) -> jax.Array:
  """Zeros of `shape` in `dtype`, placed like `param` with its size-1 axes replicated.

  `shape` is the parameter's shape, possibly with some axes set to 1. The
  zeros are selected from the parameter (never computed from its values, so
  Inf and NaN parameters still give zeros): the data dependence is what lets
  the sharding propagator of a jitted `init` in Auto mode give the state the
  parameter's sharding; ``jnp.zeros(shape)`` has none, and comes out
  replicated. The reduced axes are reduced with `max`, which replicates them.

  A `jax.ShapeDtypeStruct` parameter (an abstract parameter, as optax's own
  transforms accept in `init`) has no values to select from: its zeros are
  built directly, placed by its ``.sharding`` when it has one on a concrete
  mesh (`reduced_sharding`), else on the default device, as optax does.

  Args:
    param: the parameter (array, tracer or `jax.ShapeDtypeStruct`).
    shape: the state array's shape, ``param.shape`` with some axes set to 1.
    dtype: the state array's dtype.

  Returns:
    An array of zeros of `shape` and `dtype`.
  """
  shape = tuple(shape)
  if not _is_reduced(shape, tuple(param.shape)):
    raise ValueError(f"shape {shape} is not {param.shape} with some axes set to 1")
  if isinstance(param, jax.ShapeDtypeStruct):
    sharding = reduced_sharding(param.sharding, tuple(param.shape), shape)
    return jnp.zeros(shape, dtype, device=sharding)
  # Not jnp.zeros_like: in Auto mode it pins the zeros to the (unknown, hence
  # replicated) sharding of the parameter's type instead of leaving it to propagation.
  # abs: complex parameters have real statistics. The reduction comes before the
  # select: after XLA folds the select to a constant, a reduction of that
  # full-size constant would be evaluated at compile time (seconds for large
  # parameters); this way only the small result is a constant.
  source = jnp.abs(jnp.asarray(param))
  axes = tuple(i for i, (s, n) in enumerate(zip(shape, param.shape)) if s != n)
  if axes:
    source = jnp.max(source, axis=axes, keepdims=True, initial=0)  # zero-size axes too
  return jnp.where(False, source, 0).astype(dtype)


def _is_reduced(shape: tuple[int, ...], param_shape: tuple[int, ...]) -> bool:
  """Whether `shape` is `param_shape` with some axes (or none) set to 1."""
  return len(shape) == len(param_shape) and all(
      s in (1, n) for s, n in zip(shape, param_shape))


def _spec_for(leaf_shape: tuple[int, ...], param_shape: tuple[int, ...], spec: Any):
  """The spec of a state array of `leaf_shape` that belongs to a parameter.

  Returns None when the leaf is not the parameter's shape (with some axes set
  to 1); the caller then replicates it.
  """
  if len(leaf_shape) != len(param_shape) or any(
      s != 1 and (n % s if s else n) for s, n in zip(leaf_shape, param_shape)
  ):
    return None
  entries = tuple(spec) + (None,) * (len(param_shape) - len(spec))
  # An axis of size 1 is replicated; one of the parameter's size, or of a
  # divisor of it (the per-block scales of `BlockQuantized`), keeps its mesh axes.
  return PartitionSpec(
      *(e if s != 1 or n == 1 else None for e, s, n in zip(entries, leaf_shape, param_shape))
  )


def reduced_sharding(
    sharding: jax.sharding.Sharding | None, param_shape: tuple[int, ...], shape: tuple[int, ...]
) -> jax.sharding.Sharding | None:
  """Where to place a state array of `shape` whose parameter has `sharding`.

  A `NamedSharding` on a concrete mesh keeps the parameter's mesh axes on the
  axes `shape` keeps, and replicates the axes reduced to 1 (`_spec_for`).
  Any other sharding is kept for an array of the parameter's own shape.

  Returns:
    The sharding, or None (the default device) when there is none to follow:
    no sharding, a sharding on an `AbstractMesh` (nothing to place on), or one
    that cannot describe the reduced shape.
  """
  if isinstance(sharding, NamedSharding):
    if not isinstance(sharding.mesh, jax.sharding.Mesh):
      return None
    spec = _spec_for(shape, param_shape, sharding.spec)
    return NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)
  if sharding is not None and shape == param_shape:
    return sharding
  return None


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, PartitionSpec)


def _match_param(path: tuple[Any, ...], params_by_path: dict[tuple[Any, ...], Any]):
  """The parameter a state leaf at `path` belongs to, or None.

  A state leaf belongs to the parameter whose path is the longest run of keys
  in its own path that ends at the leaf or one key before it (``.v_row`` and
  ``.v_col`` of a `FactoredMoment`): ``[0].nu['dense']['w'].v_row`` belongs to
  ``['dense']['w']``.
  """
  for end in (len(path), len(path) - 1):
    for start in range(end + 1):
      found = params_by_path.get(tuple(path[start:end]))
      if found is not None:
        return found
  return None


def state_partition_specs(
    tx: optax.GradientTransformation, params: optax.Params, param_specs: Any
) -> Any:
  """The `PartitionSpec` of every array in ``tx.init(params)``, without running it.

  Each state array that is its parameter's shape gets the parameter's spec;
  one with some axes reduced to 1 (`FactoredMoment` rows and columns) gets the
  spec with those entries set to None; anything else (counts,
  hyperparameters, placeholders) is replicated, ``PartitionSpec()``.

  Works for this package's transforms and for any optax transform whose state
  holds params-shaped trees (`optax.chain`, `optax.masked`,
  `optax.MultiSteps`, `optax.inject_hyperparams`, `optax.adam`, ...).

  Args:
    tx: the optimizer.
    params: the parameters: arrays or `jax.ShapeDtypeStruct` leaves.
    param_specs: a tree with `params`' structure of mesh-axis `PartitionSpec` leaves
      (None means replicated), e.g. ``flax.linen.get_partition_spec(...)`` or
      ``flax.nnx.get_partition_spec(...)`` translated to mesh axes with
      ``flax.linen.logical_to_mesh_axes(spec, rules)``.

  Returns:
    A tree with the state's structure and a `PartitionSpec` at every leaf.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import adafactor_optax as ao
    >>> params = {"w": jax.ShapeDtypeStruct((512, 256), jnp.float32)}
    >>> specs = ao.state_partition_specs(ao.adafactor(), params, {"w": P("data", "model")})
    >>> specs[0].nu["w"]
    FactoredMoment(v_row=P('data', None), v_col=P(None, 'model'))
  """
  abstract_state = jax.eval_shape(tx.init, params)
  specs_leaves = jax.tree.leaves(param_specs, is_leaf=_is_spec)
  params_with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  if len(specs_leaves) != len(params_with_path):
    raise ValueError(
        f"param_specs has {len(specs_leaves)} leaves but params has {len(params_with_path)}; "
        "give one PartitionSpec (or None) per parameter, in a tree like params."
    )
  params_by_path = {
      tuple(path): (jnp.shape(p), PartitionSpec() if s is None else s)
      for (path, p), s in zip(params_with_path, specs_leaves)
  }

  def leaf_spec(path, leaf):
    found = _match_param(tuple(path), params_by_path)
    if found is None:
      return PartitionSpec()
    spec = _spec_for(tuple(leaf.shape), found[0], found[1])
    return PartitionSpec() if spec is None else spec

  return jax.tree_util.tree_map_with_path(leaf_spec, abstract_state)


def state_shardings(
    tx: optax.GradientTransformation,
    params: optax.Params,
    param_shardings: Any = None,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> Any:
  """The `NamedSharding` of every array in ``tx.init(params)``, without running it.

  The placement of `state_partition_specs`, on the parameters' mesh: use it
  as ``out_shardings`` of a jitted init or update, or to build restore targets
  for a checkpoint (``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``).

  Args:
    tx: the optimizer.
    params: the parameters: arrays or `jax.ShapeDtypeStruct` leaves.
    param_shardings: a tree like `params` of `NamedSharding` leaves, or of
      `PartitionSpec` leaves together with `mesh`. Default: each parameter's own
      ``.sharding`` (sharded arrays, or shape structs with a sharding).
    mesh: the mesh for `PartitionSpec` leaves; default, the mesh of the first
      `NamedSharding` in `param_shardings`.

  Returns:
    A tree with the state's structure and a `NamedSharding` at every leaf.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import adafactor_optax as ao
    >>> mesh = jax.sharding.AbstractMesh((1, 1), ("data", "model"))
    >>> params = {"b": jax.ShapeDtypeStruct((256,), jnp.float32)}
    >>> ao.state_shardings(ao.adafactor(), params, {"b": P("model")}, mesh=mesh)[0].nu["b"].spec
    P('model',)
  """
  if param_shardings is None:
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
  leaves = jax.tree.leaves(param_shardings, is_leaf=_is_spec)
  if mesh is None:
    named = [s for s in leaves if isinstance(s, NamedSharding)]
    if not named:
      raise ValueError("give mesh=..., or NamedShardings from which to take it")
    mesh = named[0].mesh
  specs = jax.tree.map(
      lambda s: s.spec if isinstance(s, NamedSharding) else s, param_shardings, is_leaf=_is_spec
  )
  state_specs = state_partition_specs(tx, params, specs)
  abstract_state = jax.eval_shape(tx.init, params)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, _divisible(spec, leaf.shape, mesh)),
      state_specs,
      abstract_state,
      is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def _divisible(spec: PartitionSpec, shape: tuple[int, ...], mesh: Any) -> PartitionSpec:
  """`spec` with the axes that its mesh axes do not divide evenly replicated.

  Only the per-block scales of int8 momentum can have such an axis (fewer
  blocks than devices along it); the parameters' own axes pass unchanged.
  """
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

  def fits(entry, n):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    count = 1
    for name in names:
      count *= sizes[name]
    return n % count == 0

  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  return PartitionSpec(*(e if fits(e, n) else None for e, n in zip(entries, shape)))
