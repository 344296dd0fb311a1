"""Factoring rules: which axes, per-layer blocks for scanned stacks, row/column-only estimates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao
from tests import helpers


def _state_shapes(tx, params):
  return jax.tree.map(jnp.shape, optax.tree_utils.tree_get(jax.eval_shape(tx.init, params), "nu"))


def test_scanned_stack_optax_factors_the_layer_axis_ours_with_a_one_line_rule():
  """For a [256, 4096, 128] stack optax factors 4096 x 256, the layer axis."""
  params = {"layers": jax.ShapeDtypeStruct((256, 4096, 128), jnp.float32)}
  theirs = jax.eval_shape(optax.adafactor(1e-2).init, params)[0]
  # Means over the 4096 axis and over the 256 (layer) axis; 128 is kept as a batch axis.
  assert theirs.v_row["layers"].shape == (256, 128) and theirs.v_col["layers"].shape == (4096, 128)
  assert ao.factored_axes((256, 4096, 128)) == (0, 1)  # the default rule agrees with optax

  per_layer = ao.adafactor(factor_rule=lambda path, shape: ao.FactorSpec(-2, -1, batch=(0,)))
  nu = _state_shapes(per_layer, params)["layers"]
  assert nu.v_row == (256, 4096, 1) and nu.v_col == (256, 1, 128)  # each layer its own 4096 x 128


@pytest.mark.parametrize("rule", [
    lambda path, shape: ao.FactorSpec(1, 2, batch=(0,)) if len(shape) == 3 else None,
    ao.stacked_layers(),
])
def test_stacked_layers_with_batch_rule_equal_separate_layers(rule):
  """A (layers, d, f) stack with the per-layer rule steps exactly like the layers apart:
  statistics, clipping RMS and parameter scale all per layer slice."""
  rng = np.random.default_rng(0)
  layers, shape = 3, (160, 130)
  stack = (rng.standard_normal((layers, *shape)) * np.array([0.01, 1.0, 0.0])[:, None, None])
  grads = [rng.standard_normal((layers, *shape)) * np.array([1e-3, 1.0, 1e2])[:, None, None]
           for _ in range(6)]
  stacked = helpers.run_scan(ao.adafactor(factor_rule=rule), {"stack": np.float32(stack)},
                             helpers.stack([{"stack": np.float32(g)} for g in grads]))[2][1]
  apart = helpers.run_scan(
      ao.adafactor(),
      {f"l{i}": np.float32(stack[i]) for i in range(layers)},
      helpers.stack([{f"l{i}": np.float32(g[i]) for i in range(layers)} for g in grads]),
  )[2][1]
  for i in range(layers):
    np.testing.assert_allclose(stacked["stack"][:, i], apart[f"l{i}"], rtol=1e-6, atol=1e-12)
  # Without the rule the stack is one block: the layer with tiny gradients and the zero
  # layer move by the whole stack's scale instead of their own.
  whole = helpers.run_scan(ao.adafactor(), {"stack": np.float32(stack)},
                           helpers.stack([{"stack": np.float32(g)} for g in grads]))[2][1]
  assert helpers.rel_err(whole["stack"][:, 2], apart["l2"]) > 1.0


def test_last_two_axes_rule():
  params = {"conv": jax.ShapeDtypeStruct((3, 200, 130, 140), jnp.float32)}
  assert _state_shapes(ao.adafactor(), params)["conv"].v_row == (3, 200, 130, 1)  # axes 1, 3
  last = _state_shapes(ao.adafactor(factor_rule="last_two"), params)["conv"]
  assert last.v_row == (3, 200, 130, 1) and last.v_col == (3, 200, 1, 140)
  small = {"w": jax.ShapeDtypeStruct((500, 64), jnp.float32)}
  assert _state_shapes(ao.adafactor(factor_rule="last_two"), small)["w"] == (500, 64)
  # Both of the last two axes must reach min_dim_size_to_factor, the second-last too.
  wide = {"w": jax.ShapeDtypeStruct((64, 500), jnp.float32)}
  assert _state_shapes(ao.adafactor(factor_rule="last_two"), wide)["w"] == (64, 500)
  assert _state_shapes(ao.adafactor(factor_rule="last_two", min_dim_size_to_factor=64),
                       wide)["w"] == ao.FactoredMoment((64, 1), (1, 500))


def test_pytree_of_specs_and_unfactored_leaves():
  params = {"w": jnp.ones((6, 5)), "big": jnp.ones((300, 200)), "b": jnp.ones(5)}
  specs = {"w": ao.FactorSpec(0, 1), "big": None, "b": None}
  shapes = _state_shapes(ao.adafactor(factor_rule=specs), params)
  assert shapes == {"w": ao.FactoredMoment((6, 1), (1, 5)), "big": (300, 200), "b": (5,)}


def _single_statistic_reference(grads, axis):
  """V_ij = mean over `axis` of G^2 (+ eps1), moving average with 1 - t^-0.8."""
  v = 0.0
  out = []
  for t, g in enumerate(grads, start=1):
    b2 = 1 - t**-0.8
    v = b2 * v + (1 - b2) * (np.mean(g**2, axis=axis, keepdims=True) + 1e-30)
    out.append(g / np.sqrt(v))
  return out


@pytest.mark.parametrize("estimate,axis", [("row", 1), ("col", 0)])
def test_row_only_and_column_only_estimates(estimate, axis):
  """Table 2 rows D (row means only) and E (column means only)."""
  grads = [np.random.default_rng(i).standard_normal((7, 9)) * 10.0 ** (i - 2) for i in range(5)]
  tx = ao.scale_by_factored_rms(
      factor_rule=lambda path, shape: ao.FactorSpec(0, 1, estimate=estimate))
  params = jnp.zeros((7, 9))
  state = tx.init(params)
  assert state.nu.shape == ((7, 1) if estimate == "row" else (1, 9))
  for g, expected in zip(grads, _single_statistic_reference(grads, axis)):
    u, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    np.testing.assert_allclose(u, expected, rtol=2e-5)


@pytest.mark.parametrize(
    "spec,message",
    [
        (ao.FactorSpec(0, 2), "out of range"),
        (ao.FactorSpec(1, -1), "repeat"),
        (ao.FactorSpec(0, 1, batch=(1,)), "repeat"),
        (ao.FactorSpec(0, 1, estimate="diagonal"), "estimate"),
        ((0, 1), "expected a FactorSpec"),
    ],
)
def test_bad_specs_name_the_parameter(spec, message):
  tx = ao.adafactor(factor_rule=lambda path, shape: spec if len(shape) == 2 else None)
  with pytest.raises((ValueError, TypeError), match=rf"\['enc'\]\['w'\].*{message}"):
    tx.init({"enc": {"w": jnp.ones((4, 5))}, "b": jnp.ones(3)})


def test_factoring_report():
  params = {
      "embed": jax.ShapeDtypeStruct((32000, 512), jnp.float32),
      "stack": jax.ShapeDtypeStruct((12, 512, 2048), jnp.bfloat16),
      "norm": jax.ShapeDtypeStruct((512,), jnp.float32),
  }
  rule = lambda path, shape: ao.FactorSpec(1, 2, batch=(0,)) if len(shape) == 3 else None
  report = ao.factoring_report(params, ao.adafactor(factor_rule=rule), rule)
  lines = report.splitlines()
  # None keeps the embedding whole, 32000 x 512 floats where the default keeps 32000 + 512:
  # 65,536,000 - 130,048 = 65,405,952 bytes more, flagged in the row and summed below.
  assert ("| ['embed'] | (32000, 512) | **no** (default: rows 0, cols 1; +65,405,952 bytes) "
          "| 65,536,000 | 131,072,000 |") in lines
  # 12 layers x (512 + 2048) float32 statistics; Adam: 2 bf16 values per parameter.
  assert "| ['stack'] | (12, 512, 2048) | rows 1, cols 2, batch (0,) | 122,880 | 50,331,648 |" in lines
  assert "| ['norm'] | (512,) | no | 2,048 | 4,096 |" in lines  # a vector: nothing to flag
  assert lines[-3].startswith("| total (whole state) |") and lines[-2] == ""
  assert lines[-1] == ("**1 matrix kept whole that the default rule factors: "
                       "+65,405,952 bytes of state.**")


def test_factoring_report_flags_nothing_for_the_stacked_layers_rule():
  """With `stacked_layers` the embedding keeps the default's 32000 + 512 floats and the
  whole state is the default rule's to the byte: batch axes cost no state."""
  params = {
      "embed": jax.ShapeDtypeStruct((32000, 512), jnp.float32),
      "stack": jax.ShapeDtypeStruct((12, 512, 2048), jnp.float32),
  }
  rule = ao.stacked_layers()
  lines = ao.factoring_report(params, ao.adafactor(factor_rule=rule), rule).splitlines()
  assert "| ['embed'] | (32000, 512) | rows 0, cols 1 | 130,048 | 131,072,000 |" in lines
  assert "| ['stack'] | (12, 512, 2048) | rows 1, cols 2, batch (0,) | 122,880 | 100,663,296 |" in lines
  assert lines[-1].startswith("| total (whole state) | | | 252,936 |")  # 130,048 + 122,880 + 8
  assert lines[-1] == ao.factoring_report(params, ao.adafactor()).splitlines()[-1]


