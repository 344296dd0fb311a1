"""`record_diagnostics` / `adafactor(diagnostics=True)` against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao
from tests import helpers, reference

STEPS = 6


class RecordingReference(reference.Adafactor):
  """The NumPy reference, also recording RMS(U_t) = RMS(G / sqrt(V)) before clipping."""

  def __init__(self, params, config):
    super().__init__(params, config)
    self.update_rms = []

  def step(self, params, grads):
    b2 = self.c.decay(self.t + 1)
    rms_now = {}
    for name, g in grads.items():
      saved = {k: v for k, v in self.state[name].items()}
      v = self._second_moment(self.state[name], g, b2)  # advance once to read V_t ...
      rms_now[name] = reference.rms(g / np.sqrt(v))
      self.state[name] = saved                           # ... then let step() redo it
    self.update_rms.append(rms_now)
    return super().step(params, grads)


def _run(tx, params, grads):
  state = tx.init(params)
  records, p = [], params
  for g in grads:
    u, state = tx.update(g, state, p)
    records.append((p, ao.get_diagnostics(state)))
    p = optax.apply_updates(p, u)
  return records


def test_diagnostics_equal_reference_and_hand_computation():
  params = helpers.make_params()
  grads = helpers.make_grads(STEPS)
  records = _run(ao.adafactor(diagnostics=True), params, grads)

  ref = RecordingReference({k: v.astype(np.float64) for k, v in params.items()},
                           reference.Config())
  p = {k: v.astype(np.float64) for k, v in params.items()}
  for t, (g, (p_before, diag)) in enumerate(zip(grads, records), start=1):
    # b2_t = 1 - t^-0.8, rho_t = min(1e-2, 1/sqrt(t)) (Algorithm 6).
    np.testing.assert_allclose(diag["b2"], 1 - t**-0.8, rtol=1e-6)
    np.testing.assert_allclose(diag["rho"], min(1e-2, t**-0.5), rtol=1e-6)
    p = ref.step(p, {k: v.astype(np.float64) for k, v in g.items()})
    rms_u = ref.update_rms[-1]
    sizes = {k: v.size for k, v in params.items()}
    for name in params:
      np.testing.assert_allclose(diag["update_rms"][name], rms_u[name], rtol=1e-4)
      x = np.asarray(p_before[name], np.float64)
      np.testing.assert_allclose(
          diag["alpha"][name], max(1e-3, reference.rms(x)) * min(1e-2, t**-0.5), rtol=1e-5)
    # Global RMS pools all elements: sqrt(sum_k n_k RMS_k^2 / sum_k n_k).
    total = sum(sizes.values())
    expected_global = np.sqrt(sum(sizes[k] * rms_u[k] ** 2 for k in params) / total)
    np.testing.assert_allclose(diag["update_rms_global"], expected_global, rtol=1e-4)
    expected_clipped = sum(sizes[k] for k in params if rms_u[k] > 1.0) / total
    np.testing.assert_allclose(diag["clipped_fraction"], expected_clipped, atol=1e-7)


def test_gradient_stream_clips_something_and_not_everything():
  """The check above is only meaningful if some but not all blocks get clipped."""
  grads = helpers.make_grads(STEPS)
  records = _run(ao.adafactor(diagnostics=True), helpers.make_params(), grads)
  fractions = [float(d["clipped_fraction"]) for _, d in records[1:]]
  assert 0.0 < max(fractions) < 1.0


@pytest.mark.parametrize("kwargs", [
    {},
    {"momentum": 0.9},
    {"learning_rate": 1e-3, "multiply_by_parameter_scale": False, "clipping_threshold": None},
])
def test_diagnostics_do_not_change_updates(kwargs):
  params, grads = helpers.make_params(), helpers.stack(helpers.make_grads(4))
  plain, _, _ = helpers.run_scan(ao.adafactor(**kwargs), params, grads)
  with_diag, state, _ = helpers.run_scan(ao.adafactor(diagnostics=True, **kwargs), params, grads)
  for k in params:
    np.testing.assert_array_equal(plain[k], with_diag[k])
  if "clipping_threshold" in kwargs:  # absolute step: alpha_t = rho_t, nothing clipped
    d = ao.get_diagnostics(state)
    assert float(d["clipped_fraction"]) == 0.0
    np.testing.assert_allclose(d["alpha"]["w"], 1e-3, rtol=1e-6)


def test_no_diagnostics_no_state():
  state = ao.adafactor().init(helpers.make_params())
  with pytest.raises(KeyError):
    ao.get_diagnostics(state)


def _fig1_update_rms(b2, steps=400, n=64):
  """RMS(U_t) of one factored n x n matrix, noisy least squares, warmup, no clipping."""
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.standard_normal((steps, 32, n)), jnp.float32)
  w_true = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n), jnp.float32)
  warmup = steps // 6
  tx = ao.adafactor(
      lambda count: 0.01 * jnp.minimum((count.astype(jnp.float32) + 1) / warmup, 1.0),
      multiply_by_parameter_scale=False,
      decay_schedule=ao.bias_corrected_decay(b2),  # Adam's constant b2 (Algorithm 3)
      clipping_threshold=None,
      min_dim_size_to_factor=16,
      diagnostics=True,
  )

  def loss(p, x):  # a noise floor (the sin term) keeps the gradients from vanishing
    return jnp.mean(jnp.square(x @ p["w"] - x @ w_true - 0.3 * jnp.sin(7.0 * x)))

  def body(carry, x):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p, x), s, p)
    return (optax.apply_updates(p, u), s), optax.tree_utils.tree_get(s, "update_rms")["w"]

  params = {"w": jnp.zeros((n, n), jnp.float32)}
  _, rms = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), xs))(params)
  return np.asarray(rms)


def test_figure1_slow_decay_gives_out_of_date_update_scale():
  """Figure 1: with b2 = 0.9, RMS(U_t) stays near 1; with b2 = 0.999 it departs.

  Gradients shrink by an order of magnitude as the loss falls; a second-moment
  estimate averaging over ~1000 steps still remembers the large early ones, so
  U_t = G_t / sqrt(V_t) is much smaller than 1 (the paper's dip to ~0.33).
  """
  fast, slow = _fig1_update_rms(0.9), _fig1_update_rms(0.999)
  assert np.all(np.isfinite(fast)) and np.all(np.isfinite(slow))
  # b2_1 = 0: V_1 is the rank-1 fit of G_1^2 itself, so RMS(U_1) is about 1.
  np.testing.assert_allclose([fast[0], slow[0]], 1.0, rtol=0.02)
  assert 0.5 < fast.min() and fast.max() < 1.5
  assert slow.min() < 0.4
  # Distance from 1 on a log scale, averaged over the run: several times larger.
  assert np.mean(np.abs(np.log(slow))) > 3 * np.mean(np.abs(np.log(fast)))


def _per_layer(path, shape):
  return ao.FactorSpec(-2, -1, batch=(0,)) if len(shape) == 3 else None


# Two layers of very different scale, whose gradients change scale in opposite
# directions: after step 1 one layer's U_t is clipped while the other's is not,
# and the RMS of U_t over the whole stack is below d (so per-parameter clipping
# would clip neither).
LAYER_SCALES = [(1.0, 1.0), (10.0, 0.1), (0.1, 10.0), (1.0, 1.0), (3.0, 0.3)]


def _stack_problem():
  rng = np.random.default_rng(3)
  params = {
      "stack": np.stack([1e-3 * rng.standard_normal((160, 130)),
                         rng.standard_normal((160, 130))]).astype(np.float32),
      "b": (0.1 * rng.standard_normal(130)).astype(np.float32),
  }
  grads = [{"stack": np.stack([a * rng.standard_normal((160, 130)),
                               b * rng.standard_normal((160, 130))]).astype(np.float32),
            "b": rng.standard_normal(130).astype(np.float32)} for a, b in LAYER_SCALES]
  return params, grads


def _split(tree):
  """The stack's layers as separate parameters: what a per-layer rule must equal."""
  out = {k: np.asarray(v, np.float64) for k, v in tree.items() if k != "stack"}
  out |= {f"layer{i}": np.asarray(x, np.float64) for i, x in enumerate(tree["stack"])}
  return out


def test_per_layer_rule_diagnostics_follow_the_blocks():
  """With FactorSpec(batch=(0,)) alpha_t, RMS(U_t) and clipping are per layer.

  Expected values: the reference run on the layers given as separate parameters.
  """
  params, grads = _stack_problem()
  records = _run(ao.adafactor(diagnostics=True, factor_rule=_per_layer), params, grads)
  ref = RecordingReference(_split(params), reference.Config())
  p = _split(params)
  layers = ("layer0", "layer1")
  clipped_layers = 0
  for t, (g, (p_before, diag)) in enumerate(zip(grads, records), start=1):
    p = ref.step(p, _split(g))
    rms_u = ref.update_rms[-1]
    assert diag["update_rms"]["stack"].shape == (2,) and diag["alpha"]["stack"].shape == (2,)
    np.testing.assert_allclose(diag["update_rms"]["stack"], [rms_u[k] for k in layers], rtol=1e-4)
    np.testing.assert_allclose(diag["update_rms"]["b"], rms_u["b"], rtol=1e-4)
    rho = min(1e-2, t**-0.5)
    expected_alpha = [max(1e-3, reference.rms(np.asarray(x, np.float64))) * rho
                      for x in p_before["stack"]]
    np.testing.assert_allclose(diag["alpha"]["stack"], expected_alpha, rtol=1e-5)
    sizes = {k: v.size for k, v in _split(params).items()}
    total = sum(sizes.values())
    np.testing.assert_allclose(
        diag["update_rms_global"],
        np.sqrt(sum(sizes[k] * rms_u[k] ** 2 for k in sizes) / total), rtol=1e-4)
    np.testing.assert_allclose(
        diag["clipped_fraction"], sum(sizes[k] for k in sizes if rms_u[k] > 1.0) / total,
        atol=1e-7)
    clipped_layers += sum(rms_u[k] > 1.0 for k in layers) == 1
  # The case is meaningful: at some step exactly one of the two layers was clipped,
  # while the stack as a whole was not, and the layers' alphas differ by decades.
  assert clipped_layers >= 2
  alpha = np.asarray(records[0][1]["alpha"]["stack"])
  assert alpha[1] > 100 * alpha[0]


@pytest.mark.parametrize("kwargs", [{}, {"momentum": 0.9}])
def test_per_layer_diagnostics_keep_the_blocks_of_clipping(kwargs):
  """diagnostics=True moves clipping into a separate link, which must clip per layer
  as the fused clipping does; both equal the reference on the separate layers."""
  params, grads = _stack_problem()
  plain, _, _ = helpers.run_scan(
      ao.adafactor(factor_rule=_per_layer, **kwargs), params, helpers.stack(grads))
  with_diag, _, _ = helpers.run_scan(
      ao.adafactor(diagnostics=True, factor_rule=_per_layer, **kwargs), params,
      helpers.stack(grads))
  np.testing.assert_allclose(with_diag["stack"], plain["stack"], rtol=1e-6, atol=1e-9)
  ref = reference.Adafactor(_split(params), reference.Config(b1=kwargs.get("momentum")))
  p = _split(params)
  for g in grads:
    p = ref.step(p, _split(g))
  for i in range(2):
    assert helpers.rel_err(with_diag["stack"][i] - params["stack"][i],
                           p[f"layer{i}"] - params["stack"][i]) < 1e-4
