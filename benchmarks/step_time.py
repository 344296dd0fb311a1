"""Step time, compile time and compiled temporary memory of Adafactor vs peers.

Times the whole jitted train-step update, ``tx.update`` then
``optax.apply_updates``, with params and optimizer state donated and the
gradients given, on transformer-shaped parameter trees: an embedding, per layer
the attention q/k/v/o matrices with biases, the two MLP matrices with biases and
two layer norms, some layers as separate leaves and some as one scanned stack of
shape (layers, d, f). Every optimizer runs in the same process, interleaved
round-robin, and each figure is the median over repeats after warm-up. SGD,
which reads params and grads once and writes params once, is the floor that all
step times are given relative to.

Usage:
  python benchmarks/step_time.py --sizes 10m,50m --dtypes float32,bfloat16
  python benchmarks/step_time.py --smoke   # a few seconds, for CI; writes to a new temporary
                                          # directory unless given --out
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import adafactor_optax as ao


class TreeConfig(NamedTuple):
  """Shape of a transformer-like parameter tree."""

  vocab: int
  d_model: int
  d_mlp: int
  layers: int  # each layer a separate set of leaves
  scanned_layers: int  # one stacked set of leaves, leading axis = layers


# Layer counts are fixed so that every size has the same ~200 leaves.
SIZES = {
    "smoke": TreeConfig(vocab=256, d_model=128, d_mlp=256, layers=0, scanned_layers=1),
    "10m": TreeConfig(vocab=4096, d_model=256, d_mlp=1024, layers=12, scanned_layers=4),
    "50m": TreeConfig(vocab=8192, d_model=512, d_mlp=2048, layers=12, scanned_layers=4),
    "100m": TreeConfig(vocab=8192, d_model=704, d_mlp=2816, layers=12, scanned_layers=4),
    "200m": TreeConfig(vocab=8192, d_model=1024, d_mlp=4096, layers=12, scanned_layers=4),
}


def layer_shapes(d: int, f: int) -> dict[str, tuple[int, ...]]:
  """Leaf shapes of one pre-LN transformer layer."""
  shapes = {f"attn_{n}": (d, d) for n in "qkvo"}
  shapes |= {f"attn_{n}_bias": (d,) for n in "qkvo"}
  shapes |= {"mlp_in": (d, f), "mlp_in_bias": (f,), "mlp_out": (f, d), "mlp_out_bias": (d,)}
  shapes |= {"ln1_scale": (d,), "ln1_bias": (d,), "ln2_scale": (d,), "ln2_bias": (d,)}
  return shapes


def tree_shapes(config: TreeConfig) -> dict:
  """The nested dict of leaf shapes for `config`."""
  d, f = config.d_model, config.d_mlp
  layer = layer_shapes(d, f)
  shapes = {"embed": (config.vocab, d), "final_ln": {"scale": (d,), "bias": (d,)}}
  shapes["layers"] = {f"{i:02d}": dict(layer) for i in range(config.layers)}
  if config.scanned_layers:
    shapes["scanned"] = {k: (config.scanned_layers, *s) for k, s in layer.items()}
  return shapes


def make_tree(config: TreeConfig, dtype, seed: int) -> dict:
  """Random arrays of `dtype` in the shapes of `config` (scale 0.02, as an init)."""
  shapes = tree_shapes(config)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  arrays = [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, [a.astype(dtype) for a in arrays])


def optimizers() -> dict[str, optax.GradientTransformation]:
  """The optimizers compared, by the name used in the tables."""
  return {
      "sgd": optax.sgd(1e-2),
      "adam": optax.adam(1e-3),
      "optax.adafactor": optax.adafactor(learning_rate=1e-2),
      "ours": ao.adafactor(),
      "ours+momentum": ao.adafactor(momentum=0.9),
      "ours+int8 momentum": ao.adafactor(momentum=0.9, dtype_momentum="int8"),
  }


def make_step(tx: optax.GradientTransformation) -> Callable:
  """The jitted train step: update then apply, params and state donated."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Entry:
  """One optimizer's compiled step, its live buffers and its measurements."""

  def __init__(self, tx, params, grads):
    self.params = jax.tree.map(jnp.copy, params)
    self.state = jax.jit(tx.init)(self.params)
    self.grads = grads
    start = time.perf_counter()
    lowered = make_step(tx).lower(self.params, self.state, grads)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    memory = self.compiled.memory_analysis()
    self.temp_bytes = memory.temp_size_in_bytes if memory is not None else float("nan")
    self.state_bytes = nbytes(self.state)
    self.times = []

  def run(self) -> float:
    start = time.perf_counter()
    self.params, self.state = self.compiled(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))
    return time.perf_counter() - start


