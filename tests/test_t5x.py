"""The README's T5X row: T5X's `Adafactor` arguments mapped to `adafactor`'s, tested.

T5X cannot be a dependency (it needs flax.optim, long gone). Its own test suite
(``t5x/adafactor_test.py``) publishes expected values, and those are reproduced
here with the mapped arguments; where it publishes none (per-layer blocks, the
step offset, momentum with weight decay), the expected values are worked out in
this file from the formulas of T5X's docstring and the paper, which T5X follows.

The mapping, and the facts about T5X it rests on:

- ``Adafactor(learning_rate=lr, decay_rate=c, step_offset=s, beta1=b1,
  epsilon1=e1, epsilon2=e2, clipping_threshold=d, weight_decay_rate=w,
  min_dim_size_to_factor=n, multiply_by_parameter_scale=m)`` is
  ``adafactor(learning_rate=lr, decay_rate=c, decay_offset=s, momentum=b1,
  eps=e1, eps2=e2, clipping_threshold=d, weight_decay_rate=w,
  min_dim_size_to_factor=max(n, 1), multiply_by_parameter_scale=m)``.
- T5X's step counts updates from 0 and its decay is ``1 - (step - s + 1)^-c``:
  our count and ``decay_offset``, the same numbers. Its learning rate is a
  schedule of that step, as ours of the count. Its weight decay,
  ``(1 - w) X - step``, is not multiplied by the learning rate nor averaged by
  the momentum, as ours (after the step size, after the momentum).
- ``global_norm_clip_threshold=g`` is ``optax.chain(optax.clip_by_global_norm(g),
  adafactor(...))``: both scale the gradients by ``min(1, g / ||G||)``.
- T5X's v_row and v_col are means (not the paper's sums), as ours; T5X's
  ``v_row`` is indexed by its ROW axes and averaged over its COLUMN axes, as
  ours, so a T5X per-axis rule with one ROW, one COLUMN and BATCH axes is
  ``FactorSpec(row=<ROW axis>, col=<COLUMN axis>, batch=<BATCH axes>)`` and its
  state is ours with the averaged axis kept as size 1 (`from_t5x_state`). Axes
  marked NONE are axes named nowhere: batch axes of the statistics, averaged in
  the clipping and the parameter scale, in both.
- T5X's default ("heuristic") rule calls the larger of the two largest axes
  COLUMN and the other ROW; ours takes them in axis order. From a zero state
  the two give equal steps (``R C / mean(R) = R C / mean(C)``); a T5X state
  whose v_row and v_col disagree (the published cases start from one) needs
  T5X's orientation, ``t5x_spec`` below.
- A T5X rule for a parameter of rank <= 2 without BATCH axes is ignored (the
  heuristic is used): its mapping is `DEFAULT_FACTORING`, as is T5X's own
  ``HEURISTIC_RULE`` in a factor map.

What does not map:

- Rules with several ROW or several COLUMN axes, e.g. ``(COLUMN, ROW, ROW)``:
  `FactorSpec` factors one row and one column axis; reshape the parameter.
- BATCH axes on a parameter that is not factored (``(BATCH, NONE)``, a scanned
  layer norm): T5X takes its clipping RMS and parameter scale per layer; None
  in a rule keeps one block for the whole parameter.
- ``max_parameter_scale``, a per-parameter ``multiply_by_parameter_scale``
  map (use ``optax.multi_transform`` of two `adafactor`), and
  ``skip_nan_updates``, which keeps each NaN element's old value where
  ``skip_non_finite`` skips the whole step. ``weight_decay_rate_lr_exponent``
  is a `weight_decay_rate` schedule, ``w * lr(count) ** e``.
- T5X refuses a parameter of rank > 2 without a rule; ours factors its two
  largest axes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao

ROW, COL, BATCH, NONE = "row", "col", "batch", None


def t5x_spec(rule, shape, min_dim=128):
  """The `FactorSpec` (or None) of a T5X per-axis rule on `shape`.

  `rule`: None (not factored), "heuristic", or a tuple of ROW / COL / BATCH / NONE,
  one per axis. For the heuristic and ignored rules this returns T5X's own
  orientation, needed only to load a T5X state (see the module docstring); in a
  rule of one's own these are `DEFAULT_FACTORING`.
  """
  if rule is None:
    return None
  if rule == "heuristic" or (len(shape) <= 2 and BATCH not in rule):
    order = np.argsort(shape, kind="stable")  # T5X: ROW the second largest, COLUMN the largest
    if len(shape) < 2 or shape[order[-2]] < min_dim:
      return None
    return ao.FactorSpec(int(order[-2]), int(order[-1]))
  rows = [i for i, r in enumerate(rule) if r == ROW]
  cols = [i for i, r in enumerate(rule) if r == COL]
  if len(rows) != 1 or len(cols) != 1:
    raise NotImplementedError(f"T5X rule {rule}: one ROW and one COL axis map to a FactorSpec")
  return ao.FactorSpec(rows[0], cols[0], batch=tuple(i for i, r in enumerate(rule) if r == BATCH))


def from_t5x_state(v_row, v_col, spec):
  """Our `FactoredMoment` from T5X's v_row (ROW axes kept) and v_col (COLUMN axes kept)."""
  return ao.FactoredMoment(jnp.expand_dims(jnp.asarray(v_row, jnp.float32), spec.col),
                           jnp.expand_dims(jnp.asarray(v_col, jnp.float32), spec.row))


