"""Resuming: the state survives serialization, and a resumed run equals an unbroken one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import adafactor_optax as ao
from tests import helpers

N = 4


def _optimizer():
  return ao.adafactor(momentum=0.9, dtype_momentum="bfloat16", skip_non_finite=True)


def _train(tx, params, state, grads):
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert jax.tree.map(lambda x: jnp.asarray(x).dtype, a) == jax.tree.map(lambda x: jnp.asarray(x).dtype, b)


def _flax_roundtrip(tree, template, _tmp_path):
  return serialization.from_bytes(template, serialization.to_bytes(tree))


def _orbax_roundtrip(tree, template, tmp_path):
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, template))


@pytest.mark.parametrize("roundtrip", [_flax_roundtrip, _orbax_roundtrip], ids=["flax", "orbax"])
def test_2n_steps_equal_n_save_restore_n(roundtrip, tmp_path):
  tx = _optimizer()
  params = jax.tree.map(jnp.asarray, helpers.make_params())
  grads = [jax.tree.map(jnp.asarray, g) for g in helpers.make_grads(2 * N)]

  straight = _train(tx, params, tx.init(params), grads)

  half = _train(tx, params, tx.init(params), grads[:N])
  template = (params, tx.init(params))
  restored = roundtrip(half, template, tmp_path)
  _assert_bitwise_equal(restored, half)
  resumed = _train(tx, *restored, grads[N:])
  _assert_bitwise_equal(resumed, straight)
