"""Each transform alone against its own small reference, and the schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao
from tests import reference as ref


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---- schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.5, 0.8, 1.0])
def test_increasing_decay_is_one_minus_t_pow(c):
  counts = np.arange(0, 50)
  got = np.asarray(jax.vmap(ao.increasing_decay(c))(counts))
  np.testing.assert_allclose(got, [ref.decay_pow(c)(t + 1) for t in counts], rtol=1e-6, atol=1e-7)
  assert got[0] == 0.0  # b2_1 = 0: no bias correction needed


def test_increasing_decay_offset_is_clamped_not_nan():
  got = np.asarray(jax.vmap(ao.increasing_decay(0.8, offset=10))(np.arange(20)))
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got[:11], 0.0)  # t = count + 1 - 10 <= 1
  np.testing.assert_allclose(got[11:], [1 - t ** -0.8 for t in range(2, 11)], rtol=1e-6)


def test_bias_corrected_decay_reproduces_adams_average():
  """A zero-started EMA with b2_t equals Adam's bias-corrected EMA with constant b2."""
  b2, xs = 0.999, _rng().uniform(0.5, 2.0, 40)
  schedule = ao.bias_corrected_decay(b2)
  v, m = 0.0, 0.0
  for t, x in enumerate(xs, start=1):
    b = float(schedule(t - 1))
    v = b * v + (1 - b) * x
    m = b2 * m + (1 - b2) * x
    np.testing.assert_allclose(v, m / (1 - b2**t), rtol=2e-6)


def test_inverse_sqrt_step():
  s = jax.vmap(ao.inverse_sqrt_step())(np.array([0, 99, 9_999, 39_999]))
  np.testing.assert_allclose(s, [1e-2, 1e-2, 1e-2, 1 / 200], rtol=1e-6)
  w = jax.vmap(ao.inverse_sqrt_step(max_step=1.0, warmup_rate=1e-2))(np.array([0, 9, 99, 399]))
  np.testing.assert_allclose(w, [1e-2, 1e-1, 1e-1, 1 / 20], rtol=1e-6)  # min(1e-2 t, 1/sqrt t)


# ---- scale_by_factored_rms -----------------------------------------------------------------


def test_factored_axes():
  assert ao.factored_axes((256, 512)) == (0, 1)
  assert ao.factored_axes((256, 4096, 128)) == (0, 1)  # two largest, like optax
  assert ao.factored_axes((4, 4, 4), 2) == (1, 2)      # ties: later axes, like optax
  assert ao.factored_axes((127, 4096)) is None
  assert ao.factored_axes((4096,)) is None and ao.factored_axes(()) is None


def test_rank_one_estimate_is_exact_for_rank_one_squares():
  """When G^2 = a b^T, V_1 = R C / 1^T R = G^2 (eps1 = 0), so every |U| is 1."""
  a, b = _rng().uniform(0.1, 3, 6), _rng(1).uniform(0.1, 3, 9)
  g = np.sqrt(np.outer(a, b)) * np.sign(_rng(2).standard_normal((6, 9)))
  tx = ao.scale_by_factored_rms(min_dim_size_to_factor=2, eps=0.0)
  params = jnp.zeros((6, 9))
  u, state = tx.update(jnp.asarray(g, jnp.float32), tx.init(params), params)
  np.testing.assert_allclose(np.abs(u), 1.0, rtol=1e-5)
  assert state.nu.v_row.shape == (6, 1) and state.nu.v_col.shape == (1, 9)


def _factored_reference(grads, b2s, eps, axes):
  """R and C sums over a batch of matrices, V = R C / 1^T R (Algorithm 4)."""
  r = c = 0.0
  out = []
  for g, b2 in zip(grads, b2s):
    g2 = np.moveaxis(np.float64(g) ** 2 + eps, axes, (-2, -1))
    r = b2 * r + (1 - b2) * g2.sum(-1)
    c = b2 * c + (1 - b2) * g2.sum(-2)
    v = r[..., :, None] * c[..., None, :] / r.sum(-1)[..., None, None]
    out.append(np.float64(g) / np.sqrt(np.moveaxis(v, (-2, -1), axes)))
  return out


