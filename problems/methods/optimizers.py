"""Methods that train the problem's own model with an sqpoptim optimizer (the SQP family and the baselines).

The options of such a method are exactly its optimizer's constructor keywords (less ``params`` and ``lr``, and
less what the method fixes, e.g. ``projection="scaled"`` for ``sqp-adam-scaled``), typed by the constructor's
hints; :meth:`OptimizerMethod.parse_options` checks names, types and values (by constructing the optimizer once
on a throw-away parameter). The optimizers' own defaults apply unless a method states others (``penalty``'s
``rho = 100``, ``primal-dual``'s ``dual_lr = 1e-2``).

Closures: a constrained method gets ``(objective, c)`` with c's graph, or the problem's per-point constraint
description (:class:`sqpoptim.PointwiseConstraints`) where the problem offers one and the method takes J rather
than c's graph; an unconstrained method gets ``c`` computed without a graph (logged only); ``penalty`` gets c
with its graph (it adds ``rho/2 ||c||^2`` itself).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import sqpoptim

from ..core.problem import Batch, Problem
from .method import Method, Training
from .options import check_keys, coerce, options_dataclass, signature_options

__all__ = ["OPTIMIZER_METHODS", "OptimizerMethod"]

_SKIP = ("self", "params", "lr")


@dataclass(frozen=True, eq=False)
class OptimizerMethod(Method):
    """An sqpoptim optimizer on the problem's model (see the module docstring)."""

    name: str
    label: str
    optimizer: type[torch.optim.Optimizer]
    constrained: bool
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Constructor arguments the method sets; not options."""
    defaults: Callable[[Mapping[str, Any]], Mapping[str, Any]] = lambda given: {}
    """Option defaults that differ from the optimizer's, as a function of the options given."""
    sets_itself: tuple[str, ...] = ()
    """Keywords of ``kwargs_from`` the optimizer passes itself (so not options)."""
    kwargs_from: type | None = None
    """Where the optimizer's ``**kwargs`` go; their keywords are options too. ``None`` with ``**kwargs``: any
    further keyword is accepted and checked by constructing the optimizer (``primal-dual``'s inner optimizer)."""
    penalty_closure: bool = False
    """c with its graph for an unconstrained optimizer that penalises c itself."""
    pointwise_jacobian: bool = True
    """Whether the optimizer can take J from a problem's ``pointwise_constraints`` (it needs J, not c's graph)."""

    def __post_init__(self) -> None:
        fields, takes_kwargs = signature_options(self.optimizer.__init__, _SKIP)
        if takes_kwargs and self.kwargs_from is not None:
            more, _ = signature_options(self.kwargs_from.__init__, _SKIP)
            own = {name for name, _, _ in fields}
            fields += [f for f in more if f[0] not in own]
            takes_kwargs = False
        fields = [f for f in fields if f[0] not in self.fixed and f[0] not in self.sets_itself]
        object.__setattr__(self, "_fields", {name: (hint, default) for name, hint, default in fields})
        object.__setattr__(self, "_open", takes_kwargs)
        extra = [("extra", Mapping[str, Any], {})] if takes_kwargs else []
        options_type = options_dataclass(f"{self.optimizer.__name__}Options", fields + extra)
        object.__setattr__(self, "options_type", options_type)

    @property
    def implementation(self) -> str:
        fixed = ", ".join(f"{k}={v!r}" for k, v in self.fixed.items())
        return self.optimizer.__name__ + (f"({fixed})" if fixed else "")

    def parse_options(self, options: Mapping[str, Any], lr: float = 1e-3) -> Any:
        given = dict(options)
        hints = {k: f"{self.name} fixes it" for k in (*self.fixed, *self.sets_itself)}
        if not self._open:
            check_keys(self.name, given, self._fields, hints)
        values = {name: default for name, (_, default) in self._fields.items()}
        typed, extra = {}, {}
        for key, value in {**self.defaults(given), **given}.items():
            if key in self._fields:
                typed[key] = coerce(value, self._fields[key][0], f"method {self.name!r}: option {key}")
            else:
                extra[key] = value  # only for an open signature: checked by the construction below
        values.update(typed)
        parsed = self.options_type(**values, **({"extra": extra} if self._open else {}))
        self._construct([torch.zeros(1, requires_grad=True)], lr, parsed)  # the optimizer's own checks
        return parsed

    def _kwargs(self, options: Any) -> dict[str, Any]:
        kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "extra"}
        return {**kwargs, **getattr(options, "extra", {}), **self.fixed}

    def _construct(self, params: Any, lr: float, options: Any) -> torch.optim.Optimizer:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self.optimizer(params, lr=lr, **self._kwargs(options))
        except (TypeError, ValueError) as err:
            raise ValueError(f"method {self.name!r}: {err}") from None

    def setup(
        self, problem: Problem, model: nn.Module, lr: float, options: Any, *, process_group: Any = None
    ) -> Training:
        kwargs = self._kwargs(options)
        if self._joint_jacobian(problem, kwargs):  # c read off the objective's pass: g and J by one backward
            kwargs["jacobian"] = "joint"
        recorded = dict(kwargs)
        if process_group is not None:  # every rank evaluates the same constraints: replicated rows
            kwargs = {**kwargs, "process_group": process_group}
        optimizer = self.optimizer(model.parameters(), lr=lr, **kwargs)
        return Training(model, optimizer, lambda batch: self._closure(problem, model, batch), recorded)

    def _joint_jacobian(self, problem: Problem, kwargs: Mapping[str, Any]) -> bool:
        return (
            self.constrained
            and not self.penalty_closure
            and problem.constraints_in_objective
            and kwargs.get("jacobian") in ("auto", "joint")
        )

    def _closure(self, problem: Problem, model: nn.Module, batch: Batch | None) -> Callable[[], Any]:
        if self.penalty_closure:
            return lambda: (problem.objective(model, batch), problem.constraints(model))
        if self.constrained:
            pointwise = getattr(problem, "pointwise_constraints", None) if self.pointwise_jacobian else None
            if pointwise is not None:  # per-point torch.func Jacobians (see sqpoptim.PointwiseConstraints)
                residual, points = pointwise()
                return lambda: (problem.objective(model, batch), sqpoptim.PointwiseConstraints(model, residual, points))
            return lambda: problem.objective_and_constraints(model, batch)

        def closure() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():  # logged only: no graph, no Jacobian
                c = problem.constraints(model)
            return problem.objective(model, batch), c

        return closure


