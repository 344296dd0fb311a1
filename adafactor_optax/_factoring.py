"""Which axes of each parameter are factored: the one place that decides.

A `FactorSpec` names a parameter's row axis, column axis and batch axes. The
second-moment statistics are averaged over columns (v_row) and over rows
(v_col) separately for every index of the other axes; the batch axes also
split the parameter into separate blocks for update clipping and the
parameter scale, so a scanned stack of layers (layers, d, f) is treated as
`layers` separate d x f matrices.

A rule maps ``(path, shape)`` to a `FactorSpec`, or None for a parameter whose
second moment is kept whole (Algorithm 5).
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import optax

DEFAULT_MIN_DIM_SIZE_TO_FACTOR = 128
ESTIMATES = ("factored", "row", "col")


class FactorSpec(NamedTuple):
  """How one parameter's second moment is estimated.

  Attributes:
    row: the row axis (negative counts from the end).
    col: the column axis.
    batch: axes indexing separate blocks: clipping and the parameter scale are
      computed per slice along them (the layer axis of a scanned stack).
      Axes named nowhere are averaged as part of each block.
    estimate: "factored" (V = R C / mean(R), Algorithm 4), "row" (V_ij = R_i,
      row means only: Table 2 row D) or "col" (V_ij = C_j, row E).
  """

  row: int
  col: int
  batch: tuple[int, ...] = ()
  estimate: str = "factored"


Rule = Callable[[tuple, tuple[int, ...]], FactorSpec | None]


def factored_axes(
    shape: Sequence[int], min_dim_size_to_factor: int = DEFAULT_MIN_DIM_SIZE_TO_FACTOR
) -> tuple[int, int] | None:
  """The (row, column) axes of the default rule: the two largest, or None.

  Both must have at least `min_dim_size_to_factor` elements; among equal sizes
  the later axis wins (as in `optax.adafactor`).

  Args:
    shape: the parameter's shape.
    min_dim_size_to_factor: the smallest axis size worth factoring.

  Returns:
    ``(row_axis, col_axis)`` with ``row_axis < col_axis``, or None.

  Example:
    >>> import adafactor_optax as ao
    >>> ao.factored_axes((512, 64, 2048)), ao.factored_axes((512,)), ao.factored_axes((512, 64))
    ((0, 2), None, None)
  """
  if len(shape) < 2:
    return None
  by_size = sorted(range(len(shape)), key=lambda axis: shape[axis])
  second, first = by_size[-2], by_size[-1]
  if shape[second] < min_dim_size_to_factor:
    return None
  return min(second, first), max(second, first)


def largest_two_axes(min_dim_size_to_factor: int = DEFAULT_MIN_DIM_SIZE_TO_FACTOR) -> Rule:
  """The default rule (optax's): factor the two largest axes, see `factored_axes`."""

  def rule(path, shape):
    del path
    axes = factored_axes(shape, min_dim_size_to_factor)
    return None if axes is None else FactorSpec(*axes)

  return rule


def last_two_axes(min_dim_size_to_factor: int = DEFAULT_MIN_DIM_SIZE_TO_FACTOR) -> Rule:
  """The tensor2tensor / PyTorch / HF convention: factor the last two axes.

  Other axes are batch axes of the factoring only; clipping and the parameter
  scale still see the whole parameter, as in those implementations.
  """

  def rule(path, shape):
    del path
    if len(shape) < 2 or min(shape[-2:]) < min_dim_size_to_factor:
      return None
    return FactorSpec(len(shape) - 2, len(shape) - 1)

  return rule


def normalize(spec: FactorSpec | None, shape: Sequence[int], where: str) -> FactorSpec | None:
  """`spec` with non-negative axes, checked against `shape`; `where` names the leaf."""
  if spec is None:
    return None
  if not isinstance(spec, FactorSpec):
    raise TypeError(f"factor rule for {where}: expected a FactorSpec or None, got {spec!r}.")
  ndim = len(shape)
  axes = (spec.row, spec.col, *spec.batch)
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(f"factor rule for {where}: axes {axes} out of range for shape {tuple(shape)}.")
  row, col, *batch = (a % ndim for a in axes)
  if len({row, col, *batch}) != len(axes):
    raise ValueError(f"factor rule for {where}: axes {axes} repeat an axis.")
  if spec.estimate not in ESTIMATES:
    raise ValueError(f"factor rule for {where}: estimate must be one of {ESTIMATES}.")
  return FactorSpec(row, col, tuple(sorted(batch)), spec.estimate)


class _Resolved:
  """A rule with its results normalised, checked and remembered per (path, shape)."""

  def __init__(self, rule: Rule):
    self._rule = rule
    self._specs: dict[tuple, FactorSpec | None] = {}

  def __call__(self, path, shape) -> FactorSpec | None:
    key = (tuple(path), tuple(shape))
    if key not in self._specs:
      spec = self._rule(path, tuple(shape))
      self._specs[key] = normalize(spec, shape, jax.tree_util.keystr(path))
    return self._specs[key]


def resolve(
    factor_rule: Any, *, factored: bool = True, min_dim_size_to_factor: int | None = None
) -> Rule:
  """The rule ``(path, shape) -> FactorSpec | None`` a user's argument stands for.

  Args:
    factor_rule: None or "largest" (`largest_two_axes`), "last_two"
      (`last_two_axes`), a callable ``(path, shape) -> FactorSpec | None``, or a
      pytree with the parameters' structure whose leaves are `FactorSpec` objects or
      None. A rule this function returned is returned as it is.
    factored: False: nothing is factored, whatever the rule.
    min_dim_size_to_factor: for the named rules.

  Returns:
    A rule; its results are normalised, checked, and computed once per
    parameter path and shape however often the rule is asked.
  """
  if not factored:
    return lambda path, shape: None
  if isinstance(factor_rule, _Resolved):
    return factor_rule
  min_dim = DEFAULT_MIN_DIM_SIZE_TO_FACTOR if min_dim_size_to_factor is None else min_dim_size_to_factor
  if factor_rule is None or factor_rule == "largest":
    rule = largest_two_axes(min_dim)
  elif factor_rule == "last_two":
    rule = last_two_axes(min_dim)
  elif callable(factor_rule):
    rule = factor_rule
  else:
    specs = dict(
        jax.tree_util.tree_flatten_with_path(
            factor_rule, is_leaf=lambda x: x is None or isinstance(x, FactorSpec)
        )[0]
    )

    def rule(path, shape):
      del shape
      if path not in specs:
        raise ValueError(f"factor_rule has no spec for {jax.tree_util.keystr(path)}.")
      return specs[path]

  return _Resolved(rule)


def block_axes_rule(factor_rule: Any, *, factored: bool = True) -> Rule | None:
  """The rule whose specs' batch axes are the blocks of clipping and the parameter scale.

  None (each parameter one block) for the named rules, which have no batch
  axes, and when nothing is factored; otherwise the resolved rule, so that
  links given the same `factor_rule` ask it once per parameter.
  """
  if factor_rule is None or isinstance(factor_rule, str) or not factored:
    return None
  return resolve(factor_rule)


def batch_axes(rule: Rule | None, path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The batch axes (blocks) `rule` gives the parameter at `path`: () for none."""
  spec = None if rule is None else rule(path, shape)
  return () if spec is None else spec.batch


def factoring_report(
    params: optax.Params, tx: optax.GradientTransformation, rule: Any = None
) -> str:
  """A markdown table: which axes each parameter factors, and state bytes vs Adam.

  The factoring shown is the one `tx` makes: it is read from the shapes of
  `tx`'s state (`jax.eval_shape` of ``tx.init``), where `scale_by_factored_rms`
  records it, so ``adafactor(min_dim_size_to_factor=32)`` is reported as it
  factors.

  Args:
    params: the parameters (arrays or `jax.ShapeDtypeStruct` leaves; nothing is
      allocated).
    tx: the optimizer, e.g. ``adafactor(...)``.
    rule: optional, the `factor_rule` `tx` was built with: adds each
      parameter's batch axes (the blocks of clipping and the parameter scale),
      which the state does not record. A rule that factors other axes than
      `tx`'s state raises a ValueError.

  Returns:
    The table, one row per parameter and a total, ready to print or log. State
    bytes per parameter are those of its second-moment statistics; the total
    counts the whole state (momentum included).

  Raises:
    ValueError: when `tx`'s state holds no second-moment statistics, or `rule`
      disagrees with it.

  Example:
    >>> import jax, jax.numpy as jnp, adafactor_optax as ao
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 512), jnp.float32)}
    >>> print(ao.factoring_report(params, ao.adafactor()).splitlines()[2])
    | ['w'] | (1024, 512) | rows 0, cols 1 | 6,144 | 4,194,304 |
  """
  state = jax.eval_shape(tx.init, params)
  nu_tree = optax.tree_utils.tree_get(state, "nu")
  if nu_tree is None:
    raise ValueError("factoring_report: tx's state holds no second-moment statistics (nu).")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  moments = treedef.flatten_up_to(nu_tree)  # type: ignore[attr-defined]  # (no stub)
  resolved = None if rule is None else resolve(rule)
  lines = ["| parameter | shape | factored | state bytes | Adam bytes |", "|---|---|---|---|---|"]
  for (path, p), nu in zip(leaves, moments):
    shape, where = tuple(p.shape), jax.tree_util.keystr(path)
    how, axes = _how_factored(shape, nu)
    if resolved is not None:
      spec = resolved(path, shape)
      expected = None if spec is None else _spec_axes(spec)
      if expected != axes and axes != ("factored",):
        raise ValueError(f"factoring_report: the rule for {where} gives {spec}, but tx's "
                         f"state factors it as: {how}. Pass the rule tx was built with.")
      if spec is not None and spec.batch:
        how += f", batch {spec.batch}"
    lines.append(f"| {where} | {shape} | {how} | {_nbytes(nu):,} | {2 * _nbytes(p):,} |")
  lines.append(f"| total (whole state) | | | {_nbytes(state):,} | {2 * _nbytes(params):,} |")
  return "\n".join(lines)


def _how_factored(shape: tuple[int, ...], nu: Any) -> tuple[str, Any]:
  """How a parameter's statistics `nu` (shapes only) factor it, read from their shapes.

  Returns:
    A description and the axes it compares against a rule's spec: ``(row, col)``
    for a factored moment, ``("means over", axes)`` for a row- or column-only
    estimate, None for a whole second moment.
  """
  if hasattr(nu, "v_row") and hasattr(nu, "v_col"):  # a FactoredMoment
    row = [a for a, (r, c) in enumerate(zip(nu.v_row.shape, nu.v_col.shape)) if c == 1 != r]
    col = [a for a, (r, c) in enumerate(zip(nu.v_row.shape, nu.v_col.shape)) if r == 1 != c]
    if len(row) == 1 and len(col) == 1:
      return f"rows {row[0]}, cols {col[0]}", (row[0], col[0])
    return "rows and columns (size-1 axes)", ("factored",)
  if tuple(nu.shape) == shape:
    return "no", None
  over = tuple(a for a, (n, m) in enumerate(zip(shape, nu.shape)) if n != m)
  return f"means over axis {', '.join(map(str, over))} only", ("means over", over)


def _spec_axes(spec: FactorSpec) -> Any:
  if spec.estimate == "factored":
    return spec.row, spec.col
  return "means over", (spec.col,) if spec.estimate == "row" else (spec.row,)


def _nbytes(tree: Any) -> int:
  return sum(x.size * jax.numpy.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
