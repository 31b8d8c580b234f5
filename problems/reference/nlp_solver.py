r"""Per-instance reference optima of the nonconvex programs C2/C3 from scipy's NLP solvers.

.. math::
    \min_y\ f(y) = \tfrac12 y^\top Q y + p^\top \sin y \quad \text{s.t.} \quad h(x, y) = 0, \qquad
    Q = \mathrm{diag}(q),

with :math:`h = A y - x` (C2, ``kind="linear"``) or
:math:`h_i = y^\top A_i y + c_i^\top y + d_i - x_i^3` (C3, ``kind="quadratic"``; here :math:`c_i` are the
rows of ``A``, the linear term, and ``quad[i]`` = :math:`A_i`).

* C2: SLSQP (``ftol`` 1e-12) with exact gradients and the constant Jacobian. Starts: the least-norm feasible
  point :math:`A^+x` and the projection of :math:`y_u` onto :math:`\{Ay = x\}`, where :math:`y_u` is the
  unconstrained minimiser (:func:`unconstrained_minimiser`).
* C3: ``trust-constr`` with exact Hessians (objective and :math:`2\sum_i v_i A_i`; ``gtol`` 1e-10,
  ``xtol`` 1e-14). At 200 variables it measured about 10x faster than SLSQP, whose quasi-Newton Hessian
  needs thousands of iterations there. Starts: :math:`y_u`, 0, then N(0, 1) draws (seeded per instance).
* The first ``starts`` starts always run; further ones (up to ``max_starts``) only while none has been
  feasible. The best feasible result (max |h| ≤ 1e-8) by objective is kept. Like IPOPT in the paper this
  finds *local* optima of a nonconvex program: the reference is an upper bound on the global optimum.
* Multipliers: the least-squares estimate :math:`\lambda = \arg\min \|\nabla f + J^\top \lambda\|` at the
  solution, stored with the KKT residual :math:`\|\nabla f + J^\top\lambda\|_\infty` (solver-independent).

Threads. Every dense operation here is small (≤ 200 x 200), and multi-threaded BLAS on such sizes only
spins: on a shared two-core machine one C3 solve measured 50x slower with OpenBLAS's default threads than
with one. Large instance sets are therefore solved in ``spawn``-ed worker processes started with one BLAS
thread (``SQPOPTIM_REFERENCE_PROCESSES`` of them, default 1; ``0`` solves in-process); small ones (n ≤ 50)
in-process. A script that builds a large C2/C3 problem for the first time (before its references are cached)
therefore needs the usual ``if __name__ == "__main__":`` guard, as for any ``multiprocessing`` spawn; the
command line (``python -m problems``) has it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Mapping

import numpy as np
import scipy.optimize as so

__all__ = ["constraint_jacobian", "constraint_values", "objective", "solve_references", "unconstrained_minimiser"]

FEASIBILITY_TOL = 1e-8
_KEYS = ("y", "lam", "objective", "violation", "kkt", "start", "iterations")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def objective(q: np.ndarray, p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:math:`f(y)` for ``y [..., n]``."""
    return 0.5 * (q * y * y).sum(-1) + (p * np.sin(y)).sum(-1)


