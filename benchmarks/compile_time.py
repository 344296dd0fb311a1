"""Trace, lower and compile time of the train step: ours vs optax.adafactor and optax.adam.

The full step (``tx.update`` then ``optax.apply_updates``, params and state
donated) of a transformer-shaped tree with many leaves (`step_time`'s layer, 16
leaves a layer) is traced, lowered and compiled for the host CPU, and ahead of
time (deviceless) for one TPU v5e chip and one H100. Each phase is timed once
with a wall clock, in a fresh jit (nothing cached between optimizers): these are
timings of this host, noisy, and comparable only within one run.

Usage:
  python benchmarks/compile_time.py                         # writes benchmarks/results/
  python benchmarks/compile_time.py --leaves 400 --targets cpu --out /tmp/ct
"""

import os

if __name__ == "__main__":
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse
import json
import platform
import shlex
import sys
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCHMARKS), BENCHMARKS]

import compiled_step
import compiled_trees
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao

OPTIMIZERS = {
    "ours": lambda: ao.adafactor(),
    "optax.adafactor": lambda: optax.adafactor(1e-2),
    "adam": lambda: optax.adam(1e-3),
}
# leaves -> unscanned layers of `compiled_trees.transformer_tree` (16 leaves a layer + 3).
LEAVES = {400: 25, 1500: 94}
TARGETS = ("cpu", "v5e", "h100")


def shapes_with_leaves(leaves):
  """A transformer tree (d 256, mlp 512, vocab 4096) with `LEAVES[leaves]` unscanned layers."""
  return compiled_trees.transformer_tree(False, d=256, f=512, layers=LEAVES[leaves], vocab=4096)


def device(target):
  if target == "cpu":
    return jax.devices("cpu")[0]
  return compiled_step.devices(*compiled_step.TARGETS[target])[0]


def timed_phases(tx, params):
  """Seconds to trace, lower and compile the donated step of `tx` on `params`."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  sharding = jax.tree.leaves(params)[0].sharding
  with jax.numpy_dtype_promotion("standard"):
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                         jax.eval_shape(tx.init, params))
    start = time.perf_counter()
    traced = jax.jit(step, donate_argnums=(0, 1)).trace(params, state, params)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    lowered.compile()
    compiled_at = time.perf_counter()
  return {"trace_s": traced_at - start, "lower_s": lowered_at - traced_at,
          "compile_s": compiled_at - lowered_at, "total_s": compiled_at - start}


def run(leaves_list, targets, optimizers, log):
  rows = []
  for leaves in leaves_list:
    shapes = shapes_with_leaves(leaves)
    for target in targets:
      sharding = NamedSharding(Mesh([device(target)], ("chip",)), P())
      params = compiled_step.structs(shapes, jnp.float32, sharding)
      for name in optimizers:
        row = dict(leaves=len(jax.tree.leaves(params)), target=target, optimizer=name)
        row.update({k: round(v, 3) for k, v in timed_phases(OPTIMIZERS[name](), params).items()})
        rows.append(row)
        log(f"  {row['leaves']:5d} leaves {target:5s} {name:16s} trace {row['trace_s']:6.2f}s "
            f"lower {row['lower_s']:6.2f}s compile {row['compile_s']:7.2f}s")
  return rows


def to_markdown(result):
  rows = result["rows"]
  lines = [
      "# Trace, lower and compile time of the train step",
      "",
      f"Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min on {result['host']}).",
      "",
      "Full step (`tx.update` + `optax.apply_updates`, params and state donated), float32, "
      "transformer layers of 16 leaves (d 256, mlp 512). `ours` is `adafactor_optax.adafactor()`; "
      "`optax.adafactor(1e-2)`; `optax.adam(1e-3)`. cpu: this host's CPU backend; v5e and "
      "h100: deviceless ahead-of-time compiles. Wall-clock seconds, once each on a shared "
      "host: noisy, compare only within this table.",
      "",
      "| leaves | target | optimizer | trace s | lower s | compile s | total s | total x adam |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    adam = next(a for a in rows if a["optimizer"] == "adam" and a["leaves"] == r["leaves"]
                and a["target"] == r["target"])
    lines.append(f"| {r['leaves']} | {r['target']} | {r['optimizer']} | {r['trace_s']:.2f} | "
                 f"{r['lower_s']:.2f} | {r['compile_s']:.2f} | {r['total_s']:.2f} | "
                 f"{r['total_s'] / adam['total_s']:.1f} |")
  return "\n".join(lines + [""])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--leaves", default=",".join(map(str, LEAVES)), help=f"of {list(LEAVES)}")
  parser.add_argument("--targets", default=",".join(TARGETS), help=f"of {TARGETS}")
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"of {list(OPTIMIZERS)}")
  parser.add_argument("--out", default=compiled_step.RESULTS)
  parser.add_argument("--name", default="compile_time")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  rows = run([int(n) for n in args.leaves.split(",")], args.targets.split(","),
             args.optimizers.split(","), lambda m: print(m, flush=True))
  command = "python benchmarks/compile_time.py " + " ".join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
  result = {"command": command.strip(), "wall_s": round(time.perf_counter() - start, 1),
            "host": f"{os.cpu_count()} CPU cores visible, {platform.machine()}",
            "versions": compiled_step.versions(), "rows": rows}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
    json.dump(result, f, indent=1)
  text = to_markdown(result)
  with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
    f.write(text)
  print(text)
  return result


if __name__ == "__main__":
  main()
