"""Property-based invariants over random shapes (0-D to 4-D, zero-size too), dtypes and hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import adafactor_optax as ao
from tests import reference

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])


def _array(draw, shape, dtype, low=-3.0, high=3.0):
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  magnitude = 10.0 ** rng.uniform(low, high, shape)
  return jnp.asarray(magnitude * rng.choice([-1.0, 1.0], shape), dtype)


@st.composite
def problems(draw):
  dtype = draw(dtypes)
  shape = draw(shapes)
  high = 4.0 if dtype == jnp.float16 else 15.0  # f16 holds up to 65504
  return dict(
      params=_array(draw, shape, dtype, -3, 1),
      grads=[_array(draw, shape, dtype, -20 if dtype == jnp.float32 else -4, high) for _ in range(2)],
      min_dim=draw(st.sampled_from([1, 2, 3, 8])),
      d=draw(st.floats(0.25, 4.0)),
      c=draw(st.floats(0.3, 1.0)),
  )


@SETTINGS
@given(problems())
def test_state_shapes_follow_the_factoring_rule(p):
  tx = ao.scale_by_factored_rms(min_dim_size_to_factor=p["min_dim"])
  shape = p["params"].shape
  nu = tx.init(p["params"]).nu
  axes = reference.factored_axes(shape, p["min_dim"])  # the paper's rule, written apart
  if axes is None:
    assert nu.shape == shape
  else:
    row, col = axes
    assert nu.v_row.shape == tuple(1 if i == col else n for i, n in enumerate(shape))
    assert nu.v_col.shape == tuple(1 if i == row else n for i, n in enumerate(shape))


@SETTINGS
@given(problems())
def test_no_nan_or_inf_for_finite_input_and_clipped_rms_at_most_d(p):
  tx = ao.adafactor(
      min_dim_size_to_factor=p["min_dim"], clipping_threshold=p["d"], decay_rate=p["c"],
      momentum=0.9,
  )
  # The clipping adafactor() uses (inside scale_by_factored_rms) and the separate link.
  fused = ao.scale_by_factored_rms(min_dim_size_to_factor=p["min_dim"], clipping_threshold=p["d"])
  apart = optax.chain(
      ao.scale_by_factored_rms(min_dim_size_to_factor=p["min_dim"]), ao.clip_by_block_rms(p["d"])
  )
  state, params = tx.init(p["params"]), p["params"]
  clip_states = [c.init(params) for c in (fused, apart)]
  for g in p["grads"]:
    updates, state = tx.update(g, state, params)
    assert bool(jnp.all(jnp.isfinite(updates))) and updates.dtype == params.dtype
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
    for i, clip in enumerate((fused, apart)):
      u, clip_states[i] = clip.update(g, clip_states[i], params)
      if u.size:
        rms = float(jnp.sqrt(jnp.mean(jnp.square(u.astype(jnp.float32)))))
        tolerance = 1e-5 if u.dtype == jnp.float32 else 1e-2  # one rounding to bf16/f16
        assert rms <= p["d"] * (1 + tolerance)
    params = optax.apply_updates(params, updates)


@st.composite
def rank_one_squares(draw):
  # Batch axes no larger than n and m, so the last two axes are the factored ones.
  batch = draw(st.lists(st.integers(1, 3), max_size=2).map(tuple))
  n, m = draw(st.integers(3, 6)), draw(st.integers(3, 6))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  a = 10.0 ** rng.uniform(-3, 3, batch + (n, 1))
  b = 10.0 ** rng.uniform(-3, 3, batch + (1, m))
  signs = rng.choice([-1.0, 1.0], batch + (n, m))
  return jnp.asarray(np.sqrt(a * b) * signs, jnp.float32)


@SETTINGS
@given(rank_one_squares(), st.integers(0, 5))
def test_factored_estimate_is_exact_when_g_squared_is_rank_one(g, steps_before):
  """G^2 = a b^T gives V = G^2 exactly, on any step (the averages stay rank 1)."""
  tx = ao.scale_by_factored_rms(min_dim_size_to_factor=1, eps=0.0)
  params = jnp.zeros(g.shape)
  assert reference.factored_axes(g.shape, 1) == (g.ndim - 2, g.ndim - 1)
  state = tx.init(params)
  for k in range(steps_before):  # earlier gradients with the same row and column profile
    _, state = tx.update(g * (k + 2), state, params)
  u, _ = tx.update(g, state, params)
  # V stays a multiple of G^2 within each matrix of the batch, so |U| is constant there:
  # 1 on the first step, and the same value in every matrix afterwards.
  magnitude = np.abs(np.asarray(u))
  np.testing.assert_allclose(magnitude, magnitude.reshape(-1)[0], rtol=1e-4)
  if steps_before == 0:
    np.testing.assert_allclose(magnitude, 1.0, rtol=1e-4)
