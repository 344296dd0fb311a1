"""Leaves of one shape reduced together (`_grouping`): the same step, fewer kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao
from adafactor_optax import _grouping


def _tree(dtype=jnp.float32):
  """Repeated layers (equal shapes), a stack with per-layer blocks, vectors, a scalar."""
  rng = np.random.default_rng(0)
  shapes = {"embed": (300, 130), "stack": (3, 130, 140), "scale": ()}
  for i in range(3):
    shapes |= {f"w{i}": (130, 140), f"v{i}": (140, 130), f"b{i}": (140,), f"row{i}": (150, 4)}
  return {k: jnp.asarray((10.0 ** rng.uniform(-2, 1)) * rng.standard_normal(s), dtype)
          for k, s in shapes.items()}


def per_layer(path, shape):
  if len(shape) == 3:
    return ao.FactorSpec(-2, -1, batch=(0,))
  if shape == (150, 4):
    return ao.FactorSpec(0, 1, estimate="row")
  return ao.largest_two_axes(128)(path, shape)


def _grouped_everywhere(monkeypatch):
  """Make every backend, CPU included, take the branch that GPUs take."""
  gpu = _grouping.PLANS["gpu"]
  monkeypatch.setattr(_grouping, "per_backend", lambda step, *args: step(*args, plan=gpu))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"factor_rule": per_layer}, {"momentum": 0.9, "clipping_threshold": None},
     {"learning_rate": 1e-2, "multiply_by_parameter_scale": False}, {"diagnostics": True}],
    ids=["defaults", "per_layer", "momentum_noclip", "absolute", "diagnostics"])
def test_grouped_step_equals_leaf_by_leaf(monkeypatch, dtype, kwargs):
  """The GPU branch (stacked reductions) computes the CPU branch's step and statistics."""
  params = _tree(dtype)
  grads = [jax.tree.map(lambda p, i=i: (p * (i + 2.0) + 0.1).astype(dtype), params)
           for i in range(3)]
  tx = ao.adafactor(**kwargs)

  def run():
    p, s = params, tx.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    for g in grads:
      p, s = step(p, s, g)
    return p, s

  alone = run()
  _grouped_everywhere(monkeypatch)
  grouped = run()
  tol = 1e-2 if dtype == jnp.bfloat16 else 2e-6
  # The two sum in different orders: round-off at the scale of each array's largest
  # elements, which an element near zero keeps in absolute terms (4.8e-9 on one of
  # -1.3e-5 in an array of magnitude 3e-2, measured on an AMD EPYC).
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(grouped)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.max(np.abs(b), initial=1e-3))


def test_map_stacked_groups_equal_keys_only():
  """One call per distinct key; None is a group of its own; results come back in order."""
  calls = []

  def f(first, x):
    calls.append((first, x.shape))
    return x * 2

  leaves = [jnp.full((2,), float(i)) for i in range(5)]
  out = _grouping.map_stacked(f, ["a", "b", "a", None, None], leaves)
  assert sorted(calls) == [(0, (2, 2)), (1, (1, 2)), (3, (1, 2)), (4, (1, 2))]
  for i, o in enumerate(out):
    np.testing.assert_array_equal(o, 2.0 * i)


def test_group_key_separates_shapes_dtypes_and_blocks():
  a, b = jnp.zeros((4, 3)), jnp.zeros((4, 3))
  assert _grouping.group_key([a]) == _grouping.group_key([b])
  assert _grouping.group_key([a]) != _grouping.group_key([jnp.zeros((3, 4))])
  assert _grouping.group_key([a]) != _grouping.group_key([a.astype(jnp.bfloat16)])
  assert _grouping.group_key([a], (0,)) != _grouping.group_key([a], ())


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_group_key_follows_the_sharding():
  """Explicit mode: equal specs share a key, other specs do not; Auto mode on a mesh: no key."""
  keys = {}
  for mode in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(mode, mode))
    with jax.set_mesh(mesh):
      xs = [jax.device_put(jnp.zeros((8, 8)), NamedSharding(mesh, spec))
            for spec in (P("data", "model"), P("data", "model"), P("model", "data"))]

      def record(*xs, mode=mode):
        keys[mode] = [_grouping.group_key([x]) for x in xs]
        return xs

      jax.jit(record)(*xs)
  explicit, auto = keys[AxisType.Explicit], keys[AxisType.Auto]
  assert explicit[0] is not None and explicit[0] == explicit[1] != explicit[2]
  assert auto == [None, None, None]


def test_user_rule_is_asked_once_per_parameter():
  """The factor rule is resolved once: init and update traces ask it once per parameter."""
  asked = []

  def rule(path, shape):
    asked.append(jax.tree_util.keystr(path))
    return per_layer(path, shape)

  params = _tree()
  tx = ao.adafactor(factor_rule=rule, diagnostics=True)
  state = tx.init(params)
  jax.jit(tx.update)(params, state, params)
  jax.jit(tx.update)(params, state, params)  # cached trace, but a retrace would not ask again
  tx.update(params, state, params)
  assert sorted(asked) == sorted(jax.tree_util.keystr(p) for p, _ in
                                 jax.tree_util.tree_flatten_with_path(params)[0])


def test_min_dim_size_to_factor_none_is_the_default():
  params = {"w": jnp.zeros((256, 128)), "small": jnp.zeros((256, 64))}
  state = ao.scale_by_factored_rms(min_dim_size_to_factor=None).init(params)
  assert isinstance(state.nu["w"], ao.FactoredMoment)
  assert not isinstance(state.nu["small"], ao.FactoredMoment)
