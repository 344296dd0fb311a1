"""Stochastic rounding: unbiased, exact against a float64 reference, reproducible, sharded.

The reference rounds in NumPy float64 from the definition: with ``lo`` the
neighbour of ``|X + u|`` toward zero in the narrow format and ``ulp`` its
spacing there, the result has magnitude ``lo + ulp`` exactly when the k random
bits (k = bits the format drops) reach ``2^k (1 - frac)``, ``frac = (|s| - lo) /
ulp``; so all-zero bits truncate, all-one bits round away from zero.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao
from adafactor_optax import _rounding
from tests import test_sharding, transformer


def _run_constant_updates(dtype, steps, update, n=4096, rounding=True):
  """`steps` updates of `update` on ones, through the transform and optax.apply_updates."""
  tx = ao.stochastic_rounding() if rounding else optax.identity()

  def body(carry, _):
    p, s = carry
    u, s = tx.update(jnp.full(p.shape, update, dtype), s, p)
    return (optax.apply_updates(p, u), s), None

  @jax.jit
  def run(p):
    return jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[0][0]

  return np.asarray(run(jnp.ones(n, dtype)).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_300_steps_of_1e_4_accumulate_unbiased(dtype):
  """1e-4 is 1/78 of bfloat16's ulp at 1 (1/10 of float16's): round-to-nearest never moves."""
  update = float(jnp.asarray(1e-4, dtype).astype(jnp.float32))  # 1e-4 as stored in dtype
  final = _run_constant_updates(dtype, 300, 1e-4)
  expected = 1 + 300 * update
  standard_error = final.std() / np.sqrt(final.size)
  assert abs(final.mean() - expected) < max(5 * standard_error, 1e-4), (final.mean(), expected)
  assert abs(final.mean() - 1.030) < 0.003
  assert final.std() > 0  # elements took different paths
  nearest = _run_constant_updates(dtype, 300, 1e-4, rounding=False)
  assert np.all(nearest == 1.0)


def _bf16_values(low_exp, high_exp):
  bits = np.arange(1 << 16, dtype=np.uint16)
  bits = bits[(bits & 0x7F80) != 0x7F80]  # finite: not all exponent bits set
  values = bits.view(jnp.bfloat16).astype(np.float64)
  magnitude = np.abs(values)
  return values[(magnitude >= 2.0**low_exp) & (magnitude < 2.0**high_exp)]


def _reference(x, u, bits):
  """Float64 stochastic rounding of x + u to bfloat16 with 16 given random bits."""
  s = x + u  # exact in float64: both are bfloat16 within 2^-16 .. 2^8
  magnitude = np.abs(s)
  exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
  ulp = 2.0 ** (exponent - 7)  # bfloat16: 8 significant bits
  low = np.floor(magnitude / ulp) * ulp
  frac = (magnitude - low) / ulp
  away = (bits & 0xFFFF) >= (1 - frac) * 2**16
  return np.sign(s) * np.where(away & (frac > 0), low + ulp, low), ulp


def test_bfloat16_rounding_equals_float64_reference():
  """Every bfloat16 X with |X| in [2^-8, 2^8) against 256 updates within 2^15 of it
  (where X + u is exact in float32), with all-zero, all-one and random bits.

  The result of `optax.apply_updates` is the reference's exactly when |u| <= |X|; for
  a larger update within one ulp of it (`rounded_update`'s docstring).
  """
  rng = np.random.default_rng(0)
  x = _bf16_values(-8, 8)
  u_pool = _bf16_values(-16, 8)
  u = rng.choice(u_pool, 256)
  xx, uu = (a.ravel() for a in np.meshgrid(x, u, indexing="ij"))
  # Within 2^15 of each other, X + u is exact in float32 (8 + 16 significant bits).
  near = (np.abs(uu) > np.abs(xx) * 2.0**-15) & (np.abs(xx) > np.abs(uu) * 2.0**-15)
  xx, uu = xx[near], uu[near]
  apply = jax.jit(lambda p, u, b: optax.apply_updates(p, _rounding.rounded_update(p, u, b)))
  p, g = jnp.asarray(xx, jnp.bfloat16), jnp.asarray(uu, jnp.bfloat16)
  for bits in (np.zeros(xx.shape, np.uint32), np.full(xx.shape, 0xFFFFFFFF, np.uint32),
               rng.integers(0, 2**32, xx.shape, dtype=np.uint32)):
    got = np.asarray(apply(p, g, jnp.asarray(bits)).astype(jnp.float32), np.float64)
    want, ulp = _reference(xx, uu, bits)
    small = np.abs(uu) <= np.abs(xx)
    np.testing.assert_array_equal(got[small], want[small])
    assert np.all(np.abs(got - want)[~small] <= ulp[~small])
    assert np.mean(got[~small] != want[~small]) < 0.05


def test_float16_below_the_smallest_subnormal_is_unbiased():
  """Sums below float16's smallest subnormal (2^-24) round to 0 or 2^-24, unbiased."""
  x = jnp.zeros(1 << 16, jnp.float32) + 2.0**-26  # a quarter of the smallest subnormal
  bits = _rounding.random_bits(jax.random.key(0), x.shape)
  got = np.asarray(_rounding.round_stochastically(x, jnp.float16, bits).astype(jnp.float32))
  assert set(np.unique(got)) == {0.0, 2.0**-24}
  assert abs(got.mean() / 2.0**-26 - 1) < 0.03  # 16384 expected hits: 1% standard error
  normal = jnp.full(1 << 16, 1 + 2.0**-12, jnp.float32)  # a quarter ulp above 1
  got = np.asarray(_rounding.round_stochastically(normal, jnp.float16, bits).astype(jnp.float32))
  assert set(np.unique(got)) == {1.0, 1 + 2.0**-10}
  assert abs((got.mean() - 1) / 2.0**-12 - 1) < 0.03


def test_float16_subnormal_sums_are_unbiased():
  """Sums in float16's subnormal range [2^-24, 2^-14), where the grid is 2^-24 apart
  whatever the binade (a normal float16 would be 2^-10 of the value apart).

  In each of the ten binades, values at random offsets between grid points round to
  the two grid points around them (``floor(x / 2^-24) 2^-24`` and the next, computed
  here in float64), with mean x: within 5 standard errors of a Bernoulli draw with
  p = the offset. The random bits come from NumPy, not from `random_bits`.
  """
  rng = np.random.default_rng(1)
  grid, n = 2.0**-24, 1 << 14
  exponents = np.arange(-24, -14)  # the binades [2^e, 2^(e+1)) below 2^-14
  x = (2.0**exponents[:, None] * (1 + rng.uniform(0.05, 0.95, (10, 4)))).ravel()
  x = x.astype(np.float32).astype(np.float64)  # what float32 holds of it
  samples = np.repeat(x[:, None], n, axis=1)
  bits = rng.integers(0, 2**32, samples.shape, dtype=np.uint32)
  got = np.asarray(_rounding.round_stochastically(
      jnp.asarray(samples, jnp.float32), jnp.float16, jnp.asarray(bits)).astype(jnp.float32),
                   np.float64)
  low = np.floor(x / grid) * grid
  frac = (x - low) / grid
  assert np.all((got == low[:, None]) | (got == low[:, None] + grid))
  standard_error = grid * np.sqrt(frac * (1 - frac) / n)
  bias = got.mean(axis=1) - x
  assert np.all(np.abs(bias) < 5 * standard_error), (bias / standard_error).round(1)


def test_leaves_of_one_shape_draw_independent_bits():
  """Two bfloat16 leaves of the same shape and values, with the same update, round
  independently: each rounds up with p = u / ulp, and both together with p^2 (the
  same bits would give p).

  u = 2^-9 is a quarter of bfloat16's ulp (2^-7) at 1, so p = 1/4 and both up with
  1/16; over 2^14 elements the standard errors are 0.003 and 0.002.
  """
  n = 1 << 14
  params = {"a": jnp.ones(n, jnp.bfloat16), "b": jnp.ones(n, jnp.bfloat16),
            "c": {"d": jnp.ones(n, jnp.bfloat16)}}
  updates = jax.tree.map(lambda p: jnp.full(p.shape, 2.0**-9, p.dtype), params)
  tx = ao.stochastic_rounding()
  new = optax.apply_updates(params, jax.jit(tx.update)(updates, tx.init(params), params)[0])
  up = {k: np.asarray(v.astype(jnp.float32)) > 1 for k, v in
        zip("abd", jax.tree.leaves(new))}
  for k, rounded_up in up.items():
    assert abs(rounded_up.mean() - 0.25) < 0.015, (k, rounded_up.mean())
  for first, second in (("a", "b"), ("a", "d"), ("b", "d")):
    both = np.mean(up[first] & up[second])
    assert abs(both - 1 / 16) < 0.01, (first, second, both)


def test_non_finite_values_keep_their_class():
  x = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0, -0.0], jnp.float32)
  for dtype in (jnp.bfloat16, jnp.float16):
    got = _rounding.round_stochastically(x, dtype, jnp.full(x.shape, 0xFFFFFFFF, jnp.uint32))
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(x))


