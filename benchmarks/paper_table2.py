"""Table 2 of Shazeer & Stern (2018), rows A-Q, on a small byte-level Transformer LM.

Every row of the paper's Table 2 (A-P: Adafactor variants built with this
package; Q: plain SGD with step k * s_t), each with and without warmup, trained
on the same task as `benchmarks/train_lm.py` (its data, model, loss and batches
are imported from it): a decoder-only byte-level Transformer on the Python
stdlib's .py files, held-out files for evaluation. Every run uses the same
steps, the same batches in the same order and the same initialisations; the
seeds are run side by side with `jax.vmap`.

Step schedules, scaled to the run length. The paper trains T_paper = 100k steps
and its two schedules meet at t = 1e4 (10 % of training). We compress time by
f = T_paper / steps, i.e. evaluate the paper's schedule at t * f:

  with warmup     s_t = min(1e-2, 1e-6 * f t, 1 / sqrt(f t))
  without warmup  s_t = min(1e-2,             1 / sqrt(f t))

so warmup ends at 10 % of our run, as in the paper, and the peak (1e-2) and the
final value (1/sqrt(1e5)) are the paper's. Absolute step (rows A-N):
alpha_t = 0.1 * step_scale * s_t; relative step (O, P): rho_t = s_t, the
paper's proposal unchanged; SGD (Q): k * s_t, as the paper. `step_scale`
(default 50, `--step-scale`) raises the absolute step from the paper's peak of
1e-3 to 5e-2: this pre-LayerNorm model is ~1000x smaller than Transformer-base
and trains 250x fewer steps, and at peaks of 1e-2 and 3e-2 (step_scale 10, 30;
measured on rows A, G, H, one seed) the training loss never rose above its
initial value after step 1, with or without warmup, so nothing could show the
paper's "unstable without warmup". At 5e-2 the first steps without warmup are
large enough that the loss jumps above its initial value within 6 steps
(measured for b2 = 0.999 and 0.9), and with warmup it does not; at 1e-1 every
row trains poorly. b2 is *not* rescaled: 0.999 keeps its ~1000-step
memory, longer than our whole run, so its second-moment estimate lags much as
in the paper's first 1000 steps (Figure 1).

Usage::

  python benchmarks/paper_table2.py            # the full table: 20 min on 2 shared CPU cores (measured)
  python benchmarks/paper_table2.py --quick    # CI: tiny model, rows A, G, Q100, under a minute
  python benchmarks/paper_table2.py --report-only   # rebuild .md and plots from the .json

Writes ``paper_table2.md`` (the table beside the paper's BLEU), ``paper_table2.png``
(held-out loss per row), ``paper_table2_figure1.png`` (RMS(U_t) of one weight
matrix, b2 = 0.9 vs 0.999, with warmup) and ``paper_table2.json`` to ``--out``:
by default ``benchmarks/results/``, but for ``--quick`` a new temporary
directory, so that a quick run never overwrites the committed full table. The
JSON is strict (no NaN tokens): a non-finite number is written as null.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import lm_task  # the data and the model of train_lm.py
import train_lm

# The rows and the report live beside this file; their names are re-exported here (the tests
# and --report-only reach them through this module).
from paper_table2_report import (  # noqa: F401
  figure1_findings,
  findings,
  markdown,
  plot_figure1,
  plot_rows,
  status,
  write_report,
)
from paper_table2_rows import (  # noqa: F401
  PAPER_STEPS,
  ROWS,
  SGD_K,
  build_optimizer,
  describe,
  factor_rule,
  scaled,
  step_schedule,
)

import adafactor_optax as ao

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------- training


@dataclasses.dataclass
class Config:
  steps: int = 400
  d_model: int = 64
  layers: int = 2
  n_heads: int = 4
  seq_len: int = 64
  batch: int = 16
  seeds: int = 2
  eval_every: int = 50
  eval_batches: int = 8
  step_scale: float = 50.0
  min_dim: int = 32
  rows: tuple[str, ...] = tuple(ROWS) + tuple(f"Q{k}" for k in SGD_K)
  probe: str = "blocks/0/up/kernel"
  max_bytes: int | None = None
  out: str | None = None  # None: benchmarks/results/, or a temporary directory for --quick


def init_params(cfg: Config):
  """One initialisation per seed, stacked on a leading axis, and the graphdef."""
  states = []
  for seed in range(cfg.seeds):
    model = lm_task.TransformerLM(d_model=cfg.d_model, layers=cfg.layers, seq_len=cfg.seq_len,
                                   n_heads=cfg.n_heads, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    states.append(params)
  return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def probe_index(params, probe: str) -> int:
  paths = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return next(i for i, p in enumerate(paths) if p.startswith(probe))


def make_evaluate(graphdef, valid_batches):
  """Held-out loss and next-byte accuracy of every seed's parameters (compiled once)."""

  def metrics(params, batch):
    logits = nnx.merge(graphdef, params)(batch[:, :-1])
    labels = batch[:, 1:]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (jnp.argmax(logits, -1) == labels).mean(dtype=jnp.float32)

  return jax.jit(jax.vmap(
      lambda p: jax.tree.map(jnp.mean, jax.lax.map(lambda b: metrics(p, b), valid_batches))))


