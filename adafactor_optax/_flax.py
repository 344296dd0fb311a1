"""Flax's own sharding metadata on the state: boxed (linen) and Variable (NNX) parameters.

Flax trainers take the optimizer state's shardings from the state itself:
linen's ``nn.get_sharding(jax.eval_shape(create_train_state), mesh)`` reads
the `flax.core.meta.Partitioned` boxes of the whole TrainState, and NNX's
`nnx.Optimizer` places each state Variable by its ``out_sharding``
metadata. A transform that maps over the boxes gives every state array its
parameter's names, of the wrong rank for a factored statistic (``v_row`` of
a ``(256, 512)`` kernel named ``(None, 'data')`` is ``(256, 1)``: 'data' does not
divide 1).

`with_flax_metadata` unboxes the parameters, builds the state from the bare
arrays, and boxes each state array with names by the rule of
`state_partition_specs`: an axis kept at the parameter's size keeps its name,
an axis reduced to 1 is unnamed (None), a block axis of int8 scales keeps its
name where its mesh axes divide it, and arrays that belong to no parameter
(counts, hyperparameters) stay bare, hence replicated. Boxes that name no axes
are kept as they are, around the new value. `update` unboxes its inputs and
boxes its outputs like them.

Flax is never imported here: a tree can hold Flax boxes only once Flax is
imported, so without it every function is the identity (`_box_types`).
"""

import sys
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from adafactor_optax import _shapes, _sharding


def _box_types() -> tuple[type, ...]:
  """Flax's box classes that are already imported: AxisMetadata and nnx.Variable."""
  types = []
  meta = sys.modules.get("flax.core.meta")
  if meta is not None:
    types.append(meta.AxisMetadata)
  variablelib = sys.modules.get("flax.nnx.variablelib")
  if variablelib is not None:
    types.append(variablelib.Variable)
  return tuple(types)


def _is_box(x: Any) -> bool:
  types = _box_types()
  return bool(types) and isinstance(x, types)


def _is_variable(x: Any) -> bool:
  variablelib = sys.modules.get("flax.nnx.variablelib")
  return variablelib is not None and isinstance(x, variablelib.Variable)


def has_boxes(tree: Any) -> bool:
  """Whether `tree` holds a linen box (`AxisMetadata`) or an `nnx.Variable`."""
  if not _box_types():
    return False
  return any(_is_box(x) for x in jax.tree.leaves(tree, is_leaf=_is_box))


def unbox(tree: Any) -> Any:
  """`tree` with every box replaced by the value it holds."""

  def value(x):
    if _is_variable(x):
      return x.get_value()
    if _names_of(x) is not None:  # Partitioned: no sharding constraint (an assert in Explicit mode)
      return x.value
    return x.unbox() if _is_box(x) else x

  return jax.tree.map(value, tree, is_leaf=_is_box)


def _with_value(box: Any, value: Any) -> Any:
  """`box` around `value`, its metadata unchanged."""
  if _is_variable(box):
    return box.replace(value)
  return box.replace_boxed(value)


def rebox_like(template: Any, tree: Any) -> Any:
  """`tree` (bare arrays) boxed like `template`, a tree of the same structure with boxes."""
  return jax.tree.map(lambda t, v: _with_value(t, v) if _is_box(t) else v, template, tree,
                      is_leaf=_is_box)


def _names_of(box: Any) -> Any:
  """The axis names a box gives its value (a tuple, `PartitionSpec` or
  `NamedSharding`), or None for a box that names no axes."""
  if _is_variable(box):
    return box.get_metadata().get("out_sharding") or None
  return getattr(box, "names", None)


def _mesh_sizes(box: Any) -> dict[str, int]:
  """Sizes of the mesh axes the box's names refer to: its own mesh, else `jax.set_mesh`'s.

  Empty when neither is known; the names are then kept as they are, as
  `state_partition_specs` keeps them (it knows no mesh either).
  """
  mesh = box.get_metadata().get("mesh") if _is_variable(box) else getattr(box, "mesh", None)
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def _to_mesh_axes(box: Any, names: tuple[Any, ...]) -> tuple[Any, ...] | None:
  """`names` as mesh axes: logical names through the box's and the context's rules."""
  rules = box.get_metadata().get("sharding_rules") if _is_variable(box) else getattr(
      box, "rules", None)
  logical = type(box).__name__ == "LogicallyPartitioned" or rules is not None
  spmd = sys.modules.get("flax.core.spmd")
  if spmd is not None and (logical or spmd.get_logical_axis_rules()):
    try:
      rules = spmd.composite_rules(spmd.get_logical_axis_rules(), rules or ())
      return tuple(spmd.from_sharding_rules(names, rules))
    except Exception:  # noqa: BLE001  # names the rules do not map: keep them, as Flax does
      return None
  return names


def _divides(entry: Any, size: int, sizes: dict[str, int]) -> bool:
  """Whether the mesh axes `entry` names divide `size` (True when their sizes are unknown)."""
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  count = 1
  for axis in axes:
    if axis not in sizes:
      return True
    count *= sizes[axis]
  return size % count == 0


