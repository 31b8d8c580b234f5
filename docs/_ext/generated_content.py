"""Content rendered at build time from the code, so that the docs cannot drift from it.

* ``.. method-table::`` — the names of the methods (registry name, sqpoptim class, paper label) from
  :mod:`problems.methods`; public sqpoptim class names become cross-references to their API entries.
* ``.. problem-table::`` — the registered problems (name, class, first line of its docstring) from
  :mod:`problems`.
* ``.. command-help:: run`` — the ``--help`` text of ``python -m problems [run|plot|list]``
  (:mod:`problems.cli`); no argument: the top-level help.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

_IDENT = re.compile(r"(layers\.)?[A-Z][A-Za-z]+")


def _implementation_cell(text: str) -> str:
    """``ProjectedAdamSQP(projection='scaled')`` -> a class reference followed by its arguments as code; other
    text (``+ AdamUnc``, ``penalty on the outputs``) stays prose."""
    import sqpoptim
    from sqpoptim import layers

    parts: list[str] = []
    pos = 0

    def text_until(end: int) -> None:
        segment = text[pos:end]
        if not segment:
            return
        if segment.startswith("("):  # the arguments of the class before it
            parts.append(rf"\ ``{segment}``")
        else:
            parts.append(re.sub(r"([*`|_\\])", r"\\\1", segment))

    for match in _IDENT.finditer(text):
        name = match.group(0)
        module, _, attr = name.rpartition(".")
        if attr not in (layers if module else sqpoptim).__all__:
            continue
        text_until(match.start())
        parts.append(f":class:`{name} <sqpoptim.{name}>`")
        pos = match.end()
    text_until(len(text))
    return "".join(parts)


class MethodTable(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        from problems.methods import METHODS

        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 22 48 30",
            "",
            "   * - registry name",
            "     - sqpoptim class",
            "     - paper label",
        ]
        for method in METHODS.values():
            lines += [
                f"   * - ``{method.name}``",
                f"     - {_implementation_cell(method.implementation)}",
                f"     - {method.label}",
            ]
        return _parse(self, lines, "problems.methods.METHODS")


class ProblemTable(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        import problems

        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 25 35 40",
            "",
            "   * - name",
            "     - class",
            "     - what it is",
        ]
        for name in problems.problem_names():
            cls = problems.problem_class(name)
            summary = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            lines += [
                f"   * - ``{name}``",
                f"     - ``{cls.__module__}.{cls.__qualname__}``",
                f"     - {summary}",
            ]
        return _parse(self, lines, "problems.problem_names()")


class CommandHelp(SphinxDirective):
    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        from problems.cli import main

        argv = [*self.arguments, "--help"]
        out = io.StringIO()
        previous = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width
        try:
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                main(argv)
        finally:
            if previous is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = previous
        text = out.getvalue().rstrip()
        if not text:
            raise self.error(f"python -m problems {' '.join(argv)} printed nothing")
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def _parse(directive: SphinxDirective, lines: list[str], source: str) -> list[nodes.Node]:
    container = nodes.container()
    directive.state.nested_parse(StringList(lines, source=source), directive.content_offset, container)
    return container.children


def setup(app: Sphinx) -> dict[str, bool]:
    app.add_directive("method-table", MethodTable)
    app.add_directive("problem-table", ProblemTable)
    app.add_directive("command-help", CommandHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
