"""The optimizer catalogue every contract test is parametrised over: one entry per configuration (a class and its
options), named as the runner names methods where one exists (``problems.methods``).

A test file picks the entries it needs, and a learning rate where its problem needs one:

    FACTORIES = factories("sqp-hb", "sqp-adam", lr=1e-2)   # name -> (params, **kw) -> optimizer
    SQP = factories(*PROJECTED_SQP)                         # the class's default lr unless the test passes one

Keyword arguments a test passes at construction override the entry's options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqpoptim


@dataclass(frozen=True)
class OptimizerCase:
    """One configuration: ``cls(params, lr=..., **options)``."""

    cls: type
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None  # the entry's own learning rate (where the method needs one), before the test's

    def make(self, params: Any, **kw: Any) -> Any:
        """The optimizer over ``params``; ``kw`` (``lr`` among them) overrides the entry's settings."""
        lr = kw.pop("lr", None) or self.lr
        return self.cls(params, **({} if lr is None else {"lr": lr}), **{**self.options, **kw})


CATALOGUE: dict[str, OptimizerCase] = {
    "sqp-hb": OptimizerCase(sqpoptim.ProjectedHeavyBallSQP),
    "sqp-hb-damped": OptimizerCase(sqpoptim.ProjectedHeavyBallSQP, {"normal_damping": 0.5}),
    "sqp-adam": OptimizerCase(sqpoptim.ProjectedAdamSQP),
    "sqp-adam-scaled": OptimizerCase(sqpoptim.ProjectedAdamSQP, {"projection": "scaled"}),
    "sqp-adam-scaled-standard": OptimizerCase(
        sqpoptim.ProjectedAdamSQP, {"projection": "scaled", "bias_correction": "standard"}
    ),
    "sqp-adam-damped": OptimizerCase(sqpoptim.ProjectedAdamSQP, {"normal_damping": 0.5}),
    "sqp-adam-damped-0.1": OptimizerCase(sqpoptim.ProjectedAdamSQP, {"normal_damping": 0.1}),
    "sqp-adam-scaled-damped": OptimizerCase(sqpoptim.ProjectedAdamSQP, {"projection": "scaled", "normal_damping": 0.5}),
    "sqp-adam-sync-free": OptimizerCase(sqpoptim.ProjectedAdamSQP, {"sync_free": True}),
    "sqp": OptimizerCase(sqpoptim.StochasticSQP),
    "sqp-adaptive": OptimizerCase(sqpoptim.StochasticSQP, {"step_rule": "adaptive"}, lr=1.0),
    # the adaptive rule with given Lipschitz constants: no extra closure calls
    "sqp-adaptive-given-L": OptimizerCase(sqpoptim.StochasticSQP, {"step_rule": "adaptive", "lipschitz": (1.0, 1.0)}),
    "adam-con": OptimizerCase(sqpoptim.ConstrainedAdam),
    "adam-unc": OptimizerCase(sqpoptim.AdamUnc),
    "penalty": OptimizerCase(sqpoptim.PenaltyAdam, {"rho": 10.0}),
    "primal-dual": OptimizerCase(sqpoptim.PrimalDual, {"dual_lr": 0.1}),
}

# the optimizers with a projected tangential step and a normal step (the SQP family and Adam(con))
PROJECTED_SQP = ("sqp-adam", "sqp-adam-scaled", "sqp-hb", "sqp", "adam-con")


def factories(*names: str, lr: float | None = None, **options: Any) -> dict[str, Callable[..., Any]]:
    """``{name: (params, **kw) -> optimizer}`` for the named entries, with ``lr`` (unless the entry has its own)
    and ``options`` for every one of them."""
    out = {}
    for name in names:
        case = CATALOGUE[name]

        def make(params: Any, *, _case: OptimizerCase = case, **kw: Any) -> Any:
            kw.setdefault("lr", _case.lr or lr)
            return _case.make(params, **{**options, **kw})

        out[name] = make
    return out
