"""Adafactor inside Flax: nnx.Optimizer, linen's TrainState, and an nnx.scan layer stack."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training import train_state

import adafactor_optax as ao

D, F = 128, 256  # both >= 128: every kernel is factored with the default min size


def _data(seed=0, n=64):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, D)).astype(np.float32)
  w = rng.standard_normal((D, D)).astype(np.float32) / np.sqrt(D)
  return jnp.asarray(x), jnp.asarray(np.tanh(x @ w))


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(D, F, rngs=rngs)
    self.down = nnx.Linear(F, D, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def _mse(y_hat, y):
  return jnp.mean(jnp.square(y_hat - y))


def _direct_optax(params, loss_of_params, steps, tx):
  """The plain optax loop every integration must reproduce."""
  state = tx.init(params)
  for _ in range(steps):
    grads = jax.grad(loss_of_params)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _nnx_train_step(x, y):
  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: _mse(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  return train_step


def _functional_train_step(graphdef, tx, x, y):
  """The split/merge pattern: params are a plain pytree (nnx.State) given to optax."""

  @jax.jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: _mse(nnx.merge(graphdef, p)(x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


# nnx.Optimizer writes the state back with `nnx.update(opt_state, nnx.state(new))`,
# which rebuilds each per-parameter FactoredMoment as an nnx.State; the second and
# later updates must still recognise it (`_factored.moments_like`).
@pytest.mark.parametrize("graph", [None, False])
def test_nnx_optimizer_several_steps(graph):
  x, y = _data()
  model = MLP(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  # Computed before the optimizer runs (the split state shares Variables with the model).
  expected = _direct_optax(params0, lambda p: _mse(nnx.merge(graphdef, p)(x), y), 3,
                           ao.adafactor())
  optimizer = nnx.Optimizer(model, ao.adafactor(), wrt=nnx.Param, graph=graph)
  train_step = _nnx_train_step(x, y)
  for _ in range(3):
    train_step(model, optimizer)
  assert int(optimizer.step[...]) == 3
  # The later steps used the statistics written back by the earlier ones.
  got = nnx.state(model, nnx.Param)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_nnx_optimizer_first_step_equals_direct_optax():
  x, y = _data()
  model = MLP(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  # Before the optimizer runs: the split state shares Variables with the model.
  expected = _direct_optax(params0, lambda p: _mse(nnx.merge(graphdef, p)(x), y), 1,
                           ao.adafactor())
  optimizer = nnx.Optimizer(model, ao.adafactor(), wrt=nnx.Param)
  loss0 = float(_nnx_train_step(x, y)(model, optimizer))
  assert int(optimizer.step[...]) == 1
  got = nnx.state(model, nnx.Param)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  assert float(_mse(model(x), y)) < loss0


def test_nnx_split_merge_trains_and_equals_direct_optax():
  x, y = _data()
  model = MLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params0 = params
  tx = ao.adafactor()
  opt_state = tx.init(params)
  train_step = _functional_train_step(graphdef, tx, x, y)
  losses = []
  for _ in range(30):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  expected = _direct_optax(params0, lambda p: _mse(nnx.merge(graphdef, p)(x), y), 30,
                           ao.adafactor())
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  nnx.update(model, params)  # back into the module
  np.testing.assert_allclose(_mse(model(x), y), _mse(nnx.merge(graphdef, params)(x), y))


def test_nnx_optimizer_state_is_factored():
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ao.adafactor(), wrt=nnx.Param)
  nu = optax.tree_utils.tree_get(optimizer.opt_state, "nu")
  # Kernels (in, out) keep one value per row and per column; biases are whole.
  assert nu["up"]["kernel"].v_row.shape == (D, 1)
  assert nu["up"]["kernel"].v_col.shape == (1, F)
  assert nu["down"]["kernel"].v_row.shape == (F, 1)
  assert nu["up"]["bias"].shape == (F,)


class LinenMLP(linen.Module):
  @linen.compact
  def __call__(self, x):
    return linen.Dense(D)(jax.nn.gelu(linen.Dense(F)(x)))


def test_linen_train_state_trains_and_equals_direct_optax():
  x, y = _data(1)
  net = LinenMLP()
  params0 = net.init(jax.random.key(0), x)["params"]
  state = train_state.TrainState.create(apply_fn=net.apply, params=params0, tx=ao.adafactor())

  @jax.jit
  def train_step(state):
    def loss(p):
      return _mse(state.apply_fn({"params": p}, x), y)

    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), value

  losses = []
  for _ in range(30):
    state, loss = train_step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  assert int(state.step) == 30

  expected = _direct_optax(params0, lambda p: _mse(net.apply({"params": p}, x), y), 30,
                           ao.adafactor())
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


class Layer(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(D, F, rngs=rngs)
    self.down = nnx.Linear(F, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(x)))


class ScannedStack(nnx.Module):
  """`layers` identical blocks created with nnx.vmap and applied with nnx.scan."""

  def __init__(self, layers, rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Layer(rngs)

    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return layer(x)

    return body(x, self.layers)


@pytest.mark.parametrize("layers", [3, 200])
def test_nnx_scan_stack_factored_axes(layers):
  """Params are (layers, d, f). The two largest axes are factored, the third is a batch axis.

  With layers < d the per-layer matrix (d, f) is factored, one R, C pair per layer.
  With layers > d the layer axis is among the two largest and gets factored
  instead (as in optax.adafactor): pick `min_dim_size_to_factor` or keep layers small.
  """
  model = ScannedStack(layers, nnx.Rngs(0))
  kernel = model.layers.up.kernel
  assert kernel.shape == (layers, D, F)
  state = ao.adafactor().init(nnx.state(model, nnx.Param))
  nu = optax.tree_utils.tree_get(state, "nu")["layers"]
  up, down = nu["up"]["kernel"], nu["down"]["kernel"]
  if layers < D:
    assert ao.factored_axes((layers, D, F)) == (1, 2)
    assert (up.v_row.shape, up.v_col.shape) == ((layers, D, 1), (layers, 1, F))
    assert (down.v_row.shape, down.v_col.shape) == ((layers, F, 1), (layers, 1, D))
  else:  # 200 > 128: axes (layers, f) are the largest; d = 128 becomes the batch axis
    assert ao.factored_axes((layers, D, F)) == (0, 2)
    assert (up.v_row.shape, up.v_col.shape) == ((layers, D, 1), (1, D, F))
  # Biases (layers, f): a matrix too, factored only when layers >= 128.
  bias = nu["up"]["bias"]
  assert (bias.shape == (layers, F)) if layers < 128 else (bias.v_row.shape == (layers, 1))


def test_nnx_scan_stack_trains():
  x, y = _data(2)
  graphdef, params = nnx.split(ScannedStack(3, nnx.Rngs(0)), nnx.Param)
  tx = ao.adafactor()
  opt_state = tx.init(params)
  train_step = _functional_train_step(graphdef, tx, x, y)
  losses = []
  for _ in range(25):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]


# A model object handed over whole (an equinox module, whose activation functions
# are leaves; a config string among the parameters): a ValueError that names the
# leaf, its type and what to pass instead, never a bare AttributeError on .dtype.

NON_ARRAYS = {"jitted_function": jax.nn.relu, "lambda": lambda x: x, "string": "relu",
              "object": object()}


@pytest.mark.parametrize("leaf", NON_ARRAYS.values(), ids=NON_ARRAYS.keys())
@pytest.mark.parametrize("tx", [ao.adafactor(1e-2), ao.scale_by_factored_rms()],
                         ids=["adafactor", "scale_by_factored_rms"])
def test_init_names_a_leaf_that_is_not_an_array(tx, leaf):
  params = {"w": jnp.ones((3,)), "model": {"act": leaf}}
  with pytest.raises(ValueError, match=r"parameter \['model'\]\['act'\] is a "
                     + type(leaf).__qualname__ + r" .*eqx\.filter\(model, eqx\.is_inexact_array\)"):
    tx.init(params)


def test_update_names_a_leaf_that_is_not_an_array():
  tx, params = ao.adafactor(1e-2), {"w": jnp.ones((3,))}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"update \['act'\] is a function"):
    tx.update({"w": jnp.ones((3,)), "act": lambda x: x}, state, params)
  with pytest.raises(ValueError, match=r"parameter \['act'\] is a str"):
    tx.update({"w": jnp.ones((3,))}, state, {"w": jnp.ones((3,)), "act": "relu"})
