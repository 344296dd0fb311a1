"""Kernels, bytes, memory and collectives of the train step on TPU and H100, compiled without one.

XLA compiles the full train step (``tx.update`` then ``optax.apply_updates``,
params and state donated) ahead of time for a TPU topology or an NVIDIA H100
on a CPU-only machine. The compiled program then tells, exactly and without a
clock, how many kernels the step launches, how many bytes it moves and how much
temporary memory it needs; for TPU the compiler also estimates the step's time
with its own cost model (an estimate, not a timing). Every optimizer is compiled
in the same run, and every ratio is against `optax.adam` of that run.

Two sections:

* ``step``: one chip, three parameter trees (a few large matrices; a
  transformer with 12 unscanned layers, ~200 leaves; the same transformer
  scanned into stacked layers), TPU v5e, v6e, v5p and H100.
* ``pod``: the sharded step of a ~1.1B-parameter decoder (abstract parameters,
  nothing allocated) on a 64-chip TPU v5e 8x8 slice and on four H100s, FSDP x
  tensor parallelism, optimizer state placed by `adafactor_optax.state_shardings`:
  per-chip argument, temporary and collective bytes.

The package is imported from this checkout (not from site-packages), so a
modified step is measured by re-running the script. Needs the ``aot`` extra
(libtpu, jax-cuda12-plugin, nvidia-cuda-nvcc-cu12); sets ``JAX_PLATFORMS=cpu``
and the TPU variables itself, before importing jax.

Usage:
  python benchmarks/compiled_step.py                  # everything: writes benchmarks/results/
  python benchmarks/compiled_step.py --sections step --trees unscanned --targets h100,v6e \\
      --optimizers ours,adam --out /tmp/compiled      # a subset, elsewhere
  python benchmarks/compiled_step.py --smoke --out DIR  # tiny trees, v5e + h100 (CI)
  python benchmarks/compiled_step.py --sections step --targets v5e,v6e,v5p \\
      --optimizers "ours lr,optax.adafactor" --tpu-schedulers list,dfs,post_order \\
      --out /tmp/paired  # ours beside optax.adafactor, each under forced schedulers too
  python benchmarks/compiled_step.py --render benchmarks/results/compiled_step.json  # tables only
"""

import os

if __name__ == "__main__":
  # Before jax is imported: compile-only devices on a CPU host (without JAX_PLATFORMS=cpu the
  # CUDA plugin fails its runtime check; the TPU variables stop libtpu looking for a TPU VM).
  # Imported as a module (the tests), the importer sets them.
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu otherwise holds /tmp/libtpu_lockfile: a second compiling process would fail.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse
import json
import platform
import shlex
import sys
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCHMARKS)
sys.path[:0] = [ROOT, BENCHMARKS]

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao
import memory  # benchmarks/memory.py: the decoder's shapes and logical-axis rules
# What is compiled (trees, optimizers); for which targets, and how it is read (counting);
# how it is reported: one module each, beside this script.
from compiled_hlo import (DEFINITIONS, POD_TARGETS, TARGETS, compile_and_measure, devices,
                          nbytes, structs)
from compiled_report import add_ratios, plot, to_markdown, versions
from compiled_trees import (DEFAULT_OPTIMIZERS, OPTIMIZERS, POD_OPTIMIZERS, SMOKE_OPTIMIZERS,
                            SMOKE_POD_OPTIMIZERS, SMOKE_TREE_NAMES, SMOKE_TREES, TREES,
                            per_layer)

RESULTS = os.path.join(BENCHMARKS, "results")

# --- The two sections -------------------------------------------------------------------------


def step_section(trees, targets, optimizers, log, schedulers=()):
  rows, total = [], len(trees) * len(targets) * len(optimizers)
  for tree_name, (description, make_shapes) in trees.items():
    shapes = make_shapes()
    rule = per_layer if tree_name == "scanned" else None
    for target in targets:
      platform_name, topology = TARGETS[target]
      device = devices(platform_name, topology)[0]
      replicated = NamedSharding(Mesh([device], ("chip",)), P())
      for name in optimizers:
        make_tx, dtype = OPTIMIZERS[name]
        tx = make_tx(rule)
        params = structs(shapes, dtype, replicated)
        state_shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(tx.init, params))
        row = dict(tree=tree_name, tree_description=description, target=target, optimizer=name,
                   dtype=jnp.dtype(dtype).name,
                   n_params=sum(x.size for x in jax.tree.leaves(params)),
                   n_leaves=len(jax.tree.leaves(params)), param_bytes=nbytes(params))
        row.update(compile_and_measure(tx, params, state_shardings, platform_name, schedulers))
        rows.append(row)
        log(f"  [{len(rows)}/{total}] {tree_name:9s} {target:5s} {name:16s} kernels "
            f"{row['kernels']:5d}  bytes/param "
            f"{row['bytes_accessed'] / row['param_bytes']:5.2f}  temp/param "
            f"{row['temp_bytes'] / row['param_bytes']:.3f}  ({row['compile_s']} s)")
  return rows


