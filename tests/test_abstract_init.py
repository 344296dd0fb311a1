"""optax's abstract-init contract, for every public transform and the alias.

optax's transforms accept `jax.ShapeDtypeStruct` parameters in `init` (users do
it to build checkpoint restore targets) and return arrays: zeros placed by the
struct's ``.sharding`` when it has one. Under an Explicit mesh the state's type
(shape, dtype and sharding, `jax.typeof`) is the same after `init`, after
`update`, and under `jax.jit` of either (optax's own sharding tests). The
oracle here is `init` on concrete parameters, which takes another code path
(zeros selected from the parameter's values).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao
from tests import helpers, transformer

TRANSFORMS = {
    "scale_by_factored_rms": lambda: ao.scale_by_factored_rms(min_dim_size_to_factor=2),
    "scale_by_factored_rms_clip_rows": lambda: ao.scale_by_factored_rms(
        clipping_threshold=1.0,
        factor_rule=lambda path, shape: ao.FactorSpec(-2, -1, (0,), "row") if len(shape) == 3
        else None),
    "clip_by_block_rms": ao.clip_by_block_rms,
    "relative_step_size": ao.relative_step_size,
    "ema_momentum": lambda: ao.ema_momentum(0.9, accumulator_dtype="bfloat16"),
    "record_diagnostics": lambda: ao.record_diagnostics(decay=0.9, step_size=0.1),
    "skip_non_finite": lambda: ao.skip_non_finite(ao.scale_by_factored_rms()),
    "adafactor": ao.adafactor,
    "adafactor_all_links": lambda: ao.adafactor(
        momentum=0.9, weight_decay_rate=1e-4, min_dim_size_to_factor=2, diagnostics=True,
        skip_non_finite=True),
}
transforms = pytest.mark.parametrize("name", sorted(TRANSFORMS))


def abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def types(tree):
  return jax.tree.map(jax.typeof, tree)


@transforms
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_init_with_abstract_params_returns_the_concrete_state(name, dtype):
  tx = TRANSFORMS[name]()
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), helpers.make_params())
  state = tx.init(abstract(params))
  want = tx.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  assert types(state) == types(want)
  jax.tree.map(np.testing.assert_array_equal, state, want)
  # The state serves update as any other: one step equals the concrete state's.
  grads = jax.tree.map(lambda x: jnp.asarray(x, dtype), helpers.make_grads(1)[0])
  jax.tree.map(np.testing.assert_array_equal,
               tx.update(grads, state, params), tx.update(grads, want, params))


needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


@needs_8
@transforms
@pytest.mark.parametrize("mode", (AxisType.Auto, AxisType.Explicit), ids=lambda m: m.name)
def test_init_with_sharded_abstract_params_places_state_like_concrete_init(name, mode):
  """Rows like the parameter's rows, columns like its columns, as `init` on arrays."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode, mode))
  shardings = transformer.param_shardings(mesh)
  params = transformer.place(transformer.make_params(), shardings)
  tx = TRANSFORMS[name]()
  with jax.set_mesh(mesh):
    state = tx.init(abstract(params, shardings))
    want = tx.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  for (path, leaf), expected in zip(jax.tree_util.tree_leaves_with_path(state),
                                    jax.tree.leaves(want)):
    assert isinstance(leaf, jax.Array), path
    assert (leaf.shape, leaf.dtype) == (expected.shape, expected.dtype), path
    assert leaf.sharding.is_equivalent_to(expected.sharding, leaf.ndim), (
        jax.tree_util.keystr(path), leaf.sharding, expected.sharding)
  if name == "adafactor_all_links":  # the case worth the test: a sharded factored state
    nu = optax.tree_utils.tree_get(state, "nu")["mlp_in"]
    assert nu.v_row.sharding.spec == P(None, "data", None)
    assert nu.v_col.sharding.spec == P(None, None, "model")


@needs_8
@transforms
def test_state_type_is_the_same_after_init_update_and_jit(name):
  """optax's sharding tests: float16 (2, 8, 4) parameters sharded P(None, 'x') on 8 devices."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  sharding = NamedSharding(mesh, P(None, "x"))
  tx = TRANSFORMS[name]()
  with jax.set_mesh(mesh):
    params = {"w": jnp.zeros((2, 8, 4), jnp.float16, out_sharding=sharding),
              "v": jnp.zeros((8,), jnp.float16, out_sharding=NamedSharding(mesh, P("x")))}
    state = tx.init(params)
    states = {
        "abstract init": tx.init(abstract(params, jax.tree.map(lambda p: p.sharding, params))),
        "jit init": jax.jit(tx.init)(params),
        "update": tx.update(params, state, params)[1],
        "jit update": jax.jit(tx.update)(params, state, params)[1],
    }
  for how, other in states.items():
    assert types(other) == types(state), how


def test_abstract_mesh_sharding_gives_arrays_on_the_default_device():
  """Nothing to place on: optax's transforms then ignore the sharding too."""
  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
  params = {"w": jax.ShapeDtypeStruct((256, 512), jnp.float32,
                                      sharding=NamedSharding(mesh, P("data", "model")))}
  state = ao.adafactor(momentum=0.9).init(params)
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.device_set == {jax.devices()[0]}
  assert state[0].nu["w"].v_row.shape == (256, 1)

