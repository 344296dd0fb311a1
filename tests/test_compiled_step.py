"""`benchmarks/compiled_step.py`: deviceless TPU / H100 compiles, and how their output is read.

The smoke run compiles tiny trees for TPU v5e and an H100 in a subprocess (the
compile-only devices need their environment set before jax is imported). Its
figures are checked against what the optimizers must do, not against earlier
output: an elementwise optimizer launches at least one kernel per leaf, and
moves a fixed number of parameter-sized arrays (SGD reads X and G and writes
X; Adam also reads and writes its two moments).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
       "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


# The `aot` extra (installed by CI): without it only the parsing tests below run.
AOT_PACKAGES = ("libtpu", "jax_cuda12_plugin")
needs_aot = pytest.mark.skipif(
    not all(importlib.util.find_spec(p) for p in AOT_PACKAGES),
    reason=f"deviceless compiles need the aot extra ({', '.join(AOT_PACKAGES)})")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("compiled_step")
  script = os.path.join(ROOT, "benchmarks", "compiled_step.py")
  run = subprocess.run([sys.executable, script, "--smoke", "--out", str(out)], cwd=ROOT,
                       env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]

  def no_nan(token):
    raise ValueError(f"{token} in the JSON")

  result = json.loads((out / "compiled_step.json").read_text(), parse_constant=no_nan)
  return out, result


@pytest.fixture(scope="module")
def module():
  return helpers.load_benchmark("compiled_step")


@pytest.fixture(scope="module")
def hlo(module):  # after compiled_step, which puts benchmarks/ on the path
  return helpers.load_benchmark("compiled_hlo")


@pytest.fixture(scope="module")
def report(module):
  return helpers.load_benchmark("compiled_report")


@pytest.fixture(scope="module")
def trees(module):
  return helpers.load_benchmark("compiled_trees")


def rows_by(rows, *keys):
  return {tuple(r[k] for k in keys): r for r in rows}


@needs_aot
def test_smoke_writes_its_command_json_markdown_and_plot(smoke):
  out, result = smoke
  text = (out / "compiled_step.md").read_text()
  assert result["command"].startswith("python benchmarks/compiled_step.py --smoke")
  assert f"`{result['command']}`" in text
  assert "not a timing" in text and "kernels (TPU)" in text and "collectives" in text
  assert (out / "compiled_step.png").stat().st_size > 0
  assert {r["target"] for r in result["step"]} == {"v5e", "h100"}


@needs_aot
def test_reference_optimizers_move_what_they_must(smoke):
  _, result = smoke
  rows = rows_by(result["step"], "tree", "target", "optimizer")
  for (tree, target, name), r in rows.items():
    assert r["kernels"] >= 1 and r["temp_bytes"] >= 0 and r["compile_s"] > 0
    if target == "h100":
      assert r["tpu_est_s"] is None
    else:
      assert r["tpu_est_s"] > 0 and r["fusions"] <= r["kernels"]
    if name != "adam":
      continue
    sgd = rows[tree, target, "sgd"]
    assert sgd["bytes_accessed"] < r["bytes_accessed"]
    if target == "h100":
      # One kernel at least per leaf (XLA:GPU fuses no two leaves' updates here).
      assert r["kernels"] >= r["n_leaves"] and sgd["kernels"] >= r["n_leaves"]
      # SGD: read X, G, write X. Adam: read X, G, m, v, write X, m, v. Plus scalars.
      assert sgd["bytes_accessed"] == pytest.approx(3 * r["param_bytes"], rel=0.01)
      assert r["bytes_accessed"] == pytest.approx(7 * r["param_bytes"], rel=0.01)
    assert r["kernels_vs_adam"] == 1.0
    ours = rows[tree, target, "ours"]
    assert ours["kernels_vs_adam"] == ours["kernels"] / r["kernels"]


@needs_aot
def test_pod_slice_shards_state_and_counts_collectives(smoke):
  _, result = smoke
  rows = rows_by(result["pod"], "target", "optimizer")
  assert {t for t, _ in rows} == {"v5e-8x8", "h100x4"}
  for target in ("v5e-8x8", "h100x4"):
    adam, ours = rows[target, "adam"], rows[target, "ours"]
    per_chip = adam["param_bytes_per_chip"]
    # Adam's arguments per chip: params, grads and two moments, each sharded like the params.
    assert adam["argument_bytes"] == pytest.approx(4 * per_chip, rel=0.01)
    # Ours: params and grads, and statistics of O(n + m) per n x m matrix.
    assert 2 * per_chip < ours["argument_bytes"] < 2.5 * per_chip
    # An elementwise update needs no communication; row and column means over a sharded
    # axis do.
    assert adam["collective_bytes"] == 0 and adam["collectives"] == {}
    assert ours["collective_bytes"] > 0
    # What the factored statistics alone must move, by hand: the smoke decoder (d 256,
    # d_ff 512, 2 layers, q/o 256 wide, k/v 128, vocab 1024) on fsdp 2 x tp 2, every
    # matrix split on both axes, so each row and column statistic all-reduces its
    # shard once (operand + result, 4 bytes a float): embed and lm_head
    # 2 x 4 x (512 + 128) each, q and o 2 x 4 x 2 x (128 + 128), k and v
    # 2 x 4 x 2 x (128 + 64), gate, up and down 2 x 4 x 2 x (128 + 256). Norms are not
    # factored.
    floor = 2 * 5120 + 2 * 4096 + 2 * 3072 + 3 * 6144
    assert ours["statistics_floor_bytes"] == floor == 43_008
    # Ours moves those and the clipping and parameter-scale scalars, nothing more.
    assert floor <= ours["collective_bytes"] <= 1.05 * floor


@needs_aot
def test_render_rewrites_the_same_tables_from_the_json(smoke, module, tmp_path):
  out, result = smoke
  module.main(["--render", str(out / "compiled_step.json"), "--out", str(tmp_path)])
  assert (tmp_path / "compiled_step.md").read_text() == (out / "compiled_step.md").read_text()
  with pytest.raises(ValueError, match="smoke"):
    module.write(result, module.RESULTS, "compiled_step")


def test_smoke_never_writes_the_committed_results(module):
  with pytest.raises(SystemExit):
    module.parse_args(["--smoke"])
  with pytest.raises(SystemExit):
    module.parse_args(["--smoke", "--out", module.RESULTS])
  with pytest.raises(SystemExit):
    module.parse_args(["--targets", "h200"])


HLO = """\
HloModule jit_step, entry_computation_layout={(f32[256,64]{1,0})->f32[1024,64]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

ENTRY %main.3 (p.1: f32[256,64], q.2: bf16[16]) -> (f32[1024,64], bf16[16]) {
  %p.1 = f32[256,64]{1,0} parameter(0), sharding={devices=[4,1]<=[4]}
  %q.2 = bf16[16]{0} parameter(1)
  %s = f32[]{:T(128)S(6)} constant(1)
  %fusion.4 = f32[256,64]{1,0} fusion(%p.1, %s), kind=kLoop, calls=%add
  %rsqrt.1 = f32[1,64]{1,0:T(1,128)S(1)} rsqrt(%fusion.4)
  %all-gather-start = (f32[256,64]{1,0}, f32[1024,64]{1,0}) all-gather-start(%fusion.4), dimensions={0}
  %all-gather-done = f32[1024,64]{1,0} all-gather-done(%all-gather-start)
  %all-reduce.7 = bf16[16]{0} all-reduce(%q.2), to_apply=%add
  %custom-call = f32[256,64]{1,0} custom-call(%p.1), custom_call_target="ConcatBitcast"
  ROOT %tuple = (f32[1024,64]{1,0}, bf16[16]{0}) tuple(%all-gather-done, %all-reduce.7)
}
"""


def test_hlo_reading_counts_kernels_and_collective_bytes(hlo):
  computations, entry = hlo.parse_hlo(HLO)
  assert entry == "main.3" and set(computations) == {"add", "main.3"}
  assert hlo.type_bytes("(f32[256,64]{1,0}, bf16[16]{0})") == 256 * 64 * 4 + 16 * 2
  # Kernels: the fusion and the unfused array rsqrt; not the scalar constant, the
  # parameters, the custom-call or the tuple. Apart: the async pair and the all-reduce.
  kernels, fusions, other, custom_calls = hlo.tpu_kernels(computations, entry)
  assert (kernels, fusions, other, custom_calls) == (2, 1, 3, 1)
  # all-gather: operand 256x64 f32 plus the done's result 1024x64; all-reduce: 16 bf16 in, out.
  assert hlo.collective_bytes(computations) == {
      "all-gather": [1, (256 + 1024) * 64 * 4], "all-reduce": [1, 2 * 16 * 2]}


THUNKS = """\
000: kCommandBuffer [source | sink]
    001: kCustomKernel [source | next=002 (1)] loop_add_fusion grid: [8, 1, 1]
    002: kKernel [prev=001 (1) | sink] input_reduce_fusion grid: [1, 1, 1]
001: kMemset [source | sink]
002: kGemm [source | sink] custom-call
"""


def test_gpu_thunks_count_kernels_inside_command_buffers(hlo, tmp_path):
  (tmp_path / "module_0001.jit_step.thunk_sequence_after_thunk_passes.txt").write_text(THUNKS)
  assert hlo.gpu_kernels(str(tmp_path)) == (3, 1)


GROUPING = """
import json, sys
sys.path[:0] = ["benchmarks", "."]
import compiled_step as cs
import jax, optax
import adafactor_optax as ao
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.sharding.Mesh(cs.devices("cuda", "1x1x1")[:1], ("x",))
counts = {}
for layers in (2, 6):
  shapes = {f"l{i}": {"w": (256, 512), "v": (512, 256), "b": (512,)} for i in range(layers)}
  params = cs.structs(shapes, jax.numpy.float32, NamedSharding(mesh, P()))
  for name, tx in (("ours", ao.adafactor()), ("adam", optax.adam(1e-3))):
    shardings = jax.tree.map(lambda s: s.sharding, jax.eval_shape(tx.init, params))
    counts[f"{name}{layers}"] = cs.compile_and_measure(tx, params, shardings, "cuda")["kernels"]
print(json.dumps(counts))
"""


@needs_aot
def test_h100_kernels_grow_with_groups_not_leaves():
  """On a GPU, equally shaped leaves share their reductions: a layer more costs ours what it costs Adam.

  Reduced leaf by leaf, each factored matrix adds about ten kernels (row and column means,
  RMS(U), RMS(X), their second stages, the update); grouped, only its update.
  """
  run = subprocess.run([sys.executable, "-c", GROUPING], cwd=ROOT, env=dict(os.environ, **ENV),
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  counts = json.loads(run.stdout.strip().splitlines()[-1])
  per_layer_adam = (counts["adam6"] - counts["adam2"]) / 4
  per_layer_ours = (counts["ours6"] - counts["ours2"]) / 4
  assert per_layer_adam >= 3  # one kernel per leaf at least: w, v, b
  assert per_layer_ours <= 1.5 * per_layer_adam, counts


def test_optax_adafactor_table_pairs_each_config_with_its_counterpart(trees, report):
  """Each `PAIRED` row of ours is set beside optax.adafactor's of the same tree and
  target in its counterpart configuration, never another's."""
  assert trees.COUNTERPARTS["ours lr+int8 momentum"] == "optax.adafactor+momentum"
  assert set(trees.COUNTERPARTS.values()) <= set(trees.DEFAULT_OPTIMIZERS)

  def row(optimizer, target, est, temp, fusions):
    return dict(tree="unscanned", n_leaves=195, target=target, optimizer=optimizer,
                tpu_est_s=est, temp_per_param_byte=temp, fusions=fusions, kernels=fusions + 1,
                tpu_est_s_by_scheduler={"list": est, "dfs": est / 2})

  rows = [row("ours lr", "v5p", 8e-4, 0.01, 950), row("optax.adafactor", "v5p", 1e-3, 0.0, 1072),
          row("optax.adafactor", "v5e", 2e-3, 0.0, 1000),
          row("ours lr+momentum", "v5e", 3e-3, 0.1, 1200),
          row("optax.adafactor+momentum", "v5p", 1e-3, 0.0, 1100)]
  lines = report.optax_adafactor_markdown(rows)
  pairs = [line for line in lines if line.startswith("| unscanned")]
  # ours lr+momentum has no counterpart on v5e: left out.
  assert pairs == ["| unscanned (195 leaves) | v5p | ours lr | optax.adafactor | 800 / 1,000 | "
                   "0.80 | 0.010 / 0.000 | 950 / 1,072 | 800 / 400; 1,000 / 500 |"]
