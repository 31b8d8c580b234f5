"""Typed method options: parsed from ``name:key=value`` text, checked against a signature, frozen.

A method's options are a frozen dataclass. For an optimizer the dataclass is built from its constructor's
signature (names, type hints, defaults), so every keyword the optimizer takes is an option and nothing else is;
an output-layer method declares its own dataclass and adds the layer's constructor keywords. Parsing checks
three things before any run starts, each with an error that names the method:

1. the names: an unknown key is refused with the close matches (``nromal_lr`` -> ``normal_lr``);
2. the types: a value must fit the parameter's type hint (``int`` is accepted for ``float``; ``"float64"`` for a
   ``torch.dtype``);
3. the values: the optimizer (or layer) is constructed once on a throw-away parameter, so its own checks
   (a negative ``rho``, ``betas`` outside [0, 1)) run at parse time.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = ["coerce", "options_dataclass", "parse_value", "signature_options", "unknown_option_error"]


def parse_value(text: str) -> Any:
    """A command-line option value: ``true``/``false``, ``none``, an int, a float, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _hint_text(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` describes, or a ``ValueError`` naming ``where`` (e.g. ``"sqp-adam: eps"``).

    Handles the hints optimizer and layer signatures use: ``bool``, ``int``, ``float`` (an int is converted),
    ``str``, ``None``, unions, ``Literal``, fixed-length ``tuple``, ``torch.dtype`` (also from its name) and
    ``type[...]``; anything else is accepted as it is (the construction check still runs).
    """
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return coerce(value, arm, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} is not a {_hint_text(hint)}")
    if hint is None or hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{where}: {value!r} is not None")
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ValueError(f"{where}: {value!r} is not one of {typing.get_args(hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: {value!r} is not a bool (true or false)")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: {value!r} is not an int")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: {value!r} is not a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: {value!r} is not a string")
    if hint is torch.dtype:
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
        if isinstance(value, torch.dtype):
            return value
        raise ValueError(f"{where}: {value!r} is not a torch dtype (e.g. float64)")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{where}: {value!r} is not a {_hint_text(hint)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{where}: {value!r} does not have {len(args)} entries")
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if origin is type:
        (base,) = typing.get_args(hint) or (object,)
        if isinstance(value, type) and (not isinstance(base, type) or issubclass(value, base)):
            return value
        raise ValueError(f"{where}: {value!r} is not a subclass of {_hint_text(base)}")
    return value


def signature_options(fn: Callable[..., Any], skip: Iterable[str] = ()) -> tuple[list[tuple[str, Any, Any]], bool]:
    """``([(name, type hint, default), ...], takes_kwargs)`` of ``fn``'s keyword parameters, less ``skip``."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation that does not resolve: check names and values only
        hints = {}
    skip = set(skip)
    fields, takes_kwargs = [], False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            takes_kwargs = True
            continue
        if p.kind is p.VAR_POSITIONAL or p.name in skip or p.default is p.empty:
            continue
        fields.append((p.name, hints.get(p.name, Any), p.default))
    return fields, takes_kwargs


def options_dataclass(qualname: str, fields: list[tuple[str, Any, Any]]) -> type:
    """A frozen dataclass with the given ``(name, hint, default)`` fields (mutable defaults copied per field)."""
    spec = []
    for name, hint, default in fields:
        if isinstance(default, (list, dict, set)):
            field = dataclasses.field(default_factory=lambda d=default: type(d)(d))
        else:
            field = dataclasses.field(default=default)
        spec.append((name, hint, field))
    return dataclasses.make_dataclass(qualname, spec, frozen=True)


def unknown_option_error(method: str, key: str, known: Iterable[str], hint: str = "") -> ValueError:
    known = sorted(known)
    close = [] if hint else difflib.get_close_matches(key, known, n=2)
    suggestion = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    listing = ", ".join(known) if known else "none"
    extra = f"; {hint}" if hint else ""
    return ValueError(f"method {method!r} has no option {key!r}{suggestion}{extra}; its options: {listing}")


def check_keys(method: str, given: Mapping[str, Any], known: Iterable[str], hints: Mapping[str, str]) -> None:
    """Refuse the first key of ``given`` that is not in ``known`` (with ``hints[key]`` where there is one)."""
    known = set(known)
    for key in given:
        if key not in known:
            raise unknown_option_error(method, key, known, hints.get(key, ""))
