"""The README's Python blocks run as written, and its figures come from committed results."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests import helpers

README = (helpers.ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", text, re.S)


# The README's blocks are user code, run under jax's default promotion rules (the
# package itself is tested under strict ones); its bias add broadcasts by rank.
def as_user(f):
  def run():
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
      f()
  run.__name__ = f.__name__
  return run


@as_user
def test_quickstart_block_trains():
  (quickstart,) = [b for b in python_blocks(README) if "def step" in b]
  assert len(quickstart.splitlines()) <= 15
  scope: dict = {}
  exec(quickstart, scope)  # noqa: S102
  w = 0.05 * jax.random.normal(jax.random.key(2), (256, 128))
  x = jax.random.normal(jax.random.key(1), (64, 256))
  y = x @ w
  params, state = scope["params"], scope["state"]
  first = float(scope["loss"](params, x, y))
  for _ in range(300):
    params, state = scope["step"](params, state, x, y)
  # A step of alpha_t = RMS(w) rho_t = 0.05 * 1e-2 per element, about 0.15 over 300 steps,
  # is enough to reach a target of the same scale: the loss falls well below half.
  assert float(scope["loss"](params, x, y)) < 0.5 * first


@as_user
def test_adam_users_block_builds_the_optimizer_it_names():
  (block,) = [b for b in python_blocks(README) if "dtype_momentum" in b]
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, 500, 3e-4)
  scope: dict = {"ao": __import__("adafactor_optax"), "schedule": schedule}
  exec(block, scope)  # noqa: S102
  params = {"w": jnp.ones((256, 256), jnp.bfloat16)}
  state = scope["tx"].init(params)
  updates, _ = scope["tx"].update(jax.tree.map(jnp.ones_like, params), state, params)
  assert updates["w"].dtype == jnp.bfloat16
  kinds = {type(s).__name__ for s in jax.tree.leaves(
      state, is_leaf=lambda s: hasattr(s, "_fields"))}
  assert {"StochasticRoundingState", "EmaMomentumState"} <= kinds, kinds


def test_readme_links_resolve():
  for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
    if "://" not in target:
      assert (helpers.ROOT / target).exists(), target


def test_results_table_figures_are_in_the_files_it_links():
  table = README[README.index("## Results"):README.index("## License")]
  rows = [r for r in table.splitlines() if r.startswith("| ") and "](" in r]
  assert len(rows) >= 5
  for row in rows:
    (target,) = re.findall(r"\]\(([^)]+)\)", row)[-1:]
    text = (helpers.ROOT / target).read_text()
    numbers = re.findall(r"\d+\.\d+|\d+", row.split("|")[2] + row.split("|")[3])
    plain = re.sub(r"[,*`]", "", text)
    for number in numbers:
      if len(number) > 1 or "." in number:
        # a figure quoted to fewer digits than the file: the file's value rounds to it
        decimals = len(number.split(".")[1]) if "." in number else 0
        values = {round(float(v), decimals) for v in re.findall(r"\d+\.\d+|\d+", plain)}
        assert np.isclose(float(number), sorted(values, key=lambda v: abs(v - float(number)))[0]), (
            number, target)


def test_every_docs_page_is_in_the_toctree():
  index = (helpers.ROOT / "docs" / "index.md").read_text()
  for page in pathlib.Path(helpers.ROOT / "docs").glob("*.md"):
    if page.stem != "index":
      assert f"\n{page.stem}\n" in index, page.stem
