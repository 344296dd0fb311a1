"""Adafactor in a linen trainer that shards the whole TrainState from its boxes.

The pattern of public Flax trainers: parameters annotated with
``nn.with_partitioning``, the TrainState built abstractly, its shardings read
from the boxes with ``nn.get_sharding``, and the same function jitted with
those ``out_shardings``. Adafactor's state boxes name the axes of their own
arrays (a row statistic (1024, 1) of a kernel named ('data', 'model') is named
('data', None)), so this works as it does with ``optax.adam``.

Run: ``python examples/flax_linen_sharding.py`` (2 simulated CPU devices).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax.training import train_state  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import adafactor_optax as ao  # noqa: E402


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = lambda features, kernel_names, bias_names: nn.Dense(  # noqa: E731
        features,
        kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), kernel_names),
        bias_init=nn.with_partitioning(nn.initializers.zeros, bias_names))
    h = jax.nn.gelu(dense(512, ("data", "model"), ("model",))(x))
    return dense(256, ("model", "data"), ("data",))(h)


def main():
  # Auto axes: linen's boxes apply with_sharding_constraint, an assert under Explicit axes.
  mesh = jax.make_mesh((jax.device_count(), 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 256)), jnp.float32)
  y = jnp.tanh(x[:, ::-1])
  model, tx = MLP(), ao.adafactor(momentum=0.9, dtype_momentum="int8")

  def create(key):
    params = model.init(key, x)["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def train_step(state):
    def loss_fn(params):
      return jnp.mean(jnp.square(state.apply_fn({"params": params}, x) - y))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  with jax.set_mesh(mesh):
    abstract_state = jax.eval_shape(create, jax.random.key(0))
    shardings = nn.get_sharding(abstract_state, mesh)  # from the boxes of the whole state
    state = jax.jit(create, out_shardings=shardings)(jax.random.key(0))
    train_step = jax.jit(train_step, out_shardings=(shardings, None), donate_argnums=0)
    for step in range(20):
      state, loss = train_step(state)
      if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {float(loss):.6f}")

  kernel = state.opt_state[0].nu["Dense_0"]["kernel"]
  print("kernel", state.params["Dense_0"]["kernel"].names,
        "v_row", kernel.v_row.names, "v_col", kernel.v_col.names)
  expected = ao.state_shardings(tx, nn.unbox(abstract_state.params),
                                nn.unbox(shardings.params))
  placed = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in
               zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(expected), strict=True))
  print(f"state placed as ao.state_shardings says: {placed}")


if __name__ == "__main__":
  main()
