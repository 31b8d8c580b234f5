"""Signatures that parse: evaluated annotations, and dataclass default factories written as calls.

Under ``from __future__ import annotations`` a dataclass's generated ``__init__`` carries its annotations as
strings (``'tuple[float, float] | None'``), and a field with a default factory shows the default ``<factory>``,
which is not Python: Sphinx then cannot parse the signature and splits it at every comma. Here annotations are
evaluated in the defining module's namespace, a default factory is written as its call (``dict()``), and the
signature is written again; anything that cannot be evaluated is left as autodoc had it.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

from sphinx.application import Sphinx
from sphinx.util.inspect import stringify_signature


class _Call:
    """A default shown as the call of its factory."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def __repr__(self) -> str:
        return f"{getattr(self.factory, '__qualname__', 'factory')}()"


def _evaluated(what: str, obj: Any) -> inspect.Signature | None:
    target = obj.__init__ if what in ("class", "exception") else obj
    try:
        hints = typing.get_type_hints(target)
        sig = inspect.signature(target)
    except (NameError, TypeError, ValueError):
        return None
    factories = {}
    if what in ("class", "exception") and dataclasses.is_dataclass(obj):
        factories = {f.name: f.default_factory for f in dataclasses.fields(obj) if callable(f.default_factory)}
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation), default=_Call(factories[p.name]))
        if p.name in factories
        else p.replace(annotation=hints.get(p.name, p.annotation))
        for p in sig.parameters.values()
    ]
    if what in ("class", "exception"):
        params = params[1:]  # self
    return sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation))


def _process_signature(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: str | None, return_annotation: str | None
) -> tuple[str, str | None] | None:
    if not signature or ("'" not in signature and "<factory>" not in signature):
        return None
    if what not in ("class", "exception", "function", "method"):
        return None
    sig = _evaluated(what, obj)
    if sig is None:
        return None
    text = stringify_signature(sig, show_return_annotation=False)
    returns = None if sig.return_annotation is inspect.Signature.empty else return_annotation
    return text, returns


def setup(app: Sphinx) -> dict[str, bool]:
    app.connect("autodoc-process-signature", _process_signature)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