def to_t5x_state(moment, spec):
  return np.squeeze(moment.v_row, spec.col), np.squeeze(moment.v_col, spec.row)


def one_step(tx, params, grads, step, **state):
  """tx's update from T5X's step `step`: every count set to it, `state` fields injected."""
  s = optax.tree_utils.tree_set(tx.init(params), count=jnp.asarray(step, jnp.int32), **state)
  updates, s = tx.update(grads, s, params)
  return optax.apply_updates(params, updates), s


def _nu(state):
  return optax.tree_utils.tree_get(state, "nu")


# ---------------------------------------------------------- published cases


def test_apply_gradient_factored():
  """T5X test_apply_gradient: a (3, 2) parameter of ones, factored (min_dim 0), at step 1
  from v_row = [0.9, 0.9], v_col = [0.1, 0.1, 0.1], learning rate 0.1, decay 0.8, one
  gradient of ones: v_row 0.9574349, v_col 0.6169143, parameters 0.9.

  (b2 = 1 - 2^-0.8 = 0.4256508: 0.4256508 * 0.9 + 0.5743492 * 1 = 0.9574349; the update,
  RMS 1.27 before clipping, is clipped to 1 and scaled by 0.1 * RMS(X) = 0.1.)"""
  spec = t5x_spec("heuristic", (3, 2), min_dim=0)
  assert spec == ao.FactorSpec(row=1, col=0)  # T5X: rows are the smaller axis
  tx = ao.adafactor(learning_rate=0.1, decay_rate=0.8, min_dim_size_to_factor=1,
                    factor_rule={"x": spec})
  params = {"x": jnp.ones((3, 2))}
  nu = {"x": from_t5x_state([0.9, 0.9], [0.1, 0.1, 0.1], spec)}
  new_params, state = one_step(tx, params, {"x": jnp.ones((3, 2))}, step=1, nu=nu)
  v_row, v_col = to_t5x_state(_nu(state)["x"], spec)
  np.testing.assert_allclose(v_row, [0.9574349] * 2, rtol=1e-6)
  np.testing.assert_allclose(v_col, [0.6169143] * 3, rtol=1e-6)
  np.testing.assert_allclose(new_params["x"], 0.9 * np.ones((3, 2)), rtol=1e-6)
  assert int(state[0].count) == 2  # T5X's next step


def test_apply_gradient_factored_unclipped_needs_t5xs_orientation():
  """The same step without clipping: the update is 1 / sqrt(v_col) = 1.2731735 (T5X
  divides v_row by its own mean, 1), parameters 1 - 0.1 * 1.2731735 = 0.8726827. In our
  default orientation the published state would be normalised by the other statistic's
  mean, 1 / sqrt(0.9574349): 0.8978013."""
  spec = t5x_spec("heuristic", (3, 2), min_dim=0)
  params = {"x": jnp.ones((3, 2))}
  nu = {"x": from_t5x_state([0.9, 0.9], [0.1, 0.1, 0.1], spec)}
  tx = ao.adafactor(learning_rate=0.1, decay_rate=0.8, clipping_threshold=None,
                    min_dim_size_to_factor=1, factor_rule={"x": spec})
  new_params, _ = one_step(tx, params, {"x": jnp.ones((3, 2))}, step=1, nu=nu)
  np.testing.assert_allclose(new_params["x"], 1 - 0.1 / np.sqrt(0.6169143), rtol=1e-6)
  np.testing.assert_allclose(new_params["x"], 0.8726827, rtol=1e-6)


