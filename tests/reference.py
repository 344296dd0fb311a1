"""An independent NumPy float64 reference of Adafactor, written from the paper
(Shazeer & Stern 2018, arXiv:1804.04235, Algorithms 4-6).

It follows the paper's notation line by line: R and C are row and column *sums*
(the implementation keeps means), V = R C / 1^T R, steps count from t = 1. It
shares no code with the package.
"""

import dataclasses
from collections.abc import Callable

import numpy as np


def rms(x):
  return np.sqrt(np.mean(np.abs(x) ** 2))


def decay_pow(c, offset=0):
  """b2_t = 1 - t^(-c), t counted from the offset and clamped to >= 1."""
  return lambda t: 1.0 - max(t - offset, 1) ** (-c)


def decay_adam(b2):
  """Algorithm 3: b2_t = b2 (1 - b2^(t-1)) / (1 - b2^t)."""
  return lambda t: b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)


def step_paper(cap=1e-2):
  """rho_t = min(cap, 1/sqrt(t))."""
  return lambda t: min(cap, 1 / np.sqrt(t))


@dataclasses.dataclass
class Config:
  step: Callable[[int], float] = dataclasses.field(default_factory=step_paper)
  relative: bool = True            # alpha_t = max(eps2, RMS(X)) * rho_t, else alpha_t = rho_t
  decay: Callable[[int], float] = dataclasses.field(default_factory=lambda: decay_pow(0.8))
  d: float | None = 1.0            # clipping threshold, None: no clipping
  eps1: float = 1e-30
  eps2: float = 1e-3
  factored: bool = True
  min_dim: int = 128
  b1: float | None = None          # momentum on the step
  weight_decay: float = 0.0


def factored_axes(shape, min_dim):
  """Two largest axes (later axis wins ties), both >= min_dim; else None."""
  if len(shape) < 2:
    return None
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
  a, b = sorted(order[-2:])
  if min(shape[a], shape[b]) < min_dim:
    return None
  return a, b


class Adafactor:
  """The paper's algorithm for a dict of float64 arrays."""

  def __init__(self, params, config: Config):
    self.c = config
    self.t = 0
    self.state = {}
    for name, x in params.items():
      axes = factored_axes(x.shape, config.min_dim) if config.factored else None
      self.state[name] = {"axes": axes, "R": None, "C": None, "V": None, "m": np.zeros_like(x)}

  def _second_moment(self, s, g, b2):
    """Algorithm 4 (factored, as a batch of n x m matrices) or Algorithm 5."""
    g2 = np.abs(g) ** 2 + self.c.eps1
    if s["axes"] is None:
      s["V"] = (0 if s["V"] is None else b2 * s["V"]) + (1 - b2) * g2
      return s["V"]
    row, col = s["axes"]
    g2 = np.moveaxis(g2, (row, col), (-2, -1))          # [..., n, m]
    n_sum = g2.sum(axis=-1)                              # (G^2 + eps1) 1_m : [..., n]
    m_sum = g2.sum(axis=-2)                              # 1_n^T (G^2 + eps1) : [..., m]
    s["R"] = (0 if s["R"] is None else b2 * s["R"]) + (1 - b2) * n_sum
    s["C"] = (0 if s["C"] is None else b2 * s["C"]) + (1 - b2) * m_sum
    v = s["R"][..., :, None] * s["C"][..., None, :] / s["R"].sum(axis=-1)[..., None, None]
    return np.moveaxis(v, (-2, -1), (row, col))

  def step(self, params, grads):
    self.t += 1
    t, c = self.t, self.c
    b2 = c.decay(t)
    out = {}
    for name, x in params.items():
      s, g = self.state[name], grads[name]
      v = self._second_moment(s, g, b2)
      u = g / np.sqrt(v)
      if c.d is not None:
        u = u / max(1.0, rms(u) / c.d)
      alpha = c.step(t) * (max(c.eps2, rms(x)) if c.relative else 1.0)
      step = alpha * u
      if c.b1 is not None:
        s["m"] = c.b1 * s["m"] + (1 - c.b1) * step
        step = s["m"]
      out[name] = x - step - c.weight_decay * x
    return out
