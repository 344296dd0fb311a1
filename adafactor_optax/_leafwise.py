"""The step leaf by leaf where each leaf is reduced alone, and on TPU in that order.

On the backends whose plan reduces every leaf alone (`_grouping.PLANS`: the
CPU and TPU), `leaf_by_leaf` traces the wrapped chain one leaf at a time, and
each distinct leaf once: leaves of one shape, dtype, placement and factoring
(the same weight in every layer) share one trace through a `jax.jit` of their
own, which XLA inlines, so the compiled program is the one the whole-tree
chain gives, and the step of a 1,500-leaf model is traced in the time of its
~16 distinct leaves.

On TPU it also fixes the order. XLA:TPU's memory scheduler may order the step
breadth-first: every leaf's reductions (row and column means, RMS(U),
RMS(X)) first, every update last, so that each parameter and gradient is read
long before it is written, and its memory-space assignment re-copies them
between HBM and on-chip memory. The compiler's estimate of such a step is
about twice that of the same program in depth-first order (v5p, 195 leaves,
learning rate 1e-2: 1,564 against 776 us when that order is forced; tied as
below, 819 us and optax.adafactor's 855:
`benchmarks/results/compiled_step_vs_optax_adafactor.md`, estimates). There
leaf i's parameter, gradient and per-leaf state pass one
`jax.lax.optimization_barrier` together with leaf i-2's new parameter
(`LAG`), ``p + u`` written exactly as `optax.apply_updates` writes it, so that
XLA merges the two (common subexpressions) and leaf i's work starts only after
that parameter is final. The barrier changes no value and no aliasing of
donated buffers. State that is not per leaf (step counts) stays out of the
barriers: each leaf's chain computes the same scalars from it, which XLA
computes once; tied to a barrier they would be recomputed for every leaf
(+500 us on that step). A step that applies the updates otherwise than
``p + u`` (`optax.apply_updates`, which Flax's optimizers call) keeps the
order, but XLA:TPU then computes the new parameters twice.

Each backend compiles only its own branch (`jax.lax.platform_dependent`);
XLA:GPU, which reduces equally shaped leaves together, gets the whole-tree
chain.
"""

import contextvars
import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import _grouping


# Where the chain is traced leaf by leaf (their plans reduce each leaf alone), and
# where it is also tied in leaf order; read when `update` is traced (the tests add
# "cpu" to TIED_PLATFORMS to run the tied step on the CPU).
LEAFWISE_PLATFORMS: tuple[str, ...] = ("cpu", "tpu")
TIED_PLATFORMS: tuple[str, ...] = ("tpu",)
# Leaf i waits for leaf i - LAG's new parameter, so that XLA:TPU can fetch one leaf
# while it updates the one before (v5p, 195 leaves, TPU compiler's estimates, lr 1e-2 /
# with momentum 0.9: lag 1 776 / 1,954 us, lag 2 819 / 977, lag 3 1,253 / 1,997;
# optax.adafactor 855 / 1,045).
LAG = 2
# Fewer, larger leaves step faster untied: XLA:TPU then overlaps them itself
# (estimates, momentum 0.9: a 1.1B decoder in layer stacks on a v5e 8x8 slice, 1,944 us
# untied, 2,474 tied; 33 large matrices, lr 1e-2, v5e 4,429 untied, 5,005 tied). With
# many small leaves the tie wins (195 leaves: above). Between the two, unmeasured.
# Such trees are traced whole, on every backend: they trace fast.
MIN_LEAVES = 64
_FIRST_LEAF: contextvars.ContextVar[Any] = contextvars.ContextVar("first_leaf", default=0)


def first_leaf() -> Any:
  """Where, in the whole tree, the first leaf that a link is now given stands.

  0, except inside `leafwise_update`, which gives the chain one leaf at a
  time: there it is that leaf's position, a traced int32 (leaves share one
  trace), so that a link numbering its leaves (`stochastic_rounding`'s random
  streams) numbers them as on the whole tree.
  """
  return _FIRST_LEAF.get()