def test_apply_gradient_unfactored_with_momentum():
  """T5X test_apply_gradient, second case: beta1 = 0, min_dim 32 (not factored), v = 0.5,
  m = 0 at step 1: v 0.787174 (0.4256508 * 0.5 + 0.5743492), m 0.1, parameters 0.9."""
  tx = ao.adafactor(learning_rate=0.1, momentum=0.0, decay_rate=0.8, min_dim_size_to_factor=32)
  params = {"x": jnp.ones((3, 2))}
  new_params, state = one_step(tx, params, {"x": jnp.ones((3, 2))}, step=1,
                               nu={"x": 0.5 * jnp.ones((3, 2))}, ema={"x": jnp.zeros((3, 2))})
  np.testing.assert_allclose(_nu(state)["x"], 0.787174 * np.ones((3, 2)), rtol=1e-6)
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, "ema")["x"], 0.1, rtol=1e-6)
  np.testing.assert_allclose(new_params["x"], 0.9, rtol=1e-6)


def test_apply_gradient_with_global_norm_clipping():
  """T5X test_apply_gradient_with_global_norm_clipping: as the factored case with
  global_norm_clip_threshold=1: the gradient of ones, norm sqrt(6), becomes 1/sqrt(6),
  G^2 = 1/6: v_row 0.478811, v_col 0.13829, parameters 0.9."""
  spec = t5x_spec("heuristic", (3, 2), min_dim=0)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      ao.adafactor(learning_rate=0.1, decay_rate=0.8, min_dim_size_to_factor=1,
                   factor_rule={"x": spec}))
  params = {"x": jnp.ones((3, 2))}
  nu = {"x": from_t5x_state([0.9, 0.9], [0.1, 0.1, 0.1], spec)}
  new_params, state = one_step(tx, params, {"x": jnp.ones((3, 2))}, step=1, nu=nu)
  v_row, v_col = to_t5x_state(_nu(state)["x"], spec)
  np.testing.assert_allclose(v_row, [0.478811] * 2, rtol=1e-6)
  np.testing.assert_allclose(v_col, [0.13829] * 3, rtol=1e-6)
  np.testing.assert_allclose(new_params["x"], 0.9, rtol=1e-6)


def _t5x_shapes(tx, params, specs):
  """The state's shapes as T5X reports them: v_row / v_col without the averaged axis, or v."""
  out = {}
  for name, nu in _nu(jax.eval_shape(tx.init, params)).items():
    if isinstance(nu, ao.FactoredMoment):
      spec = specs[name]
      out[name] = {"v_row": tuple(np.delete(nu.v_row.shape, spec.col)),
                   "v_col": tuple(np.delete(nu.v_col.shape, spec.row))}
    else:
      out[name] = {"v": nu.shape}
  return out


@pytest.mark.parametrize("shape,min_dim,rule,expected", [
    # test_2D_simple / _nofactor / test_factorizes: the heuristic.
    ((24, 16), 8, "heuristic", {"v_row": (16,), "v_col": (24,)}),
    ((24, 16), 32, "heuristic", {"v": (24, 16)}),
    ((64, 64), 32, "heuristic", {"v_row": (64,), "v_col": (64,)}),
    ((31, 64), 32, "heuristic", {"v": (31, 64)}),
    # test_2D_ignore_specified_factor_rule: a 2-D rule is ignored.
    ((24, 16), 8, (ROW, COL), {"v_row": (16,), "v_col": (24,)}),
    ((24, 16), 8, (COL, ROW), {"v_row": (16,), "v_col": (24,)}),
    # test_3D_simple_manual_rules: per-axis rules with a BATCH axis.
    ((24, 4, 16), 8, (COL, BATCH, ROW), {"v_row": (4, 16), "v_col": (24, 4)}),
    ((24, 4, 16), 8, (ROW, BATCH, COL), {"v_row": (24, 4), "v_col": (4, 16)}),
])
def test_state_shapes_of_t5x_rules(shape, min_dim, rule, expected):
  """T5X's published state shapes, from its rules mapped to FactorSpecs. The heuristic
  and ignored rules are our default rule (same axes, our v_row is T5X's v_col)."""
  params = {"a": jax.ShapeDtypeStruct(shape, jnp.float32)}
  spec = t5x_spec(rule, shape, min_dim)
  tx = ao.adafactor(min_dim_size_to_factor=min_dim, factor_rule={"a": spec})
  assert _t5x_shapes(tx, params, {"a": spec})["a"] == expected
  if isinstance(rule, tuple) and len(shape) == 3:
    return
  # The default rule factors the same two axes (v_row and v_col trade names).
  default = _t5x_shapes(ao.adafactor(min_dim_size_to_factor=min_dim), params,
                        {"a": ao.FactorSpec(0, 1)})["a"]
  assert default == ({"v_row": expected["v_col"], "v_col": expected["v_row"]}
                     if "v_row" in expected else expected)


