"""A small mutation run over adafactor_optax/: one change to the code at a time, then the
tests that should notice it.

Each mutant is applied to a copy of the repository (the working tree is never touched),
and the test files mapped to its module run with ``-x`` (stop at the first failure). A
mutant is *killed* when they fail, *survives* when they pass. Two sets of mutants:

- named: the changes a review found surviving (issue 14) and the ones it asked about,
  each written as (module, code, replacement);
- sample: a systematic sample of mechanical mutants (an arithmetic or comparison
  operator swapped, a number changed, a keyword argument dropped, True/False flipped)
  generated from each module's syntax tree: every ``--stride``-th one, in file order.

  python tools/mutation.py                    # named + sample, a table on stdout
  python tools/mutation.py --list             # print the mutants only
  python tools/mutation.py --only named       # just the named ones
  python tools/mutation.py --ids 14,20 --out /tmp/rerun.md   # rerun some, by number

The table goes to stdout, and with ``--out FILE`` to a file as well (outside the tree: past
runs are not kept in it). The current result and the triage of its survivors (a new test,
or why the mutant is equivalent) are kept in one place: the Development page of the docs
(docs/development.md).
"""

import argparse
import ast
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adafactor_optax"

# The test files that cover each module (the fast ones; the slow property, compiled-HLO
# and benchmark tests are left to the full suite).
TESTS = {
    "_alias.py": ["tests/test_transforms.py", "tests/test_reference.py",
                  "tests/test_diagnostics.py"],
    "_clipping.py": ["tests/test_transforms.py"],
    "_diagnostics.py": ["tests/test_diagnostics.py"],
    "_factored.py": ["tests/test_transforms.py", "tests/test_factoring.py",
                     "tests/test_numerics.py"],
    "_factoring.py": ["tests/test_factoring.py", "tests/test_transforms.py"],
    "_finite.py": ["tests/test_numerics.py"],
    "_momentum.py": ["tests/test_transforms.py"],
    "_numerics.py": ["tests/test_transforms.py", "tests/test_numerics.py"],
    "_schedules.py": ["tests/test_transforms.py"],
    "_sharding.py": ["tests/test_sharding.py"],
    "_step_size.py": ["tests/test_transforms.py", "tests/test_factoring.py"],
    "_grouping.py": ["tests/test_grouping.py", "tests/test_transforms.py",
                     "tests/test_leafwise.py"],
    "_shapes.py": ["tests/test_shapes.py"],
    "_rounding.py": ["tests/test_rounding.py", "tests/test_leafwise.py"],
    "_quantize.py": ["tests/test_quantize.py"],
    "_leafwise.py": ["tests/test_leafwise.py"],
}

# (module, code as written, replacement, what it breaks)
NAMED = [
    ("_factored.py", "dtype = _numerics.compute_dtype(param.dtype) if stats_dtype is None "
     "else stats_dtype", "dtype = _numerics.compute_dtype(param.dtype)",
     "stats_dtype ignored"),
    ("_finite.py", "jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim)), initial=0)",
     "jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim)))",
     "skip_non_finite loses its zero-size guard"),
    ("_factoring.py", "min(shape[-2:]) < min_dim_size_to_factor",
     "shape[-1] < min_dim_size_to_factor", "last_two checks only the last axis"),
    ("_factored.py", "eps: jax.typing.ArrayLike = 1e-30,\n    factored: bool = True,\n"
     "    min_dim_size_to_factor: int | None = None",
     "eps: jax.typing.ArrayLike = 1e-20,\n    factored: bool = True,\n"
     "    min_dim_size_to_factor: int | None = None",
     "scale_by_factored_rms's own default eps"),
    ("_step_size.py", "    eps2: jax.typing.ArrayLike = 1e-3,\n    factor_rule",
     "    eps2: jax.typing.ArrayLike = 1e-2,\n    factor_rule",
     "relative_step_size's own default eps2"),
    ("_alias.py", "clipping_threshold, factor_rule=factor_rule if factored else None))",
     "clipping_threshold))",
     "the separate clip link (diagnostics=True) drops the blocks"),
    ("_alias.py", "        clipping_threshold=clipping_threshold,\n"
     "        factor_rule=factor_rule if factored else None,",
     "        clipping_threshold=clipping_threshold,",
     "diagnostics ignore the blocks"),
    ("_diagnostics.py", "clipped = pooled(jax.tree.map(lambda r: (r > d)",
     "clipped = pooled(jax.tree.map(lambda r: (r >= 2 * d)",
     "clipped fraction with the wrong threshold"),
    ("_factored.py", "_clipping.clip_to_rms(u, r, clipping_threshold) for u, r",
     "_clipping.clip_to_rms(u, r, 2 * clipping_threshold) for u, r",
     "fused clipping at the wrong threshold"),
    ("_factored.py", "u_of, blocks, *_grouping", "u_of, [()] * len(blocks), *_grouping",
     "fused clipping drops the blocks"),
    ("_step_size.py", "lambda p: p, blocks, *_grouping",
     "lambda p: p, [()] * len(blocks), *_grouping", "parameter scale drops the blocks"),
    ("_factoring.py", "return min(second, first), max(second, first)",
     "return second, first", "factored axes out of order"),
]


