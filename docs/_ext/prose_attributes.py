"""Napoleon for functions, classes and modules only: attribute and property docstrings here are prose.

Napoleon reads an attribute docstring as Google-style ``type: description`` and turns everything before the first
colon into a type (``"The active tolerance: ..."`` would become a type named "The active tolerance"). The
docstrings of this project never use that form, so they reach Sphinx unchanged.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from sphinx.ext import napoleon

_PROSE = {"attribute", "data", "property"}


def _process_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if what not in _PROSE:
        napoleon._process_docstring(app, what, name, obj, options, lines)


def setup(app: Sphinx) -> dict[str, bool]:
    app.setup_extension("sphinx.ext.napoleon")
    for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)
    app.connect("autodoc-process-docstring", _process_docstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
