"""The tables and the plot of `compiled_step.py`'s results (ratios against adam, pairs with optax)."""

import os
import platform
import sys
from importlib import metadata

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCHMARKS), BENCHMARKS]

import jax
import numpy as np
import optax

from compiled_trees import COUNTERPARTS  # each PAIRED row of ours -> optax.adafactor's

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
      "state donated. Per chip. `x statistics' floor`: the collective bytes over those that "
      "the factored statistics alone must move, each row or column statistic's partial sums "
      "once where the axis it sums over is split over devices (operand and result, as "
      "`collectives` counts; `statistics_floor_bytes` in `compiled_step.py`); adam needs none.",
      "",
      "| target | mesh | optimizer | param MiB | args / param bytes | temp / param bytes "
      "| collective MiB | collectives / param bytes | x statistics' floor "
      "| collectives (count: kind) | kernels | TPU est. x adam |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    kinds = ", ".join(f"{n}: {k}" for k, (n, _) in sorted(r["collectives"].items())) or "none"
    floor = (f"{r['collective_bytes'] / r['statistics_floor_bytes']:.3f}"
             if r.get("statistics_floor_bytes") else "-")
    lines.append(
        f"| {r['target']} ({r['topology']}) | {r['mesh']} | {r['optimizer']} | "
        f"{r['param_bytes_per_chip'] / 2**20:,.1f} | "
        f"{r['argument_bytes'] / r['param_bytes_per_chip']:.2f} | "
        f"{r['temp_per_param_byte']:.3f} | {r['collective_bytes'] / 2**20:,.2f} | "
        f"{r['collective_bytes'] / r['param_bytes_per_chip']:.4f} | {floor} | {kinds} | "
        f"{r['kernels']:,} | "
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
      "tree with the README's `factor_rule=ao.stacked_layers()`: `FactorSpec(-2, -1, "
      "batch=(0,))` for stacked matrices, the default factoring for the rest); `ours bf16` and "
      "`adam bf16` step the same tree in bfloat16.",
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
