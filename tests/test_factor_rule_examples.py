"""Every `factor_rule=` example in the README, the docs and the notebooks, run.

Each example is found by the text ``factor_rule=`` in fenced code, inline code
and notebook cells; the call it is an argument of is cut out by its
parentheses, and its factoring arguments (``factor_rule``,
``min_dim_size_to_factor``, ``factored``) are evaluated and given to
`adafactor`. (Other arguments, such as a peer's ``lr``, name values the
snippet leaves to the reader and do not change the state's size.) A rule
given by name is looked up among the definitions of the same code block.

On a scanned decoder (shapes only, nothing allocated) each example's whole
state must stay under 0.01x the parameter bytes: the sublinear memory that
is the point of Adafactor (a whole second moment is 1x). An example that
keeps more on purpose says so on its own line or the line before, with the
words "whole second moment", and is exempt.
"""

import ast
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_optax as ao

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ["README.md", "docs/*.md", "notebooks/*.ipynb", "docs/notebooks/*.ipynb"]
FACTORING_ARGS = ("factor_rule", "min_dim_size_to_factor", "factored")
EXEMPT = "whole second moment"
MAX_STATE_FRACTION = 0.01


def scanned_decoder(layers=12, d=512, f=2048, vocab=32_000, dtype=jnp.float32):
  """The issue's model: a decoder scanned over `layers`, untied embedding and output.

  12 x (4 d^2 + 2 d f) + 2 vocab d = 70.5M float32 parameters, 269 MiB.
  """
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  return {
      "embed": s(vocab, d),
      "layers": {
          "attn": {"q": s(layers, d, d), "k": s(layers, d, d), "v": s(layers, d, d),
                   "o": s(layers, d, d)},
          "mlp": {"wi": s(layers, d, f), "wo": s(layers, f, d)},
          "norm_attn": s(layers, d),
          "norm_mlp": s(layers, d),
      },
      "final_norm": s(d),
      "out": s(d, vocab),
  }


def nbytes(tree):
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(tx, params):
  return nbytes(jax.eval_shape(tx.init, params))


# ---------------------------------------------------------------- extraction


def _snippets(path):
  """(code, the source line before it) of every code span in a markdown file or notebook.

  For inline code the line "before" is its own line and the one above, so that
  prose beside an example counts as said on its line.
  """
  if path.suffix == ".ipynb":
    for cell in json.loads(path.read_text())["cells"]:
      text = "".join(cell["source"])
      if cell["cell_type"] == "code":
        yield text, ""
      else:
        yield from _markdown_snippets(text)
  else:
    yield from _markdown_snippets(path.read_text())


def _markdown_snippets(text):
  lines = text.splitlines()
  fence, block, before = None, [], ""
  for i, line in enumerate(lines):
    stripped = line.lstrip()
    opening = re.match(r"(`{3,}|~{3,})", stripped)
    if fence is None and opening:
      fence, block, before = opening.group(1), [], lines[i - 1] if i else ""
    elif fence is not None and stripped.startswith(fence):
      yield "\n".join(block), before
      fence = None
    elif fence is not None:
      block.append(line)
    else:
      for span in re.findall(r"(`+)(.+?)\1", line):
        yield span[1], "\n".join(lines[max(i - 1, 0):i + 1])


def _is_exempt(code, line, before):
  """Whether the example on `code`'s line `line` says, there or just above, why it
  keeps a whole second moment."""
  lines = code.splitlines()
  above = lines[line - 1] if line else before
  return EXEMPT in lines[line] or EXEMPT in above


def _enclosing_call(code, at):
  """The text of the call whose argument list holds position `at`, or None."""
  depth, i = 0, at
  while i > 0:
    i -= 1
    if code[i] in ")]}":
      depth += 1
    elif code[i] in "([{":
      if depth == 0:
        break
      depth -= 1
  else:
    return None
  start = i
  while start > 0 and (code[start - 1].isidentifier() or code[start - 1] in "._"
                       or code[start - 1].isdigit()):
    start -= 1
  depth, j, quote = 0, i, None
  while j < len(code):
    c = code[j]
    if quote:
      quote = None if c == quote else quote
    elif c in "'\"":
      quote = c
    elif c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
      if depth == 0:
        return code[start:j + 1]
    j += 1
  return None


def _definitions(code):
  """Top-level imports, defs and assignments of a code block, by the names they bind."""
  try:
    tree = ast.parse(code)
  except SyntaxError:
    return {}
  out = {}
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom, ast.Assign)):
      if isinstance(node, ast.FunctionDef):
        names = [node.name]
      elif isinstance(node, ast.Assign):
        names = [t.id for t in node.targets if isinstance(t, ast.Name)]
      else:
        names = [(a.asname or a.name).split(".")[0] for a in node.names]
      for name in names:
        out[name] = ast.unparse(node)
  return out


def find_examples():
  """Every `factor_rule=` example: (where, call text, its factoring arguments' source,
  the definitions of its block, exempt)."""
  examples = []
  for pattern in SOURCES:
    for path in sorted(ROOT.glob(pattern)):
      for code, before in _snippets(path):
        for match in re.finditer(r"\bfactor_rule\s*=(?!=)", code):
          if not code[match.end():].strip():  # "`factor_rule=`": the name, not an example
            continue
          line = code.count("\n", 0, match.start())
          where = f"{path.relative_to(ROOT)}: {code.splitlines()[line].strip()[:80]}"
          call = _enclosing_call(code, match.start())
          assert call is not None, f"{where}: no call around factor_rule="
          node = ast.parse(call, mode="eval").body
          assert isinstance(node, ast.Call), where
          kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg in FACTORING_ARGS}
          exempt = _is_exempt(code, line, before)
          examples.append((where, call, kwargs, _definitions(code), exempt))
  return examples