def _primal_dual_defaults(given: Mapping[str, Any]) -> Mapping[str, Any]:
    # ε inside the square root (1e-7) like every Adam of this package, when the inner optimizer is Adam
    inner = given.get("inner", "Adam")
    adam = inner in ("Adam", torch.optim.Adam)
    return {"dual_lr": 1e-2, **({"eps": 1e-7} if adam else {})}


OPTIMIZER_METHODS: list[OptimizerMethod] = [
    OptimizerMethod("sqp-adam", "SQP-Adam(con)", sqpoptim.ProjectedAdamSQP, True),
    OptimizerMethod(
        "sqp-adam-scaled", "SQP-Adam(con), scaled", sqpoptim.ProjectedAdamSQP, True, fixed={"projection": "scaled"}
    ),
    OptimizerMethod(
        "sqp-adam-standard",
        "SQP-Adam(con), standard BC",
        sqpoptim.ProjectedAdamSQP,
        True,
        fixed={"bias_correction": "standard"},
    ),
    OptimizerMethod(
        "sqp-adam-scaled-standard",
        "SQP-Adam(con), scaled, standard BC",
        sqpoptim.ProjectedAdamSQP,
        True,
        fixed={"projection": "scaled", "bias_correction": "standard"},
    ),
    OptimizerMethod("sqp-hb", "SQP-Heavyball(con)", sqpoptim.ProjectedHeavyBallSQP, True),
    OptimizerMethod("sqp", "SQP(con)", sqpoptim.StochasticSQP, True),
    OptimizerMethod(
        "sqp-adaptive", "SQP(con), adaptive", sqpoptim.StochasticSQP, True, fixed={"step_rule": "adaptive"}
    ),
    OptimizerMethod("adam-unc", "Adam(unc)", sqpoptim.AdamUnc, False),
    OptimizerMethod(
        "adam-con",
        "Adam(con)",
        sqpoptim.ConstrainedAdam,
        True,
        sets_itself=("projection", "bias_correction", "project_gradients"),
        kwargs_from=sqpoptim.ProjectedAdamSQP,
    ),
    OptimizerMethod(
        "penalty", "Penalty", sqpoptim.PenaltyAdam, False, defaults=lambda given: {"rho": 100.0}, penalty_closure=True
    ),
    OptimizerMethod(
        "primal-dual",
        "Primal-dual",
        sqpoptim.PrimalDual,
        True,
        defaults=_primal_dual_defaults,
        pointwise_jacobian=False,  # it back-propagates λᵀc through c's graph
    ),
]
