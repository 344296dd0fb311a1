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
import glob
import itertools
import json
import math
import platform
import re
import shlex
import sys
import tempfile
import time
from importlib import metadata

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCHMARKS)
sys.path[:0] = [ROOT, BENCHMARKS]

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao
from adafactor_optax import _grouping
import memory  # benchmarks/memory.py: the decoder's shapes and logical-axis rules
import step_time  # benchmarks/step_time.py: the transformer layer's leaves

RESULTS = os.path.join(BENCHMARKS, "results")
H100_CONFIG = os.path.join(BENCHMARKS, "h100_sxm.txtpb")

# name -> (platform, topology). One chip of each TPU topology; the H100 alone.
TARGETS = {
    "v5e": ("tpu", "v5e:2x2"),
    "v6e": ("tpu", "v6e:2x2"),
    "v5p": ("tpu", "v5p:2x2x1"),
    "h100": ("cuda", "1x1x1"),
}
# name -> (platform, topology, (fsdp, tp)) of the pod-slice section.
POD_TARGETS = {
    "v5e-8x8": ("tpu", "v5e:8x8", (16, 4)),
    "h100x4": ("cuda", "1x1x4", (2, 2)),
}


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


def per_layer(path, shape):
  """Each layer of a stack (layers, d, f) its own d x f matrix (the README's rule)."""
  del path
  return ao.FactorSpec(-2, -1, batch=(0,)) if len(shape) == 3 else None


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

DEFINITIONS = {
    "kernels (H100)": (
        "kernel launches in the final thunk sequence (`*thunk_sequence_after_thunk_passes.txt` of "
        "`xla_dump_to`): thunks of kind kKernel, kCustomKernel and library calls (kGemm, "
        "kCublasLtMatmul, kCuDnn, kConvolution), counted inside command buffers (CUDA graphs) "
        "too; memcpy/memset thunks are counted apart (`other`)."),
    "kernels (TPU)": (
        "in the ENTRY computation of the compiled HLO: `fusion` instructions plus unfused "
        "instructions with an array (rank >= 1) result that compute, i.e. all but parameter, "
        "constant, bitcast, tuple, get-tuple-element, custom-call (libtpu's ConcatBitcast) and "
        "collectives and asynchronous `*-start`/`*-done` pairs (DMAs, collectives), counted "
        "apart (`other`). "
        "Scalar (rank-0) instructions run on the scalar unit and are not counted. `fusions` is "
        "the `fusion` instructions alone (the unfused rest are mostly rsqrt of factored "
        "statistics)."),
    "bytes": (
        "\"bytes accessed\" of XLA's HloCostAnalysis on the optimised per-chip module "
        "(`hlo_module_cost_analysis`), the same analysis for every target: operand and result "
        "bytes of every top-level instruction, a fusion counted by its own inputs and outputs. "
        "On TPU this also counts the copies XLA:TPU inserts between HBM and on-chip memory "
        "(prefetches to VMEM, `S(1)` layouts), so it is not HBM traffic there and is compared "
        "only within a target; the TPU compiler's own figure is in the JSON "
        "(`tpu_compiler_bytes_accessed`)."),
    "temp": "`memory_analysis().temp_size_in_bytes` of the compiled step, per chip.",
    "tpu_est": (
        "the TPU compiler's cost-model estimate of the step time (`cost_analysis()"
        "['optimal_seconds']`, with the -1 s that each ENTRY custom-call adds to it added back): "
        "an estimate, not a timing."),
    "collectives": (
        "per chip, every all-reduce, all-gather, reduce-scatter, all-to-all and "
        "collective-permute (synchronous or `*-start`) in any computation of the compiled HLO: "
        "the sum of its operand bytes plus its result bytes (for `*-start`, the result of its "
        "`*-done`), shapes as compiled (per-chip shards)."),
    "args": "`memory_analysis().argument_size_in_bytes`: params, state and gradients, per chip.",
}


# --- Compiling --------------------------------------------------------------------------------


def devices(platform_name, topology):
  """Compile-only devices of a TPU topology or of H100s."""
  if platform_name == "tpu":
    return topologies.get_topology_desc(topology, "tpu").devices
  with open(H100_CONFIG) as f:
    config = f.read()
  return topologies.get_topology_desc("h100", "cuda", target_config=config,
                                      topology=topology).devices