def build(kwargs, definitions):
  """`adafactor` with an example's factoring arguments, evaluated in its block's namespace."""
  namespace = {"ao": ao, "jax": jax, "jnp": jnp, "np": np, "optax": optax}
  for source in kwargs.values():
    for name in {n.id for n in ast.walk(ast.parse(source, mode="eval"))
                 if isinstance(n, ast.Name)}:
      if name not in namespace and name in definitions:
        exec(definitions[name], namespace)  # noqa: S102 - the docs' own code
  return ao.adafactor(**{k: eval(v, namespace) for k, v in kwargs.items()})


EXAMPLES = find_examples()


# ---------------------------------------------------------------- the tests


def test_the_scanned_decoder_is_the_issues_model():
  """269 MiB of float32 parameters; the default rule keeps 0.72 MiB of state."""
  params = scanned_decoder()
  assert nbytes(params) / 2**20 == pytest.approx(269.0, abs=0.5)
  # Default rule, counted by hand: embed and out 32000 + 512 floats each; per layer
  # 4 x (512 + 512) + 2 x (512 + 2048) floats; two (12, 512) norms and one (512,)
  # kept whole; 4 bytes each, plus two int32 counts.
  floats = 2 * (32_000 + 512) + 12 * (4 * 1024 + 2 * 2560) + 2 * 12 * 512 + 512
  assert state_bytes(ao.adafactor(), params) == 4 * floats + 8
  assert 4 * floats / 2**20 == pytest.approx(0.72, abs=0.005)


def test_examples_are_found():
  """The usage page's scanned-stack recipes at least; an extraction that finds nothing
  would pass everything below."""
  assert sum(w.startswith("docs/usage.md") for w, *_ in EXAMPLES) >= 2, EXAMPLES
  assert any("stack" in call or "batch" in call for _, call, *_ in EXAMPLES), EXAMPLES


@pytest.mark.parametrize("where,call,kwargs,definitions,exempt", EXAMPLES,
                         ids=[e[0] for e in EXAMPLES])
def test_example_keeps_the_state_sublinear(where, call, kwargs, definitions, exempt):
  params = scanned_decoder()
  tx = build(kwargs, definitions)
  fraction = state_bytes(tx, params) / nbytes(params)
  if exempt:
    pytest.skip(f"{where}: says why it keeps a {EXEMPT} ({fraction:.2f}x)")
  assert fraction < MAX_STATE_FRACTION, (
      f"{where}: {call} keeps {fraction:.3f}x the parameter bytes of state on a scanned "
      f"decoder\n{ao.factoring_report(params, tx)}")


def test_the_check_catches_the_old_recipe():
  """The recipe the README had, `else None`, keeps the embedding and the output projection
  whole: 0.47x the parameters (125.5 MiB, 175x the default's state); its fix with
  DEFAULT_FACTORING, and `stacked_layers`, keep the default's state to the byte."""
  params = scanned_decoder()
  old = ao.adafactor(factor_rule=lambda path, shape: (
      ao.FactorSpec(-2, -1, batch=(0,)) if len(shape) == 3 else None))
  default = state_bytes(ao.adafactor(), params)
  # Embed and out kept whole: 2 x (32000 x 512 - (32000 + 512)) floats more.
  assert state_bytes(old, params) - default == 2 * (32_000 * 512 - 32_512) * 4
  assert state_bytes(old, params) / 2**20 == pytest.approx(125.5, abs=0.05)
  assert state_bytes(old, params) / default == pytest.approx(175, abs=1)
  fixed = ao.adafactor(factor_rule=lambda path, shape: (
      ao.FactorSpec(-2, -1, batch=(0,)) if len(shape) == 3 else ao.DEFAULT_FACTORING))
  assert state_bytes(fixed, params) == default
  assert state_bytes(ao.adafactor(factor_rule=ao.stacked_layers()), params) == default


def test_extraction_reads_fences_inline_code_and_named_rules():
  text = """\
Some prose with `ao.adafactor(factor_rule=ao.stacked_layers())` inline.
The argument `factor_rule=` by name only.
```python
import adafactor_optax as ao
def rule(path, shape):
  return None  # keeps the whole second moment, on purpose
tx = ao.adafactor(
    factor_rule=rule,
    learning_rate=lr)
```
A whole second moment for every parameter, the cost of Adam:
```python
tx = ao.adafactor(factor_rule=lambda path, shape: None)
```
"""
  found = []
  for code, before in _markdown_snippets(text):
    for m in re.finditer(r"\bfactor_rule\s*=(?!=)", code):
      if code[m.end():].strip():
        line = code.count("\n", 0, m.start())
        found.append((_enclosing_call(code, m.start()), _definitions(code),
                      _is_exempt(code, line, before)))
  assert [call for call, *_ in found] == [
      "ao.adafactor(factor_rule=ao.stacked_layers())",
      "ao.adafactor(\n    factor_rule=rule,\n    learning_rate=lr)",
      "ao.adafactor(factor_rule=lambda path, shape: None)"]
  assert [exempt for *_, exempt in found] == [False, False, True]
  tx = build({"factor_rule": "rule"}, found[1][1])
  assert state_bytes(tx, scanned_decoder()) / nbytes(scanned_decoder()) > 0.99
