"""`benchmarks/memory.py --smoke`: the memory table's numbers follow from the state's shapes."""

import pathlib
import shutil
import tempfile

import pytest

from tests import helpers


@pytest.fixture(scope="module")
def memory():
  return helpers.load_benchmark("memory")


def test_smoke_run_writes_table_and_plot(memory, tmp_path):
  rows, temps = memory.main(["--smoke", "--out", str(tmp_path)])
  text = (tmp_path / "memory.md").read_text()
  assert text.startswith("Made by `python benchmarks/memory.py --smoke --out ")
  assert "| model |" in text
  assert (tmp_path / "memory.png").stat().st_size > 0
  ratio = {(r["model"], r["optimizer"]): r["per_device"] / r["param_per_device"] for r in rows}
  for model in {r["model"] for r in rows}:
    # Adam: two moments of the parameters' size and dtype, sharded like them.
    assert ratio[model, "optax.adam"] == pytest.approx(2.0, abs=1e-3)
    # Adafactor: row and column statistics, O(n + m) per n x m matrix; vectors whole.
    assert ratio[model, "adafactor (paper defaults)"] < 0.05
    # Momentum adds one parameter-sized array, in float32 or in bfloat16.
    base = ratio[model, "adafactor (paper defaults)"]
    assert ratio[model, "adafactor + f32 momentum"] == pytest.approx(1.0 + base, abs=1e-3)
    assert ratio[model, "adafactor + bf16 momentum"] == pytest.approx(0.5 + base, abs=1e-3)
    # int8 values (a quarter of float32) and a float32 scale per block (a row of
    # 64 at these tiny shapes, 128+ at real ones: 1/64 to 1/128 of a float32 each).
    int8 = ratio[model, "adafactor + int8 momentum"]
    assert 0.25 + 1 / 128 + base <= int8 <= 0.25 + 1 / 32 + base
  per_param = {(r["model"], r["optimizer"]): (r["total"] + r["param_total"]) / r["n_params"]
               for r in rows}
  for model in {r["model"] for r in rows}:
    assert per_param[model, "optax.adam"] == pytest.approx(12.0, abs=1e-3)
    assert 2 + 1 < per_param[model, "bf16 params, adafactor + int8 momentum + stochastic "
                             "rounding"] < 2 + 1.1
  # Compiled temporaries: ours keeps no parameter-sized buffer (its statistics only);
  # optax.adafactor writes at least one (U, shared by RMS(U) and the update).
  temp = {t["optimizer"]: t["temp"] / t["param_bytes"] for t in temps}
  for name in ("adafactor (paper defaults)", "adafactor + f32 momentum",
               "adafactor + bf16 momentum"):
    assert temp[name] < 0.05, name
  assert temp["optax.adafactor"] > 0.9


def test_smoke_run_writes_elsewhere_by_default(memory):
  tmp = pathlib.Path(tempfile.gettempdir())
  before, dirs = helpers.repository_snapshot(), set(tmp.glob("memory_smoke_*"))
  memory.main(["--smoke"])
  assert helpers.repository_snapshot() == before
  new = set(tmp.glob("memory_smoke_*")) - dirs
  assert any((d / "memory.md").is_file() for d in new)
  for d in new:
    shutil.rmtree(d)


def test_t5_xxl_and_70b_shapes_have_their_published_sizes(memory):
  count = lambda shapes: sum(__import__("math").prod(s) for s, _ in shapes.values())
  assert count(memory.t5_shapes()) == pytest.approx(11.3e9, rel=0.02)  # T5 v1.1 XXL
  assert count(memory.decoder_shapes()) == pytest.approx(70.6e9, rel=0.01)  # Llama-3-70B
