"""The report of `paper_table2.py`: the markdown table beside the paper's BLEU, the findings, plots.

Kept apart from the training so that ``--report-only`` and the tests of the report need no
model; it reads the results `paper_table2.run` returns (or their JSON).
"""

import math
import os
import pathlib

import jax
import numpy as np
from paper_table2_rows import PAPER_STEPS, ROWS, SGD_BLEU, describe

# The hand-written reading of a committed run, kept by --report-only.
NOTES_HEADING = "## Reading the results"


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