def pod_shapes(smoke):
  """A Llama-style decoder of 1.1B parameters (TinyLlama's shapes), layers stacked."""
  if smoke:
    return "smoke decoder (d 256, 2 layers)", memory.decoder_shapes(256, 512, 2, 4, 2, 64, 1024)
  return ("decoder d_model 2048, d_ff 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000",
          memory.decoder_shapes(2048, 5632, 22, 32, 4, 64, 32000))


def statistics_floor_bytes(tx, params):
  """Per chip, the collective bytes that the factored statistics alone must move.

  A factored parameter's row statistic sums G^2 over its columns: where the
  column axis is split over devices, each chip holds a partial sum of its rows'
  shard, which crosses devices once (an all-reduce: its operand and its result,
  counted as `collectives` counts them); the column statistic likewise over
  the rows. Parameters without factored statistics need none. The scalars of
  clipping and the parameter scale are left out (a few bytes per leaf).
  """
  state = jax.eval_shape(tx.init, params)
  shardings = ao.state_shardings(tx, params)
  factored = lambda x: isinstance(x, ao.FactoredMoment)
  total = 0
  for part, placed in zip(state, shardings):
    if not isinstance(part, ao.ScaleByFactoredRmsState):
      continue
    moments = jax.tree.leaves(part.nu, is_leaf=factored)
    places = jax.tree.leaves(placed.nu, is_leaf=factored)
    for p, m, s in zip(jax.tree.leaves(params), moments, places):
      if not factored(m):
        continue
      shard = p.sharding.shard_shape(p.shape)
      for stat, where in ((m.v_row, s.v_row), (m.v_col, s.v_col)):
        summed = [a for a in range(p.ndim) if stat.shape[a] == 1 and p.shape[a] > 1]
        if any(shard[a] < p.shape[a] for a in summed):  # split over devices
          total += 2 * memory.shard_bytes(stat, where)
  return total


def pod_section(targets, optimizers, smoke, log):
  description, shapes = pod_shapes(smoke)
  rows, total = [], len(targets) * len(optimizers)
  for target in targets:
    platform_name, topology, (fsdp, tp) = POD_TARGETS[target]
    if smoke and platform_name == "tpu":
      topology, (fsdp, tp) = "v5e:2x2", (2, 2)
    devs = devices(platform_name, topology)
    mesh = Mesh(np.array(devs).reshape(fsdp, tp), ("fsdp", "tp"))
    for name in optimizers:
      make_tx, dtype = OPTIMIZERS[name]
      tx = make_tx(per_layer)
      params = memory.abstract_params(shapes, mesh, dtype)
      _, per_chip = memory.param_bytes(params)
      row = dict(model=description, target=target, topology=topology, mesh=f"{fsdp}x{tp}",
                 optimizer=name, n_params=sum(x.size for x in params.values()),
                 param_bytes_per_chip=per_chip)
      row.update(compile_and_measure(tx, params, ao.state_shardings(tx, params), platform_name))
      row["collective_bytes"] = sum(b for _, b in row["collectives"].values())
      row["statistics_floor_bytes"] = statistics_floor_bytes(tx, params)
      rows.append(row)
      log(f"  [{len(rows)}/{total}] pod {target:8s} {name:16s} args/param "
          f"{row['argument_bytes'] / per_chip:.2f}  "
          f"temp/param {row['temp_bytes'] / per_chip:.3f}  collectives/param "
          f"{row['collective_bytes'] / per_chip:.4f}  ({row['compile_s']} s)")
  return rows

