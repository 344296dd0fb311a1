"""Train a small byte-level Transformer LM on the Python standard library's source.

Compares `adafactor_optax.adafactor()` at the paper's defaults, with no warmup
(arXiv:1804.04235, Algorithm 6: relative step rho_t = min(1e-2, 1/sqrt(t)), b2_t = 1 - t^-0.8,
update clipping d = 1, no momentum), against `optax.adam` with a linear warmup and
cosine decay, and the memory-saving recipes between them: Adafactor given Adam's
schedule as an absolute step, with float32 or int8 momentum, and with bfloat16
parameters rounded stochastically or to nearest (the model computes in float32 from
them, so only their storage differs). Same model, data, initialisation, batches and
number of steps. The table reports the bytes per parameter of parameters plus
optimizer state.

The text is every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``, read as
bytes (vocabulary of 256), and split into train and validation *by file*: a file
goes to validation when the CRC32 of its path relative to the stdlib is 0 mod 10.

Usage::

  python benchmarks/train_lm.py    # defaults: 7 optimizers, see results.md for the wall time
  python benchmarks/train_lm.py --steps 50 --d-model 64 --layers 1 --out /tmp/lm

Any setting other than the defaults needs its own ``--out``: the committed results
in benchmarks/results/train_lm/ are only written by the default run.

Writes ``results.md`` (the table), ``loss.png`` (loss curves) and ``history.json``
to ``--out``.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]),  # run from a checkout
                str(pathlib.Path(__file__).resolve().parent)]
import adafactor_optax
# The task (data and model, shared with paper_table2.py): benchmarks/lm_task.py.
from lm_task import TransformerLM, load_stdlib_bytes, loss_fn, sample_batches


# ----------------------------------------------------------------------- optimizers


def _adam_schedule(steps: int) -> optax.Schedule:
  warmup = max(steps // 10, 1)
  return optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, max(steps, warmup + 1), 3e-4)


def _adafactor_adam_schedule(steps: int, **kwargs) -> optax.GradientTransformation:
  """Adafactor with Adam's learning-rate schedule as an absolute step."""
  return adafactor_optax.adafactor(
      learning_rate=_adam_schedule(steps), multiply_by_parameter_scale=False, **kwargs)


# name: (what it is, (steps -> optimizer), parameter dtype)
OPTIMIZER_SPECS = {
    "adafactor": ("adafactor() (paper defaults, no warmup)",
                  lambda steps: adafactor_optax.adafactor(), "float32"),
    "adam": ("optax.adam, warmup + cosine 3e-3",
             lambda steps: optax.adam(_adam_schedule(steps)), "float32"),
    "adam-nowarmup": ("optax.adam, cosine 3e-3, no warmup",
                      lambda steps: optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.1)),
                      "float32"),
    "adafactor-momentum": ("adafactor(momentum=0.9)",
                           lambda steps: adafactor_optax.adafactor(momentum=0.9), "float32"),
    "af-lr": ("adafactor, Adam's schedule (learning_rate=sched, "
              "multiply_by_parameter_scale=False)", _adafactor_adam_schedule, "float32"),
    "af-lr-m32": ("af-lr + momentum=0.9 (float32)",
                  lambda steps: _adafactor_adam_schedule(steps, momentum=0.9), "float32"),
    "af-lr-m8": ("af-lr + momentum=0.9, dtype_momentum='int8'",
                 lambda steps: _adafactor_adam_schedule(
                     steps, momentum=0.9, dtype_momentum="int8"), "float32"),
    "af-lr-m8-bf16-sr": ("af-lr-m8, bfloat16 params, stochastic_rounding=True",
                         lambda steps: _adafactor_adam_schedule(
                             steps, momentum=0.9, dtype_momentum="int8",
                             stochastic_rounding=True), "bfloat16"),
    "af-lr-m8-bf16-rtn": ("af-lr-m8, bfloat16 params, round to nearest",
                          lambda steps: _adafactor_adam_schedule(
                              steps, momentum=0.9, dtype_momentum="int8"), "bfloat16"),
}
OPTIMIZERS = tuple(OPTIMIZER_SPECS)


def make_optimizer(name: str, steps: int) -> optax.GradientTransformation:
  """The optimizer `name` of `OPTIMIZER_SPECS` for a run of `steps`."""
  if name not in OPTIMIZER_SPECS:
    raise ValueError(f"unknown optimizer {name!r}")
  return OPTIMIZER_SPECS[name][1](steps)


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------- train


