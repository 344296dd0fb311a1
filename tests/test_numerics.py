"""Numerics and bad input: each case works correctly or fails with a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao
from adafactor_optax import _numerics
from tests import helpers
from tests import reference as ref


def finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def step(tx, grads, params, state=None):
  state = tx.init(params) if state is None else state
  return jax.jit(tx.update)(grads, state, params)


# ---- float16 --------------------------------------------------------------------------------


def test_float16_zero_gradients_keep_eps1():
  """eps1 = 1e-30 is 0 in float16; the statistics are float32, so V = 1e-30, not 0."""
  params = {"w": jnp.ones((256, 128), jnp.float16), "b": jnp.ones(7, jnp.float16)}
  updates, state = step(ao.adafactor(), jax.tree.map(jnp.zeros_like, params), params)
  assert finite(updates) and all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
  nu = state[0].nu
  np.testing.assert_allclose(nu["b"], 1e-30, rtol=1e-6)
  np.testing.assert_allclose(nu["w"].v_col, 1e-30, rtol=1e-6)


def test_large_gradients_do_not_overflow_the_statistics():
  """f16 gradients of 1e3 (G^2 = 1e6 > f16 max) and f32 gradients of 1e15 (G^2 = 1e30)."""
  rng = np.random.default_rng(0)
  for dtype, scale in [(jnp.float16, 1e3), (jnp.float32, 1e15)]:
    params = {"w": jnp.ones((256, 128), dtype), "b": jnp.ones(9, dtype)}
    signs = jax.tree.map(lambda p: rng.choice([-1.0, 1.0], p.shape), params)
    grads = jax.tree.map(lambda s, p, k=scale: jnp.asarray(k * s, p.dtype), signs, params)
    updates, state = step(ao.adafactor(), grads, params)
    assert finite(updates) and finite(state)
    # |G| is constant, so |U| = 1 everywhere and the step is rho_1 * RMS(X) = 1e-2.
    for u in jax.tree.leaves(updates):
      np.testing.assert_allclose(np.abs(np.float32(u)), 1e-2, rtol=1e-3)


# ---- schedules at their edges ---------------------------------------------------------------


def test_decay_offset_beyond_the_count_is_clamped():
  """optax gives NaN here; t is clamped to 1, so b2 = 0 until the offset is reached."""
  params, grads = helpers.make_params(), helpers.stack(helpers.make_grads(5))
  _, _, (_, ours) = helpers.run_scan(ao.adafactor(decay_offset=100), params, grads)
  _, _, (_, b2_zero) = helpers.run_scan(ao.adafactor(decay_schedule=lambda c: 0.0), params, grads)
  assert finite(ours)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, b2_zero)


def test_step_counter_saturates_instead_of_wrapping():
  params = {"w": jnp.ones((256, 128)), "b": jnp.ones(5)}
  tx = ao.adafactor(momentum=0.5)
  state = tx.init(params)
  near_max = jnp.asarray(2**31 - 2, jnp.int32)
  state = optax.tree_utils.tree_set(state, count=near_max)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = step(tx, grads, params, state)
  v0 = np.float64(state[0].nu["b"])
  for _ in range(3):
    updates, state = step(tx, jax.tree.map(lambda g: 5 * g, grads), params, state)
    assert finite(updates)
  for _, count in optax.tree_utils.tree_get_all_with_path(state, "count"):
    assert int(count) == 2**31 - 1
  # b2_t = 1 - t^-0.8 for t ~ 2^31 is 1 - 2^-24 in float32, on each of the three steps.
  b2 = np.float64(ao.increasing_decay()(jnp.asarray(2**31 - 1, jnp.int32)))
  expected = b2**3 * v0 + (1 - b2) * (1 + b2 + b2**2) * 25.0
  np.testing.assert_allclose(state[0].nu["b"], expected, rtol=1e-5)


# ---- degenerate trees and values ------------------------------------------------------------


def test_zero_size_scalar_and_empty_trees():
  params = {"empty": jnp.zeros((0, 300)), "empty3": jnp.zeros((200, 0, 300)), "s": jnp.float32(2.0)}
  updates, state = step(ao.adafactor(momentum=0.9), jax.tree.map(jnp.ones_like, params), params)
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(updates["s"], -2e-3, rtol=1e-6)  # (1 - b1) rho_1 RMS(X) U
  assert finite(updates) and finite(state)
  u, s = step(ao.adafactor(), {}, {})
  assert u == {} and finite(s)


def test_all_zero_gradients_and_parameters():
  params = {"w": jnp.zeros((256, 128)), "b": jnp.zeros(5)}
  updates, _ = step(ao.adafactor(), params, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = step(ao.adafactor(), grads, params)
  for u in jax.tree.leaves(updates):  # the eps2 floor: alpha_1 = 1e-3 * 1e-2
    np.testing.assert_allclose(u, -1e-5, rtol=1e-6)


def test_integer_and_bool_leaves():
  params = {"w": jnp.ones((3, 3)), "step": jnp.zeros((), jnp.int32), "mask": jnp.ones(3, bool)}
  with pytest.raises(TypeError, match=r"\['mask'\].*bool"):
    ao.adafactor().init(params)
  # The documented way: mask them out.
  is_float = jax.tree.map(lambda p: jnp.issubdtype(p.dtype, jnp.floating), params)
  tx = optax.masked(ao.adafactor(), is_float)
  grads = {"w": jnp.ones((3, 3)), "step": params["step"], "mask": params["mask"]}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -1e-2, rtol=1e-6)


def test_gradient_tree_differing_from_params_is_named():
  params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
  tx = ao.adafactor()
  with pytest.raises(ValueError, match="tree structure differs"):
    tx.update({"w": jnp.ones((3, 3))}, tx.init(params), params)


def test_complex_parameters_use_abs_squared_statistics():
  rng = np.random.default_rng(0)
  shapes = {"w": (6, 5), "b": (5,)}
  params = {k: (rng.standard_normal(s) + 1j * rng.standard_normal(s)).astype(np.complex64)
            for k, s in shapes.items()}
  grads = [{k: (rng.standard_normal(s) + 1j * rng.standard_normal(s)).astype(np.complex64)
            for k, s in shapes.items()} for _ in range(8)]
  _, _, (before, updates) = helpers.run_scan(
      ao.adafactor(min_dim_size_to_factor=2, momentum=0.9), params, helpers.stack(grads))
  reference = ref.Adafactor(params, ref.Config(min_dim=2, b1=0.9))
  for t in range(8):
    x = {k: np.complex128(v[t]) for k, v in before.items()}
    expected = reference.step(x, {k: np.complex128(v) for k, v in grads[t].items()})
    for k in shapes:
      assert updates[k].dtype == jnp.complex64
      assert helpers.rel_err(updates[k][t], expected[k] - x[k]) < 1e-5


# ---- non-finite gradients -------------------------------------------------------------------


def _poisoned(params, value):
  return jax.tree.map(lambda p: jnp.ones_like(p).at[(0,) * p.ndim].set(value), params)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_skip_non_finite_leaves_params_and_state_unchanged(bad):
  params = {"w": jnp.ones((256, 128)), "b": jnp.ones(5)}
  tx = ao.adafactor(momentum=0.9, skip_non_finite=True)
  update = jax.jit(tx.update)
  _, state = update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  updates, new_state = update(_poisoned(params, bad), state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
  jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
  assert int(new_state.skipped) == 1
  updates, after = update(jax.tree.map(jnp.ones_like, params), new_state, params)
  assert finite(updates) and int(after.skipped) == 1
  assert int(after.inner_state[0].count) == 2  # the skipped step did not count


def test_skip_non_finite_composes_with_apply_if_finite():
  params = {"w": jnp.ones((4, 4))}
  tx = optax.apply_if_finite(ao.adafactor(skip_non_finite=True), max_consecutive_errors=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(4):  # past max_consecutive_errors, apply_if_finite lets the step through;
    updates, state = update(_poisoned(params, np.nan), state, params)
    assert finite(updates)  # ours still refuses it
  assert int(state.inner_state.skipped) >= 1


def test_skip_non_finite_with_zero_size_leaves():
  """A zero-size leaf has no elements to be non-finite: the check must not fail on it."""
  params = {"empty": jnp.zeros((0, 300)), "w": jnp.ones((4, 4))}
  tx = ao.adafactor(skip_non_finite=True)
  state = tx.init(params)
  updates, state = step(tx, jax.tree.map(jnp.ones_like, params), params, state)
  assert updates["empty"].shape == (0, 300) and finite(updates) and int(state.skipped) == 0
  bad = {"empty": params["empty"], "w": _poisoned(params["w"], np.nan)}
  updates, state = step(tx, bad, params, state)
  assert float(jnp.max(jnp.abs(updates["w"]))) == 0 and int(state.skipped) == 1


# --- float32 -> bfloat16 on its bits (`_numerics.narrow`, the CPU's form) ----------------


def _special_float32_bits():
  """Bit patterns where rounding to bfloat16 can go wrong, as uint32."""
  low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
  # Exact ties (low half 0x8000) below an even and an odd last kept bit, and their
  # neighbours; the carry into the exponent; the largest finite values (round to inf).
  highs = np.array([0x3F80, 0x3F81, 0x3FFF, 0x7F7F, 0x7F7E, 0x0000, 0x0001, 0x007F, 0x0080],
                   np.uint32)
  finite = (highs[:, None] << 16 | low[None, :]).ravel()
  infinities = np.array([0x7F800000], np.uint32)
  # NaNs: quiet, and signalling with the payload in the kept or only in the dropped bits.
  nans = np.array([0x7FC00000, 0x7F800001, 0x7F808000, 0x7FBFFFFF, 0x7F810000], np.uint32)
  one_sign = np.concatenate([finite, infinities, nans])
  return np.concatenate([one_sign, one_sign | np.uint32(0x80000000)])


def test_bfloat16_by_bits_rounds_as_the_convert():
  """The CPU's integer rounding gives ml_dtypes' (NumPy's) round-to-nearest-even, bit for
  bit, on every finite value class and infinities; a NaN stays a NaN of its sign."""
  rng = np.random.default_rng(0)
  bits = np.concatenate([_special_float32_bits(),
                         rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)])
  x = bits.view(np.float32)
  with _numerics.narrowing_by_bits():
    got = np.asarray(jax.jit(lambda x: _numerics.narrow(x, jnp.bfloat16))(x))
  assert got.dtype == jnp.bfloat16
  nan = np.isnan(x)
  want = x[~nan].astype(jnp.bfloat16)  # ml_dtypes: the conversion of NumPy, not XLA's
  np.testing.assert_array_equal(got[~nan].view(np.uint16), want.view(np.uint16))
  top = got[nan].view(np.uint16)  # NaN: all exponent bits and a nonzero fraction, its sign
  assert ((top & 0x7F80) == 0x7F80).all() and ((top & 0x007F) != 0).all()
  np.testing.assert_array_equal(top >> 15, bits[nan] >> 31)


def test_narrow_differentiates_as_astype():
  x = jnp.array([1.0, -3.5, 1e-3], jnp.float32)
  f = lambda x: jnp.sum(_numerics.narrow(x * x, jnp.bfloat16).astype(jnp.float32))
  g = lambda x: jnp.sum((x * x).astype(jnp.bfloat16).astype(jnp.float32))
  with _numerics.narrowing_by_bits():
    np.testing.assert_array_equal(jax.jit(jax.grad(f))(x), jax.jit(jax.grad(g))(x))
    assert jax.jit(lambda x: _numerics.narrow(x, jnp.float16))(x).dtype == jnp.float16


def test_narrow_is_the_convert_outside_its_context():
  """Only int8 momentum's chain asks for the bits (they cost compile time)."""
  text = lambda: jax.jit(lambda x: _numerics.narrow(x, jnp.bfloat16)).lower(
      jnp.ones(4)).as_text()
  assert "shift_right" not in text()
  with _numerics.narrowing_by_bits():
    assert "shift_right" in text()
