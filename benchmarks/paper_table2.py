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
import math
import os
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
import train_lm

import adafactor_optax as ao

PAPER_STEPS = 100_000
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# The hand-written reading of a committed run, kept by --report-only.
NOTES_HEADING = "## Reading the results"


# ------------------------------------------------------------------------- the rows


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of Table 2: how Adafactor is configured, and the paper's BLEU."""

  factored: str | None  # None, "factored", "row" or "col"
  b1: float | None
  b2: str  # "0.999", "0.99", "0.9" (constant, bias-corrected) or "t^-c"
  d: float | None
  relative: bool
  bleu_warmup: float
  bleu_no_warmup: float


ROWS = {
    "A": Row(None, None, "0.999", None, False, 25.6, 0.1),
    "B": Row(None, 0.9, "0.999", None, False, 25.4, 23.1),
    "C": Row("factored", None, "0.999", None, False, 25.4, 0.2),
    "D": Row("row", None, "0.999", None, False, 25.2, 0.3),
    "E": Row("col", None, "0.999", None, False, 0.3, 0.5),
    "F": Row(None, None, "0.99", None, False, 25.0, 0.4),
    "G": Row(None, None, "0.9", None, False, 18.4, 15.6),
    "H": Row(None, None, "0.999", 1.0, False, 25.4, 21.5),
    "I": Row(None, None, "0.999", 2.0, False, 25.7, 0.2),
    "J": Row("factored", None, "0.999", 1.0, False, 25.6, 22.4),
    "K": Row(None, None, "t^-0.5", None, False, 25.6, 21.1),
    "L": Row(None, None, "t^-0.8", None, False, 25.6, 0.1),
    "M": Row(None, None, "t^-1.0", None, False, 25.4, 0.1),
    "N": Row(None, None, "t^-0.8", 1.0, False, 25.9, 22.4),
    "O": Row("factored", None, "t^-0.8", 1.0, True, 25.0, 25.5),
    "P": Row("factored", 0.9, "t^-0.8", 1.0, True, 24.9, 25.3),
}
SGD_K = (1, 10, 100, 150, 200, 300)
# Row Q, BLEU with warmup / without ("div": diverged).
SGD_BLEU = {1: ("0.6", "0.8"), 10: ("8.2", "9.1"), 100: ("22.9", "div"),
            150: ("24.0", "div"), 200: ("24.3", "div"), 300: ("div", "div")}


def step_schedule(warmup: bool, f: float):
  """The paper's s_t evaluated at the compressed time f * t (`inverse_sqrt_step`)."""
  paper = ao.inverse_sqrt_step(1e-2, 1e-6 if warmup else None)

  def schedule(count):
    t = (jnp.asarray(count).astype(jnp.float32) + 1.0) * jnp.float32(f)
    return paper(t - 1.0)  # the package's schedules take count = t - 1

  return schedule


def scaled(schedule, k: float):
  return lambda count: jnp.float32(k) * schedule(count)


def factor_rule(estimate: str, min_dim: int):
  """Row D / E: only row (or column) statistics for the matrices the default rule factors."""

  def rule(path, shape):
    axes = ao.factored_axes(shape, min_dim)
    return None if axes is None else ao.FactorSpec(*axes, estimate=estimate)

  return rule


def build_optimizer(name: str, warmup: bool, cfg) -> optax.GradientTransformation:
  """Row `name` ("A"-"P", or "Q<k>") with or without warmup."""
  s = step_schedule(warmup, PAPER_STEPS / cfg.steps)
  if name.startswith("Q"):
    return optax.sgd(scaled(s, int(name[1:])))  # the paper's k * s_t, not step_scale
  row = ROWS[name]
  if row.b2.startswith("t^-"):
    decay = dict(decay_rate=float(row.b2[3:]))
  else:
    decay = dict(decay_schedule=ao.bias_corrected_decay(float(row.b2)))
  if row.factored in ("row", "col"):
    factoring = dict(factored=True, factor_rule=factor_rule(row.factored, cfg.min_dim))
  else:
    factoring = dict(factored=row.factored == "factored")
  step = (dict(learning_rate=s) if row.relative else
          dict(learning_rate=scaled(s, 0.1 * cfg.step_scale), multiply_by_parameter_scale=False))
  return ao.adafactor(**step, **decay, **factoring, clipping_threshold=row.d, momentum=row.b1,
                      min_dim_size_to_factor=cfg.min_dim, diagnostics=True)


