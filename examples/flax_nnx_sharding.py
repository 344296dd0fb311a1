"""Adafactor in ``nnx.Optimizer`` with ``nnx.with_partitioning`` parameters under ``jax.set_mesh``.

NNX places each optimizer state Variable by its ``out_sharding`` metadata.
Adafactor's state Variables carry names that fit their own arrays (a row
statistic (256, 1) of a kernel named ('data', 'model') gets ('data', None)),
so the Optimizer builds, and every state array is sharded as
``ao.state_shardings`` says, in Explicit and in Auto mode.

Run: ``python examples/flax_nnx_sharding.py [auto|explicit]`` (2 simulated CPU devices).
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adafactor_optax as ao  # noqa: E402


class MLP(nnx.Module):
  def __init__(self, rngs):
    linear = lambda i, o, kernel_names, bias_names: nnx.Linear(  # noqa: E731
        i, o, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), kernel_names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, bias_names))
    self.up = linear(256, 512, ("data", "model"), ("model",))
    self.down = linear(512, 256, ("model", "data"), ("data",))

  def __call__(self, x):
    # Under Explicit axes, a contraction over a sharded axis states its output's sharding.
    explicit = AxisType.Explicit in jax.sharding.get_abstract_mesh().axis_types
    return self.down(jax.nn.gelu(self.up(x)), out_sharding=P(None, "data") if explicit else None)


def main(mode):
  axis_type = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[mode]
  mesh = jax.make_mesh((jax.device_count(), 1), ("data", "model"), axis_types=(axis_type,) * 2)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 256)), jnp.float32)
  y = jnp.tanh(x[:, ::-1])
  tx = ao.adafactor(momentum=0.9, dtype_momentum="int8")

  with jax.set_mesh(mesh):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x) - y)))(model)
      optimizer.update(model, grads)
      return loss

    for step in range(20):
      loss = train_step(model, optimizer)
      if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {float(loss):.6f}")

  kernel = optimizer.opt_state[0].nu["up"]["kernel"]
  print("kernel", model.up.kernel.get_metadata()["out_sharding"],
        "v_row", kernel.v_row.get_metadata()["out_sharding"],
        "v_col", kernel.v_col.get_metadata()["out_sharding"])
  expected = ao.state_shardings(tx, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  placed = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in
               zip(jax.tree.leaves(optimizer.opt_state), jax.tree.leaves(expected), strict=True))
  print(f"state placed as ao.state_shardings says: {placed}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "explicit")
