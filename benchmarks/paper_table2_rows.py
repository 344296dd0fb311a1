"""The rows of the paper's Table 2 (arXiv:1804.04235, Section 9) as optimizers of this package.

Used by `paper_table2.py` (training) and `paper_table2_report.py` (the table and plots).
"""

import dataclasses

import jax.numpy as jnp
import optax

import adafactor_optax as ao

PAPER_STEPS = 100_000


# ------------------------------------------------------------------------- the rows


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of Table 2: how Adafactor is configured, and the paper's BLEU."""

  factored: str | None  # None, "factored", "row" or "col"
  b1: float | None
  b2: str  # "0.999", "0.99", "0.9" (constant, bias-corrected) or "t^-c"
  d: float | None
  relative: bool
  bleu_warmup: float
  bleu_no_warmup: float


ROWS = {
    "A": Row(None, None, "0.999", None, False, 25.6, 0.1),
    "B": Row(None, 0.9, "0.999", None, False, 25.4, 23.1),
    "C": Row("factored", None, "0.999", None, False, 25.4, 0.2),
    "D": Row("row", None, "0.999", None, False, 25.2, 0.3),
    "E": Row("col", None, "0.999", None, False, 0.3, 0.5),
    "F": Row(None, None, "0.99", None, False, 25.0, 0.4),
    "G": Row(None, None, "0.9", None, False, 18.4, 15.6),
    "H": Row(None, None, "0.999", 1.0, False, 25.4, 21.5),
    "I": Row(None, None, "0.999", 2.0, False, 25.7, 0.2),
    "J": Row("factored", None, "0.999", 1.0, False, 25.6, 22.4),
    "K": Row(None, None, "t^-0.5", None, False, 25.6, 21.1),
    "L": Row(None, None, "t^-0.8", None, False, 25.6, 0.1),
    "M": Row(None, None, "t^-1.0", None, False, 25.4, 0.1),
    "N": Row(None, None, "t^-0.8", 1.0, False, 25.9, 22.4),
    "O": Row("factored", None, "t^-0.8", 1.0, True, 25.0, 25.5),
    "P": Row("factored", 0.9, "t^-0.8", 1.0, True, 24.9, 25.3),
}
SGD_K = (1, 10, 100, 150, 200, 300)
# Row Q, BLEU with warmup / without ("div": diverged).
SGD_BLEU = {1: ("0.6", "0.8"), 10: ("8.2", "9.1"), 100: ("22.9", "div"),
            150: ("24.0", "div"), 200: ("24.3", "div"), 300: ("div", "div")}


def step_schedule(warmup: bool, f: float):
  """The paper's s_t evaluated at the compressed time f * t (`inverse_sqrt_step`)."""
  paper = ao.inverse_sqrt_step(1e-2, 1e-6 if warmup else None)

  def schedule(count):
    t = (jnp.asarray(count).astype(jnp.float32) + 1.0) * jnp.float32(f)
    return paper(t - 1.0)  # the package's schedules take count = t - 1

  return schedule


def scaled(schedule, k: float):
  return lambda count: jnp.float32(k) * schedule(count)


def factor_rule(estimate: str, min_dim: int):
  """Row D / E: only row (or column) statistics for the matrices the default rule factors."""

  def rule(path, shape):
    axes = ao.factored_axes(shape, min_dim)
    return None if axes is None else ao.FactorSpec(*axes, estimate=estimate)

  return rule


def build_optimizer(name: str, warmup: bool, cfg) -> optax.GradientTransformation:
  """Row `name` ("A"-"P", or "Q<k>") with or without warmup."""
  s = step_schedule(warmup, PAPER_STEPS / cfg.steps)
  if name.startswith("Q"):
    return optax.sgd(scaled(s, int(name[1:])))  # the paper's k * s_t, not step_scale
  row = ROWS[name]
  if row.b2.startswith("t^-"):
    decay = dict(decay_rate=float(row.b2[3:]))
  else:
    decay = dict(decay_schedule=ao.bias_corrected_decay(float(row.b2)))
  if row.factored in ("row", "col"):
    factoring = dict(factored=True, factor_rule=factor_rule(row.factored, cfg.min_dim))
  else:
    factoring = dict(factored=row.factored == "factored")
  step = (dict(learning_rate=s) if row.relative else
          dict(learning_rate=scaled(s, 0.1 * cfg.step_scale), multiply_by_parameter_scale=False))
  return ao.adafactor(**step, **decay, **factoring, clipping_threshold=row.d, momentum=row.b1,
                      min_dim_size_to_factor=cfg.min_dim, diagnostics=True)


def describe(name: str) -> tuple[str, str, str, str]:
  if name.startswith("Q"):
    return "SGD", "-", "-", "-"
  r = ROWS[name]
  fac = {None: "-", "factored": "yes", "row": "row-mean only", "col": "column-mean only"}
  b2 = "1 - " + r.b2 if r.b2.startswith("t") else r.b2
  return fac[r.factored], "0" if r.b1 is None else str(r.b1), b2, "-" if r.d is None else str(r.d)
