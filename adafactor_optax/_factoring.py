"""Which axes of each parameter are factored: the one place that decides.

A `FactorSpec` names a parameter's row axis, column axis and batch axes. The
second-moment statistics are averaged over columns (v_row) and over rows
(v_col) separately for every index of the other axes; the batch axes also
split the parameter into separate blocks for update clipping and the
parameter scale, so a scanned stack of layers (layers, d, f) is treated as
`layers` separate d x f matrices.

A rule maps ``(path, shape)`` to a `FactorSpec`, to None for a parameter whose
second moment is kept whole (Algorithm 5), or to `DEFAULT_FACTORING` for
whatever the default rule (`largest_two_axes`, with the optimizer's
`min_dim_size_to_factor`) gives that parameter.

Example:
  >>> import jax.numpy as jnp, adafactor_optax as ao
  >>> rule = lambda path, shape: (ao.FactorSpec(-2, -1, batch=(0,)) if len(shape) == 3
  ...                             else ao.DEFAULT_FACTORING)
  >>> params = {"embed": jnp.zeros((256, 128)), "stack": jnp.zeros((4, 128, 256))}
  >>> nu = ao.adafactor(factor_rule=rule).init(params)[0].nu
  >>> nu["embed"].v_row.shape, nu["stack"].v_col.shape
  ((256, 1), (4, 1, 256))
"""

import enum
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
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


class _Default(enum.Enum):
  """The type of `DEFAULT_FACTORING` (one member, so ``is`` compares it)."""

  DEFAULT_FACTORING = "default"

  def __repr__(self) -> str:
    return "DEFAULT_FACTORING"


DEFAULT_FACTORING = _Default.DEFAULT_FACTORING
"""What a factor rule returns for "the default for this parameter".

The default rule is `largest_two_axes` with the `min_dim_size_to_factor` of
the optimizer the rule is given to, so a rule that names only the parameters
it cares about keeps every other one as factored as with no rule at all.
Returning None instead keeps the whole second moment (n x m values, not
n + m). Also allowed as a leaf of a pytree of specs.
"""

Answer = FactorSpec | None | _Default
Rule = Callable[[tuple, tuple[int, ...]], Answer]  # a user's rule
SpecRule = Callable[[tuple, tuple[int, ...]], FactorSpec | None]  # a resolved one


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


def largest_two_axes(min_dim_size_to_factor: int = DEFAULT_MIN_DIM_SIZE_TO_FACTOR) -> SpecRule:
  """The default rule (optax's): factor the two largest axes, see `factored_axes`."""

  def rule(path, shape):
    del path
    axes = factored_axes(shape, min_dim_size_to_factor)
    return None if axes is None else FactorSpec(*axes)

  return rule


def last_two_axes(min_dim_size_to_factor: int = DEFAULT_MIN_DIM_SIZE_TO_FACTOR) -> SpecRule:
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


def stacked_layers(rank: int = 3) -> Rule:
  """The rule for scanned layer stacks: each layer its own matrix, the rest by default.

  A parameter of rank `rank` is taken as a stack of matrices: its last two
  axes are factored (whatever their sizes) and its leading ``rank - 2`` axes
  (the layer axis of ``nn.scan``) are batch axes, so every layer has its own
  statistics, clipping RMS and parameter scale, as a separate matrix would
  (``FactorSpec(-2, -1, batch=(0,))`` for rank 3). Every other parameter gets
  `DEFAULT_FACTORING`: the embedding, the output projection and any other
  matrix stay factored as with no rule, and the state is the default rule's
  (batch axes cost no state).

  Args:
    rank: the rank of the stacked parameters (3: layers x rows x columns).

  Returns:
    A rule ``(path, shape) -> FactorSpec | DEFAULT_FACTORING``.

  Example:
    >>> import adafactor_optax as ao
    >>> rule = ao.stacked_layers()
    >>> rule((), (12, 512, 2048)), rule((), (32000, 512))
    (FactorSpec(row=-2, col=-1, batch=(0,), estimate='factored'), DEFAULT_FACTORING)
  """
  if rank < 3:
    raise ValueError(f"stacked_layers: rank must be at least 3 (a stack of matrices), got {rank}.")
  batch = tuple(range(rank - 2))

  def rule(path, shape):
    del path
    return FactorSpec(-2, -1, batch=batch) if len(shape) == rank else DEFAULT_FACTORING

  return rule


