"""`benchmarks/compile_time.py`: its trees and its table (the timings themselves are not tested)."""

import jax
import jax.numpy as jnp
import pytest

from tests import helpers


@pytest.fixture(scope="module")
def module():
  return helpers.load_benchmark("compile_time")


def test_trees_have_the_leaves_they_are_named_for(module):
  # 16 leaves a layer (q, k, v, o and their biases, two MLP matrices and biases, two
  # layer norms' scales and biases), plus the embedding and the final norm's two.
  for leaves, layers in module.LEAVES.items():
    n = len(jax.tree.leaves(module.shapes_with_leaves(leaves),
                            is_leaf=lambda x: isinstance(x, tuple)))
    assert n == 16 * layers + 3
    assert abs(n - leaves) <= 0.02 * leaves


def test_phases_are_timed_on_the_host_cpu(module):
  params = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32,
                                      sharding=jax.sharding.SingleDeviceSharding(
                                          jax.devices("cpu")[0]))}
  phases = module.timed_phases(module.OPTIMIZERS["ours"](), params)
  assert set(phases) == {"trace_s", "lower_s", "compile_s", "total_s"}
  assert phases["total_s"] == pytest.approx(
      phases["trace_s"] + phases["lower_s"] + phases["compile_s"])


def test_table_gives_each_total_over_adams_of_the_same_leaves_and_target(module):
  def row(leaves, target, name, total):
    return dict(leaves=leaves, target=target, optimizer=name, trace_s=0.0, lower_s=0.0,
                compile_s=total, total_s=total)

  rows = [row(403, "cpu", "adam", 2.0), row(403, "cpu", "ours", 5.0),
          row(403, "v5e", "adam", 4.0), row(403, "v5e", "ours", 5.0)]
  text = module.to_markdown({"command": "c", "wall_s": 60, "host": "h", "rows": rows})
  assert "| 403 | cpu | ours | 0.00 | 0.00 | 5.00 | 5.00 | 2.5 |" in text
  assert "| 403 | v5e | ours | 0.00 | 0.00 | 5.00 | 5.00 | 1.2 |" in text
