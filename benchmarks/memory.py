"""Optimizer-state memory at pod scale, from shapes alone (`jax.eval_shape`).

For T5-XXL (T5 v1.1, 11B) and a 70B-class decoder with grouped-query attention,
on FSDP x TP meshes of 256 and 1024 devices, the bytes of the optimizer state in
total and on the busiest device, with the state sharded as
`adafactor_optax.state_shardings` places it. Nothing is allocated: the meshes are
`AbstractMesh`es and the parameters `ShapeDtypeStruct`s. Then the compiled
temporary memory (`memory_analysis()`) of one jitted update step of a small
transformer on the local device: what the step needs besides its inputs and
outputs.

  python benchmarks/memory.py            # full table, writes benchmarks/results/
  python benchmarks/memory.py --smoke    # seconds: tiny shapes, for CI; writes to a new
                                         # temporary directory unless given --out
"""

import argparse
import math
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adafactor_optax as ao

# Logical axis -> mesh axis: 'embed' is sharded by FSDP, the rest by tensor parallelism.
RULES = {"embed": "fsdp", "heads": "tp", "kv": "tp", "mlp": "tp", "vocab": "tp"}


def t5_shapes(d_model=4096, d_ff=10240, layers=24, heads=64, d_kv=64, vocab=32128):
  """T5 v1.1 (gated GELU, untied head): ``{name: (shape, logical axes)}``, layers stacked."""
  d, f, hd, L = d_model, d_ff, heads * d_kv, layers
  attn = lambda p: {f"{p}_{k}": ((L, d, hd), ("layers", "embed", "heads")) for k in "qkv"} | {
      f"{p}_o": ((L, hd, d), ("layers", "heads", "embed"))}
  mlp = lambda p: {f"{p}_wi0": ((L, d, f), ("layers", "embed", "mlp")),
                   f"{p}_wi1": ((L, d, f), ("layers", "embed", "mlp")),
                   f"{p}_wo": ((L, f, d), ("layers", "mlp", "embed"))}
  norms = lambda p, n: {f"{p}_norm{i}": ((L, d), ("layers", "embed")) for i in range(n)}
  return {
      "embed": ((vocab, d), ("vocab", "embed")),
      "lm_head": ((d, vocab), ("embed", "vocab")),
      "enc_rel_bias": ((32, heads), (None, "heads")),
      "dec_rel_bias": ((32, heads), (None, "heads")),
      "enc_final_norm": ((d,), ("embed",)),
      "dec_final_norm": ((d,), ("embed",)),
      **attn("enc_self"), **mlp("enc"), **norms("enc", 2),
      **attn("dec_self"), **attn("dec_cross"), **mlp("dec"), **norms("dec", 3),
  }


def decoder_shapes(d_model=8192, d_ff=28672, layers=80, heads=64, kv_heads=8, head_dim=128,
                   vocab=128256):
  """A Llama-style decoder with grouped-query attention, layers stacked."""
  d, f, L = d_model, d_ff, layers
  return {
      "embed": ((vocab, d), ("vocab", "embed")),
      "lm_head": ((d, vocab), ("embed", "vocab")),
      "final_norm": ((d,), ("embed",)),
      "q": ((L, d, heads * head_dim), ("layers", "embed", "heads")),
      "k": ((L, d, kv_heads * head_dim), ("layers", "embed", "kv")),
      "v": ((L, d, kv_heads * head_dim), ("layers", "embed", "kv")),
      "o": ((L, heads * head_dim, d), ("layers", "heads", "embed")),
      "gate": ((L, d, f), ("layers", "embed", "mlp")),
      "up": ((L, d, f), ("layers", "embed", "mlp")),
      "down": ((L, f, d), ("layers", "mlp", "embed")),
      "attn_norm": ((L, d), ("layers", "embed")),
      "mlp_norm": ((L, d), ("layers", "embed")),
  }


OPTIMIZERS = {
    "adafactor (paper defaults)": lambda: ao.adafactor(),
    "adafactor + f32 momentum": lambda: ao.adafactor(momentum=0.9),
    "adafactor + bf16 momentum": lambda: ao.adafactor(momentum=0.9, dtype_momentum="bfloat16"),
    "adafactor + int8 momentum": lambda: ao.adafactor(momentum=0.9, dtype_momentum="int8"),
    "bf16 params, adafactor + int8 momentum + stochastic rounding": lambda: ao.adafactor(
        momentum=0.9, dtype_momentum="int8", stochastic_rounding=True),
    "optax.adam": lambda: optax.adam(1e-3),
}
# The parameters' dtype for each row (float32 unless named here).
PARAM_DTYPES = {"bf16 params, adafactor + int8 momentum + stochastic rounding": jnp.bfloat16}


def abstract_params(shapes, mesh, dtype=jnp.float32):
  def struct(shape, axes):
    spec = P(*(RULES.get(a) for a in axes))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

  return {k: struct(s, a) for k, (s, a) in shapes.items()}


def shard_bytes(x, sharding):
  """Bytes of the largest shard of `x` (uneven splits round up)."""
  mesh_sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
  entries = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
  shard = []
  for n, entry in zip(x.shape, entries):
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    shard.append(math.ceil(n / math.prod(mesh_sizes[a] for a in names)))
  return math.prod(shard) * jnp.dtype(x.dtype).itemsize


