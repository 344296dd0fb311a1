"""Reductions shared by leaves of one shape: one kernel per group, not one per leaf.

Adafactor's step reduces every parameter several times (row and column means
of G^2, RMS(U), RMS(X)), where Adam's step is one elementwise pass. Done leaf by
leaf, each reduction is a kernel of its own, and on a GPU or TPU a model with
hundreds of small leaves spends its step launching them. Leaves of equal shape,
dtype, blocks and sharding (the same weight in each of a model's layers) are
reduced together instead: their values are stacked along a new leading axis
and reduced once. XLA fuses the stacking into the reduction, which reads each
leaf where it lies; no stacked copy is written. Only the small results (one
statistic per row, column or block) are split back per leaf, and the
elementwise update stays one fused pass per leaf, as Adam's.

Leaves are grouped only when their placement is known to be equal: on one
device, or with the sharding in the arrays' types (`jax.sharding.AxisType`
Explicit). Under a multi-device mesh in Auto mode the shardings are not known
while tracing, so every leaf is its own group: stacking differently sharded
leaves would make XLA move them.

Grouping is a choice per backend (`PLANS`, `per_backend`), made from the
compiled step: XLA:GPU fuses the stacking into the reductions; XLA:CPU and the
TPU compiler write the stacked copy, so there each leaf is reduced alone.
"""

import collections
import contextlib
import contextvars
import functools
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adafactor_optax import _numerics


