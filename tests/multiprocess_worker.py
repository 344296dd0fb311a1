"""One process of a 2-process run: `python -m tests.multiprocess_worker PORT ID OUT`.

Each process owns 4 simulated CPU devices; together they form one 2 x 4
('data', 'model') mesh and train the transformer-shaped tree for three steps with
gloo collectives between them. Process 0 writes the gathered parameters and
state to OUT (an .npz) for `test_multiprocess.py` to compare with one process.
"""

import sys

import jax


def main(port, process_id, out):
  # Here, not at import: pytest's doctest collection imports this module.
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils

  from tests import test_multiprocess

  assert jax.device_count() == 8 and jax.local_device_count() == 4
  params, state = test_multiprocess.train_on_mesh()
  gathered = multihost_utils.process_allgather((params, state), tiled=True)
  if process_id == 0:
    np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(gathered)])
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