@pytest.mark.parametrize("shape,axes", [((12, 7), (0, 1)), ((5, 3, 11), (0, 2)), ((2, 9, 8), (1, 2))])
def test_factored_update_matches_reference(shape, axes):
  grads = [_rng(i).standard_normal(shape) * 10.0**i for i in range(6)]
  tx = ao.scale_by_factored_rms(min_dim_size_to_factor=5, eps=1e-30)
  params = jnp.zeros(shape)
  state = tx.init(params)
  expected = _factored_reference(grads, [1 - t**-0.8 for t in range(1, 7)], 1e-30, axes)
  for g, e in zip(grads, expected):
    u, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    np.testing.assert_allclose(u, e, rtol=2e-5)


def test_unfactored_update_matches_reference():
  tx = ao.scale_by_factored_rms(decay=0.9)  # a constant b2 is accepted too
  params = jnp.zeros((7,))
  state, v = tx.init(params), 0.0
  for i in range(5):
    g = _rng(i).standard_normal(7)
    v = 0.9 * v + 0.1 * (g**2 + 1e-30)
    u, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    np.testing.assert_allclose(u, g / np.sqrt(v), rtol=2e-6)


def test_zero_gradient_gives_zero_update_not_nan():
  """R, C and V are eps1 = 1e-30 in float32; the factors are applied one at a time."""
  tx = ao.scale_by_factored_rms(min_dim_size_to_factor=2)
  params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros((6,))}
  u, _ = tx.update(params, tx.init(params), params)
  for leaf in jax.tree.leaves(u):
    np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.complex64])
@pytest.mark.parametrize("per_layer", [False, True])
def test_clipping_inside_equals_clip_by_block_rms_after(dtype, per_layer):
  """`scale_by_factored_rms(clipping_threshold=d)` is the chain with `clip_by_block_rms(d)`."""
  rule = (lambda path, shape: ao.FactorSpec(-2, -1, batch=(0,)) if len(shape) == 3 else None
          ) if per_layer else None
  shapes = {"w": (160, 192), "stack": (3, 130, 140), "b": (192,), "s": ()}
  rng = _rng(3)
  grads = [{k: jnp.asarray((10.0 ** rng.uniform(-3, 3)) * rng.standard_normal(s), dtype)
            for k, s in shapes.items()} for _ in range(4)]
  fused = ao.scale_by_factored_rms(factor_rule=rule, clipping_threshold=0.5)
  chain = optax.chain(ao.scale_by_factored_rms(factor_rule=rule),
                      ao.clip_by_block_rms(0.5, factor_rule=rule))
  s1, s2 = fused.init(grads[0]), chain.init(grads[0])
  for g in grads:
    u1, s1 = jax.jit(fused.update)(g, s1)
    u2, s2 = jax.jit(chain.update)(g, s2)
    for k in shapes:
      assert u1[k].dtype == g[k].dtype
      tol = 1e-2 if dtype == jnp.bfloat16 else 2e-6
      np.testing.assert_allclose(np.asarray(u1[k], np.complex64), np.asarray(u2[k], np.complex64),
                                 rtol=tol, atol=tol * float(jnp.max(jnp.abs(u2[k]))))
    assert float(ref.rms(np.asarray(u1["w"], np.complex128))) <= 0.5 * (1 + tol)
  jax.tree.map(np.testing.assert_array_equal, s1, s2[0])


def test_integer_parameter_is_rejected_by_name():
  with pytest.raises(TypeError, match=r"\['step'\].*int32"):
    ao.scale_by_factored_rms().init({"w": jnp.zeros(3), "step": jnp.zeros((), jnp.int32)})


# ---- clip_by_block_rms / relative_step_size / ema_momentum ----------------------------------


def test_clip_by_block_rms():
  tx = ao.clip_by_block_rms(2.0)
  big, small = _rng().standard_normal((8, 8)) * 10, _rng(1).standard_normal(5) * 0.1
  u, _ = tx.update({"big": jnp.asarray(big, jnp.float32), "small": jnp.asarray(small, jnp.float32)}, ())
  np.testing.assert_allclose(u["big"], big / (ref.rms(big) / 2.0), rtol=1e-6)  # RMS now d
  np.testing.assert_allclose(u["small"], small, rtol=1e-7)  # RMS < d: untouched
  np.testing.assert_allclose(ref.rms(np.asarray(u["big"])), 2.0, rtol=1e-6)


