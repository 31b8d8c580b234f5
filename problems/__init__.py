"""The hard-constrained training tasks of the papers, a runner that trains any method on any problem, and plots.

Problems are looked up by name in a registry (``get_problem("spring", size="small")``); each lives in its own
module, imported on first use. See :mod:`problems._base` for the interface.
"""

from __future__ import annotations

import importlib

from ._base import Batch, Problem, ProblemDefaults, Size

__all__ = ["Batch", "Problem", "ProblemDefaults", "Size", "get_problem", "problem_class", "problem_names"]

# name -> "module:Class"; modules are imported lazily so that `import problems` stays cheap.
_REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Register ``target`` ("problems.module:Class") under ``name``."""
    _REGISTRY[name] = target


def problem_names() -> list[str]:
    return list(_REGISTRY)


def problem_class(name: str) -> type[Problem]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"Unknown problem {name!r}; known problems: {', '.join(_REGISTRY)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def get_problem(name: str, **kwargs) -> Problem:
    """Instantiate the problem registered under ``name`` (keyword arguments go to its constructor)."""
    return problem_class(name)(**kwargs)


# The suite. Keep this list in the order problems appear in the papers.
for _name, _target in [
    ("spring", "problems.spring:Spring"),
    ("chemistry", "problems.chemistry:Chemistry"),
    ("burgers", "problems.burgers:Burgers"),
    ("darcy", "problems.darcy:Darcy"),
    ("manifold_toy", "problems.manifold_toy:ManifoldToy"),
    ("enforce_fitting", "problems.enforce_fitting:EnforceFitting"),
    ("nonconvex_linear", "problems.nonconvex:NonconvexLinear"),
    ("nonconvex_quadratic", "problems.nonconvex:NonconvexQuadratic"),
    ("nonconvex_linear_100x50", "problems.nonconvex:NonconvexLinear100x50"),
    ("nonconvex_linear_100x70", "problems.nonconvex:NonconvexLinear100x70"),
    ("nonconvex_quadratic_100x10", "problems.nonconvex:NonconvexQuadratic100x10"),
    ("nonconvex_quadratic_100x50", "problems.nonconvex:NonconvexQuadratic100x50"),
    ("nonconvex_quadratic_100x70", "problems.nonconvex:NonconvexQuadratic100x70"),
    ("mpc", "problems.mpc:LearnedMPC"),
    ("kkt_e1", "problems.kkt_examples:KKTExample1"),
    ("kkt_e2", "problems.kkt_examples:KKTExample2"),
    ("kkt_e3", "problems.kkt_examples:KKTExample3"),
    ("pooling", "problems.pooling:Pooling"),
]:
    register(_name, _target)
