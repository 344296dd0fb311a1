"""Flax's own sharding paths: the state `init` makes carries partitioning fitted to each of its arrays.

Linen trainers read the shardings of a whole TrainState from its boxes
(``nn.get_sharding(jax.eval_shape(create), mesh)``); NNX's Optimizer places
each state Variable by its ``out_sharding``. Both must give every state array
the sharding `ao.state_shardings` computes from the bare parameters: a
factored row statistic ``(n, 1)`` of a kernel named ``('data', 'model')`` is
``('data', None)``, never the kernel's names (which 'data' cannot divide:
``optax.adafactor`` fails there, `optax.adam` does not).

The first half checks the metadata itself on abstract state; the second runs
`tests/flax_sharding_worker.py` on 2 and 8 simulated host devices (a
subprocess, so that XLA_FLAGS set the device count before JAX starts): both
Flax patterns, FSDP, tensor-parallel and 2 x 4 meshes, Auto and Explicit
axes, four optimizer configurations, 5 jitted donated steps each.
"""

import contextlib
import json
import re
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import meta
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao
from tests import helpers

KERNEL, BIAS = (256, 512), (512,)


def boxed_params(box=nn.Partitioned, **box_kwargs):
  return {"w": box(jnp.ones(KERNEL), ("data", "model"), **box_kwargs),
          "b": box(jnp.zeros(BIAS), ("model",), **box_kwargs),
          "free": jnp.ones((3,))}  # no box: the state of it stays bare


