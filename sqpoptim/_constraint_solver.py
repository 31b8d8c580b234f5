r"""The seam between the methods and the linear algebra: a constraint solver answers the three questions a step
asks of :math:`G_W = JWJ^\top`.

* ``project(x)`` — :math:`P_W x = x - WJ^\top G_W^{-1}Jx` (:math:`J P_W x = 0`);
* ``normal_step(c)`` — :math:`v_W = -WJ^\top G_W^{-1}c` (:math:`Jv_W = -c`), optionally Levenberg–Marquardt
  damped (:func:`sqpoptim._linalg.damped`);
* ``step(x, c, γ)`` — the whole displacement :math:`\gamma v_W - P_W x` (the KKT step of
  :mod:`sqpoptim._krylov`), with the step's diagnostics.

Two implementations, chosen per step by :func:`make_solver`:

* :class:`DenseSolver` — forms :math:`G_W` in float64 once (:meth:`JacobianOperator.gram`), factors it once
  (:func:`sqpoptim._linalg.factor_gram`) and solves every right-hand side with that factor, as lineax's
  ``init``/``compute``; the functions of :mod:`sqpoptim._linalg` on an explicit J are its reference. Above
  ``EXACT_RANK_MAX`` constraints the exact mode's fallback for an ill-conditioned :math:`G` (a truncated
  eigendecomposition, about nine Cholesky factorisations' worth of work) is replaced by the regularised
  Cholesky factorisation of the sync-free mode; the diagnostics then report ``rank = -1``.
* :class:`KrylovSolver` — MINRES with only :math:`Jx` and :math:`J^\top y`, warm-started from the
  last step's multipliers, the step by the inexact-SQP termination tests (:mod:`sqpoptim._krylov`).

``make_solver(..., mode="auto")`` takes the dense solver — exact solves, the algorithm as published — for up
to ``AUTO_DENSE_M`` constraints, and above while it costs no more than a matrix-free step at its iteration cap
(two solves of at most ``max_iter`` iterations, each a :math:`J` and a :math:`J^\top` product), counting
:math:`\text{gram\_flops} + m^3/3` for the Gram matrix and its Cholesky factorisation, at twice the price of a
float32 flop (``AUTO_FLOAT64_COST``); and never when its float64 ``m × m`` matrices would not fit in
``AUTO_DENSE_BYTES``. On the tanh MLPs of the scaling benchmark (layer factors) the switch falls near m = 2,400
for :math:`n \approx 10^5` and between m = 1,000 and 10,000 for :math:`n \approx 10^6`, where the measured
costs cross too (BENCHMARKS.md). On CUDA (where every Krylov iteration would synchronise) only the memory bound
applies.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._jacobian_operator import DenseJacobian, JacobianOperator
from ._krylov import KrylovOptions, _inv_diag, inexact_step, krylov_project, minres
from ._linalg import GramFactor, _damped_gram, damped, factor_gram, step_info

__all__ = [
    "AUTO_DENSE_BYTES",
    "AUTO_DENSE_M",
    "AUTO_FLOAT64_COST",
    "EXACT_RANK_MAX",
    "SOLVER_MODES",
    "ConstraintSolver",
    "DenseSolver",
    "KrylovSolver",
    "as_solver",
    "make_solver",
]

SOLVER_MODES = ("auto", "dense", "krylov")
EXACT_RANK_MAX = 256  # largest m handled by the truncated eigendecomposition in exact mode
AUTO_DENSE_M = 512  # up to this many constraints the dense solver is always taken (exact steps, the published method)
AUTO_FLOAT64_COST = 2.0  # float64 GEMM and Cholesky run at about half the float32 rate (measured: 39 vs 78 GFLOP/s)
AUTO_DENSE_BYTES = 3 << 30  # float64 m x m matrices (G, its factor, a temporary) the dense solver may hold


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
    ) -> None:
        self.op, self.weight, self.rank_tol, self.sync_free = op, weight, rank_tol, sync_free
        self.needs_gram = needs_gram  # the unweighted Gram matrix will be factored (validation reads its diagonal)
        # the exact mode's eigendecomposition costs about nine Cholesky factorisations: only for small m
        self.truncate = op.m <= EXACT_RANK_MAX
        self._gram: Tensor | None = None
        self._factor: GramFactor | None = None

    @property
    def gram(self) -> Tensor:
        r""":math:`G_W` in float64 (formed on first use)."""
        if self._gram is None:
            self._gram = self.op.gram(self.weight)
        return self._gram

    @property
    def factor(self) -> GramFactor:
        if self._factor is None:
            self._factor = factor_gram(self.gram, self.rank_tol, sync_free=self.sync_free, truncate=self.truncate)
        return self._factor

    def row_check(self) -> Tensor:
        if self.weight is None and self.needs_gram:  # formed anyway: its diagonal validates J for free
            return torch.diagonal(self.gram)
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
        F = damped(self.factor, damping, self.rank_tol, sync_free=self.sync_free or not self.truncate)
        return self._wjt(F.solve(-c), self.weight)

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
        return delta_n + u, step_info(c, self.factor if self.op.m else None, v, u)

    def exact(self, info: dict[str, Any]) -> bool:
        if self.op.m == 0 or self._factor is None or self._factor.chol is None:
            return self.op.m == 0
        return self.truncate or self.sync_free or int(self._factor.rank) >= 0  # (one host read, exact mode)

    def weighted(self, weight: Tensor) -> DenseSolver:
        return DenseSolver(self.op, rank_tol=self.rank_tol, sync_free=self.sync_free, weight=weight)


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
        when set)."""
        if self.op.m == 0:
            return torch.zeros(self.op.n, dtype=self.op.dtype, device=self.op.device)
        w = self.weight if weight is None else weight
        b = -c.double()
        shift = 0.0
        if damping is not None:
            shift = float(damping) * float(self.op.row_sq_norms(w).mean())
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
        )
        self._record(slot, res)
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


