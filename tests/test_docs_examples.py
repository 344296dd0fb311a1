"""Every Python block of the documentation pages runs, on a small model it is given.

The blocks are written for a reader who has `params` and `grads` (and, on the sharding
page, a mesh and a train step): those names are provided here, real and small, and
everything else a block uses it must define itself. A block that stops running as
written fails here.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao
from tests import helpers

DOCS = sorted((helpers.ROOT / "docs").glob("*.md"))
BLOCKS = [(page, i, block) for page in DOCS
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]


def reader_scope():
  """What a docs reader is assumed to have in hand."""
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  specs = {"w": P("data", None), "b": P()}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  params = {"w": jax.device_put(jnp.ones((256, 128)), shardings["w"]),
            "b": jax.device_put(jnp.zeros(128), shardings["b"])}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

  def train_step(params, state, grads):
    updates, state = ao.adafactor().update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return dict(jax=jax, jnp=jnp, optax=optax, ao=ao, params=params, grads=grads,
              schedule=optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, 500, 3e-4),
              mesh=mesh, shardings=shardings, param_specs=specs, param_shardings=shardings,
              train_step=train_step, tx=ao.adafactor())


def test_the_docs_have_python_blocks():
  assert len(BLOCKS) >= 3, [(p.name, i) for p, i, _ in BLOCKS]


@pytest.mark.parametrize(("page", "index", "block"), BLOCKS,
                         ids=[f"{p.stem}-{i}" for p, i, _ in BLOCKS])
def test_docs_block_runs(page, index, block):
  del page, index
  scope = reader_scope()
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    exec(block, scope)  # noqa: S102
    # The optimizer a block builds (or the reader's) steps the reader's parameters.
    tx = scope["tx"]
    params = jax.tree.map(np.asarray, scope["params"])
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(np.ones_like, params), state, params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
