"""Cross-references into this project, and a check that the public API is documented.

* A full name that is not where the object is documented (``problems.runner.loop.run``, documented as
  ``problems.runner.run``) resolves to the documented entry of the same object.
* A short name in a docstring that does not resolve where it is written is looked up, first as a member of the
  enclosing class's bases (``:meth:`diagnostics``` in an optimizer that inherits it), then by suffix among this
  project's documented objects, as Sphinx does for ``.name`` targets (``:class:`Problem``` in
  :mod:`problems.core`). An ambiguous name stays an error.
* Every name in the ``__all__`` of the public namespaces must have an entry in the API reference.
"""

from __future__ import annotations

import importlib
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

logger = logging.getLogger(__name__)

PROJECT_PREFIXES = ("sqpoptim.", "problems.")
PUBLIC_NAMESPACES = ("sqpoptim", "sqpoptim.layers", "problems", "problems.core", "problems.methods", "problems.runner")


def _resolve_short_name(
    app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element
) -> nodes.Element | None:
    if node.get("refdomain") != "py" or node.get("refspecific"):
        return None
    if not f"{node.get('py:module') or ''}.".startswith(PROJECT_PREFIXES):
        return None  # only docstrings of this project
    domain = env.domains["py"]
    documented = _documented_name_of(env, _import(node["reftarget"]))
    if documented is not None:
        retry = node.deepcopy()
        retry["reftarget"] = documented
        found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], documented, retry, contnode)
        if found is not None:
            return found
    for base in _bases(node.get("py:module"), node.get("py:class")):
        for owner in _documented_names(base):
            qualified = f"{owner}.{node['reftarget']}"
            if qualified not in domain.objects:
                continue
            retry = node.deepcopy()
            retry["reftarget"] = qualified
            found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], qualified, retry, contnode)
            if found is not None:
                return found
    retry = node.deepcopy()
    retry["refspecific"] = True
    found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], node["reftarget"], retry, contnode)
    if found is None or not str(found.get("reftitle", "")).startswith(PROJECT_PREFIXES):
        return None
    return found


_MISSING = object()


def _import(path: str) -> Any:
    """The object at a dotted path (a module, then attributes), or ``_MISSING``."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return _MISSING
        return obj
    return _MISSING


_BY_IDENTITY: dict[int, dict[int, str]] = {}


def _documented_name_of(env: BuildEnvironment, obj: Any) -> str | None:
    """The name under which ``obj`` is documented (functions and classes of this project only)."""
    if obj is _MISSING or not callable(obj):
        return None
    index = _BY_IDENTITY.get(id(env))
    if index is None:
        index = {}
        for name, entry in env.domains["py"].objects.items():
            if entry.aliased or not name.startswith(PROJECT_PREFIXES):
                continue
            target = _import(name)
            if target is not _MISSING and callable(target):
                index.setdefault(id(target), name)
        _BY_IDENTITY.clear()
        _BY_IDENTITY[id(env)] = index
    return index.get(id(obj))


def _bases(module: str | None, cls: str | None) -> list[type]:
    """The classes of the method resolution order of ``module.cls`` (none outside a class)."""
    if not module or not cls:
        return []
    try:
        obj: Any = importlib.import_module(module)
        for part in cls.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return []
    return list(obj.__mro__) if isinstance(obj, type) else []


def _documented_names(cls: type) -> list[str]:
    """The names a class may be documented under: its home module's, or a public namespace's that exports it."""
    names = [f"{cls.__module__}.{cls.__qualname__}"]
    for namespace in PUBLIC_NAMESPACES:
        module = importlib.import_module(namespace)
        if getattr(module, cls.__name__, None) is cls:
            names.append(f"{namespace}.{cls.__name__}")
    return names


def _check_public_api(app: Sphinx, env: BuildEnvironment) -> None:
    documented = set(env.domains["py"].objects) | set(env.domains["py"].modules)
    modules = [importlib.import_module(namespace) for namespace in PUBLIC_NAMESPACES]
    for module in modules:
        for name in module.__all__:
            obj: Any = getattr(module, name)
            # where it may be documented: any public namespace that exports the same object, or its home module
            names = {f"{m.__name__}.{name}" for m in modules if name in m.__all__ and getattr(m, name) is obj}
            if hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
                names.add(f"{obj.__module__}.{obj.__qualname__}")
            if hasattr(obj, "__spec__") and hasattr(obj, "__name__"):  # a submodule
                names.add(obj.__name__)
            # a type alias or constant re-exported by a package is documented in the package's module that defines it
            defined_below = any(d.startswith(f"{module.__name__}.") and d.endswith(f".{name}") for d in documented)
            if not names & documented and not defined_below:
                logger.warning(
                    "public name %s.%s has no entry in the API reference", module.__name__, name, type="public-api"
                )


def setup(app: Sphinx) -> dict[str, bool]:
    app.connect("missing-reference", _resolve_short_name)
    app.connect("env-check-consistency", _check_public_api)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