def test_random_bits_are_uniform_and_differ_by_key():
  bits = np.asarray(_rounding.random_bits(jax.random.key(0), (256, 256)))
  uniform = (bits >> 8) / 2.0**24
  assert abs(uniform.mean() - 0.5) < 0.005 and abs(uniform.var() - 1 / 12) < 0.002
  # Neighbouring elements are not correlated (lag-1 along each axis).
  for axis in (0, 1):
    a, b = uniform.take(range(255), axis=axis), uniform.take(range(1, 256), axis=axis)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02
  other = np.asarray(_rounding.random_bits(jax.random.key(1), (256, 256)))
  assert np.mean(bits == other) < 0.001


def test_float32_and_float64_updates_pass_through_exactly():
  tx = ao.stochastic_rounding()
  with jax.enable_x64(True):
    params = {"f32": jnp.ones(5, jnp.float32), "f64": jnp.ones(5, jnp.float64),
              "c64": jnp.ones(5, jnp.complex64)}
    updates = jax.tree.map(lambda p: (1e-9 * jnp.arange(5.0)).astype(p.dtype), params)
    out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    for k in params:
      assert out[k].dtype == updates[k].dtype
      np.testing.assert_array_equal(out[k], updates[k])


def test_updates_keep_their_dtype_and_bad_leaves_are_named():
  tx = ao.stochastic_rounding()
  params = {"w": jnp.ones(3, jnp.bfloat16), "h": jnp.ones(3, jnp.float16)}
  updates, _ = tx.update(jax.tree.map(lambda p: p * 1e-3, params), tx.init(params), params)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
  bad = {"w": jnp.ones(3, jnp.bfloat16), "step": jnp.zeros((), jnp.int32)}
  with pytest.raises(TypeError, match=r"\['step'\].*int32"):
    tx.update(bad, tx.init(bad), bad)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))