def names(tree):
  """The names of every box in `tree` (None for a bare array), as a tree."""
  return jax.tree.map(lambda x: x.names if isinstance(x, nn.Partitioned) else None, tree,
                      is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def test_linen_state_names_by_kind_of_leaf():
  state = jax.eval_shape(ao.adafactor(momentum=0.9).init, boxed_params())
  nu = names(state[0].nu)
  # Row statistics (256, 1): rows keep 'data', the reduced axis is unnamed;
  # columns (1, 512) likewise. The bias is unfactored: its own names.
  assert nu["w"] == ao.FactoredMoment(("data", None), (None, "model"))
  assert nu["b"] == ("model",) and nu["free"] is None
  ema = names(optax.tree_utils.tree_get(state, "ema"))
  assert ema == {"w": ("data", "model"), "b": ("model",), "free": None}
  # Counts belong to no parameter: bare, hence replicated by nn.get_sharding.
  assert names(state[0].count) is None and names(state[1].count) is None


def test_linen_int8_momentum_names():
  """Values like the parameter; scales (256, 4 blocks) like their blocks."""
  tx = ao.adafactor(momentum=0.9, dtype_momentum="int8")
  ema = optax.tree_utils.tree_get(jax.eval_shape(tx.init, boxed_params()), "ema")
  assert ema["w"].scales.value.shape == (256, 4)
  assert names(ema["w"]) == ao.BlockQuantized(("data", "model"), ("data", "model"))
  assert names(ema["b"]) == ao.BlockQuantized(("model",), ("model",))


def test_int8_block_axis_unnamed_where_its_mesh_axes_do_not_divide_it():
  """A (256, 256) kernel has 2 blocks per row: 8-way 'model' cannot split them,
  so the scales' block axis is replicated, as state_shardings does."""
  params = {"w": nn.Partitioned(jnp.ones((256, 256)), (None, "model"))}
  tx = ao.adafactor(momentum=0.9, dtype_momentum="int8")
  for shape, want in (((1, 8), (None, None)), ((4, 2), (None, "model"))):
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
      ema = optax.tree_utils.tree_get(jax.eval_shape(tx.init, params), "ema")
    assert names(ema["w"]) == ao.BlockQuantized((None, "model"), want), shape
    expected = ao.state_shardings(tx, nn.unbox(params), {"w": P(None, "model")}, mesh=mesh)
    assert optax.tree_utils.tree_get(expected, "ema")["w"].scales.spec == P(*want)


def test_logically_partitioned_keeps_its_rules_and_mesh():
  rules = (("data", "data"), ("model", "model"))
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  state = ao.adafactor().init(boxed_params(nn.LogicallyPartitioned, rules=rules, mesh=mesh))
  v_row = state[0].nu["w"].v_row
  assert type(v_row) is nn.LogicallyPartitioned
  assert (v_row.names, v_row.rules, v_row.mesh) == (("data", None), rules, mesh)


class Tagged(meta.AxisMetadata):
  """A box that names no axes (user metadata): kept as it is around each state array."""

  def __init__(self, value, tag):
    self.value, self.tag = value, tag

  def unbox(self):
    return self.value

  def replace_boxed(self, val):
    return Tagged(val, self.tag)

  def add_axis(self, index, params):
    return self

  def remove_axis(self, index, params):
    return self


jax.tree_util.register_pytree_node(Tagged, lambda t: ((t.value,), t.tag),
                                   lambda tag, c: Tagged(c[0], tag))


def test_boxes_that_name_no_axes_are_kept():
  state = ao.adafactor().init({"w": Tagged(jnp.ones(KERNEL), "mine")})
  v_row = state[0].nu["w"].v_row
  assert isinstance(v_row, Tagged) and v_row.tag == "mine" and v_row.value.shape == (256, 1)


WRAPPERS = {
    "adafactor": lambda: ao.adafactor(momentum=0.9),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), ao.adafactor(momentum=0.9)),
    "multi_steps": lambda: optax.MultiSteps(ao.adafactor(), every_k_schedule=2),
    "inject_hyperparams": lambda: optax.inject_hyperparams(ao.adafactor)(learning_rate=0.1),
    "masked": lambda: optax.masked(ao.adafactor(), {"w": True, "b": False, "free": True}),
    "chain_of_links": lambda: ao.with_flax_metadata(optax.chain(
        ao.scale_by_factored_rms(), ao.relative_step_size(), ao.ema_momentum(0.9),
        optax.scale(-1.0))),
}


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_linen_get_sharding_equals_state_shardings(wrap):
  """The trainer's nn.get_sharding over the boxed state == state_shardings on bare params."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  tx, params = WRAPPERS[wrap](), boxed_params()
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(tx.init, params)
  got = nn.get_sharding(abstract, mesh)
  param_specs = jax.tree.map(lambda x: x.get_partition_spec() if isinstance(x, nn.Partitioned)
                             else P(), params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  want = ao.state_shardings(tx, nn.unbox(params), param_specs, mesh=mesh)
  got_leaves = jax.tree.leaves(got)
  assert len(got_leaves) == len(jax.tree.leaves(want))
  for g, w, leaf in zip(got_leaves, jax.tree.leaves(want), jax.tree.leaves(abstract)):
    assert g.is_equivalent_to(w, leaf.ndim), (wrap, leaf.shape, g.spec, w.spec)


def test_linen_update_returns_boxes_like_its_inputs():
  tx, params = ao.adafactor(momentum=0.9), boxed_params()
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert names(updates) == names(params)
  assert names(state[0].nu)["w"] == ao.FactoredMoment(("data", None), (None, "model"))
  # The values are those of the bare step.
  bare_updates, _ = tx.update(nn.unbox(grads), tx.init(nn.unbox(params)), nn.unbox(params))
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(updates), bare_updates)


@pytest.mark.parametrize("mode", (AxisType.Auto, AxisType.Explicit), ids=lambda m: m.name)
def test_nnx_state_variables_carry_their_own_sharding(mode):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode, mode))
  with jax.set_mesh(mesh):
    model = nnx.Linear(256, 512, rngs=nnx.Rngs(0),
                       kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                         ("data", "model")),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("model",)))
    tx = ao.adafactor(momentum=0.9, dtype_momentum="int8")
    state = tx.init(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # raised before: (256, 1) named 'data'
  sharding_of = lambda v: v.get_metadata()["out_sharding"]  # noqa: E731
  assert sharding_of(state[0].nu["kernel"].v_row) == ("data", None)
  assert sharding_of(state[0].nu["kernel"].v_col) == (None, "model")
  assert sharding_of(optax.tree_utils.tree_get(state, "ema")["kernel"].scales) == ("data", "model")
  expected = ao.state_shardings(tx, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  for leaf, want in zip(jax.tree.leaves(optimizer.opt_state), jax.tree.leaves(expected),
                        strict=True):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.shape, leaf.sharding, want)


def test_without_flax_nothing_changes():
  """In a process where flax cannot be imported, the package imports, trains and
  never tries to import it."""
  script = (
      "import sys; sys.modules['flax'] = None\n"
      "import jax.numpy as jnp, adafactor_optax as ao\n"
      "from adafactor_optax import _flax\n"
      "assert _flax._box_types() == ()\n"
      "p = {'w': jnp.ones((256, 128)), 'b': jnp.zeros(128)}\n"
      "tx = ao.adafactor(momentum=0.9)\n"
      "u, s = tx.update(p, tx.init(p), p)\n"
      "assert set(k for k in sys.modules if k.startswith('flax')) == {'flax'}\n"
      "print('ok', round(float(u['w'][0, 0]), 7))\n")
  run = subprocess.run([sys.executable, "-c", script], cwd=helpers.ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert run.returncode == 0, run.stderr[-2000:]
  # -(1 - b1) rho_1 RMS(w) U: -0.1 * 1e-2 * 1 * 1 (U = g / sqrt(g^2) = 1 at step 1).
  assert "ok -0.001\n" in run.stdout


# The whole patterns on 2 and 8 host devices: tests/flax_sharding_worker.py.

CASES = {
    2: [((2, 1), "Auto", p) for p in ("linen_partitioned", "linen_logical", "nnx")]
    + [((2, 1), "Explicit", "nnx")],
    8: [(m, "Auto", p) for m in ((8, 1), (1, 8), (2, 4))
        for p in ("linen_partitioned", "linen_logical", "nnx")]
    + [(m, "Explicit", "nnx") for m in ((8, 1), (1, 8), (2, 4))],
}
CONFIGS = ("defaults", "momentum", "int8_momentum", "bf16_stochastic_rounding")
_RESULTS: dict = {}


def worker_results(devices):
  if devices not in _RESULTS:
    run = subprocess.run(
        [sys.executable, "tests/flax_sharding_worker.py", str(devices)], cwd=helpers.ROOT,
        capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
            [str(helpers.ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])))
    assert run.returncode == 0, run.stderr[-3000:]
    _RESULTS[devices] = [json.loads(line) for line in run.stdout.splitlines()]
  return _RESULTS[devices]


def results_for(devices, mesh, mode, pattern):
  return [r for r in worker_results(devices)
          if (tuple(r["mesh"]), r["mode"], r["pattern"]) == (mesh, mode, pattern)]


ALL_CASES = [(d, *c) for d, cases in CASES.items() for c in cases]
IDS = [f"{d}dev-{'x'.join(map(str, m))}-{mode}-{p}" for d, m, mode, p in ALL_CASES]


@pytest.mark.parametrize(("devices", "mesh", "mode", "pattern"), ALL_CASES, ids=IDS)
def test_flax_pattern_trains_sharded_like_one_device(devices, mesh, mode, pattern):
  runs = {r["config"]: r for r in results_for(devices, mesh, mode, pattern)
          if r["optimizer"] == "ao"}
  assert set(runs) == set(CONFIGS)
  for config, r in runs.items():
    assert "error" not in r, (config, r.get("error"))
    assert r["mismatches"] == [], (config, r["mismatches"])
    losses, want = np.asarray(r["losses"]), np.asarray(r["single_device"])
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], (config, losses)
    # float32: only the order of the sums in the sharded matmuls and means differs.
    # bfloat16 parameters: those last-bit differences of the float32 update flip
    # the rounding of a few elements by one bfloat16 ulp (2^-8 relative).
    rtol = 1e-3 if config.startswith("bf16") else 1e-6
    np.testing.assert_allclose(losses, want, rtol=rtol, err_msg=config)


@pytest.mark.parametrize(("devices", "mesh", "mode", "pattern"), ALL_CASES, ids=IDS)
def test_optax_adafactor_fails_the_same_pattern(devices, mesh, mode, pattern):
  """The contrast the issue reports: optax.adafactor's state keeps its parameters' names."""
  (r,) = [r for r in results_for(devices, mesh, mode, pattern)
          if r["optimizer"] == "optax.adafactor"]
  assert r["outcome"] != "ok", r


# The runnable examples (2 simulated devices each, set by the example itself).

@pytest.mark.parametrize("command", [["examples/flax_linen_sharding.py"],
                                     ["examples/flax_nnx_sharding.py", "explicit"],
                                     ["examples/flax_nnx_sharding.py", "auto"]], ids=" ".join)
def test_flax_sharding_example_runs_and_trains(command):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(helpers.ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  env.pop("XLA_FLAGS", None)
  run = subprocess.run([sys.executable, *command], cwd=helpers.ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", run.stdout)]
  assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], losses
  assert "v_row ('data', None) v_col (None, 'model')" in run.stdout
  assert "state placed as ao.state_shardings says: True" in run.stdout


@pytest.mark.parametrize("mode", (AxisType.Explicit, AxisType.Auto), ids=lambda m: m.name)
def test_int8_momentum_with_fewer_blocks_than_devices(mode):
  """A (1024, 512) kernel sharded 8-way along its 512 columns has 4 int8 blocks per
  row: under Explicit axes the block reshape must say where its result lies (it
  raised ShardingTypeError, so nnx.Optimizer with int8 momentum failed on a
  (1, 8) mesh). The scales' block axis is replicated, as state_shardings says."""
  tx = ao.adafactor(momentum=0.9, dtype_momentum="int8")
  rng = np.random.default_rng(0)
  params = {"w": rng.standard_normal((1024, 512)).astype(np.float32)}
  grads = {"w": rng.standard_normal((1024, 512)).astype(np.float32)}

  def step(p, g, s):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  want_params, want_state = jax.jit(step)(params, grads, tx.init(params))
  mesh = jax.make_mesh((1, 8), ("data", "model"), axis_types=(mode, mode))
  sharding = {"w": jax.sharding.NamedSharding(mesh, P("data", "model"))}
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, sharding)
    expected = ao.state_shardings(tx, sharded)
    state = jax.jit(tx.init)(sharded)
    got_params, got_state = jax.jit(step)(sharded, jax.device_put(grads, sharding), state)
  assert optax.tree_utils.tree_get(expected, "ema")["w"].scales.spec == P("data", None)
  for leaf, want in zip(jax.tree.leaves((state, got_state)), 2 * jax.tree.leaves(expected)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.shape, leaf.sharding, want)
  ema, want_ema = (optax.tree_utils.tree_get(s, "ema")["w"] for s in (got_state, want_state))
  np.testing.assert_allclose(ema.scales, want_ema.scales, rtol=1e-6)
  # Sums in another order: an element may land on the next int8 level, never further;
  # the momentum is of the scaled step, so its parameter then moves by that level,
  # at most its block's scale / 127.
  assert np.max(np.abs(np.asarray(ema.values, np.int32) - np.asarray(want_ema.values))) <= 1
  level = np.max(want_ema.scales) / 127
  np.testing.assert_allclose(got_params["w"], want_params["w"], rtol=1e-6, atol=1.01 * level)