def unconstrained_minimiser(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    r"""The global minimiser of :math:`f` without constraints, coordinate by coordinate (q ≥ 0, p ≥ 0).

    Each term :math:`\tfrac12 q y^2 + p \sin y` is smallest near :math:`y = -\pi/2` (the sine minimum with
    the smallest :math:`|y|`); Newton from there, where :math:`f'' = q + p > 0`, stays in that basin."""
    y = np.full_like(q, -np.pi / 2)
    for _ in range(50):
        y = y - (q * y + p * np.cos(y)) / (q - p * np.sin(y))
    return y


def constraint_values(data: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:math:`h(x, y)` ``[m]`` for one instance."""
    h = data["A"] @ y - (x if data.get("quad") is None else x**3 - data["d"])
    if data.get("quad") is not None:
        h = h + np.einsum("i,mij,j->m", y, data["quad"], y)
    return h


def constraint_jacobian(data: Mapping[str, np.ndarray], y: np.ndarray) -> np.ndarray:
    """:math:`J = \\partial h / \\partial y` ``[m, n]`` for one instance (A_i symmetric)."""
    if data.get("quad") is None:
        return data["A"]
    return 2.0 * np.einsum("mij,j->mi", data["quad"], y) + data["A"]


def _multipliers(data: Mapping[str, np.ndarray], y: np.ndarray) -> tuple[np.ndarray, float]:
    grad = data["q"] * y + data["p"] * np.cos(y)
    J = constraint_jacobian(data, y)
    lam = np.linalg.lstsq(J.T, -grad, rcond=None)[0]
    return lam, float(np.abs(grad + J.T @ lam).max())


def _starts(data: Mapping[str, np.ndarray], x: np.ndarray, index: int, count: int) -> list[np.ndarray]:
    q, p, A = data["q"], data["p"], data["A"]
    yu = unconstrained_minimiser(q, p)
    rng = np.random.default_rng([int(data["seed"]), index])
    if data.get("quad") is None:
        pinv = np.linalg.pinv(A)
        first = [pinv @ x, yu - pinv @ (A @ yu - x)]
        return [*first, *(s - pinv @ (A @ s - x) for s in rng.standard_normal((max(0, count - 2), len(q))))]
    return [yu, np.zeros_like(yu), *rng.standard_normal((max(0, count - 2), len(q)))]


def _solve_one(data: Mapping[str, np.ndarray], x: np.ndarray, y0: np.ndarray) -> tuple[np.ndarray, int]:
    q, p = data["q"], data["p"]
    f = lambda y: objective(q, p, y)  # noqa: E731
    grad = lambda y: q * y + p * np.cos(y)  # noqa: E731
    if data.get("quad") is None:
        con = {"type": "eq", "fun": lambda y: constraint_values(data, x, y), "jac": lambda y: data["A"]}
        res = so.minimize(f, y0, jac=grad, method="SLSQP", constraints=[con], options={"ftol": 1e-12, "maxiter": 2000})
    else:
        quad = data["quad"]
        con = so.NonlinearConstraint(
            lambda y: constraint_values(data, x, y),
            0.0,
            0.0,
            jac=lambda y: constraint_jacobian(data, y),
            hess=lambda y, v: 2.0 * np.einsum("m,mij->ij", v, quad),
        )
        res = so.minimize(
            f,
            y0,
            jac=grad,
            hess=lambda y: np.diag(q - p * np.sin(y)),
            method="trust-constr",
            constraints=[con],
            options={"gtol": 1e-10, "xtol": 1e-14, "maxiter": 3000},
        )
    return res.x, int(res.nit)


def solve_instance(
    data: Mapping[str, np.ndarray], x: np.ndarray, index: int, starts: int, max_starts: int
) -> dict[str, np.ndarray | float]:
    """The best feasible local optimum over the starts (see the module docstring), with diagnostics."""
    best: dict[str, np.ndarray | float] | None = None
    for k, y0 in enumerate(_starts(data, x, index, max_starts)):
        if k >= starts and best is not None:
            break
        y, nit = _solve_one(data, x, y0)
        violation = float(np.abs(constraint_values(data, x, y)).max())
        value = float(objective(data["q"], data["p"], y))
        if violation <= FEASIBILITY_TOL and np.isfinite(value) and (best is None or value < best["objective"]):
            lam, kkt = _multipliers(data, y)
            best = {"y": y, "lam": lam, "objective": value, "violation": violation, "kkt": kkt}
            best |= {"start": k, "iterations": float(nit)}
    if best is None:  # no start reached feasibility: flagged, never silently used
        m, n = data["A"].shape
        nan = float("nan")
        return {
            "y": np.full(n, nan),
            "lam": np.full(m, nan),
            "objective": nan,
            "violation": nan,
            "kkt": nan,
            "start": -1,
            "iterations": nan,
        }
    return best


# --- worker processes ------------------------------------------------------------------------------------
_WORKER: dict[str, object] = {}


def _init_worker(data: Mapping[str, np.ndarray], starts: int, max_starts: int) -> None:
    _WORKER.update(data=data, starts=starts, max_starts=max_starts)


def _solve_indexed(item: tuple[int, np.ndarray]) -> dict[str, np.ndarray | float]:
    index, x = item
    return solve_instance(_WORKER["data"], x, index, _WORKER["starts"], _WORKER["max_starts"])


def solve_references(
    data: Mapping[str, np.ndarray], X: np.ndarray, indices: np.ndarray, *, starts: int, max_starts: int
) -> dict[str, np.ndarray]:
    """Solve every instance ``X[k]`` (global instance number ``indices[k]``, which seeds its random starts).

    Returns stacked arrays ``y [K, n]``, ``lam [K, m]``, ``objective``, ``violation``, ``kkt``, ``start``
    (which start won; −1: none was feasible, the row is NaN), ``iterations`` (the winner's) ``[K]`` and
    ``seconds`` (wall time of the whole set)."""
    t0 = time.perf_counter()
    items = list(zip(indices.tolist(), X))
    processes = int(os.environ.get("SQPOPTIM_REFERENCE_PROCESSES", "1"))
    if processes < 1 or data["A"].shape[1] <= 50:
        _init_worker(data, starts, max_starts)
        results = [_solve_indexed(item) for item in items]
    else:
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})  # read by BLAS when a spawned worker loads it
        try:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(processes, initializer=_init_worker, initargs=(dict(data), starts, max_starts)) as pool:
                results = []
                for k, res in enumerate(pool.imap(_solve_indexed, items, chunksize=4)):
                    results.append(res)
                    if (k + 1) % max(1, len(items) // 10) == 0:
                        print(f"reference optima: {k + 1}/{len(items)} instances", file=sys.stderr, flush=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    out = {key: np.stack([np.asarray(r[key]) for r in results]) for key in _KEYS}
    out["seconds"] = np.asarray(time.perf_counter() - t0)
    return out