def state_names(box: Any, names: tuple[Any, ...], shape: tuple[int, ...],
                param_shape: tuple[int, ...]) -> tuple[Any, ...] | None:
  """The names of a state array of `shape` that belongs to the parameter in `box`.

  `state_partition_specs`' rule (`_sharding._spec_for`) on the box's names;
  an axis its mesh axes do not divide (an int8 block axis with fewer blocks
  than devices) is unnamed, as `state_shardings` does. None when the array is
  not the parameter's shape with axes reduced or divided.
  """
  spec = _sharding._spec_for(shape, param_shape, PartitionSpec(*names))  # noqa: SLF001
  if spec is None:
    return None
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  mesh_axes = _to_mesh_axes(box, entries)
  sizes = _mesh_sizes(box)
  if mesh_axes is None or not sizes:
    return entries
  return tuple(e if _divides(m, n, sizes) else None
               for e, m, n in zip(entries, mesh_axes, shape))


def _box_state_leaf(box: Any, leaf: Any, param_shape: tuple[int, ...]) -> Any:
  """`leaf` in a box like `box`, with names of its own shape, or bare."""
  names = _names_of(box)
  if names is None:
    return _with_value(box, leaf)
  spec_names = tuple(names.spec) if isinstance(names, jax.sharding.NamedSharding) else tuple(names)
  new = state_names(box, spec_names, tuple(leaf.shape), param_shape)
  if new is None:
    return leaf  # belongs to the parameter, but not of its shape: replicated
  if not _is_variable(box):
    return box.replace(value=leaf, names=new)
  # NNX's out_sharding, in the form it was given: names, a PartitionSpec or a NamedSharding.
  out_sharding: Any = new
  if isinstance(names, jax.sharding.NamedSharding):
    out_sharding = jax.sharding.NamedSharding(names.mesh, PartitionSpec(*new))
  elif isinstance(names, PartitionSpec):
    out_sharding = PartitionSpec(*new)
  return box.replace(leaf, out_sharding=out_sharding)


def box_state(state: Any, boxed_params: Any) -> Any:
  """`state` (built from the unboxed parameters) with each array boxed for its own shape."""
  boxes = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=_is_box)[0]
  by_path = {tuple(path): box for path, box in boxes if _is_box(box)}
  if not by_path:
    return state

  def leaf_box(path, leaf):
    box = _sharding._match_param(tuple(path), by_path)  # noqa: SLF001
    if box is None or not hasattr(leaf, "shape"):
      return leaf
    return _box_state_leaf(box, leaf, tuple(jax.numpy.shape(unbox(box))))

  return jax.tree_util.tree_map_with_path(leaf_box, state)


def with_flax_metadata(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """`inner`, with Flax's sharding metadata on its state, fitted to each state array.

  Given parameters in linen boxes (``nn.with_partitioning``,
  ``nn.with_logical_partitioning``: any `flax.core.meta.AxisMetadata`) or
  `nnx.Variable` s with ``out_sharding`` metadata (``nnx.with_partitioning``,
  as `nnx.Optimizer` passes them), `init` returns a state whose boxes name
  the axes of their own arrays: a factored row statistic of a kernel named
  ``('embed', 'mlp')`` is named ``('embed', None)``, its column statistic
  ``(None, 'mlp')``, momentum like the kernel, int8 scales like their
  blocks, counts bare (replicated). Linen's ``nn.get_sharding`` over a whole
  TrainState and NNX's Optimizer then place every state array as
  `state_shardings` does. `update` unboxes what it is given and boxes its
  results like its inputs. For trees without Flax boxes, and without Flax
  installed, it is `inner` itself.

  `adafactor` applies it already; wrap a chain of this package's transforms
  (``with_flax_metadata(optax.chain(...))``) the same way. Call `init` under
  ``jax.set_mesh`` (or give the boxes a mesh): only then are the mesh's axis
  sizes known, which decide whether an int8 block axis with fewer blocks than
  devices keeps its name.

  Args:
    inner: the transformation.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: in `init` and `update`, for a leaf that is not an array (a
      function, a module, a string), naming its path and type.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import adafactor_optax as ao
    >>> params = {"w": nn.Partitioned(jnp.ones((256, 512)), ("data", "model"))}
    >>> state = ao.adafactor().init(params)
    >>> state[0].nu["w"].v_row.names, state[0].nu["w"].v_col.names
    (('data', None), (None, 'model'))
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _shapes.check_arrays("tx.init", "parameter", unbox(params))
    if not has_boxes(params):
      return inner.init(params)
    return box_state(inner.init(unbox(params)), params)

  def update_fn(updates, state, params=None, **extra_args):
    _shapes.check_arrays("tx.update", "update", unbox(updates))
    if params is not None:
      _shapes.check_arrays("tx.update", "parameter", unbox(params))
    if not has_boxes((updates, state, params)):
      return inner.update(updates, state, params, **extra_args)
    new_updates, new_state = inner.update(
        unbox(updates), unbox(state), unbox(params), **extra_args)
    return rebox_like(updates, new_updates), rebox_like(state, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
