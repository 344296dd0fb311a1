"""Swapping ``optax.adam(3e-3)`` for Adafactor: what the learning rate means.

The task of equinox's RNN example, in plain JAX: a GRU (hidden size 16) reads
a 2-d curve of 16 points and says whether it turns clockwise; batch 32, 200
steps, binary cross-entropy. Each optimizer runs from the same initialisation
and batches; the script prints the final loss and accuracy on held-out curves.

With ``multiply_by_parameter_scale=True`` (the default, the paper's) the
learning rate is a *relative* step: a parameter moves by about
``lr * max(eps2, RMS(X))`` per step, so Adam's 3e-3 moves these weights (RMS
~0.14) by ~4e-4 and a zero-initialised bias by 3e-6 (eps2 = 1e-3). Without
parameter scaling the learning rate is absolute, as Adam's.

Run: ``python examples/from_adam.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adafactor_optax as ao

HIDDEN, LENGTH, BATCH, STEPS, LR = 16, 16, 32, 200, 3e-3


def curves(n, seed):
  """Points on a circle from a random phase, half of them run backwards (label 1)."""
  rng = np.random.default_rng(seed)
  t = np.linspace(0, 2 * np.pi, LENGTH)[None] + rng.uniform(0, 2 * np.pi, (n, 1))
  x = np.stack([np.sin(t), np.cos(t)], axis=-1) + 0.1 * rng.standard_normal((n, LENGTH, 2))
  y = (np.arange(n) % 2).astype(np.float32)
  x[y == 1] = x[y == 1, ::-1]
  return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def init(key):
  """equinox's GRUCell and Linear initialisation: U(-1/sqrt(fan), 1/sqrt(fan)); head bias 0."""
  k = jax.random.split(key, 4)
  scale = 1 / np.sqrt(HIDDEN)
  u = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -scale, scale)  # noqa: E731
  return {"w_input": u(k[0], (2, 3 * HIDDEN)), "w_hidden": u(k[1], (HIDDEN, 3 * HIDDEN)),
          "b_input": u(k[2], (3 * HIDDEN,)), "w_out": u(k[3], (HIDDEN, 1)),
          "b_out": jnp.zeros((1,), jnp.float32)}


def logits(p, x):
  def gru(h, x_t):
    a = x_t @ p["w_input"] + p["b_input"][None]
    b = h @ p["w_hidden"]
    r = jax.nn.sigmoid(a[:, :HIDDEN] + b[:, :HIDDEN])
    z = jax.nn.sigmoid(a[:, HIDDEN:2 * HIDDEN] + b[:, HIDDEN:2 * HIDDEN])
    n = jnp.tanh(a[:, 2 * HIDDEN:] + r * b[:, 2 * HIDDEN:])
    return (1 - z) * n + z * h, None

  h, _ = jax.lax.scan(gru, jnp.zeros((x.shape[0], HIDDEN), jnp.float32), x.swapaxes(0, 1))
  return (h @ p["w_out"] + p["b_out"][None])[:, 0]


def loss(p, x, y):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits(p, x), y))


def train(tx, seed=0):
  x, y = curves(BATCH * STEPS, seed)
  batches = (x.reshape(STEPS, BATCH, LENGTH, 2), y.reshape(STEPS, BATCH))
  params = init(jax.random.key(seed))

  def step(carry, batch):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params, *batch)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), value

  (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), batches))(params)
  x_test, y_test = curves(2000, seed + 1)
  accuracy = jnp.mean((logits(params, x_test) > 0) == (y_test > 0.5))
  return float(loss(params, x_test, y_test)), float(accuracy)


OPTIMIZERS = {
    "optax.adam(3e-3)": optax.adam(LR),
    "ao.adafactor(3e-3)": ao.adafactor(LR),
    "ao.adafactor(3e-3, multiply_by_parameter_scale=False)":
        ao.adafactor(LR, multiply_by_parameter_scale=False),
    "ao.adafactor(3e-3, multiply_by_parameter_scale=False, momentum=0.9)":
        ao.adafactor(LR, multiply_by_parameter_scale=False, momentum=0.9),
    "ao.adafactor() (the paper's relative step min(1e-2, 1/sqrt(t)))": ao.adafactor(),
}


def main():
  for name, tx in OPTIMIZERS.items():
    results = [train(tx, seed) for seed in range(3)]
    losses, accuracies = zip(*results)
    print(f"{name:70s} test loss {np.mean(losses):.3f}  accuracy "
          + " ".join(f"{a:.3f}" for a in accuracies))


if __name__ == "__main__":
  main()