def structs(shapes, dtype, sharding):
  """`jax.ShapeDtypeStruct`s of `shapes` (nested dict of tuples), all placed by `sharding`."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype, sharding=sharding), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def compile_step(tx, params, state_shardings, dump_dir=None, scheduler=None):
  """The compiled step: update + apply_updates, params and state donated.

  `scheduler` forces XLA's memory scheduler ("list", "dfs", "post_order"); by default
  XLA builds all three orders and keeps the one of lowest simulated peak memory.
  """

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  param_shardings = jax.tree.map(lambda p: p.sharding, params)
  # Standard promotion: optax mixes Python floats with int32 counts (as memory.py).
  with jax.numpy_dtype_promotion("standard"):
    state = jax.eval_shape(tx.init, params)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, state_shardings)
    lowered = jax.jit(step, donate_argnums=(0, 1),
                      out_shardings=(param_shardings, state_shardings)).lower(params, state, params)
    options = {"xla_dump_to": dump_dir} if dump_dir else {}
    if scheduler:
      options["xla_memory_scheduler"] = scheduler
    return lowered.compile(compiler_options=options)


# --- Reading the compiled program ---------------------------------------------------------

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "s4": 0.5, "u4": 0.5}
SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
NOT_KERNELS = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "custom-call",
               "after-all", "partition-id", "replica-id"}


def type_bytes(text):
  """Bytes of every array shape in an HLO type (a tuple's elements summed)."""
  total = 0
  for dtype, dims in SHAPE.findall(text):
    if dtype in DTYPE_BYTES or dtype.startswith("f8"):
      size = math.prod(int(d) for d in dims.split(",") if d)
      total += size * DTYPE_BYTES.get(dtype, 1)
  return int(total)


def split_instruction(rest):
  """``(type, opcode, operand names)`` of the text right of an HLO instruction's ``=``."""
  if rest.startswith("("):  # a tuple type: match its parentheses
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    type_text, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    type_text, _, rest = rest.partition(" ")
  opcode, _, args = rest.partition("(")
  depth, end = 1, 0
  for end, ch in enumerate(args):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      break
  operands = re.findall(r"%([\w.\-]+)", args[:end])
  return type_text, opcode.strip(), operands


def parse_hlo(text):
  """``{computation: [(name, type, opcode, operands)]}`` and which computation is ENTRY."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if line and not line.startswith((" ", "}", "HloModule", "//")) and line.rstrip().endswith("{"):
      current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      current = current.lstrip("%")
      if line.startswith("ENTRY"):
        entry = current
      computations[current] = []
      continue
    match = INSTRUCTION.match(line)
    if match and current is not None:
      computations[current].append((match.group(1), *split_instruction(match.group(2))))
  return computations, entry


def tpu_kernels(computations, entry):
  """(kernels, fusions, other device ops, custom-calls) in ENTRY: DEFINITIONS['kernels (TPU)']."""
  kernels = fusions = other = custom_calls = 0
  for _, type_text, opcode, _ in computations[entry]:
    custom_calls += opcode == "custom-call"
    fusions += opcode == "fusion"
    if opcode.endswith(("-start", "-done")) or opcode in COLLECTIVES:
      other += 1
    elif opcode == "fusion" or (opcode not in NOT_KERNELS and not type_text.startswith(
        tuple(f"{t}[]" for t in DTYPE_BYTES))):
      kernels += 1
  return kernels, fusions, other, custom_calls


THUNK = re.compile(r"^\s*\d+: (k\w+)")
KERNEL_THUNKS = ("kKernel", "kCustomKernel", "kGemm", "kCublasLtMatmul", "kCuDnn", "kConvolution")
CONTAINER_THUNKS = ("kCommandBuffer", "kSequential", "kWhile", "kConditional")


def gpu_kernels(dump_dir):
  """(kernels, other device ops) of the final thunk sequence: DEFINITIONS['kernels (H100)']."""
  paths = glob.glob(os.path.join(dump_dir, "*thunk_sequence_after_thunk_passes.txt"))
  if len(paths) != 1:
    raise RuntimeError(f"expected one thunk sequence in {dump_dir}, found {paths}")
  kernels = other = 0
  with open(paths[0]) as f:
    for line in f:
      match = THUNK.match(line)
      if not match:
        continue
      kind = match.group(1)
      if kind.startswith(KERNEL_THUNKS):
        kernels += 1
      elif kind not in CONTAINER_THUNKS:
        other += 1
  return kernels, other


def collective_bytes(computations):
  """``{op: [count, bytes]}`` of the collectives: see DEFINITIONS['collectives']."""
  types = {name: t for instrs in computations.values() for name, t, _, _ in instrs}
  done_of = {ops[0]: t for instrs in computations.values() for _, t, op, ops in instrs
             if op.endswith("-done") and ops}
  found = {}
  for instrs in computations.values():
    for name, type_text, opcode, operands in instrs:
      base = opcode.removesuffix("-start")
      if base not in COLLECTIVES:
        continue
      result = done_of.get(name, type_text) if opcode.endswith("-start") else type_text
      n = sum(type_bytes(types.get(o, "")) for o in operands) + type_bytes(result)
      entry = found.setdefault(base, [0, 0])
      entry[0] += 1
      entry[1] += n
  return found


def generic_cost(compiled):
  """XLA's HloCostAnalysis of the optimised module (flops, bytes accessed), any target."""
  from jax._src import xla_bridge
  from jax._src.lib import _jax

  module = compiled.runtime_executable().hlo_modules()[0]
  return _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)