def new_parameter(param: jax.Array, update: jax.Array) -> jax.Array:
  """``param + update`` as `optax.apply_updates` computes it (so that XLA merges the two)."""
  return jnp.asarray(param + update).astype(jnp.asarray(param).dtype)


def _up_to(treedef: Any, tree: Any) -> list:
  """`tree`'s subtrees at `treedef`'s leaves (a ValueError where it is not a prefix)."""
  return treedef.flatten_up_to(tree)


def _alone(treedef: Any, i: int, subtree: Any) -> Any:
  """A tree of `treedef` with `subtree` at leaf i and None (no leaves) at the others."""
  return jax.tree.unflatten(treedef, [subtree if j == i else None
                                      for j in range(treedef.num_leaves)])


class _Split:
  """A state cut into its per-leaf parts (subtrees shaped like the parameters) and the rest."""

  def __init__(self, state: Any, treedef: Any):
    self.treedef = treedef
    items, self.structure = jax.tree.flatten(
        state, is_leaf=lambda x: _per_leaf(x, treedef) is not None)
    parts = [_per_leaf(x, treedef) for x in items]
    self.own = [k for k, p in enumerate(parts) if p is not None]  # the per-leaf items
    self.parts = [p for p in parts if p is not None]
    self.shared = [x for x, p in zip(items, parts) if p is None]

  def arrays(self, i: int) -> list:
    """Leaf i's own state: one subtree per per-leaf item."""
    return [parts[i] for parts in self.parts]

  def state(self, i: int, own: list, shared: list) -> Any:
    """The state the chain sees for leaf i: its own parts, None for the other leaves."""
    owns, shareds = iter(own), iter(shared)
    items = [_alone(self.treedef, i, next(owns)) if k in self.own else next(shareds)
             for k in range(len(self.own) + len(self.shared))]
    return jax.tree.unflatten(self.structure, items)

  def cut(self, i: int, state: Any) -> tuple[list, list]:
    """Leaf i's own parts and the shared items of a state that the chain returned for it."""
    items = _up_to(self.structure, state)
    return ([_up_to(self.treedef, items[k])[i] for k in self.own],
            [x for k, x in enumerate(items) if k not in self.own])

  def merge(self, own: list, shared: list) -> Any:
    """One state from every leaf's own parts (`own[i]`) and the shared items."""
    shareds = iter(shared)
    items = [jax.tree.unflatten(self.treedef, [o[self.own.index(k)] for o in own])
             if k in self.own else next(shareds)
             for k in range(len(self.own) + len(self.shared))]
    return jax.tree.unflatten(self.structure, items)


def _per_leaf(x: Any, treedef: Any) -> list | None:
  """`x`'s subtree per parameter when it has the parameters' structure, else None (shared)."""
  if x is None or hasattr(x, "shape"):
    return None
  try:
    return _up_to(treedef, x)
  except (ValueError, TypeError):
    return None


class _Leaf:
  """A static argument of the per-leaf trace: equal for leaves that may share it.

  `key` is what the chain reads of the leaf beyond its arrays (its batch axes,
  from its path); the arrays' shapes, dtypes and placements are the trace's
  own key. `position` is the leaf the trace is first made for.
  """

  def __init__(self, position: int, key: Hashable):
    self.position, self.key = position, key

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Leaf) and self.key == other.key

  def __hash__(self) -> int:
    return hash(self.key)


def _no_key(path: Any, shape: tuple[int, ...]) -> Hashable:
  del path, shape
  return ()


