"""Facts about the compiled train step, read from XLA (exact, no wall clock).

`adafactor()` computes the chain's head parameter by parameter (_fused.py); its
updates and state must equal the hand-built chain of the public transforms, and
its compiled step must not need more than one gradient-sized temporary.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import adafactor_optax as ao
from tests import helpers


def hand_built_chain(momentum=None, clipping_threshold=1.0):
  links = [ao.scale_by_factored_rms()]
  if clipping_threshold is not None:
    links.append(ao.clip_by_block_rms(clipping_threshold))
  links.append(ao.relative_step_size())
  if momentum is not None:
    links.append(ao.ema_momentum(momentum))
  links.append(optax.scale(-1.0))
  return optax.chain(*links)


@pytest.mark.parametrize("kwargs", [{}, {"momentum": 0.9}, {"clipping_threshold": None}])
def test_fast_path_equals_chain(kwargs):
  params = helpers.make_params()
  grads = helpers.stack(helpers.make_grads(10))
  p_fast, s_fast, (_, u_fast) = helpers.run_scan(ao.adafactor(**kwargs), params, grads)
  p_chain, s_chain, (_, u_chain) = helpers.run_scan(hand_built_chain(**kwargs), params, grads)
  assert jax.tree.structure(s_fast) == jax.tree.structure(s_chain)
  # Same math, operations in another order: float32 round-off only.
  for k in params:
    assert helpers.rel_err(u_fast[k], u_chain[k]) < 1e-6, k
  for a, b in zip(jax.tree.leaves(s_fast), jax.tree.leaves(s_chain)):
    assert helpers.rel_err(a, b) < 1e-6


def tree(n_layers=4, d=256, f=512):
  """A small transformer-like tree: matrices, a stacked layer, vectors."""
  shapes = {"embed": (1024, d), "stack": (2, d, f)}
  for i in range(n_layers):
    shapes |= {f"w{i}": (d, f), f"v{i}": (f, d), f"b{i}": (f,), f"ln{i}": (d,)}
  return {k: jnp.full(s, 0.5, jnp.float32) for k, s in shapes.items()}


def temp_bytes(tx, params):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
  return lowered.compile().memory_analysis().temp_size_in_bytes


def test_compiled_temporaries():
  params = tree()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  ours = temp_bytes(ao.adafactor(), params)
  # At most one float32 gradient-sized buffer per parameter (G^2, which XLA:CPU
  # materialises for the row, column and RMS(U) reductions), plus the small
  # statistics: no second full-size buffer for U.
  assert ours <= 1.02 * param_bytes
