"""The step-time benchmark runs end to end in its smoke mode and writes its report
somewhere other than the committed results."""

import os
import pathlib
import shutil
import subprocess
import sys

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_time_smoke_writes_its_report_elsewhere_by_default():
  """With no --out the smoke run writes to a temporary directory, not benchmarks/results/."""
  before = helpers.repository_snapshot()
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "step_time.py"), "--smoke"],
      check=True, cwd=ROOT, capture_output=True, text=True, timeout=300,
  )
  assert helpers.repository_snapshot() == before
  out = pathlib.Path(run.stdout.strip().splitlines()[-1].removeprefix("wrote "))
  try:
    assert helpers.ROOT not in out.resolve().parents
    text = out.read_text()
    for name in ("sgd", "adam", "optax.adafactor", "ours", "ours+momentum"):
      assert f"| {name} |" in text
    assert "ours / adam" in text and "CPU:" in text
    assert "Command: `python benchmarks/step_time.py --smoke`" in text
    assert out.with_suffix(".png").stat().st_size > 0
  finally:
    shutil.rmtree(out.parent)