def describe(name: str) -> tuple[str, str, str, str]:
  if name.startswith("Q"):
    return "SGD", "-", "-", "-"
  r = ROWS[name]
  fac = {None: "-", "factored": "yes", "row": "row-mean only", "col": "column-mean only"}
  b2 = "1 - " + r.b2 if r.b2.startswith("t") else r.b2
  return fac[r.factored], "0" if r.b1 is None else str(r.b1), b2, "-" if r.d is None else str(r.d)


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
    model = train_lm.TransformerLM(d_model=cfg.d_model, layers=cfg.layers, seq_len=cfg.seq_len,
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
    return train_lm.loss_fn(nnx.merge(graphdef, params), batch)

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
  counts = np.bincount(train_data, minlength=train_lm.VOCAB).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  return float(-logp[valid_batches[..., 1:]].mean())


def status(valid_loss: float, train_loss, threshold: float) -> str:
  """"diverged" (not finite), "failed" (no better than byte frequencies), "spiked" or "ok".

  "spiked": the training loss rose above its initial value (the step-1 loss)
  at some later step, an instability the run recovered from.
  """
  if not math.isfinite(valid_loss):
    return "diverged"
  if valid_loss > threshold:
    return "failed"
  return "spiked" if max(train_loss[1:], default=0.0) > train_loss[0] else "ok"


# ------------------------------------------------------------------------ reports


def _fmt(losses, train_losses, threshold):
  """Mean held-out loss over seeds, with every seed's value and its status."""
  flags = [status(x, t, threshold) for x, t in zip(losses, train_losses)]
  num = lambda x, p: f"{x:.{p}f}" if abs(x) < 100 else f"{x:.2g}"
  mean = num(float(np.mean(losses)), 3) if all(map(math.isfinite, losses)) else "nan"
  spread = "" if len(losses) == 1 else " (" + " / ".join(
      "nan" if not math.isfinite(x) else num(x, 2) for x in losses) + ")"
  bad = [f for f in flags if f != "ok"]
  note = "".join(f" **{bad.count(f)}/{len(flags)} {f}**"
                 for f in ("diverged", "failed", "spiked") if f in bad)
  return mean + spread + note


def markdown(results, cfg, info, wall_s, threshold):
  lines = [
      "| row | factored | b1 | b2_t | d | paper BLEU warmup | paper BLEU no warmup "
      "| ours: held-out loss, warmup | ours: no warmup | next-byte acc. warmup / no warmup "
      "| peak train loss after step 1, warmup / no warmup |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in cfg.rows:
    fac, b1, b2, d = describe(name)
    if name.startswith("Q"):
      k = int(name[1:])
      paper = SGD_BLEU[k]
      label = f"Q (k={k})"
    else:
      paper = (ROWS[name].bleu_warmup, ROWS[name].bleu_no_warmup)
      label = name
    cells, accs, peaks = [], [], []
    for warmup in (True, False):
      h = results[f"{name}/{'warmup' if warmup else 'no_warmup'}"]
      cells.append(_fmt([v[-1] for v in h["valid_loss"]], h["train_loss"], threshold))
      accs.append(np.mean([a[-1] for a in h["valid_acc"]]))
      peak = np.mean([max(t[1:], default=np.nan) for t in h["train_loss"]])
      peaks.append(f"{peak:.2f}" if abs(peak) < 100 else f"{peak:.2g}")
    lines.append(f"| {label} | {fac} | {b1} | {b2} | {d} | {paper[0]} | {paper[1]} | "
                 f"{cells[0]} | {cells[1]} | {accs[0]:.3f} / {accs[1]:.3f} | {peaks[0]} / {peaks[1]} |")
  f = PAPER_STEPS / cfg.steps
  lines += [
      "",
      f"Held-out loss: cross-entropy in nats per byte after {cfg.steps} steps, mean over "
      f"{cfg.seeds} seed(s) (each seed's value in brackets); lower is better, whereas the paper's "
      f"BLEU is higher-is-better. **failed**: no better than the byte-frequency (unigram) model, "
      f"{threshold:.3f} nats; **diverged**: non-finite; **spiked**: the training loss rose "
      f"above its step-1 value later in training (then recovered). Step 0 loss: "
      f"{np.mean(results[f'{cfg.rows[0]}/warmup']['valid_loss'][0][0]):.3f}.",
      f"Schedules: time compressed by f = {PAPER_STEPS}/{cfg.steps} = {f:g}; "
      f"s_t = min(1e-2, [1e-6 f t,] 1/sqrt(f t)); warmup ends at step {1e4 / f:g}. "
      f"Absolute step alpha_t = 0.1 x {cfg.step_scale:g} x s_t (peak {1e-3 * cfg.step_scale:g}); "
      f"relative step rho_t = s_t; SGD step k x s_t.",
      f"Model: d_model={cfg.d_model}, layers={cfg.layers}, heads={cfg.n_heads}, "
      f"seq_len={cfg.seq_len}, batch={cfg.batch}; matrices factored when both axes >= "
      f"{cfg.min_dim} (the default 128 would factor none of them). Evaluation: "
      f"{cfg.eval_batches} x {cfg.batch} windows of held-out files.",
      f"Data: stdlib .py files, {info['train_files']} train / {info['valid_files']} held-out "
      f"files. Wall time {wall_s:.0f} s on {jax.devices()[0].platform.upper()} "
      f"({os.cpu_count()} cores), JAX {jax.__version__}.",
      "",
  ] + findings(results, cfg) + [""] + figure1_findings(results, cfg)
  return "\n".join(lines) + "\n"


def figure1_findings(results, cfg) -> list[str]:
  """Figure 1's reading, computed: RMS(U_t) of the probe after warmup, rows G and A."""
  end = int(round(1e4 * cfg.steps / PAPER_STEPS))
  lines = []
  for name, b2 in (("G", "0.9"), ("A", "0.999")):
    key = f"{name}/warmup"
    if key not in results or results[key].get("update_rms") is None:
      continue
    rms = np.asarray(results[key]["update_rms"], np.float64)[:, end:]
    rms = rms[np.isfinite(rms)]
    if not rms.size:
      continue
    lo, med, hi = np.percentile(rms, [5, 50, 95])
    lines.append(
        f"- b2 = {b2} (row {name}): median {med:.2f}, 5-95% range {lo:.2f}-{hi:.2f}, "
        f"min {rms.min():.3f}, max {rms.max():.2f}; {np.mean(rms < 0.4):.0%} of steps below "
        f"0.4, {np.mean(rms > 1.4):.0%} above 1.4")
  if not lines:
    return []
  return [f"Figure 1 (computed): RMS(U_t) of `{cfg.probe}` with warmup, after warmup (steps "
          f"{end + 1}-{cfg.steps}), all seeds together:", ""] + lines


def _final(results, name, warmup):
  """Mean final held-out loss over seeds (inf when any seed is not finite)."""
  h = results[f"{name}/{'warmup' if warmup else 'no_warmup'}"]
  vals = [v[-1] for v in h["valid_loss"]]
  return float(np.mean(vals)) if all(math.isfinite(v) for v in vals) else math.inf


def findings(results, cfg) -> list[str]:
  """The paper's conclusions, each checked against our losses: held / not held.

  Two losses "match" when they differ by less than `tol`; one is "worse" when it
  is higher by more than `tol`. tol = max(0.05 nats, 2 x the median spread
  between seeds of one run).
  """
  spreads = [np.ptp([v[-1] for v in h["valid_loss"]]) for h in results.values()
             if len(h["valid_loss"]) > 1 and all(math.isfinite(v[-1]) for v in h["valid_loss"])]
  tol = max(0.05, 2 * float(np.median(spreads))) if spreads else 0.05
  have = lambda *names: all(f"{n}/warmup" in results for n in names)
  L = lambda n, w: _final(results, n, w)
  close = lambda a, b: abs(a - b) < tol
  worse = lambda a, b: a > b + tol
  checks = []

  def check(claim, names, ok, detail):
    if have(*names):
      checks.append(f"- {'**holds**' if ok() else '**does not hold**'}: {claim} ({detail()})")

  f3 = lambda x: "inf" if not math.isfinite(x) else f"{x:.3f}" if x < 100 else f"{x:.2g}"
  check("factored = full second moment, with warmup (A vs C)", "AC",
        lambda: close(L("A", 1), L("C", 1)), lambda: f"{f3(L('A', 1))} vs {f3(L('C', 1))}")
  check("factored = full, clipped, without warmup (H vs J)", "HJ",
        lambda: close(L("H", 0), L("J", 0)), lambda: f"{f3(L('H', 0))} vs {f3(L('J', 0))}")
  check("row-mean-only estimate trains like factored, with warmup (D vs C)", "CD",
        lambda: close(L("D", 1), L("C", 1)), lambda: f"{f3(L('D', 1))} vs {f3(L('C', 1))}")
  check("column-mean-only estimate fails, with warmup (E worse than C)", "CE",
        lambda: worse(L("E", 1), L("C", 1)), lambda: f"{f3(L('E', 1))} vs {f3(L('C', 1))}")
  check("b2 = 0.999 without warmup is worse than with (A)", "A",
        lambda: worse(L("A", 0), L("A", 1)), lambda: f"{f3(L('A', 0))} vs {f3(L('A', 1))}")
  for n, what in (("B", "momentum 0.9"), ("G", "b2 = 0.9"), ("K", "b2_t = 1 - t^-0.5"),
                  ("H", "clipping d = 1")):
    check(f"{what} rescues no-warmup training ({n} better than A without warmup)", "A" + n,
          lambda n=n: worse(L("A", 0), L(n, 0)),
          lambda n=n: f"{f3(L(n, 0))} vs {f3(L('A', 0))}")
  check("clipping d = 2 does not rescue it (I not better than A without warmup)", "AI",
        lambda: not worse(L("A", 0), L("I", 0)), lambda: f"{f3(L('I', 0))} vs {f3(L('A', 0))}")
  for n in ("L", "M"):
    check(f"unclipped 1 - t^-{ROWS[n].b2[3:]} is worse without warmup ({n})", n,
          lambda n=n: worse(L(n, 0), L(n, 1)), lambda n=n: f"{f3(L(n, 0))} vs {f3(L(n, 1))}")
  check("clipping rescues 1 - t^-0.8 without warmup (N better than L)", "LN",
        lambda: worse(L("L", 0), L("N", 0)), lambda: f"{f3(L('N', 0))} vs {f3(L('L', 0))}")
  for n in ("O", "P"):
    check(f"relative step trains as well without warmup as with ({n})", n,
          lambda n=n: not worse(L(n, 0), L(n, 1)), lambda n=n: f"{f3(L(n, 0))} vs {f3(L(n, 1))}")
  check("relative step (O) is about as good as Adam-like B with warmup", "BO",
        lambda: not worse(L("O", 1), L("B", 1)), lambda: f"{f3(L('O', 1))} vs {f3(L('B', 1))}")
  qs = [n for n in cfg.rows if n.startswith("Q")]
  if qs:
    best = min(qs, key=lambda n: L(n, 1))
    checks.append(f"- SGD (row Q): best k with warmup is {best[1:]} ({f3(L(best, 1))}); "
                  + ", ".join(f"k={n[1:]}: {f3(L(n, 1))} / {f3(L(n, 0))}" for n in qs)
                  + " (warmup / no warmup). The paper's best is k=200; no warmup diverges "
                  "from k=100.")
  return [f"Checks of the paper's conclusions (computed; tol = {tol:.3f} nats of held-out "
          "loss):", ""] + checks


def plot_rows(results, cfg, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(cfg.rows)
  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(11, 4.2))
  for off, warmup, color in ((-0.18, True, "C0"), (0.18, False, "C3")):
    vals = np.array([[v[-1] for v in results[f"{n}/{'warmup' if warmup else 'no_warmup'}"]
                      ["valid_loss"]] for n in names])  # (rows, seeds)
    shown = np.where(np.isfinite(vals), np.minimum(vals, 6.0), 6.0)
    ax.bar(x + off, shown.mean(1), width=0.36, color=color,
           label="warmup" if warmup else "no warmup")
    for s in range(vals.shape[1]):
      ax.plot(x + off, shown[:, s], "k.", ms=3)
  ax.set_xticks(x, [n if not n.startswith("Q") else f"Q k={n[1:]}" for n in names],
                rotation=45, fontsize=8)
  ax.set_ylabel("held-out loss (nats / byte), capped at 6")
  ax.set_title(f"Table 2 rows on a byte-level LM ({cfg.steps} steps; dots: seeds)")
  ax.legend()
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_figure1(results, cfg, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for name, label, color in (("G", "b2 = 0.9", "C0"), ("A", "b2 = 0.999", "C3")):
    key = f"{name}/warmup"
    if key not in results:
      continue
    rms = np.asarray(results[key]["update_rms"][0])
    ax.plot(np.arange(1, rms.size + 1), rms, color=color, lw=1, label=f"{label} (row {name})")
  ax.axhline(1.0, color="gray", lw=0.8, ls=":")
  ax.axvline(1e4 * cfg.steps / PAPER_STEPS, color="gray", lw=0.8, ls="--", label="end of warmup")
  ax.set_xlabel("step")
  ax.set_ylabel(f"RMS(U_t) of {cfg.probe}")
  ax.set_title("Figure 1: unclipped update RMS, with warmup, no clipping")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(out: pathlib.Path, table: str) -> None:
  """Writes the table, keeping a hand-written reading already in the file."""
  path = out / "paper_table2.md"
  old = path.read_text() if path.exists() else ""
  notes = old[old.index(NOTES_HEADING):] if NOTES_HEADING in old else ""
  path.write_text(table + ("\n" + notes if notes else ""))


def run(cfg: Config, progress: bool = True) -> dict:
  t0 = time.perf_counter()
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  train_data, valid_data, info = train_lm.load_stdlib_bytes(cfg.max_bytes)
  train_batches = np.stack([train_lm.sample_batches(train_data, cfg.steps, cfg.batch,
                                                    cfg.seq_len, seed)
                            for seed in range(cfg.seeds)])  # (seeds, steps, batch, L + 1)
  valid_np = train_lm.sample_batches(valid_data, cfg.eval_batches, cfg.batch, cfg.seq_len,
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