def test_factoring_report_compares_with_the_default_at_a_given_min_dim():
  """A 64 x 40 matrix kept whole is a cost only against a default that factors it."""
  params = {"w": jax.ShapeDtypeStruct((64, 40), jnp.float32)}
  whole = ao.adafactor(factor_rule=lambda path, shape: None)
  assert "**" not in ao.factoring_report(params, whole)  # 40 < 128: the default keeps it too
  lines = ao.factoring_report(params, whole, min_dim_size_to_factor=32).splitlines()
  # 64 x 40 floats kept, 64 + 40 by the default: (2560 - 104) * 4 = 9,824 bytes more.
  assert "| ['w'] | (64, 40) | **no** (default: rows 0, cols 1; +9,824 bytes) |" in lines[2]


def test_factoring_report_reads_the_decision_from_tx():
  """min_dim_size_to_factor=32 factors a 64 x 40 matrix: the report says so (its state
  is 64 + 40 floats), with no rule passed."""
  params = {"w": jax.ShapeDtypeStruct((64, 40), jnp.float32),
            "v": jax.ShapeDtypeStruct((64, 16), jnp.float32)}
  lines = ao.factoring_report(params, ao.adafactor(min_dim_size_to_factor=32)).splitlines()
  assert "| ['w'] | (64, 40) | rows 0, cols 1 | 416 | 20,480 |" in lines
  assert "| ['v'] | (64, 16) | no | 4,096 | 8,192 |" in lines
  # "last_two" and the per-spec estimates, read the same way.
  lines = ao.factoring_report({"w": jax.ShapeDtypeStruct((3, 200, 130), jnp.float32)},
                              ao.adafactor(factor_rule="last_two")).splitlines()
  assert "| ['w'] | (3, 200, 130) | rows 1, cols 2 |" in lines[2]
  row_only = lambda path, shape: ao.FactorSpec(0, 1, estimate="row")
  lines = ao.factoring_report({"w": jax.ShapeDtypeStruct((7, 9), jnp.float32)},
                              ao.adafactor(factor_rule=row_only), row_only).splitlines()
  assert "| ['w'] | (7, 9) | means over axis 1 only | 28 |" in lines[2]


