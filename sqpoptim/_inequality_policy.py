"""How a step with inequality constraints differs in the orchestration of
:meth:`~sqpoptim.ConstrainedOptimizer.step`: which solver it takes, whether its normal step is damped, and the
warm start it keeps. The step itself is :mod:`sqpoptim._inequality`'s.

* The solver is always the dense one: the step QP is solved in its dual on the explicit Gram matrix, and the
  gradient mapping too; the matrix-free solver asked for explicitly is refused, before anything changes.
* A step with inequalities is one QP, with no separate normal step to damp: the default ``normal_damping``
  globalises the steps without inequalities and leaves this one undamped; any other value asked for explicitly
  is refused, before anything changes.
* The step's dual partitions (the working sets of the step QP and of the gradient mapping) warm-start the next
  step's; a refused step keeps the old ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._damping import DEFAULT_NU0
from ._state import OptimizerState

__all__ = ["damping_for", "keep_partitions", "solver_for"]


def solver_for(requested: str, num_ineq: int) -> str:
    """The solver mode of this step: ``requested``, or ``"dense"`` with inequalities."""
    if not num_ineq:
        return requested
    if requested == "krylov":
        raise ValueError(
            "solver='krylov' (matrix-free) is not available with inequality constraints: the step QP is solved "
            "in its dual on the m x m Gram matrix of the explicit Jacobian; pass solver='dense' or 'auto' (which "
            "takes the dense solver whenever inequalities are given)"
        )
    return "dense"


def damping_for(normal_damping: float | None, num_ineq: int) -> float | None:
    """ν0 of this step's damped normal step, or ``None`` (undamped)."""
    if not num_ineq or normal_damping is None:
        return normal_damping
    if normal_damping != DEFAULT_NU0:
        raise ValueError(
            f"normal_damping={normal_damping:g} is not available with inequality constraints: the step with "
            "inequalities is one QP, with no separate normal step to damp; leave normal_damping at its default "
            f"({DEFAULT_NU0:g}, which damps only the steps without inequalities) or pass None, and use "
            "normal_lr < 1 to shorten the feasibility step"
        )
    return None


def keep_partitions(
    state: OptimizerState, partitions: tuple[Tensor | None, Tensor | None], applied: Tensor | None
) -> None:
    """Store the step's dual partitions in ``state`` (``applied``: the sync-free flag; where it is false the old
    partitions stay)."""
    for name, new in zip(("inequality_active", "projection_active"), partitions):
        if new is None:
            continue
        old = getattr(state, name)
        if applied is not None:
            old = torch.zeros_like(new) if old is None or old.shape != new.shape else old
            new = torch.where(applied, new, old)
        setattr(state, name, new)