@pytest.mark.parametrize("shape", [(64, 64), (64, 132), (132, 64), (132, 140), (140, 132)])
def test_t5x_orientation_and_ours_step_alike_from_zero(shape):
  """T5X test_no_factor_map_equivalence / test_simple_equivalence: the heuristic and the
  explicit rules step alike. Here: T5X's orientation and our default rule, from a zero
  state, over five steps."""
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.uniform(size=shape), jnp.float32)}
  grads = [{"a": jnp.asarray(rng.uniform(size=shape) * 10.0 ** (i - 2), jnp.float32)}
           for i in range(5)]
  theirs = ao.adafactor(learning_rate=0.1, factor_rule={"a": t5x_spec("heuristic", shape)})
  ours = ao.adafactor(learning_rate=0.1)
  states = [tx.init(params) for tx in (theirs, ours)]
  p = [params, params]
  for g in grads:
    for i, tx in enumerate((theirs, ours)):
      u, states[i] = tx.update(g, states[i], p[i])
      p[i] = optax.apply_updates(p[i], u)
  # Equal to float32 rounding of five steps of about 0.03 each.
  np.testing.assert_allclose(p[0]["a"], p[1]["a"], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------- derived cases


def _paper_step(x, g, v_row, v_col, b2, *, lr, blocks, d=1.0, eps1=1e-30, eps2=1e-3):
  """One step of T5X's documented update in NumPy float64, for x of shape (L, n, m)
  factored over its last two axes, from v_row (L, n) and v_col (L, m). `blocks`: the axes
  of one clipping / parameter-scale block ((1, 2): per layer; (0, 1, 2): the whole)."""
  g2 = g**2 + eps1
  r = b2 * v_row + (1 - b2) * g2.mean(axis=2)
  c = b2 * v_col + (1 - b2) * g2.mean(axis=1)
  v = r[:, :, None] / r.mean(axis=1)[:, None, None] * c[:, None, :]
  y = g / np.sqrt(v)
  y = y / np.maximum(1.0, np.sqrt((y**2).mean(axis=blocks, keepdims=True)) / d)
  scale = lr * np.maximum(eps2, np.sqrt((x**2).mean(axis=blocks, keepdims=True)))
  return x - scale * y, r, c


@pytest.mark.parametrize("rule,spec", [
    ((BATCH, ROW, COL), ao.FactorSpec(1, 2, batch=(0,))),
    ((NONE, ROW, COL), ao.FactorSpec(1, 2)),
])
def test_per_axis_rule_on_a_layer_stack(rule, spec):
  """A (3, 6, 5) stack of layers with parameter scales 0.01, 1 and 0 and gradient scales
  1e-3, 1 and 1e2, at step 4 from a T5X state with unequal v_row and v_col: BATCH makes
  each layer its own block of clipping and parameter scale; NONE averages them over the
  stack, with per-layer statistics in both."""
  assert t5x_spec(rule, (3, 6, 5)) == spec
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 6, 5)) * np.array([0.01, 1.0, 0.0])[:, None, None]
  g = rng.standard_normal((3, 6, 5)) * np.array([1e-3, 1.0, 1e2])[:, None, None]
  v_row, v_col = rng.uniform(0.1, 2.0, (3, 6)), rng.uniform(0.1, 2.0, (3, 5))
  b2 = 1 - (4 + 1) ** -0.8
  blocks = (1, 2) if BATCH in rule else (0, 1, 2)
  expected, r, c = _paper_step(x, g, v_row, v_col, b2, lr=0.05, blocks=blocks)
  tx = ao.adafactor(learning_rate=0.05, factor_rule={"w": spec}, min_dim_size_to_factor=1)
  new, state = one_step(tx, {"w": jnp.float32(x)}, {"w": jnp.float32(g)}, step=4,
                        nu={"w": from_t5x_state(v_row, v_col, spec)})
  got_row, got_col = to_t5x_state(_nu(state)["w"], spec)
  np.testing.assert_allclose(got_row, r, rtol=1e-6)
  np.testing.assert_allclose(got_col, c, rtol=1e-6)
  np.testing.assert_allclose(new["w"], expected, rtol=2e-6, atol=1e-12)


