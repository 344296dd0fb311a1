"""`_leafwise`: the leaf-by-leaf step computes exactly what the whole-tree chain does.

The CPU traces the chain leaf by leaf already; here it is compared, bit for
bit, with the whole-tree chain (`LEAFWISE_PLATFORMS` emptied), under the CPU's
plan and, tied in leaf order (`TIED_PLATFORMS` adds the CPU), under the TPU's.
Whether XLA:TPU then orders the step leaf by leaf is read from a deviceless
compile: the same estimate under its default scheduler as under a forced
depth-first order.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao
from adafactor_optax import _grouping, _leafwise
from tests import test_compiled_step

def stacked_twins(path, shape):
  """Two leaves of one shape, factored otherwise: they must not share a trace."""
  if len(shape) == 3:  # the same statistics; blocks per layer for one of them
    return ao.FactorSpec(-2, -1, batch=(0,) if "twin" in jax.tree_util.keystr(path) else ())
  return ao.DEFAULT_FACTORING


CONFIGS = {
    "defaults": dict(),
    "learning rate": dict(learning_rate=1e-2),
    "momentum": dict(learning_rate=1e-2, momentum=0.9),
    "int8 momentum": dict(learning_rate=1e-2, momentum=0.9, dtype_momentum="int8"),  # untied
    "stacked layers": dict(factor_rule=ao.stacked_layers()),
    "path rule": dict(factor_rule=lambda path, shape: (
        None if "keep" in jax.tree_util.keystr(path) else ao.DEFAULT_FACTORING)),
    "one shape, two rules": dict(factor_rule=stacked_twins),
    "weight decay": dict(learning_rate=1e-2, weight_decay_rate=1e-3),
    "skip non-finite": dict(skip_non_finite=True),  # untied
    "stochastic rounding": dict(learning_rate=1e-2, momentum=0.9, dtype_momentum="int8",
                                stochastic_rounding=True),
    "stochastic rounding, float momentum": dict(learning_rate=1e-2, momentum=0.9,
                                                stochastic_rounding=True),
}


def params_tree(dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  tree = {
      "layer": {"kernel": jax.random.normal(keys[0], (64, 32)), "bias": jnp.zeros(32)},
      "keep": jax.random.normal(keys[1], (48, 40)),
      "twin": jax.random.normal(keys[2], (64, 32)),  # same shape: its own random bits
      "scan": {"kernel": jax.random.normal(keys[3], (3, 16, 24))},
      "scan_twin": {"kernel": jax.random.normal(keys[3], (3, 16, 24)) + 1.0},
      "scale": jnp.ones(()),
  }
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def run(tx, params, steps=3):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    grads = jax.tree.map(lambda x, t=t: (jnp.sin(3.0 * x + t) + 0.1).astype(x.dtype), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("plan, tied", [("cpu", False), ("tpu", True)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_leaf_by_leaf_step_equals_the_whole_tree_step(name, plan, tied, monkeypatch):
  dtype = jnp.bfloat16 if "rounding" in name else jnp.float32
  params = params_tree(dtype)
  monkeypatch.setitem(_grouping.PLANS, "cpu", _grouping.PLANS[plan])  # the CPU compiles it
  monkeypatch.setattr(_leafwise, "LEAFWISE_PLATFORMS", ())
  monkeypatch.setattr(_leafwise, "TIED_PLATFORMS", ())
  expected = run(ao.adafactor(**CONFIGS[name]), params)
  monkeypatch.setattr(_leafwise, "LEAFWISE_PLATFORMS", ("cpu",))
  monkeypatch.setattr(_leafwise, "TIED_PLATFORMS", ("cpu",) if tied else ())
  monkeypatch.setattr(_leafwise, "MIN_LEAVES", 2)
  got = run(ao.adafactor(**CONFIGS[name]), params)
  assert_equal(got, expected)


def test_equal_leaves_share_one_trace(monkeypatch):
  """Twelve layers of one shape: the chain is traced for one, not for twelve."""
  monkeypatch.setattr(_leafwise, "MIN_LEAVES", 2)
  params = {f"layer{i}": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)} for i in range(12)}
  tx = ao.adafactor(1e-2)
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  leaf_steps = [e for e in equations(jaxpr.jaxpr) if e.primitive.name in ("pjit", "jit")
                and e.params.get("name") == "one_leaf"]
  assert len(leaf_steps) == 2 * 24  # the CPU's branch and the TPU's
  assert len({id(e.params["jaxpr"]) for e in leaf_steps}) == 2 * 2  # a kernel and a bias


def equations(jaxpr):
  """Every equation of `jaxpr`, in its sub-jaxprs too (the backends' branches)."""
  for e in jaxpr.eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from equations(sub)


def assert_equal(got, expected):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_int8_momentum_tied_directly():
  """`adafactor` leaves int8 momentum untied (it estimates lower so), but the tie is exact."""
  params = params_tree(jnp.float32)
  tx = ao.adafactor(1e-2, momentum=0.9, dtype_momentum="int8")
  with _grouping.traced_plans("tpu"):
    expected = run(tx, params)
    tied = optax.GradientTransformation(tx.init, functools.partial(
        _leafwise.leafwise_update, optax.with_extra_args_support(tx)))
    assert_equal(run(tied, params), expected)


def test_tied_step_is_traced_leaf_by_leaf(monkeypatch):
  """One barrier per leaf after the first LAG, each carrying leaf i - LAG's new parameter."""
  monkeypatch.setattr(_leafwise, "TIED_PLATFORMS", ("cpu",))
  params = params_tree(jnp.float32)
  tx = _leafwise.leaf_by_leaf(optax.chain(ao.scale_by_factored_rms(), optax.scale(-1e-2)))
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(lambda p, s: _leafwise.leafwise_update(
      optax.with_extra_args_support(tx), p, s, p))(params, state)
  barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
  assert len(barriers) == len(jax.tree.leaves(params)) - _leafwise.LAG
  adds = [e for e in jaxpr.eqns if e.primitive.name == "add" and e.outvars[0] in
          {v for b in barriers for v in b.invars}]
  assert len(adds) == len(barriers)  # the token: p + u, outside any barrier


def test_untied_without_params_or_with_one_leaf():
  tx = _leafwise.leaf_by_leaf(optax.sgd(0.1))
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update(params, tx.init(params))  # sgd needs no params: passes through
  np.testing.assert_allclose(updates["w"], -0.1)


@test_compiled_step.needs_aot
@pytest.mark.slow
def test_xla_tpu_compiles_it_in_leaf_order():
  """v5p, a 4-layer transformer: the default scheduler's estimate is the depth-first one's.

  Untied, XLA:TPU's list scheduler estimates this step well above its
  depth-first order; tied, every scheduler gives the same order. Estimates
  (the TPU compiler's cost model), compared within one compile of each.
  """
  script = f"""
import json, sys
sys.path[:0] = [{test_compiled_step.ROOT!r}, {os.path.join(test_compiled_step.ROOT, 'benchmarks')!r}]
import adafactor_optax as ao, jax, optax
import compiled_hlo as H, compiled_trees as T
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
rep = NamedSharding(Mesh([H.devices("tpu", "v5p:2x2x1")[0]], ("chip",)), P())
params = H.structs(T.transformer_tree(False, layers=4), jax.numpy.float32, rep)
out = {{}}
for name, tx in {{"ours": ao.adafactor(1e-2), "optax": optax.adafactor(1e-2)}}.items():
  ss = jax.tree.map(lambda _: rep, jax.eval_shape(tx.init, params))
  r = H.compile_and_measure(tx, params, ss, "tpu", ("dfs",))
  out[name] = (r["tpu_est_s"], r["tpu_est_s_by_scheduler"]["dfs"])
print(json.dumps(out))
"""
  run = subprocess.run([sys.executable, "-c", script], cwd=test_compiled_step.ROOT,
                       env=dict(os.environ, **test_compiled_step.ENV), capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  (ours, ours_dfs), (optax_est, _) = out["ours"], out["optax"]
  assert ours <= 1.02 * ours_dfs, out
  assert ours <= optax_est, out


def test_eager_update_equals_the_whole_tree_one(monkeypatch):
  """Called outside jit, the leaves are stepped one by one, each without a jit of its own."""
  params = params_tree(jnp.float32)
  tx = ao.adafactor(1e-2, momentum=0.9)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1, params)
  monkeypatch.setattr(_leafwise, "LEAFWISE_PLATFORMS", ())
  expected = tx.update(grads, state, params)
  monkeypatch.setattr(_leafwise, "LEAFWISE_PLATFORMS", ("cpu",))
  monkeypatch.setattr(_leafwise, "MIN_LEAVES", 2)
  compiled, jit = [], jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(a) or jit(*a, **k))
  assert_equal(tx.update(grads, state, params), expected)
  assert not compiled
