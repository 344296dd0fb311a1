"""Gradients or parameters shaped unlike the state: a ValueError naming the leaf and both shapes.

Checked while tracing (static shapes only), so the errors come out of `jax.jit`
and `jax.eval_shape` before anything runs, and nothing is left in the step.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao
from adafactor_optax import _factored, _shapes
from tests import helpers

RUNS = {
    "eager": lambda f, *args: f(*args),
    "jit": lambda f, *args: jax.jit(f)(*args),
    "eval_shape": lambda f, *args: jax.eval_shape(f, *args),
}
runs = pytest.mark.parametrize("run", sorted(RUNS))


def message(transform, what, path, got, want, reference):
  return re.escape(f"{transform}: {what} {path} has shape {got}, but {reference} has shape {want}.")


@runs
def test_transposed_gradient_names_the_leaf_and_both_shapes(run):
  params = {"w": jnp.ones((256, 128)), "b": jnp.ones(128)}
  grads = {"w": jnp.ones((128, 256)), "b": jnp.ones(128)}
  tx = ao.adafactor()
  with pytest.raises(ValueError, match=message(
      "scale_by_factored_rms", "gradient", "['w']", "(128, 256)", "(256, 128)",
      "the parameter the state was built for")):
    RUNS[run](tx.update, grads, tx.init(params), params)


# One wrong gradient per kind of statistics: (parameter shape, gradient shape, rule).
STACK_RULE = lambda path, shape: ao.FactorSpec(-2, -1, batch=(0,)) if len(shape) == 3 else None
ROWS_ONLY = lambda path, shape: ao.FactorSpec(0, 1, estimate="row") if len(shape) == 2 else None
WRONG = {
    "factored": ((160, 192), (160, 191), None),
    "unfactored_matrix": ((8, 5), (5, 8), None),
    "vector": ((192,), (191,), None),
    "scalar": ((), (1,), None),
    "vector_of_one": ((1,), (5,), None),
    "stack_batch_axis": ((3, 130, 140), (4, 130, 140), STACK_RULE),
    "rows_only_kept_axis": ((130, 140), (131, 140), ROWS_ONLY),
    "rank": ((130, 140), (130, 140, 1), None),
}


@pytest.mark.parametrize("kind", sorted(WRONG))
def test_wrong_gradient_shape_for_each_kind_of_statistics(kind):
  param_shape, grad_shape, rule = WRONG[kind]
  tx = ao.scale_by_factored_rms(factor_rule=rule)
  params = {"p": jnp.ones(param_shape), "ok": jnp.ones(3)}
  grads = {"p": jnp.ones(grad_shape), "ok": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"gradient \['p'\] has shape \(.*\), but the parameter"):
    jax.eval_shape(tx.update, grads, tx.init(params))


@runs
def test_parameters_shaped_unlike_their_updates_are_named(run):
  """A transposed parameter would broadcast silently in the relative step (RMS is a scalar)."""
  params = {"w": jnp.ones((256, 128))}
  state = ao.adafactor().init(params)
  grads = {"w": jnp.ones((256, 128))}
  with pytest.raises(ValueError, match=message(
      "relative_step_size", "parameter", "['w']", "(128, 256)", "(256, 128)", "its update")):
    RUNS[run](ao.adafactor().update, grads, state, {"w": jnp.ones((128, 256))})


def test_each_transform_with_a_state_or_params_checks_its_leaves():
  params = {"w": jnp.ones((4, 3))}
  wrong = {"w": jnp.ones((3, 4))}
  tx = ao.ema_momentum(0.9)
  with pytest.raises(ValueError, match=message(
      "ema_momentum", "update", "['w']", "(3, 4)", "(4, 3)", "its momentum")):
    tx.update(wrong, tx.init(params))
  tx = ao.record_diagnostics(decay=0.9, step_size=0.1)
  with pytest.raises(ValueError, match=message(
      "record_diagnostics", "parameter", "['w']", "(3, 4)", "(4, 3)", "its update")):
    tx.update(params, tx.init(params), wrong)


def test_integer_gradient_is_named():
  params = {"w": jnp.ones((4, 3))}
  tx = ao.adafactor()
  with pytest.raises(TypeError, match=r"gradient \['w'\] has dtype int32"):
    tx.update({"w": jnp.ones((4, 3), jnp.int32)}, tx.init(params), params)


RULES = {"largest": None, "last_two": "last_two", "stack": STACK_RULE, "rows_only": ROWS_ONLY,
         "cols_only": lambda path, shape: ao.FactorSpec(0, 1, estimate="col") if len(shape) == 2
         else None}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_state_gives_back_each_parameters_shape(rule):
  """The expected shapes come from the state alone, and match every parameter they should."""
  params = {**helpers.make_params(), "empty": np.zeros((0, 5), np.float32)}
  state = ao.scale_by_factored_rms(factor_rule=RULES[rule], min_dim_size_to_factor=1).init(params)
  for name, p in params.items():
    pattern = _factored.parameter_shape(state.nu[name])
    assert _shapes.matches(p.shape, pattern), (name, p.shape, pattern)
    if not isinstance(state.nu[name], ao.FactoredMoment) and rule.endswith("only") and p.ndim == 2:
      assert pattern.count(None) == 1, (name, pattern)  # the reduced axis, any size
    else:
      assert pattern == p.shape, (name, pattern)


def test_the_checks_leave_nothing_in_the_step(monkeypatch):
  params = {"w": jnp.ones((256, 128)), "b": jnp.ones(128)}

  def traced_step():  # a new optimizer each time: jax caches the trace of a function
    tx = ao.adafactor(momentum=0.9, diagnostics=True)
    return str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))

  checked = traced_step()
  monkeypatch.setattr(_shapes, "check_shapes", lambda *args: None)
  monkeypatch.setattr(_shapes, "check_floating", lambda *args: None)
  assert traced_step() == checked


def test_masked_out_leaves_are_not_checked():
  params = {"w": jnp.ones((256, 128)), "b": jnp.ones(128)}
  tx = optax.masked(ao.adafactor(momentum=0.9), {"w": True, "b": False})
  updates, _ = tx.update(params, tx.init(params), params)
  assert updates["b"].shape == (128,)
