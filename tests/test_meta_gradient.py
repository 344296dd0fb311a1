"""Differentiating through updates (hypergradients, MAML): finite everywhere, and right.

The meta-objective is the loss after 3 updates of a linear regression whose
bias starts at zero, as a model's biases do. RMS(b) = sqrt(0) there: with the
plain derivative of sqrt (infinite at 0) times the zero derivative of mean(b^2),
every gradient through the parameter scale ``max(eps2, RMS(X))`` is NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao

STEPS = 3


def problem(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 160)), dtype)
  y = jnp.asarray(rng.standard_normal((32, 192)), dtype)
  params = {"w": jnp.asarray(0.05 * rng.standard_normal((160, 192)), dtype),
            "b": jnp.zeros((192,), dtype)}  # zero-initialised: RMS(b) = 0

  def loss(p):
    return jnp.mean(jnp.square(x @ p["w"] + p["b"][None] - y))

  return params, loss


def loss_after_updates(make_tx, loss):
  """``(learning_rate, params0) -> loss(params after STEPS updates)``."""

  def meta_objective(learning_rate, params):
    tx = make_tx(learning_rate)
    state = tx.init(params)
    for _ in range(STEPS):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    return loss(params)

  return meta_objective


CONFIGS = {
    "relative_step": lambda lr: ao.adafactor(max_relative_step=lr),
    "learning_rate": lambda lr: ao.adafactor(lr),
    "momentum": lambda lr: ao.adafactor(lr, momentum=0.9),
    "int8_momentum": lambda lr: ao.adafactor(lr, momentum=0.9, dtype_momentum="int8"),
    "diagnostics": lambda lr: ao.adafactor(lr, diagnostics=True),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_gradient_through_updates_is_finite_at_zero_initialised_leaves(config):
  params, loss = problem(jnp.float32)
  grad_lr, grad_params = jax.grad(loss_after_updates(CONFIGS[config], loss), argnums=(0, 1))(
      jnp.float32(1e-2), params)
  for leaf in [grad_lr, *jax.tree.leaves(grad_params)]:
    assert np.all(np.isfinite(leaf)), config
  # Not finite by being cut off: the loss depends on b0 directly (b3 = b0 + steps).
  assert np.any(grad_params["b"] != 0) and grad_lr != 0


def test_meta_gradient_equals_finite_differences():
  """In float64, where central differences are accurate to ~1e-9 relative."""
  with jax.enable_x64(True):
    params, loss = problem(jnp.float64)
    meta_objective = loss_after_updates(CONFIGS["learning_rate"], loss)
    lr = jnp.float64(1e-2)
    grad_lr, grad_params = jax.grad(meta_objective, argnums=(0, 1))(lr, params)
    h = 1e-6 * lr
    fd_lr = (meta_objective(lr + h, params) - meta_objective(lr - h, params)) / (2 * h)
    np.testing.assert_allclose(grad_lr, fd_lr, rtol=1e-7)
    # A random direction in parameter space, the zero bias included. The bias'
    # RMS stays below eps2 along it (h RMS(v) ~ 1e-6 < 1e-3): its scale is flat,
    # as the gradient's 0 at RMS = 0 says.
    rng = np.random.default_rng(3)
    v = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)
    h = 1e-6
    shifted = lambda s: jax.tree.map(lambda a, b: a + s * b, params, v)  # noqa: E731
    fd_dir = (meta_objective(lr, shifted(h)) - meta_objective(lr, shifted(-h))) / (2 * h)
    along_v = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad_params),
                                                 jax.tree.leaves(v)))
    np.testing.assert_allclose(along_v, fd_dir, rtol=1e-7)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_meta_gradient_equals_optax_adafactor(momentum):
  """With an explicit learning rate the two are the same algorithm (same updates),
  so their meta-gradients agree too; optax's RMS has a custom gradient at 0 of its own."""
  params, loss = problem(jnp.float32)
  lr = jnp.float32(1e-2)
  ours = jax.grad(loss_after_updates(lambda r: ao.adafactor(r, momentum=momentum), loss),
                  argnums=(0, 1))(lr, params)
  theirs = jax.grad(loss_after_updates(lambda r: optax.adafactor(r, momentum=momentum), loss),
                    argnums=(0, 1))(lr, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), ours, theirs)


def test_forward_value_unchanged_by_the_safe_gradient():
  """safe_sqrt changes derivatives only: RMS(X) is jnp.sqrt's value bit for bit."""
  from adafactor_optax import _numerics

  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48)), jnp.float32)
  assert _numerics.block_rms(x) == jnp.sqrt(jnp.mean(jnp.square(x)))
  assert _numerics.block_rms(jnp.zeros(5)) == 0
