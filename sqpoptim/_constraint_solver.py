r"""The seam between the methods and the linear algebra: a constraint solver answers the three questions a step
asks of :math:`G_W = JWJ^\top`.

* ``project(x)`` — :math:`P_W x = x - WJ^\top G_W^{-1}Jx` (:math:`J P_W x = 0`);
* ``normal_step(c)`` — :math:`v_W = -WJ^\top G_W^{-1}c` (:math:`Jv_W = -c`), optionally Levenberg–Marquardt
  damped (:func:`sqpoptim._linalg.damped`);
* ``step(x, c, γ)`` — the whole displacement :math:`\gamma v_W - P_W x` (the KKT step of
  :mod:`sqpoptim._krylov`), with the step's diagnostics.

Two implementations: :class:`sqpoptim._dense_solver.DenseSolver` (one float64 Gram factorisation) and
:class:`sqpoptim._krylov_solver.KrylovSolver` (MINRES with products only); :mod:`sqpoptim._solver_choice` picks
one per step.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._jacobian_operator import JacobianOperator

__all__ = ["ConstraintSolver"]


class ConstraintSolver:
    """Interface; see the module docstring. ``op`` is the Jacobian operator, ``weight`` the diagonal of W."""

    kind: str
    op: JacobianOperator
    weight: Tensor | None

    def project(self, x: Tensor, *, multipliers: bool = False) -> Any:  # pragma: no cover - abstract
        r""":math:`P_W x`; with ``multipliers`` the pair :math:`(P_W x, \lambda)`,
        :math:`\lambda = -G_W^{-1}Jx` (float64 ``[m]``, so that :math:`P_W x = x + WJ^\top\lambda`)."""
        raise NotImplementedError

    def normal_part(
        self, c: Tensor, gamma: float | Tensor, damping: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | None:  # pragma: no cover - abstract
        """``(δ_n, v)`` formed ahead of the step (so that a method can check it before its state changes), or
        ``None`` when the solver forms the normal part inside :meth:`step`."""
        raise NotImplementedError

    def step(
        self,
        x: Tensor,
        c: Tensor,
        gamma: float | Tensor,
        damping: Tensor | None = None,
        normal: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        r""":math:`\gamma v_W - P_W x` (``normal``: the result of :meth:`normal_part`, if formed) and the step's
        diagnostics (:func:`sqpoptim._linalg.step_info`)."""
        raise NotImplementedError

    def weighted(self, weight: Tensor) -> ConstraintSolver:  # pragma: no cover - abstract
        """The same solver for the metric W = diag(weight)."""
        raise NotImplementedError

    def row_check(self) -> Tensor:
        """A float64 ``[m]`` vector that is zero exactly at the all-zero rows of J and non-finite exactly at rows
        with a non-finite entry: the step's validation, without another pass over J where the solver has
        the Gram matrix (its diagonal)."""
        return self.op.row_check()

    def info(self) -> dict[str, Any]:
        """Solver diagnostics of the step (merged into ``optimizer.diagnostics()``)."""
        return {"solver": self.kind}

    def exact(self, info: dict[str, Any]) -> bool:
        r"""Whether the step's normal part solved :math:`J\delta_n = -\gamma c` exactly (a full-rank Cholesky
        solve): then the residual :math:`c + J\delta` needs no product to be known."""
        return False

    def commit(self) -> None:
        """Keep what the next step reuses (warm starts); called once the step is applied."""