@dataclasses.dataclass
class Config:
  steps: int = 500
  d_model: int = 128
  layers: int = 2
  n_heads: int = 4
  seq_len: int = 128
  batch: int = 16
  seed: int = 0
  eval_every: int = 50
  eval_batches: int = 8
  optimizers: tuple[str, ...] = ("adafactor", "af-lr", "af-lr-m32", "af-lr-m8",
                                 "af-lr-m8-bf16-sr", "af-lr-m8-bf16-rtn", "adam")
  out: str = "benchmarks/results/train_lm"


def train_one(name: str, cfg: Config, train_batches, valid_batches, progress: bool = True):
  """Trains a fresh model (seeded by cfg.seed) with optimizer `name`; returns history."""
  model = TransformerLM(d_model=cfg.d_model, layers=cfg.layers, seq_len=cfg.seq_len,
                        n_heads=cfg.n_heads, rngs=nnx.Rngs(cfg.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  # Low-precision parameters are stored (and updated) in their dtype; the model
  # computes in float32 from them, so only the storage differs between rows.
  param_dtype = jnp.dtype(OPTIMIZER_SPECS[name][2])
  params = jax.tree.map(lambda p: p.astype(param_dtype), params)
  tx = make_optimizer(name, cfg.steps)
  opt_state = tx.init(params)

  def loss_of_params(params, batch):
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return loss_fn(nnx.merge(graphdef, params), batch)

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_of_params)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_loss = jax.jit(lambda params, batches: jax.lax.map(
      lambda b: loss_of_params(params, b), batches).mean())

  history = {"step": [], "train_loss": [], "eval_step": [], "valid_loss": []}

  def evaluate(step):
    history["eval_step"].append(step)
    history["valid_loss"].append(float(eval_loss(params, valid_batches)))

  evaluate(0)
  train_time = 0.0
  timed_steps = 0
  bar = tqdm(range(cfg.steps), desc=f"{name:>10}", disable=not progress, file=sys.stdout,
             mininterval=2.0)
  for step in bar:
    t0 = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(train_batches[step]))
    loss = float(loss)  # blocks
    if step > 0:  # step 0 includes compilation
      train_time += time.perf_counter() - t0
      timed_steps += 1
    history["step"].append(step + 1)
    history["train_loss"].append(loss)
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
      evaluate(step + 1)
  tokens = timed_steps * cfg.batch * cfg.seq_len
  last = max(1, min(20, len(history["train_loss"])))
  history["summary"] = {
      "optimizer": name,
      "final_train_loss": float(np.mean(history["train_loss"][-last:])),
      "valid_loss": history["valid_loss"][-1],
      "tokens_per_s": tokens / train_time if train_time > 0 else float("nan"),
      "opt_state_bytes": tree_bytes(opt_state),
      "param_bytes": tree_bytes(params),
      "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "param_dtype": str(param_dtype),
      "description": OPTIMIZER_SPECS[name][0],
  }
  return history