def test_clip_by_block_rms_float16_does_not_overflow():
  u = jnp.full((64,), 1000.0, jnp.float16)  # u^2 = 1e6 > f16 max 65504
  out, _ = ao.clip_by_block_rms(1.0).update(u, ())
  assert out.dtype == jnp.float16
  np.testing.assert_allclose(np.float32(out), 1.0, rtol=1e-3)


def test_relative_step_size():
  params = {"w": jnp.full((3, 3), -4.0), "zero": jnp.zeros(5)}
  tx = ao.relative_step_size(eps2=1e-3)
  state = tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  for count in [0, 9_999, 39_999]:
    state = state._replace(count=jnp.asarray(count, jnp.int32))
    u, _ = tx.update(ones, state, params)
    rho = min(1e-2, (count + 1) ** -0.5)
    np.testing.assert_allclose(u["w"], 4.0 * rho, rtol=1e-6)     # RMS(X) = 4
    np.testing.assert_allclose(u["zero"], 1e-3 * rho, rtol=1e-6)  # the eps2 floor


def test_relative_step_size_needs_params():
  tx = ao.relative_step_size()
  with pytest.raises(ValueError, match="needs params"):
    tx.update(jnp.ones(3), tx.init(jnp.ones(3)))


def test_ema_momentum_equals_optax_ema_and_keeps_dtype():
  steps = [_rng(i).standard_normal(6).astype(np.float32) for i in range(5)]
  ours, theirs = ao.ema_momentum(0.9), optax.ema(0.9, debias=False)
  s1, s2 = ours.init(jnp.zeros(6)), theirs.init(jnp.zeros(6))
  for x in steps:
    u1, s1 = ours.update(jnp.asarray(x), s1)
    u2, s2 = theirs.update(jnp.asarray(x), s2)
    np.testing.assert_allclose(u1, u2, rtol=1e-6)
  bf16 = ao.ema_momentum(0.9, accumulator_dtype=jnp.float32)
  u, s = bf16.update(jnp.ones(4, jnp.bfloat16), bf16.init(jnp.zeros(4, jnp.bfloat16)))
  assert u.dtype == jnp.bfloat16 and s.ema.dtype == jnp.float32


def test_ema_momentum_narrow_accumulator_steps_by_the_stored_value():
  tx = ao.ema_momentum(0.9, accumulator_dtype=jnp.bfloat16)
  state = tx.init(jnp.zeros(64))
  for i in range(3):
    x = jnp.asarray(_rng(i).standard_normal(64), jnp.float32)
    expected = (0.1 * x + 0.9 * state.ema.astype(jnp.float32)).astype(jnp.bfloat16)
    u, state = tx.update(x, state)
    assert u.dtype == jnp.float32 and state.ema.dtype == jnp.bfloat16
    np.testing.assert_array_equal(state.ema, expected)
    np.testing.assert_array_equal(u, state.ema.astype(jnp.float32))