def leaf_by_leaf(
    inner: optax.GradientTransformation,
    leaf_key: Callable[[Any, tuple[int, ...]], Hashable] = _no_key,
    *,
    tie: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """`inner` traced leaf by leaf where the plan allows, tied on TPU (module docstring).

  Args:
    inner: a chain that computes each leaf's update from that leaf's
      gradient, parameter and state alone, plus state shared by all leaves
      (counts; a link that numbers leaves reads `first_leaf`): true of
      `adafactor`'s chain without diagnostics or a weight decay mask, which
      `adafactor` checks before it wraps.
    leaf_key: ``(path, shape) -> hashable``, everything `inner` reads of a
      leaf's path (`adafactor`: its factor rule's batch axes); leaves with
      equal keys and equal arrays share one trace.
    tie: tie the leaves in order on `TIED_PLATFORMS` (False: only trace them
      leaf by leaf).

  The updates and state equal `inner`'s: bit for bit on one device
  (`tests/test_leafwise.py`); under an Auto mesh XLA may partition a
  reduction otherwise, as it may for the whole-tree step
  (`tests/test_sharding.py`).
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None or len(jax.tree.leaves(updates)) < MIN_LEAVES:
      return inner.update(updates, state, params, **extra_args)
    leafwise = tuple(dict.fromkeys(LEAFWISE_PLATFORMS + TIED_PLATFORMS))

    def whole(updates, state, params):
      # The plans of the backends that take this branch, alone.
      plans = tuple(name for name in _grouping.PLANS if name not in leafwise)
      with _grouping.traced_plans(*(plans or tuple(_grouping.PLANS))):
        return inner.update(updates, state, params, **extra_args)

    def by_leaf(updates, state, params, *, platform):
      with _grouping.traced_plans(platform):  # that backend's plan (the CPU's in tests, tied)
        return leafwise_update(inner, updates, state, params, leaf_key=leaf_key,
                               tied=tie and platform in TIED_PLATFORMS, **extra_args)

    branches = {name: functools.partial(by_leaf, platform=name) for name in leafwise}
    if not branches:
      return whole(updates, state, params)
    return jax.lax.platform_dependent(updates, state, params, **branches, default=whole)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def leafwise_update(
    inner: optax.GradientTransformationExtraArgs, updates: Any, state: Any, params: Any, *,
    leaf_key: Callable[[Any, tuple[int, ...]], Hashable] = _no_key, tied: bool = True,
    **extra_args: Any
) -> tuple[Any, Any]:
  """`inner.update` one leaf at a time; `tied`: leaf i's inputs tied to leaf i - LAG's new parameter.

  Leaf i's chain sees a tree of the parameters' structure with None at every
  other leaf (so that paths are kept for the factor rules), traced once per
  `leaf_key` and arrays: `jax.jit` reuses the trace for the leaves that share
  them, and only the first leaf's tree is ever built.
  """
  paths_grads, treedef = jax.tree_util.tree_flatten_with_path(updates)
  param_leaves = _up_to(treedef, params)
  split = _Split(state, treedef)

  def one_leaf(g, p, own, shared, extra, position, leaf):
    token = _FIRST_LEAF.set(position)
    try:
      u, s = inner.update(_alone(treedef, leaf.position, g), split.state(leaf.position, own, shared),
                          _alone(treedef, leaf.position, p), **extra)
    finally:
      _FIRST_LEAF.reset(token)
    (u,) = jax.tree.leaves(u)
    return (u, *split.cut(leaf.position, s))

  # Called eagerly (no outer trace), a jit per call would compile each leaf anew.
  tracing = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((updates, params)))
  traced = jax.jit(one_leaf, static_argnums=6) if tracing else one_leaf
  steps: list = []
  owns: list = []
  tokens: list = []
  shared: list = split.shared
  for i, ((path, g), p) in enumerate(zip(paths_grads, param_leaves)):
    own = split.arrays(i)
    if tied and i >= LAG:
      p, g, own, _ = jax.lax.optimization_barrier((p, g, own, tokens[i - LAG]))
    u, own, new_shared = traced(g, p, own, split.shared, extra_args, jnp.int32(i),
                                _Leaf(i, leaf_key(path, tuple(jnp.shape(g)))))
    shared = new_shared if i == 0 else shared
    if tied:
      tokens.append(new_parameter(param_leaves[i], u))
    steps.append(u)
    owns.append(own)
  return jax.tree.unflatten(treedef, steps), split.merge(owns, shared)
