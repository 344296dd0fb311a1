"""Sharded state and sharded updates on a mesh of 8 simulated CPU devices.

The state must follow the parameters (a factored matrix's row statistics sharded
like its rows, column statistics like its columns, everything else like its
parameter, counts replicated) in both mesh modes, and the sharded update must
communicate O(n + m) values per n x m matrix: the row and column means, and the
per-parameter RMS scalars of clipping and of the relative step size.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao
from adafactor_optax import _leafwise
from tests import transformer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

MODES = (AxisType.Auto, AxisType.Explicit)
MESH_SHAPES = ((8, 1), (1, 8), (2, 4))  # FSDP only, tensor parallel only, both


def make_mesh(shape, mode):
  return jax.make_mesh(shape, ("data", "model"), axis_types=(mode, mode))


def optimizer():
  return ao.adafactor(momentum=0.9)


def step(params, grads, state):
  updates, state = optimizer().update(grads, state, params)
  return optax.apply_updates(params, updates), state


def assert_placed_like(state, expected):
  for path, leaf, want in zip(
      [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)],
      jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (path, leaf.sharding, want)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=str)
def test_init_state_follows_params(mesh_shape, mode):
  mesh = make_mesh(mesh_shape, mode)
  params = transformer.place(transformer.make_params(), transformer.param_shardings(mesh))
  with jax.set_mesh(mesh):
    jitted = jax.jit(optimizer().init)(params)
    eager = optimizer().init(params)
  expected = ao.state_shardings(optimizer(), params)
  assert_placed_like(jitted, expected)
  assert_placed_like(eager, expected)
  # Placed, and zero: statistics, momentum and counts all start at 0.
  for leaf in jax.tree.leaves((jitted, eager)):
    assert not np.any(np.asarray(leaf)), leaf.shape


def test_state_specs_by_kind_of_leaf():
  params = transformer.abstract_params()
  specs = ao.state_partition_specs(
      optimizer(), params, {k: s.spec for k, s in transformer.param_shardings(
          jax.sharding.AbstractMesh((2, 4), ("data", "model"))).items()})
  nu, ema = specs[0].nu, optax.tree_utils.tree_get(specs, "ema")
  # (L, embed, mlp) sharded (None, data, model): rows keep 'data', columns keep 'model'.
  assert nu["mlp_in"] == ao.FactoredMoment(P(None, "data", None), P(None, None, "model"))
  assert ema["mlp_in"] == P(None, "data", "model")
  assert nu["mlp_in_bias"] == P(None, "model")  # unfactored: the parameter's spec
  assert specs[0].count == P()


def test_state_specs_none_means_replicated():
  """A None among the parameter specs (documented: replicated) is one parameter's spec."""
  params = {"w": jax.ShapeDtypeStruct((512, 256), jnp.float32),
            "b": jax.ShapeDtypeStruct((256,), jnp.float32)}
  specs = ao.state_partition_specs(optimizer(), params, {"w": P("data", "model"), "b": None})
  assert specs[0].nu == {"w": ao.FactoredMoment(P("data", None), P(None, "model")), "b": P(None)}
  assert optax.tree_utils.tree_get(specs, "ema") == {"w": P("data", "model"), "b": P(None)}


def test_optax_adafactor_state_is_replicated_in_auto_mode():
  """The contrast: optax's jitted init ignores the parameters' sharding."""
  mesh = make_mesh((2, 4), AxisType.Auto)
  params = transformer.place(transformer.make_params(), transformer.param_shardings(mesh))
  with jax.set_mesh(mesh):
    theirs = jax.jit(optax.adafactor(1e-2, momentum=0.9).init)(params)
    ours = jax.jit(optimizer().init)(params)
  assert not params["mlp_in"].sharding.is_fully_replicated
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(theirs))
  assert not optax.tree_utils.tree_get(ours, "ema")["mlp_in"].sharding.is_fully_replicated


@pytest.fixture(scope="module")
def single_device_run():
  params = jax.tree.map(jnp.asarray, transformer.make_params())
  state = optimizer().init(params)
  for grads in transformer.make_grads(3):
    params, state = jax.jit(step)(params, jax.tree.map(jnp.asarray, grads), state)
  return params, state


@pytest.fixture(params=[False, True], ids=["whole tree", "tied"])
def tied(request, monkeypatch):
  """Also the TPU's leaf-by-leaf step (`_leafwise`), run here on the CPU devices."""
  if request.param:
    monkeypatch.setattr(_leafwise, "TIED_PLATFORMS", ("cpu",))
    monkeypatch.setattr(_leafwise, "MIN_LEAVES", 2)
  return request.param


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=str)
def test_sharded_steps_equal_single_device(mesh_shape, mode, single_device_run, tied):
  mesh = make_mesh(mesh_shape, mode)
  shardings = transformer.param_shardings(mesh)
  params = transformer.place(transformer.make_params(), shardings)
  with jax.set_mesh(mesh):
    state = jax.jit(optimizer().init)(params)
    state_shardings = ao.state_shardings(optimizer(), params)
    jitted = jax.jit(step, out_shardings=(shardings, state_shardings))
    for grads in transformer.make_grads(3):
      params, state = jitted(params, transformer.place(grads, shardings), state)
  assert_placed_like(state, state_shardings)
  want_params, want_state = single_device_run
  # Only the order of the sums inside the means and RMS differs.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9),
               (params, state), (want_params, want_state))


# Collective traffic of one compiled update step, from the partitioned HLO.

_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\((.*)")
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64|c64|c128)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


