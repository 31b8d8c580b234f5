"""The methods the runner trains with: one registry, one name per method.

A method spec on the command line is ``name`` or ``name:key=value:key=value`` (values parsed as numbers,
booleans, ``none`` or strings), e.g. ``penalty:rho=1e4`` or ``sqp-adam:normal_damping=0.1``.
:func:`resolve_method` parses a spec into its :class:`~problems.methods.method.Method` and typed, validated
options (:mod:`problems.methods.options`); the runner checks every spec of a sweep this way before the first
run starts.

The names. Each method has one registry name (the command line's, the results files'), one paper label (the
tables' and the figures') and the sqpoptim class that does the work:

========================  ==========================================================  ==================================
registry name             sqpoptim class                                              paper label
========================  ==========================================================  ==================================
sqp-adam                  ProjectedAdamSQP                                            SQP-Adam(con)
sqp-adam-scaled           ProjectedAdamSQP(projection='scaled')                       SQP-Adam(con), scaled
sqp-adam-standard         ProjectedAdamSQP(bias_correction='standard')                SQP-Adam(con), standard BC
sqp-adam-scaled-standard  ProjectedAdamSQP(projection='scaled', bias_correction=...)  SQP-Adam(con), scaled, standard BC
sqp-hb                    ProjectedHeavyBallSQP                                       SQP-Heavyball(con)
sqp                       StochasticSQP                                               SQP(con)
sqp-adaptive              StochasticSQP(step_rule='adaptive')                         SQP(con), adaptive
adam-unc                  AdamUnc                                                     Adam(unc)
adam-con                  ConstrainedAdam                                             Adam(con)
penalty                   PenaltyAdam                                                 Penalty
primal-dual               PrimalDual                                                  Primal-dual
hardnet                   layers.HardNetAffine + AdamUnc                              Layer: HardNet
enforce                   layers.EnforceProjection + AdamUnc                          Layer: ENFORCE
hardnet-pp                layers.HardNetPP + AdamUnc                                  Layer: HardNet++
kkt-hardnet               layers.KKTHardNet + AdamUnc                                 Layer: KKT-Hardnet
soft                      AdamUnc + penalty on the outputs                            Soft constraint
========================  ==========================================================  ==================================

:func:`method_table` renders the same table from the registry (as Markdown); a test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .layers import LAYER_METHODS
from .method import Method, Training
from .optimizers import OPTIMIZER_METHODS
from .options import parse_value

__all__ = ["METHODS", "Method", "Training", "method_table", "parse_method", "resolve_method"]

METHODS: Mapping[str, Method] = {m.name: m for m in (*OPTIMIZER_METHODS, *LAYER_METHODS)}
"""Registry name -> method, in the order of the table above."""


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"penalty:rho=1e4"`` -> ``("penalty", {"rho": 10000.0})``: the name must be registered; the options are
    parsed as text only (:func:`resolve_method` types and validates them)."""
    name, *opts = spec.split(":")
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; known methods: {', '.join(METHODS)}")
    options: dict[str, Any] = {}
    for opt in opts:
        key, sep, val = opt.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid method option {opt!r} in {spec!r} (expected key=value)")
        if key in options:
            raise ValueError(f"Method option {key!r} given twice in {spec!r}")
        options[key] = parse_value(val)
    return name, options


def resolve_method(spec: str, lr: float = 1e-3) -> tuple[Method, Any]:
    """The method of ``spec`` and its typed options, validated for learning rate ``lr``."""
    name, options = parse_method(spec)
    method = METHODS[name]
    return method, method.parse_options(options, lr=lr)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 4] + "...)"


def method_table(fmt: str = "markdown") -> str:
    """The table of names (registry name, sqpoptim class, paper label), as ``"markdown"`` or ``"rst"`` (the
    module docstring's layout)."""
    rows = [(m.name, m.implementation, m.label) for m in METHODS.values()]
    if fmt == "markdown":
        lines = ["| registry name | sqpoptim class | paper label |", "|---|---|---|"]
        return "\n".join([*lines, *(f"| `{a}` | `{b}` | {c} |" for a, b, c in rows)])
    if fmt != "rst":
        raise ValueError(f"Invalid format {fmt!r}: expected 'markdown' or 'rst'")
    widths = (24, 58, 34)
    rule = "  ".join("=" * w for w in widths)
    head = "  ".join(h.ljust(w) for h, w in zip(("registry name", "sqpoptim class", "paper label"), widths))
    body = ["  ".join(_shorten(c, w).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([rule, head.rstrip(), rule, *body, rule])
