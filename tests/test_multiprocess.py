"""A real multi-process run: 2 processes x 4 CPU devices, gloo collectives.

The same code a multi-host GPU/TPU job runs (one process per host, one global
mesh over all devices, `jax.make_array_from_callback` to build global arrays
from each host's part), here on localhost. Its result must equal the same
training on one process with 8 devices.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import adafactor_optax as ao
from tests import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_on_mesh(steps=3):
  """Three steps on a global 2 x 4 mesh; every process calls it with the same data."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  shardings = transformer.param_shardings(mesh)
  tx = ao.adafactor(momentum=0.9)

  def global_array(x, sharding):  # each process fills only its own devices' slices
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(global_array, transformer.make_params(), shardings)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    jitted = jax.jit(step, out_shardings=(shardings, ao.state_shardings(tx, params)))
    for grads in transformer.make_grads(steps):
      params, state = jitted(params, jax.tree.map(global_array, grads, shardings), state)
  return params, state


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.skipif(jax.device_count() < 8, reason="the reference needs 8 devices")
def test_two_processes_equal_one(tmp_path):
  out, port = tmp_path / "result.npz", free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  workers = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.multiprocess_worker", str(port), str(i), str(out)],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  logs = [w.communicate(timeout=240)[0] for w in workers]
  assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)

  want = jax.tree.leaves(train_on_mesh())
  with np.load(out) as got:
    assert len(got.files) == len(want)
    for i, w in enumerate(want):
      # Same partitioning; gloo's all-reduce sums in its own order (a few ulp).
      np.testing.assert_allclose(got[f"arr_{i}"], np.asarray(w), rtol=1e-5, atol=1e-9)