def measure(size: str, dtype, repeats: int, warmup: int = 2) -> dict:
  """Builds every optimizer's step for one tree and times them round-robin."""
  config = SIZES[size]
  params = make_tree(config, dtype, seed=0)
  grads = make_tree(config, dtype, seed=1)
  entries = {name: Entry(tx, params, grads) for name, tx in optimizers().items()}
  for _ in range(warmup):
    for entry in entries.values():
      entry.run()
  for _ in range(repeats):
    for entry in entries.values():
      entry.times.append(entry.run())
  result = {
      "size": size,
      "dtype": jnp.dtype(dtype).name,
      "n_params": sum(x.size for x in jax.tree.leaves(params)),
      "n_leaves": len(jax.tree.leaves(params)),
      "param_bytes": nbytes(params),
      "optimizers": {},
  }
  for name, entry in entries.items():
    result["optimizers"][name] = {
        "step_s": statistics.median(entry.times),
        "compile_s": entry.compile_s,
        "temp_bytes": entry.temp_bytes,
        "state_bytes": entry.state_bytes,
    }
  return result


def machine_description() -> str:
  model = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return (
      f"CPU: {model}; {os.cpu_count()} cores visible; {platform.system()} {platform.machine()}; "
      f"Python {platform.python_version()}; jax {jax.__version__}, optax {optax.__version__}; "
      f"backend {jax.default_backend()}"
  )


def to_markdown(results: list[dict], repeats: int, command: str) -> str:
  lines = [
      "# Optimizer step time on CPU",
      "",
      f"Machine: {machine_description()}.",
      "",
      f"Command: `{command}`",
      "",
      "Full jitted step (`tx.update` + `optax.apply_updates`, params and state donated),",
      f"median of {repeats} interleaved round-robin runs after 2 warm-up runs. Ratios are",
      "of medians measured in the same process. `temp` is XLA's",
      "`compile().memory_analysis().temp_size_in_bytes` over the parameter bytes; `state` is",
      "the optimizer state over the parameter bytes; compile is lower + compile, in seconds.",
      "",
  ]
  for r in results:
    opts = r["optimizers"]
    sgd = opts["sgd"]["step_s"]
    lines += [
        f"## {r['size']}, {r['dtype']}: {r['n_params'] / 1e6:.1f}M parameters, "
        f"{r['n_leaves']} leaves, {r['param_bytes'] / 2**20:.0f} MiB",
        "",
        "| optimizer | step ms | x SGD | temp / params | state / params | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for name, o in opts.items():
      lines.append(
          f"| {name} | {1e3 * o['step_s']:.2f} | {o['step_s'] / sgd:.2f} | "
          f"{o['temp_bytes'] / r['param_bytes']:.3f} | {o['state_bytes'] / r['param_bytes']:.3f} | "
          f"{o['compile_s']:.2f} |"
      )
    ours, adam, optax_af = (opts[k]["step_s"] for k in ("ours", "adam", "optax.adafactor"))
    mom, int8 = (opts[k]["step_s"] for k in ("ours+momentum", "ours+int8 momentum"))
    lines += [
        "",
        f"ours / adam = {ours / adam:.2f}; ours / optax.adafactor = {ours / optax_af:.2f}; "
        f"ours+momentum / adam = {mom / adam:.2f}; "
        f"ours+momentum / optax.adafactor = {mom / optax_af:.2f}; "
        f"ours+int8 momentum / ours+momentum = {int8 / mom:.2f}.",
        "",
    ]
  return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results[0]["optimizers"])
  labels = [f"{r['size']}\n{r['dtype']}" for r in results]
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results) + 3), 4))
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    ratios = [r["optimizers"][name]["step_s"] / r["optimizers"]["sgd"]["step_s"] for r in results]
    ax.bar(np.arange(len(results)) + i * width, ratios, width, label=name)
  ax.set_xticks(np.arange(len(results)) + width * (len(names) - 1) / 2, labels)
  ax.set_ylabel("step time / SGD step time")
  ax.set_title("Jitted update + apply, donated (CPU, median)")
  ax.axhline(1.0, color="gray", linewidth=0.8)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="10m,50m", help=f"comma-separated, of {list(SIZES)}")
  parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", help="the .md to write (its plot beside it); default: "
                      "benchmarks/results/step_time_cpu.md, or a temporary directory for --smoke")
  parser.add_argument("--smoke", action="store_true", help="tiny tree, 2 repeats (CI)")
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = (os.path.join(tempfile.mkdtemp(prefix="step_time_smoke_"), "step_time.md")
                if args.smoke else
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                             "step_time_cpu.md"))
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  sizes, repeats = args.sizes.split(","), args.repeats
  if args.smoke:
    sizes, repeats = ["smoke"], 2
  results = []
  for dtype in args.dtypes.split(","):
    for size in sizes:
      r = measure(size, jnp.dtype(dtype), repeats)
      results.append(r)
      print(to_markdown([r], repeats, "").split("\n", 11)[-1], flush=True)
  command = "python benchmarks/step_time.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(to_markdown(results, repeats, command.strip()))
    f.write(f"\n![step time / SGD]({os.path.basename(os.path.splitext(args.out)[0])}.png)\n")
  plot(results, os.path.splitext(args.out)[0] + ".png")
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
