"""Sharded checkpoints with orbax: save on one mesh, restore on the same or another.

The restore targets come from `ao.state_shardings`, so no sharding is written by
hand. Restoring is lossless: the restored arrays equal the saved ones bit for bit,
placed as the helper says, and training resumed from them equals training that
was never interrupted (with its state moved to the new mesh by `jax.device_put`).
"""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType

import adafactor_optax as ao
from tests import transformer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


def optimizer():
  return ao.adafactor(momentum=0.9)


def train(params, state, grads_list, mesh):
  shardings = transformer.param_shardings(mesh)

  def step(params, grads, state):
    updates, state = optimizer().update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with jax.set_mesh(mesh):
    jitted = jax.jit(step, out_shardings=(shardings, ao.state_shardings(optimizer(), params)))
    for grads in grads_list:
      params, state = jitted(params, transformer.place(grads, shardings), state)
  return params, state


def make_mesh(shape, mode=AxisType.Auto):
  return jax.make_mesh(shape, ("data", "model"), axis_types=(mode, mode))


def restore_target(mesh):
  """Shape structs carrying the shardings the helper gives for `mesh`."""
  params = transformer.abstract_params()
  shardings = transformer.param_shardings(mesh)
  params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                        params, shardings)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(optimizer().init, params),
                       ao.state_shardings(optimizer(), params))
  return {"params": params, "opt_state": state}


@pytest.mark.parametrize("new_shape, new_mode", [
    ((2, 4), AxisType.Auto), ((4, 2), AxisType.Auto), ((8, 1), AxisType.Auto),
    ((4, 2), AxisType.Explicit),
], ids=str)
def test_save_restore_resume(tmp_path, new_shape, new_mode):
  grads = transformer.make_grads(4)
  mesh = make_mesh((2, 4))
  params = transformer.place(transformer.make_params(), transformer.param_shardings(mesh))
  with jax.set_mesh(mesh):
    state = jax.jit(optimizer().init)(params)
  params, state = train(params, state, grads[:2], mesh)

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "step2", {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    new_mesh = make_mesh(new_shape, new_mode)
    target = restore_target(new_mesh)
    restored = checkpointer.restore(tmp_path / "step2", target)

  saved = {"params": params, "opt_state": state}
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for got, want, like in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                             jax.tree.leaves(target)):
    assert got.sharding.is_equivalent_to(like.sharding, got.ndim)
    np.testing.assert_array_equal(got, want)

  # Uninterrupted: the same state moved to the new mesh in memory.
  moved = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), saved, target)
  want = train(moved["params"], moved["opt_state"], grads[2:], new_mesh)
  got = train(restored["params"], restored["opt_state"], grads[2:], new_mesh)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  if new_mesh == mesh:  # same mesh: equal to never having stopped at all
    jax.tree.map(np.testing.assert_array_equal, got, train(params, state, grads[2:], mesh))
