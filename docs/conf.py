"""Sphinx configuration: the API reference and the math are rendered from the docstrings (reStructuredText with
``.. math::`` blocks, ``:class:`` cross-references and Google-style ``Args:`` sections, read by napoleon).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (warnings are errors; no network needed:
MathJax is loaded by the reader's browser, and no inventory of other projects is fetched).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's sqpoptim and problems, also without an install
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

import sqpoptim  # noqa: E402

project = "sqpoptim"
author = "sqpoptim developers"
copyright = "sqpoptim developers"
release = version = sqpoptim.__version__

extensions = [
    "sphinx.ext.autodoc",
    "prose_attributes",  # loads sphinx.ext.napoleon
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "generated_content",
    "project_refs",
    "evaluated_signatures",
]

exclude_patterns = ["_build", "examples"]
root_doc = "index"
html_theme = "alabaster"
html_theme_options = {"description": "Hard-constrained training of neural networks", "fixed_sidebar": True}
html_static_path: list[str] = []
templates_path: list[str] = []

# autodoc: members in source order, type hints in the signature, no members inherited from torch (their
# docstrings are torch's, documented there).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# The docstrings write absolute values in plain text, "max |c|"; to reStructuredText |c| is a substitution.
rst_prolog = "\n".join(rf".. |{name}| replace:: \|{name}\|" for name in ("c", "c_i", "h", "y₂", "dynamics"))

# Every cross-reference into this project must resolve (nitpicky). Names from other projects are not linked:
# fetching their inventories (intersphinx) would need the network, which the docs build must not.
nitpicky = True
_EXTERNAL = ("torch", "numpy", "matplotlib", "collections", "pathlib", "abc")
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..*)?"),
    (r"py:.*", r"(Tensor|Module|Optimizer)"),  # as torch's own docstrings write them
    (r"py:class", r"(sqpoptim|problems)\..*\._[A-Za-z]\w*"),  # private helpers (type variables, private bases)
]
