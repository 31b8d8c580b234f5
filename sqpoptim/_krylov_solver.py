r"""The matrix-free constraint solver: MINRES with only :math:`Jx` and :math:`J^\top y`, warm-started from the
last step's multipliers, the step by the inexact-SQP termination tests (:mod:`sqpoptim._krylov`).

The solver keeps the multipliers of its solves in the optimizer's state (``state``) and warm-starts the next
step's solves from them; :meth:`KrylovSolver.commit` stores them once the step is applied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._constraint_solver import ConstraintSolver
from ._jacobian_operator import JacobianOperator
from ._krylov import KrylovOptions, _inv_diag, cauchy_safeguard, inexact_step, krylov_project, minres
from ._linalg import step_info

__all__ = ["KrylovSolver"]


class KrylovSolver(ConstraintSolver):
    """Matrix-free solves by MINRES (see :mod:`sqpoptim._krylov`). ``state`` is the optimizer's solver state:
    ``{"multipliers": {slot: λ}, "penalty": π}``, read for warm starts and updated by :meth:`commit`."""

    kind = "krylov"

    def __init__(
        self,
        op: JacobianOperator,
        options: KrylovOptions,
        state: dict[str, Any],
        *,
        weight: Tensor | None = None,
        updates: dict[str, Any] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        self.op, self.options, self.state, self.weight = op, options, state, weight
        self.updates: dict[str, Any] = {} if updates is None else updates
        self.stats: dict[str, Any] = {"krylov_iterations": 0, "krylov_converged": True} if stats is None else stats
        self._inv: Tensor | None = None
        self._inv_done = False

    def _inv_diag(self) -> Tensor | None:
        if not self._inv_done:
            try:
                self._inv = _inv_diag(self.op, self.weight, self.options.jacobi)
            except NotImplementedError:
                self._inv = None
            self._inv_done = True
        return self._inv

    def _warm(self, slot: str) -> Tensor | None:
        lam = self.state.get("multipliers", {}).get(slot)
        return lam if lam is not None and lam.shape == (self.op.m,) else None

    def _record(self, slot: str, res: Any) -> None:
        self.updates.setdefault("multipliers", {})[slot] = res.lam
        self.stats["krylov_iterations"] += res.iterations
        self.stats["krylov_converged"] = self.stats["krylov_converged"] and res.converged

    def project(self, x: Tensor, *, multipliers: bool = False, slot: str = "gradient") -> Any:
        if self.op.m == 0:
            return (x, x.new_zeros(0, dtype=torch.float64)) if multipliers else x
        y, res = krylov_project(
            self.op, x, self._warm(slot), self.options, weight=self.weight, inv_diag=self._inv_diag()
        )
        self._record(slot, res)
        return (y, -res.lam) if multipliers else y

    def normal_step(self, c: Tensor, damping: Tensor | None = None, *, weight: Tensor | None = None) -> Tensor:
        r""":math:`-WJ^\top(G_W + \mu I)^{-1}c`, stopped at :math:`\|r\| \le \epsilon\|c\|` (Test II; ``rtol``
        when set), warm-started from the last normal step's multipliers (where they leave a smaller residual than
        zero), or the Cauchy point where the iterate falls short of a tenth of the Cauchy point's decrease of the
        damped model (:func:`sqpoptim._krylov.cauchy_safeguard`). From zero, the solve's first iteration gives
        the Cauchy point; from a warm start it costs one more :math:`J^\top` and :math:`J` product."""
        if self.op.m == 0:
            return torch.zeros(self.op.n, dtype=self.op.dtype, device=self.op.device)
        w = self.weight if weight is None else weight
        b = -c.double()
        shift = 0.0
        if damping is not None:
            shift = float(damping) * float(self.op.mean_row_sq_norm(w))
        opt = self.options
        target = (opt.rtol if opt.rtol is not None else opt.epsilon) * float(torch.linalg.vector_norm(b))
        inv = self._inv_diag() if weight is None else _inv_diag(self.op, w, opt.jacobi)
        if inv is not None and shift:
            inv = 1.0 / (1.0 / inv + shift)
        slot = "normal" if weight is None else "normal_scaled"
        res = minres(
            self.op,
            b,
            self._warm(slot),
            weight=w,
            shift=shift,
            inv_diag=inv,
            stop=lambda lam, z, r: float(torch.linalg.vector_norm(r)) <= target,
            max_iter=opt.max_iter,
            keep_first=True,
        )
        res.lam, res.z, replaced = cauchy_safeguard(self.op, b, res, shift, weight=w)
        res.converged = res.converged and not replaced
        self._record(slot, res)
        self.stats["krylov_cauchy"] = self.stats.get("krylov_cauchy", False) or replaced
        return res.z

    def _fused(self, gamma: float | Tensor, damping: Tensor | None) -> bool:
        return damping is None and not isinstance(gamma, Tensor)

    def normal_part(
        self, c: Tensor, gamma: float | Tensor, damping: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | None:
        if self._fused(gamma, damping):
            return None  # one solve for the whole step
        return self._normal_parts(c, gamma, damping)

    def _normal_parts(self, c: Tensor, gamma: float | Tensor, damping: Tensor | None) -> tuple[Tensor, Tensor]:
        v = self.normal_step(c, damping)
        if not isinstance(gamma, Tensor):
            return gamma * v, v
        gmax = gamma.max()
        w = gamma / gmax if self.weight is None else self.weight * (gamma / gmax)
        return gmax * self.normal_step(c, damping, weight=w), v

    def step(
        self,
        x: Tensor,
        c: Tensor,
        gamma: float | Tensor,
        damping: Tensor | None = None,
        normal: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        zero = torch.zeros((), dtype=torch.float64, device=c.device)
        if self.op.m == 0:
            return -x, step_info(c, None, torch.zeros_like(x), -x)
        if normal is None and self._fused(gamma, damping):
            penalty = self.state.get("penalty")
            penalty = self.options.penalty0 if penalty is None else float(penalty)
            s, res, info = inexact_step(
                self.op,
                x,
                c,
                float(gamma),
                self._warm("step"),
                penalty,
                self.options,
                weight=self.weight,
                inv_diag=self._inv_diag(),
            )
            self._record("step", res)
            self.updates["penalty"] = torch.tensor(info["penalty"], dtype=torch.float64, device=c.device)
            self.stats.update(krylov_test=info["krylov_test"], krylov_residual=info["krylov_residual"])
            nan = zero + math.nan  # one solve gives γv + u, not its parts
            return s, {
                "c_inf": c.abs().max(),
                "v_norm": nan,
                "u_norm": nan,
                "step_norm": torch.linalg.vector_norm(s),
                "rank": zero.long() - 1,
                "gram_cond": nan,
                "truncated": False,
            }
        # damped or per-group normal step sizes: the two parts by separate solves
        u = -self.project(x, slot="tangential")
        delta_n, v = self._normal_parts(c, gamma, damping) if normal is None else normal
        info = step_info(c, None, v, u)
        info.update(rank=zero.long() - 1, gram_cond=zero + math.nan)
        return delta_n + u, info

    def weighted(self, weight: Tensor) -> KrylovSolver:
        return KrylovSolver(self.op, self.options, self.state, weight=weight, updates=self.updates, stats=self.stats)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"solver": self.kind, **self.stats}
        if "penalty" in self.updates:
            out["penalty"] = self.updates["penalty"]
        return out

    def commit(self) -> None:
        multipliers = dict(self.state.get("multipliers", {}))
        multipliers.update(self.updates.get("multipliers", {}))
        self.state["multipliers"] = multipliers
        if "penalty" in self.updates:
            self.state["penalty"] = self.updates["penalty"]
