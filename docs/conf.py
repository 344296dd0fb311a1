"""Sphinx configuration of the adafactor_optax documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (the `docs`
extra). Warnings are errors: a broken cross-reference, a malformed docstring or
a public name missing from the API page fails the build. The notebooks
(``docs/notebooks`` links to ``notebooks/``) are rendered from their committed
outputs, never executed here.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not

import adafactor_optax  # noqa: E402

project = "adafactor_optax"
author = "adafactor_optax developers"
copyright = "the adafactor_optax developers"  # noqa: A001
release = adafactor_optax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "README.md"]
html_theme = "furo"
html_title = f"adafactor_optax {release}"

# MyST: $...$ and $$...$$ math, and (label)= anchors for headings.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # rendered from the committed outputs

# API reference from the docstrings (Google style).
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `name` in a docstring is a cross-reference when it names something documented.
default_role = "py:obj"

# Every reference must resolve, except to the libraries documented elsewhere (no
# network at build time, so no intersphinx) and bare lowercase words in backquotes,
# which the docstrings use for argument names.
nitpicky = True
_EXTERNAL = r"(jax|jaxlib|optax|chex|numpy|np|jnp|flax|nnx|orbax|ocp|typing|collections|abc)"
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL + r"(\..*)?"),
    (r"py:.*", r"(int|float|str|bool|tuple|list|dict|None|Any|Callable|Sequence|NamedTuple)"),
    # optax's type aliases and jax's sharding classes, as the signatures and docstrings name them.
    (r"py:.*", r"(ArrayTree|Params|Updates|OptState|PartitionSpec|NamedSharding|AbstractMesh|Mesh)"),
    (r"py:obj", r"[a-z_][a-z0-9_]*"),
    # The one-member enum behind DEFAULT_FACTORING (private: users name the constant).
    (r"py:class", r"adafactor_optax\._factoring\._Default"),
]


def _check_api_page(app):
  """Every name in `adafactor_optax.__all__` is on the API page (a warning, so -W fails)."""
  from sphinx.util import logging

  text = (pathlib.Path(app.srcdir) / "api.md").read_text()
  listed = set(re.findall(r"^ +(\w+) *$", text, flags=re.M))
  for name in sorted(set(adafactor_optax.__all__) - listed):
    logging.getLogger(__name__).warning(f"api.md: public name {name!r} is not documented")


def setup(app):
  app.connect("builder-inited", _check_api_page)
