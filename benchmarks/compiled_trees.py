"""What `compiled_step.py` compiles: parameter trees, their factor rule, and the optimizers.

Trees are nested dicts of shapes (`large_tree`, `transformer_tree`); `OPTIMIZERS`
maps a row's name to ``(make(rule) -> tx, parameter dtype)``, and `PAIRED` sets
each configuration of ours beside `optax.adafactor` in the same configuration.
"""

import itertools
import os
import sys

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCHMARKS), BENCHMARKS]

import jax.numpy as jnp
import optax
import step_time  # benchmarks/step_time.py: the transformer layer's leaves

import adafactor_optax as ao
from adafactor_optax import _grouping

# --- Parameter trees: {name: shape}, nested ------------------------------------------------


def large_tree(d=1024, f=4096, layers=4, vocab=8192):
  """A few large leaves: an embedding and, per layer, six matrices and two norm scales."""
  layer = {k: s for k, s in step_time.layer_shapes(d, f).items()
           if not k.endswith("bias") and k not in ("ln1_bias", "ln2_bias")}
  return {"embed": (vocab, d), "layers": {f"{i:02d}": dict(layer) for i in range(layers)}}


def transformer_tree(scanned, d=512, f=2048, layers=12, vocab=8192):
  """`step_time`'s transformer: its 12 layers as separate leaves, or as one scanned stack."""
  config = step_time.TreeConfig(vocab=vocab, d_model=d, d_mlp=f, layers=0 if scanned else layers,
                                scanned_layers=layers if scanned else 0)
  return step_time.tree_shapes(config)


TREES = {
    "large": ("few large leaves (4 layers, d 1024, no biases)", lambda: large_tree()),
    "unscanned": ("transformer, 12 unscanned layers (d 512)", lambda: transformer_tree(False)),
    "scanned": ("same transformer, 12 layers scanned into stacks",
                lambda: transformer_tree(True)),
}
SMOKE_TREES = {
    "large": ("smoke: 2 layers, d 256", lambda: large_tree(256, 512, 2, 512)),
    "unscanned": ("smoke: 2 unscanned layers, d 128",
                  lambda: transformer_tree(False, 128, 256, 2, 256)),
    "scanned": ("smoke: 2 scanned layers, d 128", lambda: transformer_tree(True, 128, 256, 2, 256)),
}


# The README's rule for stacked trees: each layer of a stack (layers, d, f) its own
# d x f matrix, every other leaf (the embedding) factored as with no rule.
per_layer = ao.stacked_layers()


# name -> (make(rule) -> tx, parameter dtype). `rule` is `per_layer` for stacked trees.
def with_plan(plan):
  """`adafactor()` compiled with one `_grouping.Plan` on every backend (to compare plans)."""

  def make(rule):
    tx = ao.adafactor(factor_rule=rule)

    def update(updates, state, params=None):
      chosen = dict(_grouping.PLANS)
      _grouping.PLANS.update(dict.fromkeys(chosen, plan))
      try:
        return tx.update(updates, state, params)
      finally:
        _grouping.PLANS.update(chosen)

    return optax.GradientTransformation(tx.init, update)

  return make, jnp.float32


def plan_name(plan):
  """E.g. ``ours [grouped+inputs]``: the plan's fields that are on."""
  on = [("grouped" if plan.grouped else "alone")] + [f for f in ("barriers", "from_inputs")
                                                     if getattr(plan, f)]
  return f"ours [{'+'.join(on)}]"


OPTIMIZERS = {
    "ours": (lambda rule: ao.adafactor(factor_rule=rule), jnp.float32),
    "ours+momentum": (lambda rule: ao.adafactor(momentum=0.9, factor_rule=rule), jnp.float32),
    "ours bf16": (lambda rule: ao.adafactor(factor_rule=rule), jnp.bfloat16),
    "adam": (lambda rule: optax.adam(1e-3), jnp.float32),
    "adam bf16": (lambda rule: optax.adam(1e-3), jnp.bfloat16),
    "optax.adafactor": (lambda rule: optax.adafactor(1e-2), jnp.float32),
    "sgd": (lambda rule: optax.sgd(1e-2), jnp.float32),
}
DEFAULT_OPTIMIZERS = tuple(OPTIMIZERS)
# Ours beside optax.adafactor in the same configuration (`--optimizers` names them; the
# `optax_adafactor_markdown` table pairs them): an explicit learning rate 1e-2 (optax's
# is absolute, ours relative to RMS(X), as optax's `multiply_by_parameter_scale=True`),
# momentum 0.9, int8 momentum (optax has none: against its float32 momentum), and
# bfloat16 parameters with int8 momentum and stochastic rounding (against optax's
# bfloat16 step with float32 momentum).
PAIRED = {
    "ours lr": (lambda rule: ao.adafactor(1e-2, factor_rule=rule), jnp.float32,
                "optax.adafactor"),
    "ours lr+momentum": (lambda rule: ao.adafactor(1e-2, momentum=0.9, factor_rule=rule),
                         jnp.float32, "optax.adafactor+momentum"),
    "ours lr+int8 momentum": (
        lambda rule: ao.adafactor(1e-2, momentum=0.9, dtype_momentum="int8", factor_rule=rule),
        jnp.float32, "optax.adafactor+momentum"),
    "ours bf16 lr+int8+rounding": (
        lambda rule: ao.adafactor(1e-2, momentum=0.9, dtype_momentum="int8",
                                  stochastic_rounding=True, factor_rule=rule),
        jnp.bfloat16, "optax.adafactor bf16+momentum"),
}
OPTIMIZERS |= {name: (make, dtype) for name, (make, dtype, _) in PAIRED.items()}
OPTIMIZERS |= {
    "optax.adafactor+momentum": (lambda rule: optax.adafactor(1e-2, momentum=0.9), jnp.float32),
    "optax.adafactor bf16+momentum": (lambda rule: optax.adafactor(1e-2, momentum=0.9),
                                      jnp.bfloat16),
}
COUNTERPARTS = {name: other for name, (_, _, other) in PAIRED.items()}
DEFAULT_OPTIMIZERS += tuple(dict.fromkeys([*PAIRED, *COUNTERPARTS.values()]))
# The step's per-backend choices (`adafactor_optax._grouping.PLANS`), each forced on every
# backend: not in the default run (`--optimizers 'ours [alone]',...`).
OPTIMIZERS |= {
    plan_name(plan): with_plan(plan)
    for plan in (_grouping.Plan(*flags) for flags in itertools.product((False, True), repeat=3))
}
POD_OPTIMIZERS = ("ours", "ours+momentum", "adam")
# The smoke run (CI): few compiles of tiny programs.
SMOKE_TREE_NAMES = ("unscanned", "scanned")
SMOKE_OPTIMIZERS = ("ours", "adam", "sgd")
SMOKE_POD_OPTIMIZERS = ("ours", "adam")