def test_bits_come_from_seed_and_count():
  """Same seed and count: the same rounding (a resumed run is bit-identical); a new
  count or seed: different bits."""
  params = jnp.ones(4096, jnp.bfloat16)
  updates = jnp.full(4096, 2e-3, jnp.bfloat16)

  def rounded(tx, count):
    state = ao.StochasticRoundingState(jnp.asarray(count, jnp.int32))
    return np.asarray(optax.apply_updates(params, jax.jit(tx.update)(updates, state, params)[0])
                      .astype(jnp.float32))

  tx = ao.stochastic_rounding()
  np.testing.assert_array_equal(rounded(tx, 7), rounded(ao.stochastic_rounding(), 7))
  assert np.mean(rounded(tx, 7) != rounded(tx, 8)) > 0.2
  assert np.mean(rounded(tx, 7) != rounded(ao.stochastic_rounding(seed=1), 7)) > 0.2


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("mode", test_sharding.MODES, ids=lambda m: m.name)
def test_sharded_rounding_equals_single_device_without_communication(mode):
  """Each device computes its own shard's bits: the same as one device, and the
  compiled step communicates exactly what it does without stochastic rounding."""
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.bfloat16), transformer.make_params())
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.bfloat16), transformer.make_grads(1)[0])
  mesh = test_sharding.make_mesh((2, 4), mode)
  shardings = transformer.param_shardings(mesh)

  def compiled(tx, p, g):
    def step(p, g, s):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    with jax.set_mesh(mesh):
      state = jax.jit(tx.init)(p)
      jitted = jax.jit(step, out_shardings=(shardings, ao.state_shardings(tx, p)))
      return jitted(p, g, state)[0], jitted.lower(p, g, state).compile().as_text()

  tx = ao.adafactor(stochastic_rounding=True)
  want = jax.jit(lambda p, g: optax.apply_updates(
      p, tx.update(g, tx.init(p), p)[0]))(params, grads)
  p, g = transformer.place(params, shardings), transformer.place(grads, shardings)
  got, hlo = compiled(tx, p, g)
  _, hlo_nearest = compiled(ao.adafactor(), p, g)
  # The sharded sums inside the statistics' means may differ in the last bit of
  # a float32 update; the random bits must not (else about a third would differ).
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.mean(np.asarray(a.astype(jnp.float32)) != np.asarray(b.astype(jnp.float32))) < 1e-3
  assert sorted(test_sharding.collective_bytes(hlo)) == sorted(
      test_sharding.collective_bytes(hlo_nearest))


def test_one_key_derivation_per_step_whatever_the_leaves():
  """The leaves' bits are streams of one step key (`random_bits`' `stream`), not a
  `fold_in` each: XLA:TPU runs every threefry as ~110 tiny instructions of its own."""
  params = {f"w{i}": jnp.ones((8, 4), jnp.bfloat16) for i in range(6)}
  tx = ao.stochastic_rounding()
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
  names = [eqn.primitive.name for eqn in jaxpr.eqns]
  assert names.count("random_fold_in") == 1, names
