"""Shared test helpers: parameter trees, gradient streams, unrolled runs."""

import importlib.util
import pathlib

import jax
import numpy as np
import optax

# One leaf of each kind the paper distinguishes, with gradients of its own scale.
SHAPES = {
    "w": (160, 192),        # factored matrix (Algorithm 4)
    "zero": (144, 130),     # zero-initialised matrix: RMS(X) = 0, the eps2 floor
    "stack": (3, 130, 140), # rank 3: a batch of 3 factored 130 x 140 matrices
    "small": (8, 5),        # below min_dim_size_to_factor: not factored (Algorithm 5)
    "b": (192,),            # vector (Algorithm 5)
    "s": (),                # scalar
}
GRAD_SCALES = {"w": 1.0, "zero": 1e-4, "stack": 1e3, "small": 1e-2, "b": 10.0, "s": 0.3}


def make_params(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  params = {k: (0.05 * rng.standard_normal(s)).astype(dtype) for k, s in SHAPES.items()}
  params["zero"] = np.zeros(SHAPES["zero"], dtype)
  return params


def make_grads(steps, seed=1, dtype=np.float32):
  """A list of gradient dicts; each leaf's scale also wanders over 4 decades in time."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    g = {}
    for k, s in SHAPES.items():
      scale = GRAD_SCALES[k] * 10 ** rng.uniform(-2, 2)
      g[k] = (scale * rng.standard_normal(s)).astype(dtype)
    out.append(g)
  return out


def stack(trees):
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def run_scan(tx, params, grads_stacked):
  """Applies `tx` for each gradient in the stacked tree.

  Returns:
    final params, final state, and per step (params before the step, update).
  """

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), (p, u)

  @jax.jit
  def run(params, grads):
    (p, s), trajectory = jax.lax.scan(body, (params, tx.init(params)), grads)
    return p, s, trajectory

  return run(params, grads_stacked)


def rel_err(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = np.max(np.abs(expected)) if expected.size else 0.0
  return float(np.max(np.abs(actual - expected)) / scale) if scale > 0 else float(np.max(np.abs(actual), initial=0.0))


def load_benchmark(name):
  """The module `benchmarks/<name>.py`, loaded from its file (benchmarks/ is no package)."""
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ROOT = pathlib.Path(__file__).resolve().parents[1]


def repository_snapshot():
  """What a benchmark run must leave alone: `git status --porcelain` of `benchmarks/` (None
  outside a git checkout) and the modification time and size of every committed result
  file. Only `benchmarks/`, so that editing other files while the tests run is no failure."""
  import subprocess

  try:
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", "benchmarks"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout
  except (OSError, subprocess.CalledProcessError):
    status = None
  results = ROOT / "benchmarks" / "results"
  files = {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
           for p in sorted(results.rglob("*")) if p.is_file()}
  return status, files