def normalize(spec: Answer, shape: Sequence[int], where: str) -> Answer:
  """`spec` with non-negative axes, checked against `shape`; `where` names the leaf."""
  if spec is None or spec is DEFAULT_FACTORING:
    return spec
  if not isinstance(spec, FactorSpec):
    raise TypeError(f"factor rule for {where}: expected a FactorSpec, None or "
                    f"DEFAULT_FACTORING, got {spec!r}.")
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
  """A rule with its answers normalised, checked and remembered per (path, shape).

  `DEFAULT_FACTORING` answers become the default rule's spec for
  `min_dim_size_to_factor`; `with_min_dim` binds another size and shares the
  remembered answers, so the user's rule is still asked once per parameter.
  """

  def __init__(self, rule: Rule, min_dim_size_to_factor: int = DEFAULT_MIN_DIM_SIZE_TO_FACTOR,
               answers: dict[tuple, Answer] | None = None):
    self._rule = rule
    self._min_dim = min_dim_size_to_factor
    self._default = largest_two_axes(min_dim_size_to_factor)
    self._answers: dict[tuple, Answer] = {} if answers is None else answers

  def with_min_dim(self, min_dim_size_to_factor: int) -> "_Resolved":
    if min_dim_size_to_factor == self._min_dim:
      return self
    return _Resolved(self._rule, min_dim_size_to_factor, self._answers)

  def answer(self, path, shape) -> Answer:
    """The rule's own answer, normalised: a `FactorSpec`, None or `DEFAULT_FACTORING`."""
    key = (tuple(path), tuple(shape))
    if key not in self._answers:
      spec = self._rule(path, tuple(shape))
      self._answers[key] = normalize(spec, shape, jax.tree_util.keystr(path))
    return self._answers[key]

  def __call__(self, path, shape) -> FactorSpec | None:
    spec = self.answer(path, shape)
    if spec is DEFAULT_FACTORING:
      return self._default(path, tuple(shape))
    return spec


def resolve(
    factor_rule: Any, *, factored: bool = True, min_dim_size_to_factor: int | None = None
) -> SpecRule:
  """The rule ``(path, shape) -> FactorSpec | None`` a user's argument stands for.

  Args:
    factor_rule: None or "largest" (`largest_two_axes`), "last_two"
      (`last_two_axes`), a callable ``(path, shape) -> FactorSpec | None |
      DEFAULT_FACTORING``, or a pytree with the parameters' structure whose
      leaves are `FactorSpec` objects, None or `DEFAULT_FACTORING`. A rule this
      function returned is returned as it is, bound to `min_dim_size_to_factor`
      when that is given.
    factored: False: nothing is factored, whatever the rule.
    min_dim_size_to_factor: for the named rules and `DEFAULT_FACTORING`.
      None: 128 (a returned rule: keeps the size it was bound to).

  Returns:
    A rule; its results are normalised, checked, and computed once per
    parameter path and shape however often the rule is asked.
  """
  if not factored:
    return lambda path, shape: None
  if isinstance(factor_rule, _Resolved):
    if min_dim_size_to_factor is None:
      return factor_rule
    return factor_rule.with_min_dim(min_dim_size_to_factor)
  min_dim = DEFAULT_MIN_DIM_SIZE_TO_FACTOR if min_dim_size_to_factor is None else min_dim_size_to_factor
  rule: Rule
  if factor_rule is None or factor_rule == "largest":
    rule = lambda path, shape: DEFAULT_FACTORING
  elif factor_rule == "last_two":
    rule = last_two_axes(min_dim)
  elif callable(factor_rule):
    rule = factor_rule
  else:
    specs = dict(
        jax.tree_util.tree_flatten_with_path(
            factor_rule,
            is_leaf=lambda x: x is None or x is DEFAULT_FACTORING or isinstance(x, FactorSpec),
        )[0]
    )

    def from_specs(path, shape):
      del shape
      if path not in specs:
        raise ValueError(f"factor_rule has no spec for {jax.tree_util.keystr(path)}.")
      return specs[path]

    rule = from_specs

  return _Resolved(rule, min_dim)


def block_axes_rule(factor_rule: Any, *, factored: bool = True) -> SpecRule | None:
  """The rule whose specs' batch axes are the blocks of clipping and the parameter scale.

  None (each parameter one block) for the named rules, which have no batch
  axes, and when nothing is factored; otherwise the resolved rule, so that
  links given the same `factor_rule` ask it once per parameter.
  """
  if factor_rule is None or isinstance(factor_rule, str) or not factored:
    return None
  return resolve(factor_rule)