def measure(compiled, platform_name, dump_dir):
  """Every figure of one compiled step (bytes absolute; ratios are made later)."""
  text = compiled.as_text()
  computations, entry = parse_hlo(text)
  memory_stats = compiled.memory_analysis()
  cost = generic_cost(compiled)
  out = {
      "bytes_accessed": int(cost["bytes accessed"]),
      "flops": int(cost.get("flops", 0)),
      "temp_bytes": int(memory_stats.temp_size_in_bytes),
      "argument_bytes": int(memory_stats.argument_size_in_bytes),
      "collectives": collective_bytes(computations),
  }
  if platform_name == "tpu":
    kernels, out["fusions"], other, custom_calls = tpu_kernels(computations, entry)
    tpu_cost = compiled.cost_analysis()
    out["tpu_est_s"] = float(tpu_cost["optimal_seconds"]) + custom_calls
    out["tpu_compiler_bytes_accessed"] = int(tpu_cost["bytes accessed"])
  else:
    kernels, other = gpu_kernels(dump_dir)
    out["tpu_est_s"] = out["fusions"] = out["tpu_compiler_bytes_accessed"] = None
  out["kernels"], out["other_ops"] = kernels, other
  return out


def nbytes(tree):
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compile_and_measure(tx, params, state_shardings, platform_name, schedulers=()):
  with tempfile.TemporaryDirectory(prefix="compiled_step_") as dump:
    start = time.perf_counter()
    compiled = compile_step(tx, params, state_shardings,
                            dump if platform_name == "cuda" else None)
    result = measure(compiled, platform_name, dump)
  result["compile_s"] = round(time.perf_counter() - start, 2)
  if platform_name == "tpu" and schedulers:
    # A good TPU program estimates the same under each forced scheduler.
    result["tpu_est_s_by_scheduler"] = {
        name: measure(compile_step(tx, params, state_shardings, scheduler=name), "tpu",
                      None)["tpu_est_s"] for name in schedulers}
  return result


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
      rows.append(row)
      log(f"  [{len(rows)}/{total}] pod {target:8s} {name:16s} args/param "
          f"{row['argument_bytes'] / per_chip:.2f}  "
          f"temp/param {row['temp_bytes'] / per_chip:.3f}  collectives/param "
          f"{row['collective_bytes'] / per_chip:.4f}  ({row['compile_s']} s)")
  return rows


# --- Reporting ------------------------------------------------------------------------------


def reference(rows, row):
  """The optax.adam row of the same tree and target, with the same parameter dtype."""
  name = "adam bf16" if row.get("dtype") == "bfloat16" else "adam"
  for r in rows:
    if r["optimizer"] == name and all(r.get(k) == row.get(k) for k in ("tree", "target", "model")):
      return r
  return None


def add_ratios(rows, per):
  """Per row: kernels, bytes, temporaries, TPU estimate and collectives over adam's and over
  the parameter bytes (`per`: the row's key of parameter bytes)."""
  for row in rows:
    ref = reference(rows, row)
    row["adam_reference"] = ref["optimizer"] if ref else None
    row["bytes_per_param_byte"] = row["bytes_accessed"] / row[per]
    row["temp_per_param_byte"] = row["temp_bytes"] / row[per]
    for key in ("kernels", "bytes_accessed", "temp_bytes", "tpu_est_s", "collective_bytes"):
      if key in row:
        value, base = row[key], ref.get(key) if ref else None
        row[f"{key}_vs_adam"] = value / base if value is not None and base else None


