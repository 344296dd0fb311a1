"""The alias against the NumPy float64 reference of the paper (arXiv:1804.04235), over 25 steps.

Each step both take the same X_{t-1} (the package's, in float32) and the same
gradient; the reference keeps its own statistics in float64. The error is the
largest deviation of the package's update from the reference's X_t - X_{t-1},
relative to the largest entry of that step, for that parameter: float32 round-off (~1e-7 per operation) accumulated
over a few dozen operations stays well below 1e-5. The same run in float64
(x64) must agree to 1e-10, which only an exact transcription of the paper can.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao
from tests import helpers
from tests import reference as ref

STEPS = 25

# name -> (alias kwargs, reference config)
CASES = {
    "paper_defaults": ({}, ref.Config()),
    "absolute_lr": (
        dict(learning_rate=0.05, multiply_by_parameter_scale=False),
        ref.Config(step=lambda t: 0.05, relative=False),
    ),
    "relative_lr_schedule": (
        dict(learning_rate=optax.linear_schedule(0.02, 0.001, STEPS)),
        ref.Config(step=lambda t: 0.02 + (0.001 - 0.02) * (t - 1) / STEPS),
    ),
    "momentum": (dict(momentum=0.9), ref.Config(b1=0.9)),
    "no_clipping": (dict(clipping_threshold=None), ref.Config(d=None)),
    "clipping_d2": (dict(clipping_threshold=2.0), ref.Config(d=2.0)),
    "decay_c05": (dict(decay_rate=0.5), ref.Config(decay=ref.decay_pow(0.5))),
    "decay_c10": (dict(decay_rate=1.0), ref.Config(decay=ref.decay_pow(1.0))),
    "decay_offset": (dict(decay_offset=5), ref.Config(decay=ref.decay_pow(0.8, offset=5))),
    "adam_b2_bias_corrected": (
        dict(decay_schedule=ao.bias_corrected_decay(0.999)),
        ref.Config(decay=ref.decay_adam(0.999)),
    ),
    "unfactored": (dict(factored=False), ref.Config(factored=False)),
    "factor_small_dims": (dict(min_dim_size_to_factor=2), ref.Config(min_dim=2)),
    "eps_variants": (
        dict(eps=1e-8, eps2=1e-2, max_relative_step=5e-3),
        ref.Config(eps1=1e-8, eps2=1e-2, step=ref.step_paper(5e-3)),
    ),
    "weight_decay": (
        dict(learning_rate=0.01, weight_decay_rate=1e-3, momentum=0.5),
        ref.Config(step=lambda t: 0.01, weight_decay=1e-3, b1=0.5),
    ),
}


def max_step_errors(kwargs, config, dtype):
  params = helpers.make_params(dtype=dtype)
  grads = helpers.make_grads(STEPS, dtype=dtype)
  tx = ao.adafactor(**kwargs)
  _, _, (before, updates) = helpers.run_scan(tx, params, helpers.stack(grads))
  reference = ref.Adafactor(params, config)
  errors = {k: 0.0 for k in params}
  for t in range(STEPS):
    previous = {k: np.asarray(v[t], np.float64) for k, v in before.items()}
    expected = reference.step(previous, {k: np.float64(v) for k, v in grads[t].items()})
    for k in params:
      errors[k] = max(errors[k], helpers.rel_err(updates[k][t], expected[k] - previous[k]))
  return errors


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_float32(name):
  errors = max_step_errors(*CASES[name], np.float32)
  assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("name", ["paper_defaults", "momentum", "adam_b2_bias_corrected", "unfactored"])
def test_matches_reference_float64(name):
  with jax.enable_x64(True):
    errors = max_step_errors(*CASES[name], np.float64)
  assert max(errors.values()) < 1e-10, errors


def test_zero_matrix_moves_by_eps2_floor():
  """X_0 = 0: alpha_1 = eps2 * rho_1 = 1e-5, and the clipped update has RMS 1."""
  params = {"zero": jnp.zeros((130, 140))}
  grads = {"zero": jnp.asarray(np.random.default_rng(0).standard_normal((130, 140)), jnp.float32)}
  tx = ao.adafactor()
  updates, _ = tx.update(grads, tx.init(params), params)
  # U_1 = G / sqrt(V_1) has RMS ~1 (V_1 is the rank-1 fit of G^2); clipping caps it at 1.
  rms = float(jnp.sqrt(jnp.mean(updates["zero"] ** 2)))
  assert 0.9e-5 < rms <= 1.0000001e-5
