r"""Choosing the constraint solver of a step: :class:`~sqpoptim._dense_solver.DenseSolver` or
:class:`~sqpoptim._krylov_solver.KrylovSolver`.

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

from typing import Any

from ._constraint_solver import ConstraintSolver
from ._dense_solver import DenseSolver
from ._jacobian_operator import JacobianOperator
from ._krylov import KrylovOptions
from ._krylov_solver import KrylovSolver
from ._workspace import Workspace

__all__ = ["AUTO_DENSE_BYTES", "AUTO_DENSE_M", "AUTO_FLOAT64_COST", "SOLVER_MODES", "choose", "make_solver"]

SOLVER_MODES = ("auto", "dense", "krylov")
AUTO_DENSE_M = 512  # up to this many constraints the dense solver is always taken (exact steps, the published method)
AUTO_FLOAT64_COST = 2.0  # float64 GEMM and Cholesky run at about half the float32 rate (measured: 39 vs 78 GFLOP/s)
AUTO_DENSE_BYTES = 3 << 30  # float64 m x m matrices (G, G + μI and their factors) the dense solver may hold


def choose(op: JacobianOperator, mode: str, options: KrylovOptions) -> str:
    """``"dense"`` or ``"krylov"`` for ``mode="auto"`` (see the module docstring); other modes pass through."""
    if mode != "auto":
        return mode
    m = op.m
    if m == 0:
        return "dense"
    if 4 * 8 * m * m > AUTO_DENSE_BYTES:
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
    workspace: Workspace | None = None,
) -> ConstraintSolver:
    """The solver for this step's operator: ``mode`` is ``"dense"``, ``"krylov"`` or ``"auto"``; ``needs_gram``
    says whether the method factors the unweighted Gram matrix (then validation reads its diagonal); ``workspace``
    holds the dense solver's m x m matrices between steps (:mod:`sqpoptim._workspace`)."""
    if choose(op, mode, options) == "dense":
        return DenseSolver(op, rank_tol=rank_tol, sync_free=sync_free, needs_gram=needs_gram, workspace=workspace)
    return KrylovSolver(op, options, state)
