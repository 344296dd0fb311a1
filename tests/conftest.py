"""Strict numerics for every test: silent dtype promotion is the commonest optimizer bug."""

import jax
import pytest

# Eight simulated CPU devices for the sharding tests (a mesh needs more than one);
# set before any backend starts. Tests that do not shard run on the first device.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _strict_jax():
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield

# A script run in a subprocess (its device count is its first argument), not a test module:
# --doctest-modules would import it.
collect_ignore = ["flax_sharding_worker.py"]
