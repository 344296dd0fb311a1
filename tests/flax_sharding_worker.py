"""Flax's own sharding paths on N simulated CPU devices; run by tests/test_flax_sharding.py.

``python tests/flax_sharding_worker.py N`` sets XLA_FLAGS for N host devices
before JAX starts, then for every mesh, mode, Flax pattern and optimizer
configuration: builds the model and optimizer state the way a Flax trainer
does, runs 5 jitted, donated steps, and prints one JSON line per case with the
losses, the 1-device losses from the same initial parameters, and every state
array whose sharding is not the one `ao.state_shardings` gives. Also records
what `optax.adafactor` does in the same setups (the contrast).
"""

import json
import os
import sys

DEVICES = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={DEVICES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from flax.training import train_state  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adafactor_optax as ao  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

D, F, BATCH, STEPS = 1024, 512, 16, 5
MESHES = {2: [(2, 1)], 8: [(8, 1), (1, 8), (2, 4)]}[DEVICES]  # FSDP, tensor parallel, both
RULES = (("embed", "data"), ("mlp", "model"))
# Mesh-axis names of the 'partitioned' patterns; logical names of the 'logical' one.
MESH_NAMES = {"k1": ("data", "model"), "b1": ("model",), "k2": ("model", "data"), "b2": ("data",)}
LOGICAL_NAMES = {"k1": ("embed", "mlp"), "b1": ("mlp",), "k2": ("mlp", "embed"), "b2": ("embed",)}

CONFIGS = {
    "defaults": dict(kwargs={}, dtype=jnp.float32),
    "momentum": dict(kwargs=dict(momentum=0.9), dtype=jnp.float32),
    "int8_momentum": dict(kwargs=dict(momentum=0.9, dtype_momentum="int8"), dtype=jnp.float32),
    "bf16_stochastic_rounding": dict(kwargs=dict(stochastic_rounding=True), dtype=jnp.bfloat16),
}


def data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH, D)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(np.tanh(x[:, ::-1] * 0.5))


def forward(p, x):
  """The model, written once in jnp: the 1-device reference of every pattern."""
  h = x @ p["k1"].astype(jnp.float32) + p["b1"].astype(jnp.float32)[None]
  return jax.nn.gelu(h) @ p["k2"].astype(jnp.float32) + p["b2"].astype(jnp.float32)[None]


def mse(y_hat, y):
  return jnp.mean(jnp.square(y_hat - y))


def single_device_losses(tx, params, x, y):
  params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), params)  # on one device
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(lambda p: mse(forward(p, x), y))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(STEPS):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses


def mismatches(state_leaves, expected_shardings):
  expected = jax.tree.leaves(expected_shardings)
  assert len(state_leaves) == len(expected), (len(state_leaves), len(expected))
  bad = []
  for i, (leaf, want) in enumerate(zip(state_leaves, expected)):
    if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
      bad.append(f"leaf {i} {leaf.shape}: {leaf.sharding.spec} != {want.spec}")
  return bad


# Linen: boxed params, nn.get_sharding (or logical_to_mesh_sharding) over the whole TrainState.

class LinenMLP(nn.Module):
  names: dict
  logical: bool
  param_dtype: object

  @nn.compact
  def __call__(self, x):
    box = nn.with_logical_partitioning if self.logical else nn.with_partitioning
    dense = lambda f, k, b, name: nn.Dense(  # noqa: E731
        f, name=name, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=box(nn.initializers.lecun_normal(), self.names[k]),
        bias_init=box(nn.initializers.zeros, self.names[b]))
    return dense(D, "k2", "b2", "l2")(jax.nn.gelu(dense(F, "k1", "b1", "l1")(x)))


def flat_linen(params):
  return {"k1": params["l1"]["kernel"], "b1": params["l1"]["bias"],
          "k2": params["l2"]["kernel"], "b2": params["l2"]["bias"]}


