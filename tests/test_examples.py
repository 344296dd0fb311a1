"""examples/quickstart.py runs as the README says, and trains."""

import os
import re
import subprocess
import sys

from tests import helpers


def test_quickstart_runs_and_trains():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(helpers.ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  run = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=helpers.ROOT, env=env,
                       capture_output=True, text=True, check=True, timeout=300)
  losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", run.stdout)]
  assert len(losses) == 7 and losses[-1] < 0.05 * losses[0], losses
  # w1 (256 x 256) factored: 256 + 256 floats; b1 and w2 (256 x 1) whole: 256 each;
  # two int32 step counts. Adam: two floats per parameter.
  state = (256 + 256 + 256 + 256) * 4 + 2 * 4
  adam = 2 * (256 * 256 + 256 + 256) * 4
  assert f"optimizer state: {state} bytes (Adam: {adam} bytes)" in run.stdout
