"""The import graph of a package, read from its source (for the layout tests of ``sqpoptim`` and ``problems``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

# what docstrings and comments must not speak of: working notes rather than the code and the papers
NOTES = re.compile(r"shared/|spec [A-Z][0-9]|[Ii]ssue [0-9]")


def module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``path`` imports by name at module level (function-level imports are lazy by
    design): ``from .x import y`` is ``x``, or ``x.y`` where that is a module."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        modules = [c for c in candidates[1:] if c in known]  # names that are submodules
        found.update(modules if modules else [candidates[0]] if candidates[0] in known else [])
    return found - {name}


def import_graph(root: Path) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    known = {module_name(root, p) for p in paths}
    return {module_name(root, p): imports(root, p, known) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of ``graph`` as a path that returns to its start, or ``None``."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle:
            return cycle
    return None


def notes_in(root: Path) -> list[str]:
    """``file:line`` of every line under ``root`` that speaks of working notes (:data:`NOTES`)."""
    return [
        f"{p}:{i}"
        for p in sorted(root.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if NOTES.search(line)
    ]