def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", default="step,pod", help="comma-separated: step,pod")
  parser.add_argument("--trees", default=None,
                      help=f"of {list(TREES)} (default all; with --smoke {SMOKE_TREE_NAMES})")
  parser.add_argument("--targets", default=",".join(TARGETS), help=f"of {list(TARGETS)}")
  parser.add_argument("--optimizers", default=None,
                      help=f"of {list(OPTIMIZERS)} (default {DEFAULT_OPTIMIZERS}; with --smoke "
                      f"{SMOKE_OPTIMIZERS})")
  parser.add_argument("--pod-targets", default=",".join(POD_TARGETS),
                      help=f"of {list(POD_TARGETS)}")
  parser.add_argument("--pod-optimizers", default=None,
                      help=f"of {list(OPTIMIZERS)} (default {POD_OPTIMIZERS}; with --smoke "
                      f"{SMOKE_POD_OPTIMIZERS})")
  parser.add_argument("--out", default=None,
                      help="output folder (default benchmarks/results; with --smoke, required)")
  parser.add_argument("--name", default="compiled_step", help="file name stem of the outputs")
  parser.add_argument("--render", metavar="JSON", default=None,
                      help="compile nothing: rewrite the markdown and plot of a result JSON")
  parser.add_argument("--tpu-schedulers", default="",
                      help="also compile each TPU step under these forced memory schedulers "
                      "(of list,dfs,post_order) and report their estimates")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny trees and decoder, v5e and h100 only, seconds (CI)")
  args = parser.parse_args(argv)
  defaults = {"trees": (TREES, SMOKE_TREE_NAMES),
              "optimizers": (DEFAULT_OPTIMIZERS, SMOKE_OPTIMIZERS),
              "pod_optimizers": (POD_OPTIMIZERS, SMOKE_POD_OPTIMIZERS)}
  for key, (full, smoke) in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, ",".join(smoke if args.smoke else full))
  lists = {k: [x for x in getattr(args, k).split(",") if x] for k in
           ("sections", "trees", "targets", "optimizers", "pod_targets", "pod_optimizers",
            "tpu_schedulers")}
  known = {"sections": ("step", "pod"), "trees": TREES, "targets": TARGETS,
           "optimizers": OPTIMIZERS, "pod_targets": POD_TARGETS, "pod_optimizers": OPTIMIZERS,
           "tpu_schedulers": ("list", "dfs", "post_order")}
  for key, values in lists.items():
    unknown = [v for v in values if v not in known[key]]
    if unknown:
      parser.error(f"--{key.replace('_', '-')}: unknown {unknown}; known: {list(known[key])}")
    setattr(args, key, values)
  if args.smoke:
    if args.out is None:
      parser.error("--smoke needs --out (a smoke run never writes benchmarks/results)")
    if os.path.realpath(args.out) == os.path.realpath(RESULTS):
      parser.error("--smoke must not write into benchmarks/results")
    args.targets = [t for t in args.targets if t in ("v5e", "h100")]
  args.out = args.out or (os.path.dirname(os.path.abspath(args.render)) if args.render else RESULTS)
  return args


def write(result, out, name):
  """The markdown and the plot of `result` into `out`."""
  if result["smoke"] and os.path.realpath(out) == os.path.realpath(RESULTS):
    raise ValueError("a smoke result is never written into benchmarks/results")
  os.makedirs(out, exist_ok=True)
  text = to_markdown(result)
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write(text)
  if result["step"]:
    plot(result["step"], os.path.join(out, f"{name}.png"))
  return text


def main(argv=None):
  args = parse_args(argv)
  if args.render:
    with open(args.render) as f:
      result = json.load(f)
    result["plot"] = f"{args.name}.png"
    add_ratios(result["step"], "param_bytes")
    add_ratios(result["pod"], "param_bytes_per_chip")
    return write(result, args.out, args.name)
  start = time.perf_counter()
  log = lambda message: print(message, flush=True)
  trees = SMOKE_TREES if args.smoke else TREES
  step_rows = pod_rows = []
  if "step" in args.sections:
    log(f"step: trees {args.trees}, targets {args.targets}, optimizers {args.optimizers}")
    step_rows = step_section({t: trees[t] for t in args.trees}, args.targets, args.optimizers, log,
                             args.tpu_schedulers)
    add_ratios(step_rows, "param_bytes")
  if "pod" in args.sections:
    log(f"pod: targets {args.pod_targets}, optimizers {args.pod_optimizers}")
    pod_rows = pod_section(args.pod_targets, args.pod_optimizers, args.smoke, log)
    add_ratios(pod_rows, "param_bytes_per_chip")
  command = "python benchmarks/compiled_step.py " + " ".join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
  result = {
      "command": command.strip(),
      "smoke": args.smoke,
      "wall_s": round(time.perf_counter() - start, 1),
      "host": f"{os.cpu_count()} CPU cores visible, {platform.machine()}",
      "versions": versions(),
      "definitions": DEFINITIONS,
      "plot": f"{args.name}.png",
      "step": step_rows,
      "pod": pod_rows,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
    json.dump(result, f, indent=1, allow_nan=False)
  log(write(result, args.out, args.name))
  return result


if __name__ == "__main__":
  main()
