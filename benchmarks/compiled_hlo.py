"""Targets, compiling the step, and reading the compiled program (`compiled_step.py`).

`devices` gives compile-only devices of a TPU topology or of H100s; `compile_step`
compiles the full step for them; `measure` reads kernels, fusions, bytes,
temporaries, collectives and the TPU compiler's estimate out of the result, as
`DEFINITIONS` says.
"""

import glob
import math
import os
import re
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCHMARKS), BENCHMARKS]

import jax
import jax.numpy as jnp
import optax
from jax.experimental import topologies

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
