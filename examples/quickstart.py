"""A runnable first look: fit a small two-layer network with paper-default Adafactor.

  python examples/quickstart.py

Tested by tests/test_examples.py.
"""

import jax
import jax.numpy as jnp
import optax

import adafactor_optax as ao


def main(steps: int = 300) -> dict:
  """Trains for `steps` steps; returns the losses and the state's bytes beside Adam's."""
  kx, kw1, kw2 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (512, 256))
  y = jnp.tanh(x[:, :8] @ jnp.linspace(-0.5, 0.5, 8)[:, None])
  params = {
      "w1": jax.random.normal(kw1, (256, 256)) / 16,
      "b1": jnp.zeros(256),
      "w2": jax.random.normal(kw2, (256, 1)) / 16,
  }

  def loss_fn(p):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

  tx = ao.adafactor()  # Algorithm 4/5 with Algorithm 6's hyperparameters
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for t in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
    if t % 50 == 0 or t == steps - 1:
      print(f"step {t:4d}  loss {losses[-1]:.4f}")
  adam_bytes = 2 * sum(p.size * 4 for p in jax.tree.leaves(params))
  ours = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  print(f"optimizer state: {ours} bytes (Adam: {adam_bytes} bytes)")
  return {"losses": losses, "state_bytes": ours, "adam_bytes": adam_bytes}


if __name__ == "__main__":
  main()
