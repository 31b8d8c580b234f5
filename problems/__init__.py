"""The hard-constrained training tasks of the papers, a runner that trains any method on any problem, and plots.

Problems are looked up by name in a catalogue (``get_problem("spring", size="small")``); each lives in a module
of its family, imported on first use:

* :mod:`problems.core` — the problem contract (:class:`Problem`) and the parts the families share (data
  caching, networks, input derivatives, the Fourier neural operator);
* :mod:`problems.pinn` — physics-informed tasks (constraints are differential-equation residuals);
* :mod:`problems.output_tasks` — output-constraint tasks (constraints on each output; the layer papers' tasks);
* :mod:`problems.reference` — the reference solvers (oracles) behind their data and metrics;
* :mod:`problems.methods` — the methods the runner trains with (one registry; the table of names);
* :mod:`problems.runner` — run specifications, the training loop, checkpoints and results files;
* :mod:`problems.plots` — figures from saved results; :mod:`problems.cli` — ``python -m problems``.
"""

from __future__ import annotations

import importlib

from .core.problem import Batch, Problem, ProblemDefaults, Size

__all__ = ["Batch", "Problem", "ProblemDefaults", "Size", "get_problem", "problem_class", "problem_names"]

# name -> "module:Class"; modules are imported lazily so that `import problems` stays cheap.
_REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Register ``target`` ("problems.family.module:Class") under ``name``."""
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
    ("spring", "problems.pinn.spring:Spring"),
    ("chemistry", "problems.pinn.chemistry:Chemistry"),
    ("burgers", "problems.pinn.burgers:Burgers"),
    ("darcy", "problems.pinn.darcy:Darcy"),
    ("manifold_toy", "problems.pinn.manifold_toy:ManifoldToy"),
    ("enforce_fitting", "problems.output_tasks.enforce_fitting:EnforceFitting"),
    ("nonconvex_linear", "problems.output_tasks.nonconvex:NonconvexLinear"),
    ("nonconvex_quadratic", "problems.output_tasks.nonconvex:NonconvexQuadratic"),
    ("nonconvex_linear_100x50", "problems.output_tasks.nonconvex:NonconvexLinear100x50"),
    ("nonconvex_linear_100x70", "problems.output_tasks.nonconvex:NonconvexLinear100x70"),
    ("nonconvex_quadratic_100x10", "problems.output_tasks.nonconvex:NonconvexQuadratic100x10"),
    ("nonconvex_quadratic_100x50", "problems.output_tasks.nonconvex:NonconvexQuadratic100x50"),
    ("nonconvex_quadratic_100x70", "problems.output_tasks.nonconvex:NonconvexQuadratic100x70"),
    ("mpc", "problems.output_tasks.mpc:LearnedMPC"),
    ("kkt_e1", "problems.output_tasks.kkt_examples:KKTExample1"),
    ("kkt_e2", "problems.output_tasks.kkt_examples:KKTExample2"),
    ("kkt_e3", "problems.output_tasks.kkt_examples:KKTExample3"),
    ("pooling", "problems.output_tasks.pooling:Pooling"),
]:
    register(_name, _target)