def state_bytes(tx, params):
  """(total, per-device) bytes of ``tx.init(params)``, placed by `ao.state_shardings`."""
  state = jax.eval_shape(tx.init, params)
  shardings = ao.state_shardings(tx, params)
  leaves, placed = jax.tree.leaves(state), jax.tree.leaves(shardings)
  total = sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)
  per_device = sum(shard_bytes(x, s) for x, s in zip(leaves, placed))
  return total, per_device


def param_bytes(params):
  return (sum(p.size * jnp.dtype(p.dtype).itemsize for p in params.values()),
          sum(shard_bytes(p, p.sharding) for p in params.values()))


def step_temp_bytes(tx, params):
  """Compiled temporary bytes of one jitted update + apply on the local device."""
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # Standard promotion: optax.adam mixes Python floats and int32 counts, which the
  # test suite's strict mode rejects.
  with jax.numpy_dtype_promotion("standard"):
    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 2)).lower(params, params, state).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def gib(n):
  return f"{n / 2**30:,.2f}"


def state_table(models, meshes):
  rows = []
  for model, shapes in models.items():
    for fsdp, tp in meshes:
      mesh = AbstractMesh((fsdp, tp), ("fsdp", "tp"))
      for name, make in OPTIMIZERS.items():
        params = abstract_params(shapes, mesh, PARAM_DTYPES.get(name, jnp.float32))
        p_total, p_dev = param_bytes(params)
        total, dev = state_bytes(make(), params)
        rows.append(dict(model=model, n_params=sum(p.size for p in params.values()),
                         mesh=f"{fsdp}x{tp}", optimizer=name, total=total, per_device=dev,
                         param_total=p_total, param_per_device=p_dev))
  return rows


def temp_table(shapes):
  optimizers = dict(OPTIMIZERS, **{"optax.adafactor": lambda: optax.adafactor(1e-2)})
  rows = []
  for name, make in optimizers.items():
    dtype = PARAM_DTYPES.get(name, jnp.float32)
    params = {k: jax.ShapeDtypeStruct(s, dtype) for k, (s, _) in shapes.items()}
    p_bytes = sum(p.size * jnp.dtype(dtype).itemsize for p in params.values())
    rows.append(dict(optimizer=name, temp=step_temp_bytes(make(), params), param_bytes=p_bytes))
  return rows


def markdown(rows, temps, temp_model, command="python benchmarks/memory.py"):
  lines = [
      f"Made by `{command}` (JAX {jax.__version__}, optax {optax.__version__}).",
      "",
      "| model | params | mesh (FSDP x TP) | optimizer | state, total GiB | state per device, MiB"
      " | state / params (per device) | params + state, bytes / param |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['n_params'] / 1e9:.1f}B | {r['mesh']} | {r['optimizer']} | "
        f"{gib(r['total'])} | {r['per_device'] / 2**20:,.1f} | "
        f"{r['per_device'] / r['param_per_device']:.3f} | "
        f"{(r['total'] + r['param_total']) / r['n_params']:.3f} |")
  lines += [
      "",
      f"Compiled temporary memory of one jitted update + apply step ({temp_model}, "
      "float32 parameters unless the row says bf16, one CPU device, params and state "
      "donated):",
      "",
      "| optimizer | temporary MiB | temporary / param bytes |",
      "|---|---|---|",
  ]
  for t in temps:
    lines.append(f"| {t['optimizer']} | {t['temp'] / 2**20:,.1f} | "
                 f"{t['temp'] / t['param_bytes']:.3f} |")
  return "\n".join(lines) + "\n"


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = list(dict.fromkeys((r["model"], r["mesh"]) for r in rows))  # in table order
  names = list(OPTIMIZERS)
  fig, ax = plt.subplots(figsize=(9, 4))
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    values = [next(r["per_device"] for r in rows if (r["model"], r["mesh"]) == g
                   and r["optimizer"] == name) / 2**30 for g in groups]
    ax.bar(np.arange(len(groups)) + i * width, values, width, label=name)
  ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
  ax.set_xticklabels([f"{m}\n{mesh}" for m, mesh in groups], fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("optimizer state per device (GiB)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs in seconds")
  parser.add_argument("--out", help="default: benchmarks/results/, or a temporary directory "
                      "for --smoke")
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = (tempfile.mkdtemp(prefix="memory_smoke_") if args.smoke
                else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  command = " ".join(["python benchmarks/memory.py", *(sys.argv[1:] if argv is None else argv)])
  if args.smoke:
    models = {"tiny T5": t5_shapes(256, 512, 2, 4, 64, 1024),
              "tiny decoder": decoder_shapes(256, 512, 2, 4, 2, 64, 1024)}
    meshes = [(4, 2)]
    temp_model, temp_shapes = "tiny decoder", decoder_shapes(128, 256, 1, 2, 1, 64, 256)
  else:
    models = {"T5-XXL": t5_shapes(), "70B decoder": decoder_shapes()}
    meshes = [(32, 8), (128, 8)]
    temp_model = "decoder d_model 1024, d_ff 4096, 4 layers, vocab 32000 (~160M)"
    temp_shapes = decoder_shapes(1024, 4096, 4, 16, 4, 64, 32000)
  rows = state_table(models, meshes)
  temps = temp_table(temp_shapes)
  text = markdown(rows, temps, temp_model, command)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "memory.md"), "w") as f:
    f.write(text)
  plot(rows, os.path.join(args.out, "memory.png"))
  print(text)
  print(f"wrote {args.out}/memory.md, memory.png")
  return rows, temps


if __name__ == "__main__":
  main()