def test_step_offset_restarts_the_second_moment_when_fine_tuning():
  """Fine-tuning from T5X step 10000 with step_offset=10000: T5X's decay is
  1 - (10000 - 10000 + 1)^-0.8 = 0, so the pretrained statistics are forgotten and
  v = mean(G^2) + eps1; one step later b2 = 1 - 2^-0.8. The momentum is carried over
  (T5X: the offset "does not affect the momentum"), and the learning-rate schedule
  sees the global step, 10000, as T5X's."""
  s = 10_000
  spec = ao.FactorSpec(0, 1)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 3))
  grads = [rng.standard_normal((4, 3)) for _ in range(2)]
  schedule = lambda count: 1.0 / jnp.sqrt(jnp.asarray(count, jnp.float32) + 1.0)
  tx = ao.adafactor(learning_rate=schedule, decay_rate=0.8, decay_offset=s, momentum=0.9,
                    clipping_threshold=None, min_dim_size_to_factor=1, factor_rule={"w": spec})
  pretrained = {"w": from_t5x_state([5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0], spec)}
  m0 = rng.standard_normal((4, 3))
  new, state = one_step(tx, {"w": jnp.float32(x)}, {"w": jnp.float32(grads[0])}, step=s,
                        nu=pretrained, ema={"w": jnp.float32(m0)})
  r, c = (grads[0] ** 2).mean(axis=1), (grads[0] ** 2).mean(axis=0)
  got_row, got_col = to_t5x_state(_nu(state)["w"], spec)
  np.testing.assert_allclose(got_row, r, rtol=1e-6)
  np.testing.assert_allclose(got_col, c, rtol=1e-6)
  rms = lambda a: np.sqrt(np.mean(a**2))
  step = (1.0 / np.sqrt(s + 1)) * rms(x) * grads[0] / np.sqrt(np.outer(r, c) / r.mean())
  np.testing.assert_allclose(new["w"], x - (0.9 * m0 + 0.1 * step), rtol=1e-5)
  # The next update, T5X's step 10001: b2 = 1 - 2^-0.8.
  _, state = tx.update({"w": jnp.float32(grads[1])}, state, new)
  b2 = 1 - 2.0**-0.8
  np.testing.assert_allclose(
      to_t5x_state(_nu(state)["w"], spec)[0],
      b2 * r + (1 - b2) * (grads[1] ** 2).mean(axis=1), rtol=1e-6)


def test_momentum_and_weight_decay():
  """The published factored case with beta1 = 0.9, weight_decay_rate = 0.01 and a momentum
  of 0.05 from the previous step: the step is 0.1 (as published), m = 0.9 * 0.05 + 0.1 * 0.1
  = 0.055, and T5X's (1 - w) X - m = 0.99 - 0.055 = 0.935: the decay is neither multiplied
  by the learning rate nor averaged into the momentum."""
  spec = t5x_spec("heuristic", (3, 2), min_dim=0)
  tx = ao.adafactor(learning_rate=0.1, decay_rate=0.8, momentum=0.9, weight_decay_rate=0.01,
                    min_dim_size_to_factor=1, factor_rule={"x": spec})
  params = {"x": jnp.ones((3, 2))}
  new_params, state = one_step(
      tx, params, {"x": jnp.ones((3, 2))}, step=1,
      nu={"x": from_t5x_state([0.9, 0.9], [0.1, 0.1, 0.1], spec)},
      ema={"x": jnp.full((3, 2), 0.05)})
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, "ema")["x"], 0.055, rtol=1e-6)
  np.testing.assert_allclose(new_params["x"], 0.935, rtol=1e-6)


def test_t5x_heuristic_rule_is_default_factoring():
  """T5X's HEURISTIC_RULE in a factor map, and its ignored 2-D rules, are DEFAULT_FACTORING:
  the state of no rule at all, with the optimizer's min_dim_size_to_factor."""
  params = {"a": jax.ShapeDtypeStruct((24, 16), jnp.float32),
            "stack": jax.ShapeDtypeStruct((3, 24, 16), jnp.float32)}
  rule = lambda path, shape: (t5x_spec((BATCH, ROW, COL), shape) if len(shape) == 3
                              else ao.DEFAULT_FACTORING)
  shapes = jax.tree.map(jnp.shape, _nu(jax.eval_shape(
      ao.adafactor(factor_rule=rule, min_dim_size_to_factor=8).init, params)))
  assert shapes["a"] == ao.FactoredMoment((24, 1), (1, 16))
  assert shapes["stack"] == ao.FactoredMoment((3, 24, 1), (3, 1, 16))