@pytest.mark.parametrize("form", ["names", "spec", "named_sharding"])
def test_nnx_out_sharding_keeps_the_form_it_was_given_in(form):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  make = {"names": lambda *n: n, "spec": P,
          "named_sharding": lambda *n: jax.sharding.NamedSharding(mesh, P(*n))}[form]
  # A NamedSharding brings its own mesh (Flax asserts it against a context mesh's).
  context = contextlib.nullcontext() if form == "named_sharding" else jax.set_mesh(mesh)
  with context:
    params = {"w": nnx.Param(jnp.ones(KERNEL), out_sharding=make("data", "model"))}
    state = ao.adafactor().init(params)
  nu = state[0].nu["w"]
  assert nu.v_row.get_metadata()["out_sharding"] == make("data", None)
  assert nu.v_col.get_metadata()["out_sharding"] == make(None, "model")
  assert isinstance(nu.v_row, nnx.Param) and nu.v_row.shape == (256, 1)


def test_linen_boxes_under_explicit_axes_fail_in_flax_itself():
  """Why the linen patterns run under Auto axes only: with Explicit axes, linen's
  own model.init fails on its boxes (their unbox applies with_sharding_constraint,
  an assert there), before any optimizer is involved. When Flax lifts this, add
  Explicit to the linen cases of the worker."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  dense = nn.Dense(512, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                                         ("data", "model")))
  with jax.set_mesh(mesh), pytest.raises(AssertionError, match="with_sharding_constraint"):
    jax.eval_shape(dense.init, jax.random.key(0), jnp.ones((4, 256)))
