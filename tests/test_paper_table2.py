"""The Table 2 benchmark runs end to end in its --quick mode and writes its outputs."""

import json
import math
import pathlib
import shutil

import pytest

from tests import helpers


@pytest.fixture(scope="module")
def quick_run():
  """`--quick` with no `--out`, as a user would run it: it must write elsewhere."""
  before = helpers.repository_snapshot()
  result = helpers.load_benchmark("paper_table2").main(["--quick"])
  after = helpers.repository_snapshot()
  out = pathlib.Path(result["out"])
  yield out, result, before, after
  shutil.rmtree(out, ignore_errors=True)


def test_quick_run_leaves_the_committed_results_alone(quick_run):
  out, _, before, after = quick_run
  assert helpers.ROOT not in out.resolve().parents
  assert after == before  # git status and every committed result file unchanged


def test_quick_writes_table_plots_and_json(quick_run):
  out, *_ = quick_run
  for name in ("paper_table2.md", "paper_table2.png", "paper_table2_figure1.png",
               "paper_table2.json"):
    assert (out / name).stat().st_size > 0, name
  text = (out / "paper_table2.md").read_text()
  # Each row is shown beside the paper's BLEU (row A: 25.6 with warmup, 0.1 without).
  assert "| A | - | 0 | 0.999 | - | 25.6 | 0.1 |" in text
  assert "| Q (k=100) | SGD |" in text


def test_quick_losses_are_finite_or_flagged(quick_run):
  out, result, *_ = quick_run
  # Strict JSON: Python's parser rejects the NaN / Infinity tokens when told to.
  saved = json.loads((out / "paper_table2.json").read_text(),
                     parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
  assert set(saved["results"]) == set(result["results"])
  text = (out / "paper_table2.md").read_text()
  for key, history in result["results"].items():
    assert len(history["train_loss"][0]) == saved["config"]["steps"]
    for losses in history["valid_loss"]:
      if not all(math.isfinite(x) for x in losses):
        assert "diverged" in text, key  # a non-finite loss is flagged, never hidden


def test_adafactor_rows_record_update_rms(quick_run):
  _, result, *_ = quick_run
  rms = result["results"]["A/warmup"]["update_rms"][0]
  # U_1 = G_1 / |G_1| elementwise (b2_1 = 0), so RMS(U_1) = 1 for a matrix with no zero gradient.
  assert rms[0] == pytest.approx(1.0, abs=1e-3)
  assert all(math.isfinite(x) and x > 0 for x in rms)


def test_schedules_are_the_papers_time_compressed():
  bench = helpers.load_benchmark("paper_table2")
  f = 250.0  # 100k paper steps in 400
  warm, cold = bench.step_schedule(True, f), bench.step_schedule(False, f)
  # Our step t is the paper's step f t: warmup 1e-6 f t, cap 1e-2, then 1/sqrt(f t).
  assert float(warm(0)) == pytest.approx(1e-6 * f, rel=1e-5)
  assert float(warm(39)) == pytest.approx(1e-2, rel=1e-5)  # the two meet at f t = 1e4
  assert float(cold(0)) == pytest.approx(1e-2, rel=1e-5)
  assert float(cold(399)) == pytest.approx(1 / math.sqrt(1e5), rel=1e-5)


def test_committed_results_are_strict_json():
  for path in (helpers.ROOT / "benchmarks" / "results").rglob("*.json"):
    json.loads(path.read_text(),
               parse_constant=lambda token: pytest.fail(f"{path}: non-JSON token {token}"))


def test_committed_table_is_what_its_json_gives(tmp_path):
  """The committed paper_table2.md's computed part (the checks and Figure 1 lines)
  is what --report-only makes from the committed JSON, and the hand-written
  reading is kept."""
  results = helpers.ROOT / "benchmarks" / "results"
  for name in ("paper_table2.json", "paper_table2.md"):
    shutil.copy(results / name, tmp_path / name)
  helpers.load_benchmark("paper_table2").main(["--report-only", "--out", str(tmp_path)])
  committed, rebuilt = (results / "paper_table2.md").read_text(), (
      tmp_path / "paper_table2.md").read_text()
  start = "Checks of the paper's conclusions"
  assert rebuilt[rebuilt.index(start):] == committed[committed.index(start):]
  assert "Figure 1 (computed)" in committed and "## Reading the results" in rebuilt


def test_figure1_sentence_is_computed_from_the_data():
  bench = helpers.load_benchmark("paper_table2")
  cfg = bench.Config(steps=20, rows=("G", "A"))  # warmup ends at step round(1e4 * 20 / 1e5) = 2
  g = [[9.0, 9.0] + [0.3] * 4 + [1.0] * 13 + [2.0]]  # after warmup: 18 steps
  results = {"G/warmup": {"update_rms": g}, "A/warmup": {"update_rms": [[0.1] * 20]}}
  text = "\n".join(bench.figure1_findings(results, cfg))
  assert "steps 3-20" in text
  assert "b2 = 0.9 (row G): median 1.00" in text and "max 2.00" in text
  assert "22% of steps below 0.4, 6% above 1.4" in text  # 4/18, 1/18
  assert "b2 = 0.999 (row A): median 0.10" in text and "100% of steps below 0.4" in text