def train_row(name, warmup, cfg, graphdef, params0, train_batches, evaluate):
  """Trains every seed of one row; returns per-seed losses, accuracies and RMS(U)."""
  tx = build_optimizer(name, warmup, cfg)
  probe = probe_index(jax.tree.map(lambda x: x[0], params0), cfg.probe)

  def loss_of(params, batch):
    return lm_task.loss_fn(nnx.merge(graphdef, params), batch)

  def step(carry, batch):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_of)(params, batch)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if name.startswith("Q"):
      rms = jnp.full([], jnp.nan, jnp.float32)
    else:
      rms = jax.tree.leaves(ao.get_diagnostics(state)["update_rms"])[probe]
    return (params, state), (loss, rms)

  chunk = jax.jit(jax.vmap(lambda p, s, b: jax.lax.scan(step, (p, s), b)))
  params, state = params0, jax.vmap(tx.init)(params0)
  hist = {"eval_step": [0], "valid_loss": [], "valid_acc": [], "train_loss": [], "update_rms": []}

  def record():
    loss, acc = evaluate(params)
    hist["valid_loss"].append(np.asarray(loss).tolist())
    hist["valid_acc"].append(np.asarray(acc).tolist())

  record()
  for start in range(0, cfg.steps, cfg.eval_every):
    batches = jnp.asarray(train_batches[:, start:start + cfg.eval_every])
    (params, state), (loss, rms) = chunk(params, state, batches)
    hist["train_loss"].append(np.asarray(loss))
    hist["update_rms"].append(np.asarray(rms))
    hist["eval_step"].append(min(start + cfg.eval_every, cfg.steps))
    record()
  for key in ("train_loss", "update_rms"):  # (seeds, steps)
    hist[key] = np.concatenate(hist[key], axis=1).tolist()
  hist["valid_loss"] = np.asarray(hist["valid_loss"]).T.tolist()  # (seeds, evals)
  hist["valid_acc"] = np.asarray(hist["valid_acc"]).T.tolist()
  return hist


def unigram_loss(train_data: np.ndarray, valid_batches: np.ndarray) -> float:
  """Held-out cross-entropy of the training bytes' frequencies (add-one smoothed)."""
  counts = np.bincount(train_data, minlength=lm_task.VOCAB).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  return float(-logp[valid_batches[..., 1:]].mean())