def _array_bytes(text):
  return sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
             for t, dims in _ARRAY.findall(text))


def collective_bytes(hlo_text):
  """Per-device bytes of every collective in partitioned HLO: max(result, operands)."""
  sizes = []
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      result, _, rest = match.groups()
      operands = rest.split("), ")[0]
      sizes.append(max(_array_bytes(result), _array_bytes(operands)))
  return sizes


BIG = dict(layers=2, d_model=2048, d_ff=8192, vocab=16384)  # compiled, never run


def compiled_step_collectives(mesh_shape, mode):
  mesh = make_mesh(mesh_shape, mode)
  shardings = transformer.param_shardings(mesh, **BIG)
  params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                        transformer.abstract_params(**BIG), shardings)
  state_shardings = ao.state_shardings(optimizer(), params)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(optimizer().init, params), state_shardings)
  with jax.set_mesh(mesh):
    compiled = jax.jit(step, out_shardings=(shardings, state_shardings)).lower(
        params, params, state).compile()
  per_device_param_bytes = sum(
      4 * np.prod(s.sharding.shard_shape(s.shape)) for s in jax.tree.leaves(params))
  return collective_bytes(compiled.as_text()), per_device_param_bytes


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=str)
def test_update_communicates_row_and_column_sizes_only(mesh_shape, mode, tied):
  sizes, param_bytes = compiled_step_collectives(mesh_shape, mode)
  # O(n + m): no collective larger than the longest statistic, L x vocab floats
  # (the embedding's rows), where moving a matrix would be L x d x d_ff floats.
  assert max(sizes, default=0) <= 4 * BIG["layers"] * BIG["vocab"], sorted(sizes)[-5:]
  assert sum(sizes) < 0.01 * param_bytes, (sum(sizes), param_bytes)
  # And the parse found the traffic that must be there: on every mesh some matrix
  # has its factored axis sharded, so at least one mean over d_model (or more)
  # values crosses devices, besides the RMS scalars of clipping and the step size.
  assert len(sizes) >= 2 and sum(sizes) >= 4 * BIG["d_model"], sizes


def test_collective_parse_sees_a_known_all_reduce():
  """The HLO parse above against a program whose one collective is known: the sum
  over a sharded axis of a (64, 1024) float32 array all-reduces 1024 floats."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  x = jax.ShapeDtypeStruct((64, 1024), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, P("data", None)))
  with jax.set_mesh(mesh):
    compiled = jax.jit(lambda x: jnp.sum(x, axis=0),
                       out_shardings=jax.sharding.NamedSharding(mesh, P())).lower(x).compile()
  assert collective_bytes(compiled.as_text()) == [4 * 1024]


# Flax metadata: the helper takes what Flax's own partitioning utilities return.

RULES = (("embed", "data"), ("mlp", "model"))


def test_state_shardings_from_linen_logical_axes():
  from flax import linen as nn

  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(512, kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("embed", "mlp")), bias_init=nn.with_logical_partitioning(
              nn.initializers.zeros, ("mlp",)))(x)

  mesh = make_mesh((2, 4), AxisType.Explicit)
  x = jax.ShapeDtypeStruct((1, 256), jnp.float32)
  boxed = jax.eval_shape(Dense().init, jax.random.key(0), x)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)["params"]
  params = nn.unbox(boxed)["params"]
  nu = ao.state_shardings(optimizer(), params, shardings)[0].nu["Dense_0"]
  assert nu["kernel"].v_row.spec == P("data", None)
  assert nu["kernel"].v_col.spec == P(None, "model")
  assert nu["bias"].spec == P("model")


def test_state_shardings_from_nnx_sharded_variables():
  from flax import nnx

  mesh = make_mesh((2, 4), AxisType.Explicit)
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: nnx.Linear(
        256, 512, rngs=nnx.Rngs(0),
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("model",))))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # shape structs with shardings
  specs = jax.tree.map(lambda s: s.spec, ao.state_shardings(optimizer(), params))
  assert specs[0].nu == {"kernel": ao.FactoredMoment(P("data", None), P(None, "model")),
                         "bias": P("model")}
  assert optax.tree_utils.tree_get(specs, "ema") == {"kernel": P("data", "model"), "bias": P("model")}


@pytest.mark.parametrize("wrap", ["masked", "multi_steps", "inject_hyperparams", "adam"])
def test_state_specs_through_optax_wrappers(wrap):
  params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32),
            "b": jax.ShapeDtypeStruct((128,), jnp.float32)}
  param_specs = {"w": P("data", "model"), "b": P("model")}
  tx = {
      "masked": lambda: optax.masked(optimizer(), {"w": True, "b": False}),
      "multi_steps": lambda: optax.MultiSteps(optimizer(), every_k_schedule=2),
      "inject_hyperparams": lambda: optax.inject_hyperparams(ao.adafactor)(learning_rate=0.1),
      "adam": lambda: optax.adam(1e-3),
  }[wrap]()
  specs = ao.state_partition_specs(tx, params, param_specs)
  state = jax.eval_shape(tx.init, params)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(state), spec_leaves,
                                strict=True):
    name = jax.tree_util.keystr(path)
    if leaf.shape == (256, 128):
      assert spec == P("data", "model"), name
    elif leaf.shape == (256, 1):
      assert spec == P("data", None), name
    elif leaf.shape == (1, 128):
      assert spec == P(None, "model"), name
    elif leaf.shape == (128,):
      assert spec == P("model"), name
    else:
      assert spec == P(), name