def placement(x: Any) -> Hashable | None:
  """What can be known of `x`'s placement while tracing; None when it cannot be.

  One device (or no mesh): ``()``. A mesh whose axes are all Explicit: the
  array's `PartitionSpec`. A mesh with Auto axes: None, the sharding is chosen
  later by XLA's propagation.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if sharding is None or mesh is None or mesh.empty or mesh.size == 1:
    return ()
  if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return (mesh.shape_tuple, sharding.spec)
  return None


def group_key(leaves: Sequence[Any], extra: Hashable = ()) -> Hashable | None:
  """The key under which `leaves` (one parameter's arrays) share work, or None for none.

  Arrays with equal keys have equal shapes, dtypes and placements, position by
  position, and the same `extra` (the parameter's blocks, say).
  """
  where = [placement(x) for x in leaves]
  if any(w is None for w in where):
    return None
  shapes = tuple((tuple(jnp.shape(x)), jnp.result_type(x).name) for x in leaves)
  return shapes, tuple(where), extra


class Plan(NamedTuple):
  """How one backend's compiler is given the step's reductions.

  Attributes:
    grouped: reduce equally shaped leaves together (`map_stacked`).
    barriers: give each reduction its own names for its inputs
      (`_numerics.unshared`), so that XLA recomputes shared elementwise
      intermediates inside each reduction instead of writing them to memory.
    from_inputs: reductions that need the new statistics (mean(R_t), RMS(U))
      recompute them from the old ones and this step's means, so that only the
      update writes them (and XLA:GPU writes them in place, in the update's
      own kernel); otherwise they read the new statistics back, which XLA:CPU
      does without copying the donated old ones.
  """

  grouped: bool
  barriers: bool
  from_inputs: bool


# Chosen from the compiled step of each backend (benchmarks/compiled_step.py, every
# plan side by side in benchmarks/results/compiled_step_plans.md). XLA:GPU fuses the
# stacking into the reductions: grouped, an H100 step launches 63-83 kernels where
# leaf by leaf it launches 281-1,274, for the same bytes. XLA:CPU and the TPU compiler
# write the stacked copy (TPU: 0.13-0.39x the parameter bytes of temporaries, and a
# higher time estimate), so there each leaf is reduced alone; XLA:CPU needs the
# barriers to fuse its reductions with their inputs (tests/test_compiled.py) and
# copies the donated statistics when they are recomputed from the inputs. On TPU the
# per-leaf plans estimate the same time within 5%; without barriers and with
# `from_inputs` it makes the fewest kernels (barriers would keep temporaries lower:
# 0.32x against 0.45x the parameter bytes on v5e, many-leaf tree).
#
# TPU: no Plan decides what the TPU estimate loses to optax.adafactor untied (v5p, 195
# leaves, lr 1e-2: 1,564 against 855 us, compiler's estimates): XLA:TPU's list memory
# scheduler orders the step breadth-first. `adafactor` wraps its chain in
# `_leafwise.leaf_by_leaf`, which ties each leaf to the new parameter of the leaf two before
# it and traces the chain there with `PLANS["tpu"]` alone (`traced_plans`); that step
# estimates 819 us.
PLANS = {
    "cpu": Plan(grouped=False, barriers=True, from_inputs=False),
    "tpu": Plan(grouped=False, barriers=False, from_inputs=True),
    "gpu": Plan(grouped=True, barriers=False, from_inputs=True),
}


_TRACED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "traced_plans", default=tuple(PLANS))


@contextlib.contextmanager
def traced_plans(*names: str) -> Iterator[None]:
  """While tracing inside it, `per_backend` traces the plans of `names` alone.

  For code in one backend's branch already (`_leafwise`'s TPU step: "tpu"),
  or in a branch that one backend never takes (its whole-tree step: "cpu",
  "gpu"), so that plans that cannot be compiled there are not traced there.
  The last name serves every backend not named (one name: every backend).
  """
  token = _TRACED.set(names)
  try:
    yield
  finally:
    _TRACED.reset(token)


def per_backend(step: Callable[..., Any], *args: Any) -> Any:
  """``step(*args, plan=...)`` with the `Plan` of the backend it is compiled for.

  Lowered for one platform, only that platform's branch is compiled
  (`jax.lax.platform_dependent`); every branch computes the same values.
  Inside `traced_plans`, only the plans it names are traced.
  """
  *named, default = _TRACED.get()
  if not named:
    return step(*args, plan=PLANS[default])
  branches = {name: functools.partial(step, plan=PLANS[name]) for name in named}
  return jax.lax.platform_dependent(
      *args, **branches, default=functools.partial(step, plan=PLANS[default]))


def unshared(columns: Sequence[list], copies: int = 1, *, plan: Plan) -> list:
  """`_numerics.unshared` position by position, where the plan asks for barriers.

  Args:
    columns: equal-length lists; position i's arrays pass one barrier together
      (one barrier per leaf: one for the whole tree would tie every leaf's
      reductions to every other's, and costs the TPU compiler copies).
    copies: how many separately named copies to return.
    plan: without `barriers`, the columns are returned as they are.

  Returns:
    `copies` lists, each with one list per column.
  """
  if not plan.barriers:
    return [list(columns) for _ in range(copies)]
  per_position = [_numerics.unshared(tuple(c[i] for c in columns), copies=copies)
                  for i in range(len(columns[0]) if columns else 0)]
  if copies == 1:
    per_position = [(p,) for p in per_position]
  return [[[p[k][j] for p in per_position] for j in range(len(columns))] for k in range(copies)]


def map_stacked(f: Callable[..., Any], keys: Sequence[Hashable | None], *columns: list) -> list:
  """``f`` once per group of equal keys, on the group's leaves stacked along axis 0.

  Args:
    f: ``f(first, *stacked)``: `first` is the position of the group's first
      member (to look up what the members share); then one stacked pytree
      per column, each array with a new leading axis of the group's size. It
      returns a pytree of arrays, each with the same leading axis.
    keys: one per position; None puts the position in a group of its own.
    *columns: equal-length lists; entry i of each is position i's pytree.

  Returns:
    A list with f's result for each position: its row of the group's result.
  """
  groups: dict[Hashable, list[int]] = collections.defaultdict(list)
  for i, key in enumerate(keys):
    groups[("alone", i) if key is None else ("key", key)].append(i)
  results: list[Any] = [None] * len(keys)
  for members in groups.values():
    stacked = [
        jax.tree.map(lambda *xs: jnp.stack(xs), *(column[i] for i in members))
        for column in columns
    ]
    out = f(members[0], *stacked)
    for row, i in enumerate(members):
      results[i] = jax.tree.map(lambda x, row=row: x[row], out)
  return results


def block_rms_per_leaf(
    f: Callable[..., jax.Array],
    blocks: Sequence[tuple[int, ...]],
    *columns: list,
    plan: Plan = PLANS["gpu"],
) -> list:
  """``RMS(f(*args))`` per block of each position's leaf, one reduction per group.

  Args:
    f: elementwise in its arrays (broadcasting allowed), e.g. `precondition`
      of (G, statistics), or the identity; called on a group's stacked
      arguments.
    blocks: each position's batch axes (see `_numerics.block_rms`).
    *columns: equal-length lists of pytrees: position i's arguments of f.
    plan: without `grouped`, every position is reduced alone.

  Returns:
    Per position, the RMS of each block: an array of the leaf's rank with
    size 1 on every axis but the batch axes, broadcasting against the leaf.
  """
  keys = [
      group_key([x for column in columns for x in jax.tree.leaves(column[i])], blocks[i])
      if plan.grouped else None
      for i in range(len(blocks))
  ]

  def rms(first, *stacked):
    return _numerics.block_rms(f(*stacked), (0, *(a + 1 for a in blocks[first])))

  return map_stacked(rms, keys, *columns)