class _Mutator(ast.NodeTransformer):
  """Yields, for each mutable node in file order, the module with that one node changed."""

  SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
          ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
          ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Pow: ast.Mult}

  def __init__(self, target):
    self.target, self.count, self.what = target, 0, None

  def _hit(self, what):
    self.count += 1
    if self.count - 1 == self.target:
      self.what = what
      return True
    return False

  def visit_BinOp(self, node):
    self.generic_visit(node)
    if type(node.op) in self.SWAP and self._hit(
        f"line {node.lineno}: {type(node.op).__name__} -> {self.SWAP[type(node.op)].__name__}"):
      node.op = self.SWAP[type(node.op)]()
    return node

  def visit_Compare(self, node):
    self.generic_visit(node)
    op = node.ops[0]
    if type(op) in self.SWAP and self._hit(
        f"line {node.lineno}: {type(op).__name__} -> {self.SWAP[type(op)].__name__}"):
      node.ops[0] = self.SWAP[type(op)]()
    return node

  def visit_Constant(self, node):
    v = node.value
    if isinstance(v, bool):
      if self._hit(f"line {node.lineno}: {v} -> {not v}"):
        node.value = not v
    elif isinstance(v, (int, float)):
      new = v + 1 if isinstance(v, int) else v * 2
      if self._hit(f"line {node.lineno}: {v!r} -> {new!r}"):
        node.value = new
    return node

  def visit_Call(self, node):
    self.generic_visit(node)
    for i, kw in enumerate(node.keywords):
      if kw.arg is not None and self._hit(f"line {node.lineno}: drop {kw.arg}= in a call"):
        del node.keywords[i]
        break
    return node

  def visit_Expr(self, node):  # docstrings are not code
    if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
      return node
    return self.generic_visit(node)


def generated(module: str):
  """All mechanical mutants of `module`: (description, mutated source)."""
  source = (PACKAGE / module).read_text()
  out, target = [], 0
  while True:
    tree = ast.parse(source)
    m = _Mutator(target)
    tree = m.visit(tree)
    if m.what is None:
      return out
    out.append((m.what, ast.unparse(tree)))
    target += 1


def mutants(only: str, stride: int):
  found = []
  if only in ("all", "named"):
    for module, old, new, what in NAMED:
      source = (PACKAGE / module).read_text()
      assert source.count(old) == 1, (module, old)
      found.append(("named", module, what, source.replace(old, new)))
  if only in ("all", "sample"):
    for module in sorted(TESTS):
      for i, (what, text) in enumerate(generated(module)):
        if i % stride == stride // 2:
          found.append(("sample", module, what, text))
  return found


def run_one(module, text, timeout):
  with tempfile.TemporaryDirectory(prefix="mutant_") as tmp:
    tmp = pathlib.Path(tmp)
    shutil.copytree(PACKAGE, tmp / "adafactor_optax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", tmp / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    (tmp / "adafactor_optax" / module).write_text(text)
    env = dict(os.environ, PYTHONPATH=str(tmp), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-p", "no:randomly", *TESTS[module]]
    t0 = time.time()
    try:
      r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return "timeout", time.time() - t0, ""
    last = (r.stdout.strip().splitlines() or [""])[-1]
    failed = [line.removeprefix("FAILED ").split(" - ")[0] for line in r.stdout.splitlines()
              if line.startswith("FAILED")]
    return ("survived" if r.returncode == 0 else "killed"), time.time() - t0, (
        failed[0] if failed else last)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", choices=("all", "named", "sample"), default="all")
  p.add_argument("--stride", type=int, default=12, help="every n-th generated mutant")
  p.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
  p.add_argument("--ids", help="comma-separated mutant numbers to run (as --list numbers them)")
  p.add_argument("--list", action="store_true")
  p.add_argument("--out", help="also write the table to this file")
  a = p.parse_args(argv)
  found = list(enumerate(mutants(a.only, a.stride), 1))
  if a.list:
    for i, (kind, module, what, _) in found:
      print(f"{i:3d} {kind:6s} {module:16s} {what}")
    return
  if a.ids:
    ids = {int(i) for i in a.ids.split(",")}
    found = [(i, m) for i, m in found if i in ids]
  command = " ".join(["python tools/mutation.py", *(sys.argv[1:] if argv is None else argv)])
  lines = [f"Made by `{command}`.", "",
           "| # | kind | module | mutant | tests run | result | first failing test | s |",
           "|---|---|---|---|---|---|---|---|"]
  for i, (kind, module, what, text) in found:
    result, seconds, detail = run_one(module, text, a.timeout)
    tests = ", ".join(t.removeprefix("tests/") for t in TESTS[module])
    lines.append(f"| {i} | {kind} | {module} | {what} | {tests} | **{result}** | "
                 f"{detail if result == 'killed' else ''} | {seconds:.0f} |")
    print(lines[-1], flush=True)
    if a.out:
      pathlib.Path(a.out).write_text("\n".join(lines) + "\n")
  killed = sum("**killed**" in line for line in lines)
  lines += ["", f"{killed} of {len(found)} killed."]
  print(lines[-1])
  if a.out:
    pathlib.Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
