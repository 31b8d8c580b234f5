r"""The dense constraint solver: forms :math:`G_W` in float64 once (:meth:`JacobianOperator.gram`), factors it once
(:func:`sqpoptim._linalg.factor_gram`) and solves every right-hand side with that factor, as lineax's
``init``/``compute``; the functions of :mod:`sqpoptim._linalg` on an explicit J are its reference. Above
``EXACT_RANK_MAX`` constraints the exact mode's fallback for an ill-conditioned :math:`G` (a truncated
eigendecomposition, about nine Cholesky factorisations' worth of work) is replaced by the regularised
Cholesky factorisation of the sync-free mode; the diagnostics then report ``rank = -1``.

:func:`as_solver` wraps an explicit ``[m, n]`` J in this solver: the reference the direction functions of the
methods accept as well as any solver.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._constraint_solver import ConstraintSolver
from ._jacobian_operator import DenseJacobian, JacobianOperator
from ._linalg import GramFactor, _damped_gram, damped, factor_gram, step_info
from ._workspace import Workspace

__all__ = ["EXACT_RANK_MAX", "DenseSolver", "as_solver"]

EXACT_RANK_MAX = 256  # largest m handled by the truncated eigendecomposition in exact mode


class DenseSolver(ConstraintSolver):
    """One float64 Gram matrix, factored once, every right-hand side solved with the factor."""

    kind = "dense"

    def __init__(
        self,
        op: JacobianOperator,
        *,
        rank_tol: float,
        sync_free: bool,
        weight: Tensor | None = None,
        needs_gram: bool = True,
        workspace: Workspace | None = None,
    ) -> None:
        self.op, self.weight, self.rank_tol, self.sync_free = op, weight, rank_tol, sync_free
        self.workspace = workspace  # the optimizer's reused m x m buffers (the unweighted solver only)
        self.needs_gram = needs_gram  # the unweighted Gram matrix will be factored (validation reads its diagonal)
        # the exact mode's eigendecomposition costs about nine Cholesky factorisations: only for small m
        self.truncate = op.m <= EXACT_RANK_MAX
        self._gram: Tensor | None = None
        self._factor: GramFactor | None = None
        self._normal_image: Tensor | None = None  # J v of the last normal step, where known without a product

    @property
    def gram(self) -> Tensor:
        r""":math:`G_W` in float64 (formed on first use)."""
        if self._gram is None:
            out = None if self.workspace is None else self.workspace.matrix("gram", self.op.m, self.op.device)
            self._gram = self.op.gram(self.weight, out=out, workspace=self.workspace)
        return self._gram

    @property
    def factor(self) -> GramFactor:
        if self._factor is None:
            self._factor = factor_gram(
                self.gram, self.rank_tol, sync_free=self.sync_free, truncate=self.truncate, workspace=self.workspace
            )
        return self._factor

    def row_check(self) -> Tensor:
        if self.weight is None and self.needs_gram:  # formed anyway: its diagonal validates J for free
            return torch.diagonal(self.gram).clone()  # (G may sit in the workspace: nothing outlives the step)
        return self.op.row_check()

    def _wjt(self, y: Tensor, weight: Tensor | None) -> Tensor:
        r = self.op.rmv(y.to(self.op.dtype))
        return r if weight is None else r * weight

    def project(self, x: Tensor, *, multipliers: bool = False) -> Any:
        if self.op.m == 0:
            return (x, x.new_zeros(0, dtype=torch.float64)) if multipliers else x
        y = self.factor.solve(self.op.mv(x))
        px = x - self._wjt(y, self.weight)
        return (px, -y) if multipliers else px

    def normal_step(self, c: Tensor, damping: Tensor | None = None) -> Tensor:
        if self.op.m == 0:
            return torch.zeros(self.op.n, dtype=self.op.dtype, device=self.op.device)
        F = damped(
            self.factor,
            damping,
            self.rank_tol,
            sync_free=self.sync_free,
            truncate=self.truncate,
            workspace=self.workspace,
        )
        y = F.solve(-c)
        # An exact solve of (G_W + μI) y = -c gives J v = G_W y = -c - μy without the product J v
        exact = not self.sync_free and F.exact
        shift = F.shift if F.shift is not None else 0.0
        self._normal_image = -c.double() - shift * y if exact else None
        return self._wjt(y, self.weight)

    def scaled_normal_step(
        self, c: Tensor, gamma: float | Tensor, damping: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(δ_n, v)`` as :func:`sqpoptim._linalg.scaled_normal_step`."""
        v = self.normal_step(c, damping)
        if not isinstance(gamma, Tensor):
            return gamma * v, v
        if self.op.m == 0:
            return v, v
        gmax = gamma.max()
        w = gamma / gmax if self.weight is None else self.weight * (gamma / gmax)
        Gw = self.op.gram(w)
        Gw = Gw if damping is None else _damped_gram(Gw, damping)
        Fw = factor_gram(Gw, self.rank_tol, sync_free=self.sync_free, truncate=self.truncate)
        return gmax * self._wjt(Fw.solve(-c), w), v

    def normal_part(
        self, c: Tensor, gamma: float | Tensor, damping: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | None:
        return self.scaled_normal_step(c, gamma, damping)

    def step(
        self,
        x: Tensor,
        c: Tensor,
        gamma: float | Tensor,
        damping: Tensor | None = None,
        normal: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        u = -self.project(x)
        delta_n, v = self.scaled_normal_step(c, gamma, damping) if normal is None else normal
        info = step_info(c, self.factor if self.op.m else None, v, u)
        if self.op.m and self._normal_image is not None and self.factor.exact and not isinstance(gamma, Tensor):
            # the step's image J δ = γ J v (J u = 0: an exact projection), for the damping's model of c + J δ
            info["Jdelta"] = gamma * self._normal_image
        return delta_n + u, info

    def exact(self, info: dict[str, Any]) -> bool:
        if self.op.m == 0 or self._factor is None or self._factor.chol is None:
            return self.op.m == 0
        return self.truncate or self.sync_free or int(self._factor.rank) >= 0  # (one host read, exact mode)

    def weighted(self, weight: Tensor) -> DenseSolver:
        return DenseSolver(self.op, rank_tol=self.rank_tol, sync_free=self.sync_free, weight=weight)


def as_solver(J: Tensor | ConstraintSolver, *, rank_tol: float, sync_free: bool) -> ConstraintSolver:
    """An explicit ``[m, n]`` J becomes the dense reference solver; a solver passes through."""
    if isinstance(J, ConstraintSolver):
        return J
    return DenseSolver(DenseJacobian(J), rank_tol=rank_tol, sync_free=sync_free)
