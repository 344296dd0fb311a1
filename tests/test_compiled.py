"""Facts about the compiled train step, read from XLA (exact, no wall clock)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import adafactor_optax as ao


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


def test_xla_cpu_fuses_a_reduction_with_its_producer():
  """What the temporaries test below relies on, checked by its effect, not by a pass name.

  XLA:CPU (jax 0.7+) fuses a row sum with the elementwise square it reads, so
  ``sum(x * x, axis=1)`` needs no temporary. If an XLA release stops doing so,
  every reduction's input is written to memory whatever the program does: this
  test then fails, saying why the next one does too.
  """
  x = jnp.ones((512, 512))
  compiled = jax.jit(lambda x: jnp.sum(x * x, axis=1)).lower(x).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < x.nbytes // 10, (
      "XLA:CPU no longer fuses a reduction with its producer (x * x is materialised)")


def per_layer(path, shape):
  if len(shape) == 3:
    return ao.FactorSpec(-2, -1, batch=(0,))
  return ao.largest_two_axes(128)(path, shape)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "dtype_momentum": jnp.bfloat16},
        {"learning_rate": 1e-3, "multiply_by_parameter_scale": False},
        {"weight_decay_rate": 1e-4},
        {"skip_non_finite": True},
        {"factor_rule": per_layer},
        {"stochastic_rounding": True},
        {"momentum": 0.9, "dtype_momentum": jnp.bfloat16, "stochastic_rounding": True},
        {"skip_non_finite": True, "stochastic_rounding": True},
    ],
    ids=["defaults", "momentum", "bf16_momentum", "absolute_lr", "weight_decay", "skip",
         "per_layer", "rounding", "rounding_bf16_momentum", "rounding_skip"],
)
def test_no_full_size_temporaries(dtype, kwargs):
  """The step's temporaries are the small statistics only: no parameter-sized buffer.

  Every full-size intermediate (G^2, U, an upcast bfloat16 X or G) is
  recomputed inside the fusion that reads it (`_numerics.unshared`).
  """
  params = jax.tree.map(lambda x: x.astype(dtype), tree())
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  largest_leaf_f32 = max(x.size for x in jax.tree.leaves(params)) * 4
  ours = temp_bytes(ao.adafactor(**kwargs), params)
  assert ours < 0.05 * param_bytes < largest_leaf_f32


def test_temporaries_control_shared_u_is_materialised():
  """The measure above sees a full-size buffer: the chain with clipping as a
  separate transform shares U between RMS(U) and the update, and XLA:CPU
  writes it; optax.adafactor does the same."""
  params = tree()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  apart = optax.chain(ao.scale_by_factored_rms(), ao.clip_by_block_rms(1.0),
                      ao.relative_step_size(), optax.scale(-1.0))
  assert temp_bytes(apart, params) > 0.9 * param_bytes
  assert temp_bytes(optax.adafactor(), params) > 0.9 * param_bytes


def test_int8_momentum_temporaries():
  """int8 momentum writes no float32 m_t: its block max and its int8 values are
  each computed from the step's inputs (`_quantize`'s CPU form), and the state
  is updated in place (no copy of the old values)."""
  params = tree()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  temp = temp_bytes(ao.adafactor(momentum=0.9, dtype_momentum="int8"), params)
  assert temp < 0.05 * param_bytes


@pytest.mark.parametrize("rounding", [False, True], ids=["nearest", "stochastic"])
def test_int8_momentum_temporaries_bfloat16(rounding):
  """With bfloat16 parameters too: the update reaching the momentum is rounded to
  bfloat16 on its bits (`_numerics.narrow`), which XLA:CPU recomputes for the block
  max and for the values; as a convert it wrote that update once, a bfloat16 copy
  of the parameters (1.05x their bytes). What is left is the small per-row and
  per-block arrays (scales, statistics), twice as large a share of these
  half-size parameters as of float32 ones."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree())
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  tx = ao.adafactor(momentum=0.9, dtype_momentum="int8", stochastic_rounding=rounding)
  assert temp_bytes(tx, params) < 0.1 * param_bytes
