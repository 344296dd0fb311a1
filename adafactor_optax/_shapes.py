"""Per-leaf checks of what `update` is given, made while tracing.

A gradient shaped unlike its parameter (a transposed matrix, two leaves
swapped in a tree of the right structure) otherwise fails deep inside the
arithmetic with a broadcasting error that names neither the leaf nor the
cause, or, when the shapes happen to broadcast, not at all. These checks
compare static shapes only: they run once, when `update` is traced, and
nothing of them is left in the compiled step.
"""

from typing import Any

import jax
import jax.numpy as jnp

# A shape in which None stands for any size.
Pattern = tuple[int | None, ...]


def format_shape(shape: Pattern) -> str:
  """``(256, 128)``, with ``*`` for an axis of any size."""
  dims = ["*" if n is None else str(n) for n in shape]
  return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def matches(shape: tuple[int, ...], pattern: Pattern) -> bool:
  return len(shape) == len(pattern) and all(p is None or p == n for n, p in zip(shape, pattern))


def check_shapes(
    transform: str, what: str, tree: Any, expected: Any, reference: str
) -> None:
  """Raises ValueError naming the first leaf of `tree` whose shape is not as expected.

  Args:
    transform: the transform's name, which starts the message.
    what: what the leaves of `tree` are ("gradient", "parameter").
    tree: the arrays to check.
    expected: a tree with the structure of `tree` whose leaves are the
      expected shapes (tuples; None for an axis of any size).
    reference: what the expected shapes are the shapes of, for the message
      ("the parameter the state was built for").

  Raises:
    ValueError: for a leaf of another shape, naming its path and both shapes,
      or for trees of different structure.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  try:
    patterns = treedef.flatten_up_to(expected)  # type: ignore[attr-defined]  # no stub
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"{transform}: the {what}s' tree structure differs from that of {reference}s.\n"
        f"  {what}s: {treedef}"
    ) from error
  for (path, leaf), pattern in zip(leaves, patterns):
    shape = tuple(jnp.shape(leaf))
    if not matches(shape, tuple(pattern)):
      raise ValueError(
          f"{transform}: {what} {jax.tree_util.keystr(path)} has shape {format_shape(shape)}, "
          f"but {reference} has shape {format_shape(tuple(pattern))}."
      )


def check_floating(transform: str, what: str, tree: Any) -> None:
  """Raises TypeError naming the first leaf of `tree` that is not floating-point (or complex)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{transform}: {what} {jax.tree_util.keystr(path)} has dtype {dtype}; "
          f"{what}s must be floating-point or complex."
      )


def is_array(x: Any) -> bool:
  """Whether `x` is an array: a `jax.Array`, tracer, NumPy array or `jax.ShapeDtypeStruct`."""
  return hasattr(x, "shape") and hasattr(x, "dtype")


def check_arrays(transform: str, what: str, tree: Any) -> None:
  """Raises ValueError naming the first leaf of `tree` that is not an array.

  A model object handed over whole (an equinox module, whose activation
  functions are leaves; a config string or number among the parameters)
  otherwise fails on its first ``.dtype`` with a bare AttributeError.

  Args:
    transform: what is being called ("init", "update").
    what: what the leaves of `tree` are ("parameter", "update").
    tree: the pytree to check.

  Raises:
    ValueError: for a leaf that is not an array, naming its path, its type and
      what to pass instead.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not is_array(leaf):
      raise ValueError(
          f"{transform}: {what} {jax.tree_util.keystr(path)} is a {type(leaf).__qualname__} "
          f"({leaf!r:.60}), not an array. Give the optimizer a tree of arrays only: leave "
          "other leaves out of it (for an equinox module, "
          "eqx.filter(model, eqx.is_inexact_array)), or replace them by None."
      )
