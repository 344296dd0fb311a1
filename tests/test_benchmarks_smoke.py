"""The step-time benchmark runs end to end in its smoke mode and writes its report."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
