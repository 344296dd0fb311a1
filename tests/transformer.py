"""A transformer-shaped parameter tree with logical axis names, for the sharding tests.

Embeddings, attention, MLP matrices (stacked over layers, as `nn.scan` makes them),
biases and norm scales: every kind of leaf the optimizer meets in a real model.
Axis names follow T5X / MaxText (`embed` is FSDP-sharded, `heads`, `mlp` and `vocab`
tensor-parallel), and `RULES` maps them to a ``('data', 'model')`` mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding

RULES = (("embed", "data"), ("vocab", "model"), ("heads", "model"), ("mlp", "model"),
         ("layers", None))


def logical_axes(*, layers=2, d_model=128, d_ff=512, vocab=256, heads_x_dim=128):
  """``{name: (shape, logical axis names)}`` of a small decoder."""
  del heads_x_dim  # same as d_model here, kept for readability of the shapes below
  L, d, f, v = layers, d_model, d_ff, vocab
  return {
      "embed": ((v, d), ("vocab", "embed")),
      "attn_qkv": ((L, d, 3 * d), ("layers", "embed", "heads")),
      "attn_out": ((L, d, d), ("layers", "heads", "embed")),
      "mlp_in": ((L, d, f), ("layers", "embed", "mlp")),
      "mlp_in_bias": ((L, f), ("layers", "mlp")),
      "mlp_out": ((L, f, d), ("layers", "mlp", "embed")),
      "mlp_out_bias": ((L, d), ("layers", "embed")),
      "norm": ((L, d), ("layers", "embed")),
      "final_norm": ((d,), ("embed",)),
  }


def abstract_params(dtype=jnp.float32, **sizes):
  return {k: jax.ShapeDtypeStruct(s, dtype) for k, (s, _) in logical_axes(**sizes).items()}


def param_shardings(mesh, **sizes):
  """NamedShardings from the logical names via Flax's rules (`nn.logical_to_mesh_sharding`)."""
  logical = {k: jax.sharding.PartitionSpec(*a) for k, (_, a) in logical_axes(**sizes).items()}
  return nn.logical_to_mesh_sharding(logical, mesh, RULES)


def make_params(seed=0, **sizes):
  rng = np.random.default_rng(seed)
  return {k: (0.05 * rng.standard_normal(s)).astype(np.float32)
          for k, (s, _) in logical_axes(**sizes).items()}


def make_grads(steps, seed=1, **sizes):
  rng = np.random.default_rng(seed)
  return [{k: (10 ** rng.uniform(-2, 1) * rng.standard_normal(s)).astype(np.float32)
           for k, (s, _) in logical_axes(**sizes).items()} for _ in range(steps)]


def place(tree, shardings):
  return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), tree, shardings)


def named(mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
