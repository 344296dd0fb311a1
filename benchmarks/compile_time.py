"""Time to the first step: tracing and compiling the train step, ours against optax's.

For one jitted step (``tx.update`` then ``optax.apply_updates``, params and state
donated) on transformer-shaped trees of ~400 and ~1,500 leaves (`step_time`'s tree,
24 and 96 unscanned layers, d 256), measures, per optimizer and backend:

* trace: ``jax.jit(step).trace(...)`` (Python: the optimizer's own code runs here;
  ours traces the plan of every backend, `jax.lax.platform_dependent`),
* lower: the traced program to StableHLO,
* compile: XLA's compilation for the backend (CPU; TPU v5e and H100 compiled
  deviceless, as in `compiled_step.py`).

Each (backend, tree) runs the three optimizers interleaved, ``--repeats`` times, and
reports the median; the ratios to `optax.adafactor` and `optax.adam` of the same run
are what to read (the machine is shared and noisy). A deviceless compile's time is the
compiler's work on this CPU host, not a measurement on the accelerator.

Usage:
  python benchmarks/compile_time.py                   # writes benchmarks/results/compile_time.md
  python benchmarks/compile_time.py --backends cpu --layers 4 --repeats 1 --out /tmp/ct  # quick
"""

import os

if __name__ == "__main__":
  # Before jax is imported (as compiled_step.py): compile-only TPU and CUDA devices.
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse
import json
import shlex
import statistics
import sys
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)
sys.path.insert(0, os.path.dirname(BENCHMARKS))

import jax
import optax
import step_time
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao

RESULTS = os.path.join(BENCHMARKS, "results")
H100_CONFIG = os.path.join(BENCHMARKS, "h100_sxm.txtpb")
OPTIMIZERS = {
    "ours": lambda: ao.adafactor(learning_rate=1e-2),
    "optax.adafactor": lambda: optax.adafactor(learning_rate=1e-2),
    "adam": lambda: optax.adam(1e-3),
}


def device(backend):
  """One device to compile for: this host's CPU, or a compile-only TPU v5e chip or H100."""
  if backend == "cpu":
    return jax.devices("cpu")[0]
  if backend == "v5e":
    return topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
  with open(H100_CONFIG) as f:
    config = f.read()
  return topologies.get_topology_desc("h100", "cuda", target_config=config,
                                      topology="1x1x1").devices[0]


def abstract_params(layers, dev):
  config = step_time.TreeConfig(vocab=8192, d_model=256, d_mlp=1024, layers=layers,
                                scanned_layers=0)
  sharding = NamedSharding(jax.sharding.Mesh([dev], ("x",)), P())
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jax.numpy.float32, sharding=sharding),
                      step_time.tree_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def time_once(tx, params):
  """Seconds to trace, lower and compile one step of `tx` on `params` (abstract)."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with jax.numpy_dtype_promotion("standard"):
    state = jax.eval_shape(tx.init, params)
    sharding = jax.tree.leaves(params)[0].sharding
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                         state)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    traced = jitted.trace(params, state, params)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
  return {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "total": t3 - t0}


def measure(backends, layers_list, repeats, log):
  rows = []
  for backend in backends:
    dev = device(backend)
    for layers in layers_list:
      params = abstract_params(layers, dev)
      leaves = len(jax.tree.leaves(params))
      runs = {name: [] for name in OPTIMIZERS}
      for _ in range(repeats):
        for name, make in OPTIMIZERS.items():  # interleaved: load drifts hit all alike
          jax.clear_caches()
          runs[name].append(time_once(make(), params))
      for name, times in runs.items():
        row = {"backend": backend, "leaves": leaves, "optimizer": name,
               **{k: statistics.median(t[k] for t in times) for k in times[0]}}
        rows.append(row)
        log(f"{backend} {leaves} leaves {name}: " +
            ", ".join(f"{k} {row[k]:.2f} s" for k in ("trace", "lower", "compile", "total")))
  return rows


def markdown(rows, command, repeats):
  lines = [
      "# Trace and compile time of the train step", "",
      f"Made by `{command}` (jax {jax.__version__}, optax {optax.__version__}, "
      f"{os.cpu_count()} CPU cores, median of {repeats}). TPU v5e and H100 are compiled "
      "deviceless on this CPU host: their times are the compiler's work here, not a "
      "measurement on the accelerator. Ratios are against the same run's optimizers.", "",
      "| backend | leaves | optimizer | trace s | lower s | compile s | total s | "
      "total / optax.adafactor | total / adam | trace / optax.adafactor |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    peers = {r["optimizer"]: r for r in rows
             if (r["backend"], r["leaves"]) == (row["backend"], row["leaves"])}
    lines.append(
        f"| {row['backend']} | {row['leaves']:,} | {row['optimizer']} | {row['trace']:.2f} | "
        f"{row['lower']:.2f} | {row['compile']:.2f} | {row['total']:.2f} | "
        f"{row['total'] / peers['optax.adafactor']['total']:.2f} | "
        f"{row['total'] / peers['adam']['total']:.2f} | "
        f"{row['trace'] / peers['optax.adafactor']['trace']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--backends", default="cpu,v5e,h100")
  p.add_argument("--layers", default="24,96", help="unscanned layers per tree (16 leaves each)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=RESULTS)
  a = p.parse_args(argv)
  default = [a.backends, a.layers, a.repeats] == ["cpu,v5e,h100", "24,96", 3]
  if os.path.abspath(a.out) == os.path.abspath(RESULTS) and not default:
    raise SystemExit("a partial run writes elsewhere (--out): benchmarks/results/ keeps the full one")
  rows = measure(a.backends.split(","), [int(n) for n in a.layers.split(",")], a.repeats,
                 lambda s: print(s, flush=True))
  command = shlex.join(["python", "benchmarks/compile_time.py", *(sys.argv[1:] if argv is None
                                                                   else argv)])
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "compile_time.md"), "w") as f:
    f.write(markdown(rows, command, a.repeats))
  with open(os.path.join(a.out, "compile_time.json"), "w") as f:
    json.dump({"command": command, "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
