"""The language-model benchmark runs end to end at a tiny size and writes its outputs."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adafactor_optax as ao
from tests import helpers


def test_split_is_by_file_and_deterministic():
  train_lm = helpers.load_benchmark("train_lm")
  a_train, a_valid, info = train_lm.load_stdlib_bytes(max_bytes=1 << 18)
  b_train, b_valid, _ = train_lm.load_stdlib_bytes(max_bytes=1 << 18)
  assert info["train_files"] > 0 and info["valid_files"] > 0
  np.testing.assert_array_equal(a_train, b_train)
  np.testing.assert_array_equal(a_valid, b_valid)
  assert a_train[:4096].tobytes() != a_valid[:4096].tobytes()


def test_tiny_run_writes_table_and_plot(tmp_path):
  train_lm = helpers.load_benchmark("train_lm")
  cfg = train_lm.parse_args([
      "--steps", "6", "--d-model", "32", "--layers", "1", "--heads", "2",
      "--seq-len", "32", "--batch", "4", "--eval-every", "3",
      "--optimizers", "adafactor,adam", "--out", str(tmp_path),
  ])
  # optax.adam's bias correction raises b1 to an int32 count, which strict dtype
  # promotion rejects (optax 0.2.8); the model and Adafactor are checked strictly below.
  with jax.numpy_dtype_promotion("standard"):
    result = train_lm.run(cfg, progress=False, max_bytes=1 << 20)

  table = (tmp_path / "results.md").read_text()
  # The file names the command that reproduces the run ...
  command = table.splitlines()[0]
  assert command.startswith("Made by `python benchmarks/train_lm.py --steps 6 --d-model 32 ")
  assert train_lm.parse_args(re.fullmatch(r"Made by `(.*)`\.", command)[1].split()[2:]) == cfg
  assert (tmp_path / "loss.png").stat().st_size > 1000
  history = json.loads((tmp_path / "history.json").read_text(),
                       parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
  for h in history["histories"]:
    assert len(h["train_loss"]) == 6
    # ... and its rows hold the recorded run's numbers: the mean of the last
    # (up to 20) training losses, the last held-out loss, the state bytes.
    n = h["summary"]["opt_state_bytes"]
    row = (f"| {h['summary']['optimizer']} | {np.mean(h['train_loss'][-20:]):.4f} "
           f"| {h['valid_loss'][-1]:.4f} |")
    assert row in table and f"| {n:,} |" in table
    assert np.all(np.isfinite(h["train_loss"])) and np.all(np.isfinite(h["valid_loss"]))
    # Six steps from a uniform-ish start (log 256 = 5.55 nats) already lower the loss.
    assert h["train_loss"][-1] < h["train_loss"][0]
  by_name = {h["summary"]["optimizer"]: h["summary"] for h in history["histories"]}
  # Adam keeps two f32 values per parameter (plus a count); Adafactor far fewer.
  assert by_name["adam"]["opt_state_bytes"] >= 2 * by_name["adam"]["param_bytes"]
  assert by_name["adafactor"]["opt_state_bytes"] < by_name["adam"]["opt_state_bytes"]


def test_model_and_adafactor_step_pass_strict_promotion():
  train_lm = helpers.load_benchmark("train_lm")
  model = train_lm.TransformerLM(d_model=32, layers=1, seq_len=16, n_heads=2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = ao.adafactor()
  batch = jnp.asarray(np.arange(2 * 17).reshape(2, 17) % 256, jnp.int32)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: train_lm.loss_fn(nnx.merge(graphdef, p), batch))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), loss

  new_params, loss = step(params, tx.init(params))
  assert np.isfinite(loss) and abs(float(loss) - np.log(256)) < 1.0  # near-uniform at init
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)
  assert all(jax.tree.leaves(changed))


def test_low_memory_rows_store_what_they_say(tmp_path):
  """bfloat16 parameters stay bfloat16: 2 bytes each."""
  train_lm = helpers.load_benchmark("train_lm")
  cfg = train_lm.parse_args([
      "--steps", "2", "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "16",
      "--batch", "2", "--eval-every", "2", "--optimizers", "af-lr-m8-bf16-sr",
      "--out", str(tmp_path)])
  with jax.numpy_dtype_promotion("standard"):  # optax's warmup schedule mixes int32 and float
    result = train_lm.run(cfg, progress=False, max_bytes=1 << 18)
  (summary,) = [h["summary"] for h in result["histories"]]
  assert summary["param_dtype"] == "bfloat16"
  assert summary["param_bytes"] == 2 * summary["n_params"]


def test_other_settings_never_overwrite_committed_results():
  train_lm = helpers.load_benchmark("train_lm")
  with pytest.raises(SystemExit):
    train_lm.parse_args(["--steps", "6"])
  assert train_lm.parse_args(["--optimizers", "adam"]).out == train_lm.Config().out