def run(cfg: Config, progress: bool = True) -> dict:
  t0 = time.perf_counter()
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  train_data, valid_data, info = lm_task.load_stdlib_bytes(cfg.max_bytes)
  train_batches = np.stack([lm_task.sample_batches(train_data, cfg.steps, cfg.batch,
                                                    cfg.seq_len, seed)
                            for seed in range(cfg.seeds)])  # (seeds, steps, batch, L + 1)
  valid_np = lm_task.sample_batches(valid_data, cfg.eval_batches, cfg.batch, cfg.seq_len,
                                     10_000)
  threshold = unigram_loss(train_data, valid_np)
  graphdef, params0 = init_params(cfg)
  evaluate = make_evaluate(graphdef, jnp.asarray(valid_np))
  runs = [(n, w) for n in cfg.rows for w in (True, False)]
  results = {}
  bar = tqdm(runs, disable=not progress, file=sys.stdout, desc="Table 2")
  for name, warmup in bar:
    key = f"{name}/{'warmup' if warmup else 'no_warmup'}"
    bar.set_postfix_str(key)
    results[key] = train_row(name, warmup, cfg, graphdef, params0, train_batches, evaluate)
  wall = time.perf_counter() - t0
  table = markdown(results, cfg, info, wall, threshold)
  (out / "paper_table2.md").write_text(table)  # a new run: no hand-written reading yet
  (out / "paper_table2.json").write_text(json.dumps(train_lm.strict_json(
      {"config": dataclasses.asdict(cfg), "data": info, "wall_s": wall,
       "unigram_loss": threshold, "results": results}), allow_nan=False))
  plot_rows(results, cfg, out / "paper_table2.png")
  plot_figure1(results, cfg, out / "paper_table2_figure1.png")
  return {"table": table, "results": results, "wall_s": wall, "threshold": threshold,
          "out": str(out)}


QUICK = dict(steps=20, d_model=32, layers=1, n_heads=2, seq_len=32, batch=4, seeds=1,
             eval_every=10, eval_batches=2, rows=("A", "G", "Q100"),
             max_bytes=1 << 20)


def parse_args(argv=None) -> Config:
  d = Config()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="a tiny CI configuration (< 1 minute)")
  p.add_argument("--steps", type=int)
  p.add_argument("--seeds", type=int)
  p.add_argument("--d-model", type=int)
  p.add_argument("--step-scale", type=float)
  p.add_argument("--rows", help="comma-separated, e.g. A,C,Q100 (default: all)")
  p.add_argument("--out", default=d.out)
  p.add_argument("--report-only", action="store_true",
                 help="rebuild the .md and plots from --out's paper_table2.json")
  a = p.parse_args(argv)
  cfg = Config(**QUICK) if a.quick else Config()
  if a.out is not None:
    cfg.out = a.out
  elif a.quick and not a.report_only:
    cfg.out = tempfile.mkdtemp(prefix="paper_table2_quick_")
  else:
    cfg.out = str(RESULTS)
  for field, value in (("steps", a.steps), ("seeds", a.seeds), ("d_model", a.d_model),
                       ("step_scale", a.step_scale)):
    if value is not None:
      setattr(cfg, field, value)
  if a.rows:
    cfg.rows = tuple(r.strip() for r in a.rows.split(",") if r.strip())
  for r in cfg.rows:
    if r not in ROWS and not (r.startswith("Q") and r[1:].isdigit()):
      p.error(f"unknown row {r!r}")
  cfg.eval_every = min(cfg.eval_every, cfg.steps)
  if cfg.steps % cfg.eval_every:
    p.error("--steps must be a multiple of the evaluation interval")
  cfg.report_only = a.report_only
  return cfg


def report(out: pathlib.Path) -> dict:
  """Rebuilds the table and plots from a saved run."""
  saved = train_lm.from_json(json.loads((out / "paper_table2.json").read_text()))
  fields = {f.name for f in dataclasses.fields(Config)}
  cfg = Config(**{k: tuple(v) if k == "rows" else v
                  for k, v in saved["config"].items() if k in fields})
  cfg.out = str(out)
  table = markdown(saved["results"], cfg, saved["data"], saved["wall_s"], saved["unigram_loss"])
  write_report(out, table)
  plot_rows(saved["results"], cfg, out / "paper_table2.png")
  plot_figure1(saved["results"], cfg, out / "paper_table2_figure1.png")
  return {"table": table, "results": saved["results"], "wall_s": saved["wall_s"],
          "out": str(out)}


def main(argv=None) -> dict:
  cfg = parse_args(argv)
  result = report(pathlib.Path(cfg.out)) if cfg.report_only else run(cfg)
  print()
  print(result["table"])
  print(f"wrote {cfg.out}/paper_table2.md, .png, _figure1.png, .json "
        f"({result['wall_s']:.0f} s)")
  return result


if __name__ == "__main__":
  main()