def strict_json(value):
  """`value` with every non-finite float as None: JSON that strict parsers accept."""
  if isinstance(value, dict):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def from_json(value):
  """The inverse of `strict_json` for number lists: None back to NaN."""
  if isinstance(value, dict):
    return {k: from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [math.nan if v is None else from_json(v) for v in value]
  return value


def command_line(cfg: Config) -> str:
  """The command that reproduces `cfg`: the script with its non-default arguments."""
  d, args = Config(), []
  for flag, field in (("--steps", "steps"), ("--d-model", "d_model"), ("--layers", "layers"),
                      ("--heads", "n_heads"), ("--seq-len", "seq_len"), ("--batch", "batch"),
                      ("--seed", "seed"), ("--eval-every", "eval_every")):
    if getattr(cfg, field) != getattr(d, field):
      args += [flag, str(getattr(cfg, field))]
  if tuple(cfg.optimizers) != tuple(d.optimizers):
    args += ["--optimizers", ",".join(cfg.optimizers)]
  if cfg.out != d.out:
    args += ["--out", str(cfg.out)]
  return " ".join(["python benchmarks/train_lm.py", *args])


def markdown_table(summaries, cfg: Config, n_params: int, data_info: dict, wall_s: float) -> str:
  lines = [
      f"Made by `{command_line(cfg)}`.",
      "",
      "| optimizer | final train loss | validation loss | tokens/s | optimizer-state bytes "
      "| state / params | params + state, bytes / param |",
      "|---|---|---|---|---|---|---|",
  ]
  for s in summaries:
    lines.append(
        f"| {s['optimizer']} | {s['final_train_loss']:.4f} | {s['valid_loss']:.4f} "
        f"| {s['tokens_per_s']:,.0f} | {s['opt_state_bytes']:,} "
        f"| {s['opt_state_bytes'] / s['param_bytes']:.3f} "
        f"| {(s['param_bytes'] + s['opt_state_bytes']) / s['n_params']:.3f} |")
  lines += ["", "Optimizers:", ""]
  lines += [f"- `{s['optimizer']}`: {s['description']}; {s['param_dtype']} parameters."
            for s in summaries]
  lines += [
      "",
      f"Model: d_model={cfg.d_model}, layers={cfg.layers}, heads={cfg.n_heads}, "
      f"seq_len={cfg.seq_len}, batch={cfg.batch}, {n_params:,} parameters; "
      f"{cfg.steps} steps, seed {cfg.seed}. Final train loss: mean of the last 20 steps "
      f"(nats/byte). Validation: {cfg.eval_batches} x {cfg.batch} windows of held-out files.",
      f"Data: stdlib .py files, {data_info['train_files']} train / "
      f"{data_info['valid_files']} validation files ({data_info['train_bytes']:,} / "
      f"{data_info['valid_bytes']:,} bytes). Wall time {wall_s:.0f} s on "
      f"{jax.devices()[0].platform.upper()} ({os.cpu_count()} cores), JAX {jax.__version__}.",
  ]
  return "\n".join(lines) + "\n"


def plot(histories, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, h in enumerate(histories):
    name = h["summary"]["optimizer"]
    color = f"C{i}"
    tl = np.asarray(h["train_loss"])
    k = min(10, len(tl))
    smooth = np.convolve(tl, np.ones(k) / k, mode="valid")
    ax.plot(h["step"][k - 1:], smooth, color=color, lw=1.2, label=f"{name} train")
    ax.plot(h["eval_step"], h["valid_loss"], color=color, ls="--", marker="o", ms=3,
            label=f"{name} validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / byte)")
  ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
  ax.set_title("Byte-level LM on Python stdlib source")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(cfg: Config, progress: bool = True, max_bytes: int | None = None) -> dict:
  t_start = time.perf_counter()
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  train_data, valid_data, data_info = load_stdlib_bytes(max_bytes)
  train_batches = sample_batches(train_data, cfg.steps, cfg.batch, cfg.seq_len, cfg.seed)
  valid_batches = jnp.asarray(
      sample_batches(valid_data, cfg.eval_batches, cfg.batch, cfg.seq_len, cfg.seed + 1))
  histories = [train_one(name, cfg, train_batches, valid_batches, progress)
               for name in cfg.optimizers]
  model = TransformerLM(d_model=cfg.d_model, layers=cfg.layers, seq_len=cfg.seq_len,
                        n_heads=cfg.n_heads, rngs=nnx.Rngs(cfg.seed))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  wall = time.perf_counter() - t_start
  table = markdown_table([h["summary"] for h in histories], cfg, n_params, data_info, wall)
  (out / "results.md").write_text(table)
  (out / "history.json").write_text(json.dumps(strict_json(
      {"config": dataclasses.asdict(cfg), "data": data_info, "wall_s": wall,
       "histories": histories}), indent=1, allow_nan=False))
  plot(histories, out / "loss.png")
  return {"table": table, "histories": histories, "wall_s": wall}


def parse_args(argv=None) -> Config:
  d = Config()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--d-model", type=int, default=d.d_model)
  p.add_argument("--layers", type=int, default=d.layers)
  p.add_argument("--heads", type=int, default=d.n_heads)
  p.add_argument("--seq-len", type=int, default=d.seq_len)
  p.add_argument("--batch", type=int, default=d.batch)
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--eval-every", type=int, default=d.eval_every)
  p.add_argument("--optimizers", default=",".join(d.optimizers),
                 help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
  p.add_argument("--out", default=d.out)
  a = p.parse_args(argv)
  names = tuple(n.strip() for n in a.optimizers.split(",") if n.strip())
  for n in names:
    if n not in OPTIMIZERS:
      p.error(f"unknown optimizer {n!r}; choose from {', '.join(OPTIMIZERS)}")
  cfg = Config(steps=a.steps, d_model=a.d_model, layers=a.layers, n_heads=a.heads,
               seq_len=a.seq_len, batch=a.batch, seed=a.seed, eval_every=a.eval_every,
               optimizers=names, out=a.out)
  if cfg.out == d.out and dataclasses.replace(cfg, optimizers=d.optimizers) != d:
    p.error(f"a run with other settings than the defaults needs its own --out, not {d.out} "
            "(the committed results)")
  return cfg


def main(argv=None) -> None:
  cfg = parse_args(argv)
  result = run(cfg)
  print()
  print(result["table"])
  print(f"wrote {cfg.out}/results.md, loss.png, history.json ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
  main()
