"""The Table 2 benchmark runs end to end in its --quick mode and writes its outputs."""

import json
import math

import pytest

from tests import helpers


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("paper_table2")
  result = helpers.load_benchmark("paper_table2").main(["--quick", "--out", str(out)])
  return out, result


def test_quick_writes_table_plots_and_json(quick_run):
  out, _ = quick_run
  for name in ("paper_table2.md", "paper_table2.png", "paper_table2_figure1.png",
               "paper_table2.json"):
    assert (out / name).stat().st_size > 0, name
  text = (out / "paper_table2.md").read_text()
  # Each row is shown beside the paper's BLEU (row A: 25.6 with warmup, 0.1 without).
  assert "| A | - | 0 | 0.999 | - | 25.6 | 0.1 |" in text
  assert "| Q (k=100) | SGD |" in text


def test_quick_losses_are_finite_or_flagged(quick_run):
  out, result = quick_run
  saved = json.loads((out / "paper_table2.json").read_text())
  assert set(saved["results"]) == set(result["results"])
  text = (out / "paper_table2.md").read_text()
  for key, history in result["results"].items():
    assert len(history["train_loss"][0]) == saved["config"]["steps"]
    for losses in history["valid_loss"]:
      if not all(math.isfinite(x) for x in losses):
        assert "diverged" in text, key  # a non-finite loss is flagged, never hidden


def test_adafactor_rows_record_update_rms(quick_run):
  _, result = quick_run
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
