"""On TPU, the step leaf by leaf: each leaf's inputs wait for an earlier leaf's new value.

XLA:TPU's memory scheduler may order the step breadth-first: every leaf's
reductions (row and column means, RMS(U), RMS(X)) first, every update last, so
that each parameter and gradient is read long before it is written, and its
memory-space assignment re-copies them between HBM and on-chip memory. The
compiler's estimate of such a step is about twice that of the same program in
depth-first order (v5p, 195 leaves, learning rate 1e-2: 1,564 against 776 us
when that order is forced; tied as below, 819 us and optax.adafactor's 855:
`benchmarks/results/compiled_step_vs_optax_adafactor.md`, estimates).

`leaf_by_leaf` fixes the order in the program itself: it runs the wrapped
chain once per leaf, and passes leaf i's parameter, gradient and per-leaf state
through one `jax.lax.optimization_barrier` together with leaf i-2's new
parameter (`LAG`), ``p + u`` written exactly as `optax.apply_updates` writes
it, so that XLA merges the two (common subexpressions) and leaf i's work starts
only after that parameter is final. The barrier changes no value and no
aliasing of donated buffers. State that is not per leaf (step counts) stays
out of the barriers: each leaf's chain computes the same scalars from it,
which XLA computes once; tied to a barrier they would be recomputed for every
leaf (+500 us on that step).

It is a TPU choice (`jax.lax.platform_dependent`): XLA:CPU and XLA:GPU compile
the whole-tree chain as before. A step that applies the updates otherwise than
``p + u`` (`optax.apply_updates`, which Flax's optimizers call) keeps the
order, but XLA:TPU then computes the new parameters twice.
"""

import contextvars
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adafactor_optax import _grouping


# Where the step is tied leaf by leaf, read when `update` is traced (the tests
# add "cpu" to run the tied step on the CPU).
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
MIN_LEAVES = 64
_FIRST_LEAF = contextvars.ContextVar("first_leaf", default=0)


def first_leaf() -> int:
  """Where, in the whole tree, the first leaf that a link is now given stands.

  0, except inside `tied_update`, which gives the chain one leaf at a time:
  there it is that leaf's position, so that a link numbering its leaves
  (`stochastic_rounding`'s random streams) numbers them as on the whole tree.
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
    self.items, self.structure = jax.tree.flatten(
        state, is_leaf=lambda x: _per_leaf(x, treedef) is not None)
    # Per item: None for shared state, else one subtree per parameter leaf.
    self.parts = [_per_leaf(x, treedef) for x in self.items]

  def arrays(self, i: int) -> list:
    """Leaf i's own state arrays."""
    return [parts[i] for parts in self.parts if parts is not None]

  def state(self, i: int, arrays: list) -> Any:
    """The state the chain sees for leaf i: its own arrays, None for the other leaves."""
    own = iter(arrays)
    items = [item if parts is None else _alone(self.treedef, i, next(own))
             for item, parts in zip(self.items, self.parts)]
    return jax.tree.unflatten(self.structure, items)

  def merge(self, states: list) -> Any:
    """One state from the per-leaf chains' states (shared state: the first leaf's)."""
    per_leaf = [_up_to(self.structure, s) for s in states]
    items = [
        per_leaf[0][k] if parts is None else jax.tree.unflatten(
            self.treedef, [_up_to(self.treedef, items[k])[i] for i, items in enumerate(per_leaf)])
        for k, parts in enumerate(self.parts)
    ]
    return jax.tree.unflatten(self.structure, items)


def _per_leaf(x: Any, treedef: Any) -> list | None:
  """`x`'s subtree per parameter when it has the parameters' structure, else None (shared)."""
  if x is None or hasattr(x, "shape"):
    return None
  try:
    return _up_to(treedef, x)
  except (ValueError, TypeError):
    return None


def leaf_by_leaf(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`inner` whose step XLA:TPU must compile leaf by leaf (see the module's docstring).

  `inner` must compute each leaf's update from that leaf's gradient, parameter
  and state alone, plus state shared by all leaves (counts; a link that
  numbers leaves reads `first_leaf`): true of `adafactor`'s chain without
  diagnostics or a weight decay mask, which `adafactor` checks before it
  wraps. The updates and state equal `inner`'s: bit for bit on one device
  (`tests/test_leafwise.py` runs the tied step on the CPU); under an Auto mesh
  XLA may partition a reduction otherwise, as it may for the untied step
  (`tests/test_sharding.py`).
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None or len(jax.tree.leaves(updates)) < MIN_LEAVES:
      return inner.update(updates, state, params, **extra_args)

    def whole(updates, state, params):
      # Where TPU takes by_leaf, its plan is not traced here.
      plans = ("cpu", "gpu") if "tpu" in TIED_PLATFORMS else tuple(_grouping.PLANS)
      with _grouping.traced_plans(*plans):
        return inner.update(updates, state, params, **extra_args)

    def by_leaf(updates, state, params):
      with _grouping.traced_plans("tpu"):  # also in the tests' CPU runs: the TPU's plan
        return tied_update(inner, updates, state, params, **extra_args)

    tied = {name: by_leaf for name in TIED_PLATFORMS}
    return jax.lax.platform_dependent(updates, state, params, **tied, default=whole)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def tied_update(inner: optax.GradientTransformationExtraArgs, updates: Any, state: Any,
                params: Any, **extra_args: Any) -> tuple[Any, Any]:
  """`inner.update`, one leaf at a time, leaf i's inputs tied to leaf i - LAG's new parameter."""
  grads, treedef = jax.tree.flatten(updates)
  param_leaves = _up_to(treedef, params)
  split = _Split(state, treedef)
  steps: list = []
  states: list = []
  tokens: list = []
  for i, (p, g) in enumerate(zip(param_leaves, grads)):
    own = split.arrays(i)
    if i >= LAG:
      p, g, own, _ = jax.lax.optimization_barrier((p, g, own, tokens[i - LAG]))
    position = _FIRST_LEAF.set(i)
    try:
      u, s = inner.update(_alone(treedef, i, g), split.state(i, own), _alone(treedef, i, p),
                          **extra_args)
    finally:
      _FIRST_LEAF.reset(position)
    (u,) = jax.tree.leaves(u)
    tokens.append(new_parameter(param_leaves[i], u))
    steps.append(u)
    states.append(s)
  return jax.tree.unflatten(treedef, steps), split.merge(states)