def test_factoring_report_rejects_a_rule_tx_does_not_use():
  params = {"w": jax.ShapeDtypeStruct((64, 40), jnp.float32)}
  with pytest.raises(ValueError, match=r"\['w'\]"):
    ao.factoring_report(params, ao.adafactor(), lambda path, shape: ao.FactorSpec(0, 1))


def test_default_factoring_is_the_default_rule_at_the_optimizers_min_dim():
  """A rule answering DEFAULT_FACTORING everywhere gives the state of no rule at all,
  for the min_dim_size_to_factor of the optimizer it is given to; None stays "whole"."""
  params = {"w": jnp.ones((64, 40)), "big": jnp.ones((300, 200)), "b": jnp.ones(5)}
  default = lambda path, shape: ao.DEFAULT_FACTORING
  for min_dim in (None, 32):
    assert (_state_shapes(ao.adafactor(factor_rule=default, min_dim_size_to_factor=min_dim),
                          params)
            == _state_shapes(ao.adafactor(min_dim_size_to_factor=min_dim), params))
  shapes = _state_shapes(ao.adafactor(factor_rule=default, min_dim_size_to_factor=32), params)
  assert shapes["w"] == ao.FactoredMoment((64, 1), (1, 40))  # 40 >= 32: factored
  tx = ao.scale_by_factored_rms(factor_rule=default, min_dim_size_to_factor=32)
  assert jax.tree.map(jnp.shape, tx.init(params).nu)["w"] == ao.FactoredMoment((64, 1), (1, 40))
  whole = _state_shapes(ao.adafactor(factor_rule=lambda path, shape: None), params)
  assert whole["big"] == (300, 200)
  # As a leaf of a pytree of specs.
  specs = {"w": ao.FactorSpec(1, 0), "big": ao.DEFAULT_FACTORING, "b": None}
  shapes = _state_shapes(ao.adafactor(factor_rule=specs), params)
  assert shapes == {"w": ao.FactoredMoment((1, 40), (64, 1)),
                    "big": ao.FactoredMoment((300, 1), (1, 200)), "b": (5,)}


def test_a_rule_is_asked_once_per_parameter_whatever_min_dim():
  calls = []

  def rule(path, shape):
    calls.append(jax.tree_util.keystr(path))
    return ao.DEFAULT_FACTORING

  params = {"w": jnp.ones((64, 40)), "b": jnp.ones(5)}
  tx = ao.adafactor(factor_rule=rule, min_dim_size_to_factor=32, diagnostics=True)
  state = tx.init(params)
  tx.update(params, state, params)
  assert sorted(calls) == ["['b']", "['w']"]


def test_stacked_layers_rule():
  rule = ao.stacked_layers()
  assert rule((), (12, 512, 2048)) == ao.FactorSpec(-2, -1, batch=(0,))
  assert rule((), (32000, 512)) is ao.DEFAULT_FACTORING and rule((), (512,)) is ao.DEFAULT_FACTORING
  # Nested scans: every leading axis is a layer axis.
  assert ao.stacked_layers(rank=4)((), (2, 6, 512, 2048)) == ao.FactorSpec(-2, -1, batch=(0, 1))
  assert ao.stacked_layers(rank=4)((), (6, 512, 2048)) is ao.DEFAULT_FACTORING
  with pytest.raises(ValueError, match="rank"):
    ao.stacked_layers(rank=2)
  params = {"embed": jax.ShapeDtypeStruct((1000, 256), jnp.float32),
            "stack": jax.ShapeDtypeStruct((4, 256, 512), jnp.float32)}
  shapes = _state_shapes(ao.adafactor(factor_rule=rule), params)
  assert shapes == {"embed": ao.FactoredMoment((1000, 1), (1, 256)),
                    "stack": ao.FactoredMoment((4, 256, 1), (4, 1, 512))}
