"""Training methods the runner pairs with problems: name -> how to build the optimizer and the closure.

A method spec on the command line is ``name`` or ``name:key=value:key=value`` (values parsed as numbers,
booleans or strings), e.g. ``penalty:rho=1e4`` or ``sqp-adam:normal_lr=1``. Options go to the optimizer's
constructor. The optimizers' defaults apply: the paper's betas (0.9, 0.999) and eps 1e-7 inside the square root,
and the full Gauss–Newton normal step (``normal_lr=1``; ``sqp-adam:normal_lr=None`` is the authors' γ = α).
``normal_damping=0.1`` turns on the Levenberg–Marquardt normal step (see RESULTS.md on the layer tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import sqpoptim

from ._base import Batch, Problem

__all__ = ["METHODS", "Method", "parse_method", "register_method"]


def _default_closure(method: Method, problem: Problem, model: nn.Module, batch: Batch | None) -> Callable[[], Any]:
    if method.constrained:
        pointwise = getattr(problem, "pointwise_constraints", None) if method.pointwise_jacobian else None
        if pointwise is not None:  # per-point torch.func Jacobians (see sqpoptim.PointwiseConstraints)
            residual, points = pointwise()
            return lambda: (problem.objective(model, batch), sqpoptim.PointwiseConstraints(model, residual, points))
        return lambda: (problem.objective(model, batch), problem.constraints(model))

    def closure() -> tuple[Tensor, Tensor]:
        with torch.no_grad():  # logged only: no graph, no Jacobian
            c = problem.constraints(model)
        return problem.objective(model, batch), c

    return closure


def _penalty_closure(method: Method, problem: Problem, model: nn.Module, batch: Batch | None) -> Callable[[], Any]:
    # PenaltyAdam adds rho/2 ||c||^2 itself: c must carry its graph
    return lambda: (problem.objective(model, batch), problem.constraints(model))


@dataclass(frozen=True)
class Method:
    """How to train with one method. ``build(params, lr, options)`` returns the optimizer; ``closure`` builds
    the closure for one batch; ``prepare`` may wrap the model (output layers)."""

    label: str
    build: Callable[[Iterable[Tensor], float, dict[str, Any]], torch.optim.Optimizer]
    constrained: bool
    closure: Callable[[Method, Problem, nn.Module, Batch | None], Callable[[], Any]] = _default_closure
    prepare: Callable[[Problem, nn.Module, dict[str, Any]], nn.Module] = lambda problem, model, options: model
    defaults: Mapping[str, Any] = field(default_factory=dict)
    pointwise_jacobian: bool = True
    """Whether the method can take J from a problem's ``pointwise_constraints`` (it needs J, not c's graph)."""
    needs_output_constraints: bool = False
    """Output-layer methods: only for :class:`~problems._layered.LayerProblem` tasks."""


def _adam_sqp(**fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    return lambda params, lr, options: sqpoptim.ProjectedAdamSQP(params, lr=lr, **{**fixed, **options})


METHODS: dict[str, Method] = {
    "sqp-adam": Method("SQP-Adam(con)", _adam_sqp(), True),
    "sqp-adam-scaled": Method("SQP-Adam(con), scaled", _adam_sqp(projection="scaled"), True),
    "sqp-adam-standard": Method("SQP-Adam(con), standard BC", _adam_sqp(bias_correction="standard"), True),
    "sqp-adam-scaled-standard": Method(
        "SQP-Adam(con), scaled, standard BC", _adam_sqp(projection="scaled", bias_correction="standard"), True
    ),
    "sqp-hb": Method("SQP-Heavyball(con)", lambda p, lr, o: sqpoptim.ProjectedHeavyBallSQP(p, lr=lr, **o), True),
    "sqp": Method("SQP(con)", lambda p, lr, o: sqpoptim.StochasticSQP(p, lr=lr, **o), True),
    "sqp-adaptive": Method(
        "SQP(con), adaptive", lambda p, lr, o: sqpoptim.StochasticSQP(p, lr=lr, step_rule="adaptive", **o), True
    ),
    "adam-unc": Method("Adam(unc)", lambda p, lr, o: sqpoptim.AdamUnc(p, lr=lr, **o), False),
    "adam-con": Method("Adam(con)", lambda p, lr, o: sqpoptim.ConstrainedAdam(p, lr=lr, **o), True),
    "penalty": Method(
        "Penalty",
        lambda p, lr, o: sqpoptim.PenaltyAdam(p, lr=lr, **{"rho": 100.0, **o}),
        False,
        closure=_penalty_closure,
        defaults={"rho": 100.0},
    ),
    "primal-dual": Method(
        "Primal-dual",
        lambda p, lr, o: sqpoptim.PrimalDual(
            p, lr=lr, **{"dual_lr": 1e-2, **({} if o.get("inner", "Adam") != "Adam" else {"eps": 1e-7}), **o}
        ),
        True,
        defaults={"dual_lr": 1e-2},
        pointwise_jacobian=False,  # it back-propagates λᵀc through c's graph
    ),
}


def register_method(name: str, method: Method) -> None:
    """Add a method to the registry (used by the output-layer methods)."""
    METHODS[name] = method


def _value(text: str) -> Any:
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


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"penalty:rho=1e4"`` -> ``("penalty", {"rho": 10000.0})``; the name must be registered."""
    name, *opts = spec.split(":")
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; known methods: {', '.join(METHODS)}")
    options: dict[str, Any] = {}
    for opt in opts:
        key, sep, val = opt.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid method option {opt!r} in {spec!r} (expected key=value)")
        options[key] = _value(val)
    return name, options


from . import layer_methods  # noqa: E402, F401  (registers the output-layer methods)