def run_linen(mesh, logical, tx, dtype, x, y):
  model = LinenMLP(LOGICAL_NAMES if logical else MESH_NAMES, logical, dtype)

  def create(key):
    params = model.init(key, x)["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def step(state):
    loss, grads = jax.value_and_grad(
        lambda p: mse(state.apply_fn({"params": p}, x), y))(state.params)
    return state.apply_gradients(grads=grads), loss

  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    abstract = jax.eval_shape(create, jax.random.key(0))
    if logical:
      shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    else:
      shardings = nn.get_sharding(abstract, mesh)
    state = jax.jit(create, out_shardings=shardings)(jax.random.key(0))
    params0 = flat_linen(nn.unbox(state.params))
    jitted = jax.jit(step, out_shardings=(shardings, None), donate_argnums=0)
    losses = []
    for _ in range(STEPS):
      state, loss = jitted(state)
      losses.append(float(loss))
  param_shardings = nn.unbox(shardings.params)
  expected = ao.state_shardings(tx, nn.unbox(abstract.params), param_shardings)
  return losses, params0, mismatches(jax.tree.leaves(state.opt_state), expected)


# NNX: nnx.with_partitioning Variables, nnx.Optimizer under jax.set_mesh.

class NnxMLP(nnx.Module):
  def __init__(self, dtype, rngs):
    part = lambda init, k: nnx.with_partitioning(init, MESH_NAMES[k])  # noqa: E731
    linear = lambda i, o, k, b: nnx.Linear(  # noqa: E731
        i, o, dtype=jnp.float32, param_dtype=dtype, rngs=rngs,
        kernel_init=part(nnx.initializers.lecun_normal(), k),
        bias_init=part(nnx.initializers.zeros, b))
    self.l1 = linear(D, F, "k1", "b1")
    self.l2 = linear(F, D, "k2", "b2")

  def __call__(self, x):
    # Under Explicit axes a contraction over sharded axes needs its output's sharding.
    explicit = AxisType.Explicit in jax.sharding.get_abstract_mesh().axis_types
    return self.l2(jax.nn.gelu(self.l1(x)), out_sharding=P(None, "data") if explicit else None)


def run_nnx(mesh, tx, dtype, x, y):
  with jax.set_mesh(mesh):
    model = NnxMLP(dtype, nnx.Rngs(0))
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params0 = {"k1": pure["l1"]["kernel"], "b1": pure["l1"]["bias"],
               "k2": pure["l2"]["kernel"], "b2": pure["l2"]["bias"]}
    params0 = jax.tree.map(lambda a: np.asarray(a), params0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, optimizer):
      loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
      optimizer.update(model, grads)
      return loss

    losses = [float(step(model, optimizer)) for _ in range(STEPS)]
    expected = ao.state_shardings(tx, pure)
  return losses, params0, mismatches(jax.tree.leaves(optimizer.opt_state), expected)


def cases():
  for shape in MESHES:
    for mode in (AxisType.Auto, AxisType.Explicit):
      # Linen's boxes apply with_sharding_constraint, an assert under Explicit axes:
      # Flax's linen partitioning runs in Auto mode only (optax.adam too).
      patterns = ["linen_partitioned", "linen_logical", "nnx"] if mode == AxisType.Auto else ["nnx"]
      for pattern in patterns:
        yield shape, mode, pattern


def run(shape, mode, pattern, tx, dtype, x, y):
  mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(mode, mode))
  if pattern == "nnx":
    return run_nnx(mesh, tx, dtype, x, y)
  return run_linen(mesh, pattern == "linen_logical", tx, dtype, x, y)


def main():
  x, y = data()
  for shape, mode, pattern in cases():
    case = dict(devices=DEVICES, mesh=list(shape), mode=mode.name, pattern=pattern)
    for config, spec in CONFIGS.items():
      tx = ao.adafactor(**spec["kwargs"])
      try:
        losses, params0, bad = run(shape, mode, pattern, tx, spec["dtype"], x, y)
      except Exception as error:  # noqa: BLE001  # reported, and failed by the test
        print(json.dumps(dict(case, optimizer="ao", config=config, error=repr(error)[:300])),
              flush=True)
        continue
      want = single_device_losses(ao.adafactor(**spec["kwargs"]), params0, x, y)
      print(json.dumps(dict(case, optimizer="ao", config=config, losses=losses,
                            single_device=want, mismatches=bad)), flush=True)
    try:
      run(shape, mode, pattern, optax.adafactor(1e-2), jnp.float32, x, y)
      outcome = "ok"
    except Exception as error:  # noqa: BLE001  # the contrast: what a user sees
      outcome = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    print(json.dumps(dict(case, optimizer="optax.adafactor", outcome=outcome)), flush=True)


if __name__ == "__main__":
  main()