def as_solver(J: Tensor | ConstraintSolver, *, rank_tol: float, sync_free: bool) -> ConstraintSolver:
    """An explicit ``[m, n]`` J becomes the dense reference solver; a solver passes through."""
    if isinstance(J, ConstraintSolver):
        return J
    return DenseSolver(DenseJacobian(J), rank_tol=rank_tol, sync_free=sync_free)


def choose(op: JacobianOperator, mode: str, options: KrylovOptions) -> str:
    """``"dense"`` or ``"krylov"`` for ``mode="auto"`` (see the module docstring); other modes pass through."""
    if mode != "auto":
        return mode
    m = op.m
    if m == 0:
        return "dense"
    if 3 * 8 * m * m > AUTO_DENSE_BYTES:
        return "krylov"
    if op.device.type == "cuda" or m <= AUTO_DENSE_M:
        return "dense"
    dense_cost = AUTO_FLOAT64_COST * (op.gram_flops() + m**3 / 3.0)
    # a step makes at most two capped solves (the projected gradient, the step), plus their starts
    krylov_cost = (2 * options.max_iter + 4) * op.product_flops()
    return "dense" if dense_cost <= krylov_cost else "krylov"


def make_solver(
    op: JacobianOperator,
    mode: str,
    *,
    rank_tol: float,
    sync_free: bool,
    options: KrylovOptions,
    state: dict[str, Any],
    needs_gram: bool = True,
) -> ConstraintSolver:
    """The solver for this step's operator: ``mode`` is ``"dense"``, ``"krylov"`` or ``"auto"``; ``needs_gram``
    says whether the method factors the unweighted Gram matrix (then validation reads its diagonal)."""
    if choose(op, mode, options) == "dense":
        return DenseSolver(op, rank_tol=rank_tol, sync_free=sync_free, needs_gram=needs_gram)
    return KrylovSolver(op, options, state)
