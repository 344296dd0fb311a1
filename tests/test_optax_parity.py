"""Parity with `optax.adafactor` wherever the two should agree: explicit learning rates.

Both run the same float32 gradients on the same tree for 12 steps; each
update must agree to float32 round-off (a few ulps of the largest entry, after
clipping and scaling have been applied in a different order of operations).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao
from tests import helpers

STEPS = 12

GRID = [
    dict(learning_rate=1e-2),
    dict(learning_rate=1e-2, min_dim_size_to_factor=2),
    dict(learning_rate=1e-2, min_dim_size_to_factor=2, factored=False),
    dict(learning_rate=0.1, multiply_by_parameter_scale=False),
    dict(learning_rate=1e-2, clipping_threshold=None),
    dict(learning_rate=1e-2, clipping_threshold=2.0, decay_rate=0.5),
    dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, STEPS), momentum=0.9),
    dict(learning_rate=1e-2, momentum=0.9, dtype_momentum=jnp.bfloat16),
    dict(learning_rate=1e-2, decay_rate=1.0, eps=1e-3, min_dim_size_to_factor=32),
    dict(learning_rate=1e-2, weight_decay_rate=1e-3),
    dict(
        learning_rate=1e-2,
        weight_decay_rate=1e-3,
        weight_decay_mask={k: k != "b" for k in helpers.SHAPES},
    ),
]


@pytest.mark.parametrize("kwargs", GRID, ids=lambda kw: ",".join(sorted(kw)))
def test_updates_equal_optax_adafactor(kwargs):
  params = helpers.make_params()
  grads = helpers.stack(helpers.make_grads(STEPS))
  _, _, (_, ours) = helpers.run_scan(ao.adafactor(**kwargs), params, grads)
  # optax.adafactor itself mixes dtypes (e.g. bf16 momentum with f32 updates), which
  # strict promotion rejects; ours runs under strict promotion (conftest).
  with jax.numpy_dtype_promotion("standard"):
    _, _, (_, theirs) = helpers.run_scan(optax.adafactor(**kwargs), params, grads)
  if kwargs.get("dtype_momentum") == jnp.bfloat16:
    # optax multiplies the bf16 momentum by b1 in bf16, ours upcasts first: each step
    # one bf16 rounding (2^-8) of the momentum apart, decaying with b1, so at most
    # 2^-8 / (1 - b1) of its largest entry in all.
    bound = 2.0**-8 / (1 - kwargs["momentum"])
    for k in params:
      assert helpers.rel_err(ours[k], theirs[k]) < bound, k
    return
  for k in params:
    for t in range(STEPS):
      scale = float(np.max(np.abs(theirs[k][t]), initial=0.0))
      np.testing.assert_allclose(
          ours[k][t], theirs[k][t], rtol=1e-5, atol=1e-6 * scale, err_msg=f"{k} step {t}"
      )


def test_default_learning_rate_is_the_papers_relative_step_not_optaxs_none():
  """The one intended difference: optax's lr=None gives steps of RMS(X); ours rho_t RMS(X)."""
  params = {"w": jnp.full((256, 256), 2.0)}
  grads = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)), jnp.float32)}
  ours, _ = ao.adafactor().update(grads, ao.adafactor().init(params), params)
  theirs, _ = optax.adafactor().update(grads, optax.adafactor().init(params), params)
  ratio = np.asarray(ours["w"]) / np.asarray(theirs["w"])
  np.testing.assert_allclose(ratio, 1e-2, rtol=1e-5)  # rho_1 = min(1e-2, 1/sqrt(1))
  assert 0.019 < float(jnp.sqrt(jnp.mean(ours["w"] ** 2))) <= 0.0200001  # RMS(X) rho_1 d


def test_positional_arguments_in_optaxs_order():
  """A positional call copied from optax.adafactor means the same here."""
  theirs = list(inspect.signature(optax.adafactor).parameters)
  ours = [name for name, p in inspect.signature(ao.adafactor).parameters.items()
          if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
  assert ours == theirs
  # Every positional slot given a non-default value, then compared step by step.
  mask = {k: k != "b" for k in helpers.SHAPES}
  args = (1e-2, 32, 0.5, 0, True, 2.0, 0.9, jnp.float32, 1e-3, 1e-20, True, mask)
  params = helpers.make_params()
  grads = helpers.stack(helpers.make_grads(4))
  _, _, (_, ours_u) = helpers.run_scan(ao.adafactor(*args), params, grads)
  with jax.numpy_dtype_promotion("standard"):
    _, _, (_, theirs_u) = helpers.run_scan(optax.adafactor(*args), params, grads)
  for k in params:
    assert helpers.rel_err(ours_u[k], theirs_u[k]) < 1e-5, k