def fmt(x, spec):
  return "-" if x is None else format(x, spec)


def summary_markdown(rows, name="ours"):
  """One line per (tree, target): `name` over adam, the figures the goals are stated in."""
  lines = [
      f"Summary, `{name}` against `optax.adam` (kernels and bytes: ratio of counts; temp: over "
      "param bytes; TPU time: ratio of the compiler's estimates):",
      "",
      "| tree | target | kernels (ours / adam) | x adam | bytes x adam | temp / param bytes "
      "| TPU est. x adam |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    ref = reference(rows, r) if r["optimizer"] == name else None
    if ref:
      lines.append(
          f"| {r['tree']} ({r['n_leaves']} leaves) | {r['target']} | {r['kernels']:,} / "
          f"{ref['kernels']:,} | {r['kernels_vs_adam']:.1f} | "
          f"{fmt(r['bytes_accessed_vs_adam'], '.2f')} | {r['temp_per_param_byte']:.3f} | "
          f"{fmt(r['tpu_est_s_vs_adam'], '.2f')} |")
  return lines + [""]


def optax_adafactor_markdown(rows):
  """Each `PAIRED` row of ours beside optax.adafactor's in the same tree, target and config."""
  index = {(r["tree"], r["target"], r["optimizer"]): r for r in rows}
  pairs = [(r, index.get((r["tree"], r["target"], COUNTERPARTS[r["optimizer"]])))
           for r in rows if r["optimizer"] in COUNTERPARTS]
  pairs = [(r, o) for r, o in pairs if o is not None]
  if not pairs:
    return []
  lines = [
      "Ours against `optax.adafactor` in the same configuration (`PAIRED` in the script; "
      "TPU time: the compiler's estimates, not timings; temp: over the parameter bytes; "
      "fusions: ENTRY `fusion` instructions; H100: kernels launched):",
      "",
      "| tree | target | ours | optax.adafactor | est. µs ours / optax | x optax "
      "| temp ours / optax | fusions (H100: kernels) ours / optax "
      "| est. µs under each forced scheduler (`--tpu-schedulers`, in order), ours; optax |",
      "|---|---|---|---|---|---|---|---|---|",
  ]

  def forced(row):
    by = row.get("tpu_est_s_by_scheduler") or {}
    return " / ".join(f"{1e6 * v:,.0f}" for v in by.values()) or "-"

  for r, o in pairs:
    est = (f"{1e6 * r['tpu_est_s']:,.0f} / {1e6 * o['tpu_est_s']:,.0f}"
           if r["tpu_est_s"] is not None else "-")
    ratio = fmt(r["tpu_est_s"] / o["tpu_est_s"] if r["tpu_est_s"] else None, ".2f")
    count = "fusions" if r["fusions"] is not None else "kernels"
    lines.append(
        f"| {r['tree']} ({r['n_leaves']} leaves) | {r['target']} | {r['optimizer']} | "
        f"{o['optimizer']} | {est} | {ratio} | {r['temp_per_param_byte']:.3f} / "
        f"{o['temp_per_param_byte']:.3f} | {r[count]:,} / {o[count]:,} | "
        f"{forced(r)}; {forced(o)} |")
  return lines + [""]


def step_markdown(rows):
  lines = []
  for tree in dict.fromkeys(r["tree"] for r in rows):
    group = [r for r in rows if r["tree"] == tree]
    f32 = next((r for r in group if r["dtype"] == "float32"), group[0])
    lines += [
        f"### {tree}: {f32['tree_description']}, {f32['n_params'] / 1e6:.1f}M parameters, "
        f"{f32['n_leaves']} leaves",
        "",
        "| target | optimizer | kernels | x adam | TPU fusions | other ops "
        "| bytes accessed / param bytes "
        "| x adam | temp / param bytes | TPU est. µs (compiler's estimate) | x adam |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in group:
      est = None if r["tpu_est_s"] is None else 1e6 * r["tpu_est_s"]
      lines.append(
          f"| {r['target']} | {r['optimizer']} | {r['kernels']:,} | "
          f"{fmt(r['kernels_vs_adam'], '.2f')} | {fmt(r['fusions'], ',')} | {r['other_ops']} | "
          f"{r['bytes_per_param_byte']:.2f} | {fmt(r['bytes_accessed_vs_adam'], '.2f')} | "
          f"{r['temp_per_param_byte']:.3f} | {fmt(est, ',.0f')} | "
          f"{fmt(r['tpu_est_s_vs_adam'], '.2f')} |")
    lines.append("")
  return lines


def pod_markdown(rows):
  r0 = rows[0]
  lines = [
      f"### {r0['model']}: {r0['n_params'] / 1e6:,.0f}M parameters, float32",
      "",
      "FSDP x tensor parallelism (mesh axes `('fsdp', 'tp')`, logical axes as "
      "`benchmarks/memory.py`), state placed by `adafactor_optax.state_shardings`, params and "
      "state donated. Per chip:",
      "",
      "| target | mesh | optimizer | param MiB | args / param bytes | temp / param bytes "
      "| collective MiB | collectives / param bytes | collectives (count: kind) "
      "| kernels | TPU est. x adam |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    kinds = ", ".join(f"{n}: {k}" for k, (n, _) in sorted(r["collectives"].items())) or "none"
    lines.append(
        f"| {r['target']} ({r['topology']}) | {r['mesh']} | {r['optimizer']} | "
        f"{r['param_bytes_per_chip'] / 2**20:,.1f} | "
        f"{r['argument_bytes'] / r['param_bytes_per_chip']:.2f} | "
        f"{r['temp_per_param_byte']:.3f} | {r['collective_bytes'] / 2**20:,.2f} | "
        f"{r['collective_bytes'] / r['param_bytes_per_chip']:.4f} | {kinds} | {r['kernels']:,} | "
        f"{fmt(r['tpu_est_s_vs_adam'], '.2f')} |")
  return lines + [""]


def versions():
  out = {"python": platform.python_version(), "jax": jax.__version__, "optax": optax.__version__}
  for package in ("jaxlib", "libtpu", "jax-cuda12-plugin", "nvidia-cuda-nvcc-cu12"):
    try:
      out[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      out[package] = None
  return out


def to_markdown(result):
  lines = [
      "# The train step compiled for TPU and H100 (deviceless)",
      "",
      f"Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min on "
      f"{result['host']}).",
      "",
      "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + ".",
      "",
      "Full step (`tx.update` + `optax.apply_updates`, params and state donated), compiled ahead "
      "of time on a CPU-only host for one chip of each target. Counts and bytes are exact "
      "properties of the compiled program; nothing ran on a TPU or GPU, and no figure here is a "
      "timing. Ratios (`x adam`) are against `optax.adam` in the same run with the same "
      "parameter dtype. `ours` is `adafactor_optax.adafactor()` at its defaults (on the scanned "
      "tree with a per-layer `factor_rule`: `FactorSpec(-2, -1, batch=(0,))` for stacked "
      "matrices); `ours bf16` and `adam bf16` step the same tree in bfloat16.",
      "",
      "What is counted:",
      "",
  ]
  lines += [f"- {k}: {v}" for k, v in result["definitions"].items()]
  lines.append("")
  if result["step"]:
    lines += (["## One chip", ""] + summary_markdown(result["step"])
              + optax_adafactor_markdown(result["step"]) + step_markdown(result["step"]))
  if result["pod"]:
    lines += ["## Pod slice", ""] + pod_markdown(result["pod"])
  if result["step"]:
    lines += [f"![kernels and bytes vs adam]({result['plot']})", ""]
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  names = [n for n in dict.fromkeys(r["optimizer"] for r in rows)]
  groups = list(dict.fromkeys((r["tree"], r["target"]) for r in rows))
  panels = [("kernels_vs_adam", "kernels / adam's"),
            ("bytes_accessed_vs_adam", "bytes accessed / adam's"),
            ("tpu_est_s_vs_adam", "TPU estimated time / adam's\n(compiler's estimate)")]
  fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.9 * len(groups) + 3), 9),
                           sharex=True)
  width = 0.8 / len(names)
  for ax, (key, label) in zip(axes, panels):
    for i, name in enumerate(names):
      values = []
      for g in groups:
        row = next((r for r in rows if (r["tree"], r["target"]) == g and r["optimizer"] == name),
                   None)
        values.append(row[key] if row and row.get(key) is not None else np.nan)
      ax.bar(np.arange(len(groups)) + i * width, values, width, label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylabel(label, fontsize=8)
    if key == "kernels_vs_adam":
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
      ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  axes[0].legend(fontsize=7, ncol=len(names))
  axes[-1].set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
  axes[-1].set_xticklabels([f"{t}\n{tg}" for t, tg in groups], fontsize=8)
  axes[0].set_title("Compiled train step, one chip, vs optax.adam (deviceless; no timings)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