@pytest.mark.parametrize(
    "factory,kwargs,name",
    [
        (ao.clip_by_block_rms, dict(threshold=0.0), "threshold"),
        (ao.ema_momentum, dict(decay=1.0), "decay"),
        (ao.ema_momentum, dict(decay=-0.1), "decay"),
        (ao.inverse_sqrt_step, dict(max_step=0.0), "max_step"),
        (ao.inverse_sqrt_step, dict(warmup_rate=-1.0), "warmup_rate"),
        (ao.relative_step_size, dict(step_size=-1.0), "step_size"),
        (ao.scale_by_factored_rms, dict(decay=1.0), "decay"),
        (ao.increasing_decay, dict(exponent=0.0), "exponent"),
        (ao.bias_corrected_decay, dict(b2=1.0), "b2"),
        (ao.relative_step_size, dict(eps2=-1.0), "eps2"),
        (ao.scale_by_factored_rms, dict(eps=-1e-30), "eps"),
        (ao.scale_by_factored_rms, dict(min_dim_size_to_factor=0), "min_dim_size_to_factor"),
        (ao.scale_by_factored_rms, dict(clipping_threshold=0.0), "clipping_threshold"),
        (ao.adafactor, dict(momentum=1.5), "momentum"),
        (ao.adafactor, dict(clipping_threshold=0.0), "clipping_threshold"),
        # diagnostics=True clips in a separate clip_by_block_rms link (its argument: threshold)
        (ao.adafactor, dict(clipping_threshold=0.0, diagnostics=True), "clipping_threshold"),
        (ao.adafactor, dict(max_relative_step=0.0), "max_relative_step"),
        (ao.adafactor, dict(eps2=-1.0), "eps2"),
        (ao.adafactor, dict(decay_rate=-0.8), "decay_rate"),
        (ao.adafactor, dict(clipping_threshold=-1.0), "clipping_threshold"),
        (ao.adafactor, dict(min_dim_size_to_factor=0), "min_dim_size_to_factor"),
        (ao.adafactor, dict(eps=-1.0), "eps"),
        (ao.adafactor, dict(learning_rate=-1e-3), "learning_rate"),
        (ao.adafactor, dict(weight_decay_rate=-1e-3), "weight_decay_rate"),
        (ao.adafactor, dict(multiply_by_parameter_scale=False), "learning_rate=None"),
    ],
)
def test_bad_hyperparameters_raise_at_build_time(factory, kwargs, name):
  """Each transform names its own argument (a standalone ema_momentum says `decay`,
  the alias `momentum`)."""
  with pytest.raises(ValueError, match=rf"^{name}\b"):
    factory(**kwargs)


# ---- the standalone transforms' own defaults (the alias always passes its own) ---------------


def test_scale_by_factored_rms_default_eps_is_1e_30():
  """Zero gradients on step 1 (b2_1 = 0): every statistic is exactly eps1 = 1e-30."""
  tx = ao.scale_by_factored_rms(min_dim_size_to_factor=2)
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for leaf in jax.tree.leaves(state.nu):
    np.testing.assert_array_equal(leaf, np.float32(1e-30))


def test_relative_step_size_default_eps2_is_1e_3():
  """A zero parameter moves by the eps2 floor: 1e-3 * rho_1 = 1e-5 per unit update."""
  tx = ao.relative_step_size()
  params = jnp.zeros(5)
  u, _ = tx.update(jnp.ones(5), tx.init(params), params)
  np.testing.assert_allclose(u, 1e-3 * 1e-2, rtol=1e-6)


def test_min_dim_size_to_factor_one_is_valid():
  """1 is the smallest valid value (HF's setting): every matrix is factored."""
  tx = ao.scale_by_factored_rms(min_dim_size_to_factor=1)
  nu = tx.init({"w": jnp.zeros((3, 2))}).nu
  assert (nu["w"].v_row.shape, nu["w"].v_col.shape) == ((3, 1), (1, 2))


@pytest.mark.parametrize("stats_dtype", ["bfloat16", "float16"])
def test_stats_dtype_stores_the_statistics_in_it(stats_dtype):
  """The statistics are kept in `stats_dtype` (computed in float32): after step 1 they
  are the float32 means of G^2 (+ eps1) rounded once to it."""
  g = jnp.asarray(_rng(4).standard_normal((160, 130)) * 3.0, jnp.float32)
  params = {"w": jnp.ones((160, 130)), "b": jnp.ones(130)}
  grads = {"w": g, "b": g[0]}
  tx = ao.adafactor(stats_dtype=stats_dtype)
  _, state = tx.update(grads, tx.init(params), params)
  nu = optax.tree_utils.tree_get(state, "nu")
  g64 = np.asarray(g, np.float64)
  expected = {"v_row": np.mean(g64**2, axis=1, keepdims=True) + 1e-30,
              "v_col": np.mean(g64**2, axis=0, keepdims=True) + 1e-30}
  for name in ("v_row", "v_col"):
    got = getattr(nu["w"], name)
    assert got.dtype == jnp.dtype(stats_dtype)
    np.testing.assert_array_equal(got, expected[name].astype(np.float32).astype(stats_dtype))
  assert nu["b"].dtype == jnp.dtype(stats_dtype)
