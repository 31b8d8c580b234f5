r"""HardNet's closed-form projection for affine constraints, and the shared (damped) parallel step.

Min, Sonar & Azizan, "Hard-Constrained Neural Networks with Universal Approximation Guarantees" (arXiv:2410.10807);
the step is also HardNet++'s (arXiv:2604.19669, Eqs. 3-4).
With stacked constraints :math:`c = [h; g]`, their Jacobian :math:`J_c` and the residual

.. math::

    r(y) = \begin{bmatrix} h(y) \\ \mathrm{ReLU}(g(y) - b_u) - \mathrm{ReLU}(b_l - g(y)) \end{bmatrix},

the (damped) parallel step is

.. math::

    y^+ = y - J_c^\top (J_c J_c^\top + \varepsilon I)^{-1} r(y)
        = y - (J_c^\top J_c + \varepsilon I)^{-1} J_c^\top r(y) \quad (\varepsilon > 0),

the second form (an ``n x n`` solve) used when :math:`m + q > n`. For :math:`\varepsilon = 0` and affine
:math:`c` with full row rank :math:`J_c = C` this is HardNet's projection :math:`y - C^+ r(y)`: one step gives
:math:`h(y^+) = 0` and :math:`g(y^+) = \mathrm{clip}(g(y), b_l, b_u)`, moving parallel to the boundaries of
satisfied inequalities. For equalities alone it is the orthogonal projection
:math:`y - B^\top(BB^\top)^{-1}(By - b)`.

Notes
-----
* :class:`HardNetAffine` does not verify that the constraints are affine; after its single step it
  evaluates the violation, and in evaluation mode a violation above ``tol`` triggers the non-convergence
  policy (the message names non-affine constraints as a cause).
* Its gradient is plain autograd through the closed form (exact; there is no iteration to differentiate
  implicitly). The ReLU makes it piecewise affine: at a sample with :math:`g(y)` exactly on a bound the
  derivative is one-sided.
* Rank-deficient :math:`C`: regularised solve, flagged in ``regularized`` (:mod:`._linalg`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._base import ProjectionLayer, ProjectionResult, check_bounds, finite_or_raise
from ._constraints import ConstraintEvaluation, OutputConstraints
from ._linalg import gram_solve

__all__ = ["HardNetAffine", "parallel_step"]


def parallel_step(y: Tensor, r: Tensor, J: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    r"""The damped parallel step :math:`y - J^\top (J J^\top + \varepsilon I)^{-1} r`; ``(y⁺, regularized)``.

    ``y`` ``[B, n]``, ``r`` ``[B, k]``, ``J`` ``[B, k, n]``. For :math:`k > n` and :math:`\varepsilon > 0`
    the push-through identity :math:`J^\top(JJ^\top + \varepsilon I)^{-1} = (J^\top J + \varepsilon I)^{-1}
    J^\top` gives the same value with an ``n x n`` solve.
    """
    k, n = J.shape[-2:]
    J = J.contiguous()  # a permuted user Jacobian would make every product below copy
    if k > n and eps > 0:
        d, flagged = gram_solve(J.mT @ J, torch.einsum("bkn,bk->bn", J, r), shift=eps)  # [B, n]
        return y - d, flagged
    w, flagged = gram_solve(J @ J.mT, r, shift=eps)  # [B, k]
    return y - torch.einsum("bkn,bk->bn", J, w), flagged


def stacked_residual(
    constraints: OutputConstraints, x: Tensor | None, ev: ConstraintEvaluation, bounds: tuple | None
) -> tuple[Tensor, tuple]:
    """HardNet++'s residual; computes (and checks) the bounds on the first call (``bounds=None``)."""
    if bounds is None:
        if ev.g is not None:
            bounds = constraints.bounds(x, ev.g)
            check_bounds(*bounds)
        else:
            bounds = (None, None)
        finite_or_raise(ev.c, "the constraint function")
    return constraints.residual(ev, *bounds), bounds


class HardNetAffine(ProjectionLayer):
    r"""HardNet: one closed-form projection onto affine equalities and inequalities in :math:`y`.

    Equalities :math:`B(x) y = b(x)` are met exactly (orthogonal projection); inequalities
    :math:`b_l \le A(x) y \le b_u` by the parallel projection :math:`y - A^+ \mathrm{ReLU}(\cdot)`; both
    together by the stacked step (module docstring). Needs :math:`[B; A]` of full row rank.

    Args:
        constraints: :class:`OutputConstraints` (``h``, ``g`` affine in ``y``) or a callable ``h(x, y)``.
        tol: violation above which a sample is reported unconverged (not affine, or rank-deficient).
        solve_dtype, nonconvergence: see :class:`~sqpoptim.layers.EnforceProjection`.
    """

    def __init__(
        self,
        constraints: OutputConstraints | Callable,
        *,
        tol: float = 1e-6,
        solve_dtype: torch.dtype | None = torch.float64,
        nonconvergence: str = "warn",
    ) -> None:
        super().__init__(constraints, solve_dtype=solve_dtype, nonconvergence=nonconvergence)
        if not tol > 0:
            raise ValueError(f"Invalid tol: {tol}")
        self.tol = float(tol)

    def _project(self, x: Tensor | None, y: Tensor) -> ProjectionResult:
        ev = self.constraints.evaluate(x, y, jacobian=True)
        r, bounds = stacked_residual(self.constraints, x, ev, None)
        y_new, regularized = parallel_step(y, r, ev.c_jac)
        r_new, _ = stacked_residual(self.constraints, x, self.constraints.evaluate(x, y_new, jacobian=False), bounds)
        residual = r_new.detach().abs().amax(dim=-1)
        return ProjectionResult(y_new, 1, residual, residual <= self.tol, regularized)