def batch_axes(rule: SpecRule | None, path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The batch axes (blocks) `rule` gives the parameter at `path`: () for none."""
  spec = None if rule is None else rule(path, shape)
  return () if spec is None else spec.batch


def factoring_report(
    params: optax.Params,
    tx: optax.GradientTransformation,
    rule: Any = None,
    *,
    min_dim_size_to_factor: int = DEFAULT_MIN_DIM_SIZE_TO_FACTOR,
) -> str:
  """A markdown table: which axes each parameter factors, and state bytes vs Adam.

  The factoring shown is the one `tx` makes: it is read from the shapes of
  `tx`'s state (`jax.eval_shape` of ``tx.init``), where `scale_by_factored_rms`
  records it, so ``adafactor(min_dim_size_to_factor=32)`` is reported as it
  factors. A parameter whose whole second moment is kept although the
  default rule would factor it is marked **no** with the default's axes and
  the bytes it costs beyond them, and a line under the table sums them: the
  cost of a factor rule at a glance.

  Args:
    params: the parameters (arrays or `jax.ShapeDtypeStruct` leaves; nothing is
      allocated).
    tx: the optimizer, e.g. ``adafactor(...)``.
    rule: optional, the `factor_rule` `tx` was built with: adds each
      parameter's batch axes (the blocks of clipping and the parameter scale),
      which the state does not record. A rule that factors other axes than
      `tx`'s state raises a ValueError.
    min_dim_size_to_factor: that of the default rule the unfactored
      parameters are compared with (`tx`'s own, when it was given one).

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
    >>> keep_whole = lambda path, shape: None
    >>> print(ao.factoring_report(params, ao.adafactor(factor_rule=keep_whole)))
    | parameter | shape | factored | state bytes | Adam bytes |
    |---|---|---|---|---|
    | ['w'] | (1024, 512) | **no** (default: rows 0, cols 1; +2,091,008 bytes) | 2,097,152 | 4,194,304 |
    | total (whole state) | | | 2,097,160 | 4,194,304 |
    <BLANKLINE>
    **1 matrix kept whole that the default rule factors: +2,091,008 bytes of state.**
  """
  state = jax.eval_shape(tx.init, params)
  nu_tree = optax.tree_utils.tree_get(state, "nu")
  if nu_tree is None:
    raise ValueError("factoring_report: tx's state holds no second-moment statistics (nu).")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  moments = treedef.flatten_up_to(nu_tree)  # type: ignore[attr-defined]  # (no stub)
  resolved = None if rule is None else resolve(rule)
  assert resolved is None or isinstance(resolved, _Resolved)
  lines = ["| parameter | shape | factored | state bytes | Adam bytes |", "|---|---|---|---|---|"]
  flagged, extra_total = 0, 0
  for (path, p), nu in zip(leaves, moments):
    shape, where = tuple(p.shape), jax.tree_util.keystr(path)
    how, axes = _how_factored(shape, nu)
    if resolved is not None:
      spec = resolved(path, shape)
      expected = None if spec is None else _spec_axes(spec)
      by_default = resolved.answer(path, shape) is DEFAULT_FACTORING  # tx's min_dim decides
      if expected != axes and axes != ("factored",) and not by_default:
        raise ValueError(f"factoring_report: the rule for {where} gives {spec}, but tx's "
                         f"state factors it as: {how}. Pass the rule tx was built with.")
      if spec is not None and spec.batch:
        how += f", batch {spec.batch}"
    default_axes = factored_axes(shape, min_dim_size_to_factor)
    if axes is None and default_axes is not None:
      extra = _nbytes(nu) - _factored_nbytes(shape, default_axes, nu.dtype)
      flagged, extra_total = flagged + 1, extra_total + extra
      how = f"**no** (default: rows {default_axes[0]}, cols {default_axes[1]}; +{extra:,} bytes)"
    lines.append(f"| {where} | {shape} | {how} | {_nbytes(nu):,} | {2 * _nbytes(p):,} |")
  lines.append(f"| total (whole state) | | | {_nbytes(state):,} | {2 * _nbytes(params):,} |")
  if flagged:
    matrices = "matrix" if flagged == 1 else "matrices"
    lines += ["", f"**{flagged} {matrices} kept whole that the default rule factors: "
                  f"+{extra_total:,} bytes of state.**"]
  return "\n".join(lines)


def _factored_nbytes(shape: tuple[int, ...], axes: tuple[int, int], dtype: Any) -> int:
  """Bytes of the row and column statistics of a parameter factored over `axes`."""
  size = int(np.prod(shape))
  return (size // shape[axes[1]] + size // shape[axes[0]]) * jax.numpy.dtype(dtype).itemsize


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
