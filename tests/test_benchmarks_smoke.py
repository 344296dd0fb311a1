"""The step-time benchmark runs end to end in its smoke mode and writes its report."""

import os
import pathlib
import shutil
import subprocess
import sys

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_time_smoke_writes_elsewhere_by_default():
  """With no --out the smoke run writes to a temporary directory, not benchmarks/results/."""
  before = helpers.repository_snapshot()
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "step_time.py"), "--smoke"],
      check=True, cwd=ROOT, capture_output=True, text=True, timeout=300,
  )
  assert helpers.repository_snapshot() == before
  out = pathlib.Path(run.stdout.strip().splitlines()[-1].removeprefix("wrote "))
  assert out.is_file() and helpers.ROOT not in out.resolve().parents
  shutil.rmtree(out.parent)


def test_step_time_smoke(tmp_path):
  out = tmp_path / "step_time.md"
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "step_time.py"), "--smoke", "--out", str(out)],
      check=True, cwd=ROOT, capture_output=True, timeout=300,
  )
  text = out.read_text()
  for name in ("sgd", "adam", "optax.adafactor", "ours", "ours+momentum"):
    assert f"| {name} |" in text
  assert "ours / adam" in text and "CPU:" in text
  assert (tmp_path / "step_time.png").stat().st_size > 0
