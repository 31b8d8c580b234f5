r"""The exact reference for the learned MPC (:mod:`problems.output_tasks.mpc`): HardNet++'s convex QCQP, solved per
instance.

With :math:`A = I` the states are affine in the controls, :math:`X(u) = S_x x_0 + S_u u` (all N states stacked,
``S_x = [A; A²; …]``, ``S_u`` block lower triangular with blocks :math:`A^{k-1-j}B`), so the QCQP in the
controls :math:`u \in \mathbb{R}^{N n_u}` alone is

.. math::
    \min_u\ Z(u) = \|X(u) - \mathbf{1}\otimes x_{\text{target}}\|^2 + \|u\|^2 \quad\text{s.t.}\quad
    -1 \le u \le 1,\quad q_k(u) = x_k(u)^\top Q x_k(u) \le 10 \ (k = 1..N),

strictly convex (Hessian :math:`2(S_u^\top S_u + I)`) with convex constraints, so a KKT point is the unique
global minimiser. :func:`solve_mpc` solves it with SLSQP (exact gradients and constraint Jacobians, ``ftol``
1e-15) from the feasible start :math:`u = 0`, then polishes with Newton steps on the KKT equations of the
active set SLSQP found (active bounds fixed, active quadratic constraints as equalities), keeping the polished
point only if it is feasible with non-negative multipliers and a smaller KKT residual.

:func:`kkt_residual` checks optimality independently of the solver: it recovers multipliers
:math:`\lambda, \nu \ge 0` of the (nearly) active constraints by non-negative least squares on the
stationarity equation :math:`\nabla Z + \sum_k \lambda_k \nabla q_k + \sum_i \nu_i\,\mathrm{sign}(u_i) e_i = 0`
and returns the relative stationarity error, the primal infeasibility and the complementarity error.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize

__all__ = ["MPCData", "kkt_residual", "solve_mpc"]


class MPCData:
    """The fixed MPC data (dynamics, weights, bounds) and the cost and constraints as functions of ``u``."""

    def __init__(
        self,
        A: np.ndarray,
        B: np.ndarray,
        Q: np.ndarray,
        x_target: np.ndarray,
        horizon: int,
        u_bound: float,
        x_bound: float,
    ) -> None:
        self.A, self.B, self.Q = (np.asarray(a, dtype=np.float64) for a in (A, B, Q))
        self.x_target = np.asarray(x_target, dtype=np.float64)
        self.N, self.nx, self.nu = horizon, self.B.shape[0], self.B.shape[1]
        self.u_bound, self.x_bound = float(u_bound), float(x_bound)
        N, nx, nu = self.N, self.nx, self.nu
        powers = [np.linalg.matrix_power(self.A, k) for k in range(N + 1)]
        self.Sx = np.concatenate(powers[1:], axis=0)  # [N nx, nx]
        self.Su = np.zeros((N * nx, N * nu))
        for k in range(N):  # state x_{k+1} = Σ_{j<=k} A^{k-j} B u_j
            for j in range(k + 1):
                self.Su[k * nx : (k + 1) * nx, j * nu : (j + 1) * nu] = powers[k - j] @ self.B
        self.Xt = np.tile(self.x_target, N)  # [N nx]
        self.H = 2 * (self.Su.T @ self.Su + np.eye(N * nu))  # Hessian of Z

    def states(self, x0: np.ndarray, u: np.ndarray) -> np.ndarray:
        return self.Sx @ x0 + self.Su @ u  # [N nx]

    def cost(self, x0: np.ndarray, u: np.ndarray) -> float:
        return float(np.sum((self.states(x0, u) - self.Xt) ** 2) + np.sum(u**2))

    def cost_grad(self, x0: np.ndarray, u: np.ndarray) -> np.ndarray:
        return 2 * self.Su.T @ (self.states(x0, u) - self.Xt) + 2 * u

    def quad(self, x0: np.ndarray, u: np.ndarray) -> np.ndarray:
        """:math:`q_k = x_k^\\top Q x_k`, ``[N]``."""
        X = self.states(x0, u).reshape(self.N, self.nx)
        return np.einsum("ki,ij,kj->k", X, self.Q, X)

    def quad_jac(self, x0: np.ndarray, u: np.ndarray) -> np.ndarray:
        """``[N, N nu]``: row k is :math:`2 S_{u,k}^\\top Q x_k`."""
        X = self.states(x0, u).reshape(self.N, self.nx)
        Su = self.Su.reshape(self.N, self.nx, -1)
        return 2 * np.einsum("kij,ki->kj", Su, X @ self.Q)

    def quad_hess(self, k: int) -> np.ndarray:
        Suk = self.Su[k * self.nx : (k + 1) * self.nx]
        return 2 * Suk.T @ self.Q @ Suk


def _multipliers(data: MPCData, x0: np.ndarray, u: np.ndarray, active_tol: float):
    grad = data.cost_grad(x0, u)
    q_slack = data.x_bound - data.quad(x0, u)  # [N]
    u_slack = data.u_bound - np.abs(u)  # [N nu]
    aq = np.flatnonzero(q_slack <= active_tol * data.x_bound)
    au = np.flatnonzero(u_slack <= active_tol * data.u_bound)
    cols = [data.quad_jac(x0, u)[aq].T, (np.eye(u.size)[:, au] * np.sign(u[au]))]
    G = np.concatenate(cols, axis=1)  # [N nu, |aq| + |au|]
    if G.shape[1]:
        lam, _ = scipy.optimize.nnls(G, -grad)
    else:
        lam = np.zeros(0)
    return grad, G, lam, aq, au, q_slack, u_slack


def kkt_residual(data: MPCData, x0: np.ndarray, u: np.ndarray, active_tol: float = 1e-7) -> dict[str, float]:
    """Relative stationarity error, primal infeasibility and complementarity of ``u`` (module docstring)."""
    grad, G, lam, aq, au, q_slack, u_slack = _multipliers(data, x0, u, active_tol)
    stat = grad + G @ lam
    comp = np.concatenate([lam[: len(aq)] * np.abs(q_slack[aq]), lam[len(aq) :] * np.abs(u_slack[au])])
    return {
        "stationarity": float(np.abs(stat).max() / max(1.0, np.abs(grad).max())),
        "primal": float(max(0.0, -q_slack.min() / data.x_bound, -u_slack.min() / data.u_bound)),
        "complementarity": float(comp.max(initial=0.0)),
        "active_quadratic": float(len(aq)),
        "active_bounds": float(len(au)),
    }


def _score(r: dict[str, float]) -> float:
    return max(r["stationarity"], r["primal"], r["complementarity"])


def _polish(data: MPCData, x0: np.ndarray, u: np.ndarray, steps: int = 8) -> np.ndarray:
    """Newton on the KKT equations of the active set at ``u`` (bounds fixed, quadratic rows as equalities)."""
    _, _, lam, aq, au, _, _ = _multipliers(data, x0, u, 1e-6)
    free = np.setdiff1d(np.arange(u.size), au)
    u = u.copy()
    u[au] = np.sign(u[au]) * data.u_bound
    mu = lam[: len(aq)].copy()
    for _ in range(steps):
        grad = data.cost_grad(x0, u)[free]
        Jq = data.quad_jac(x0, u)[aq][:, free]  # [|aq|, |free|]
        W = data.H + sum(m * data.quad_hess(k) for m, k in zip(mu, aq))
        K = np.block([[W[np.ix_(free, free)], Jq.T], [Jq, np.zeros((len(aq), len(aq)))]])
        F = np.concatenate([grad + Jq.T @ mu, data.quad(x0, u)[aq] - data.x_bound])
        step = np.linalg.solve(K, -F)
        u[free] += step[: len(free)]
        mu += step[len(free) :]
    return u


def solve_mpc(data: MPCData, x0: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """The optimal controls ``u* [N nu]`` for the initial state ``x0`` and their KKT residuals."""
    x0 = np.asarray(x0, dtype=np.float64)
    res = scipy.optimize.minimize(
        lambda u: data.cost(x0, u),
        np.zeros(data.N * data.nu),
        jac=lambda u: data.cost_grad(x0, u),
        method="SLSQP",
        bounds=[(-data.u_bound, data.u_bound)] * (data.N * data.nu),
        constraints=[
            {
                "type": "ineq",
                "fun": lambda u: data.x_bound - data.quad(x0, u),
                "jac": lambda u: -data.quad_jac(x0, u),
            }
        ],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    u = np.clip(res.x, -data.u_bound, data.u_bound)
    best = kkt_residual(data, x0, u)
    try:
        polished = np.clip(_polish(data, x0, u), -data.u_bound, data.u_bound)
        r = kkt_residual(data, x0, polished)
        if _score(r) < _score(best):
            u, best = polished, r
    except np.linalg.LinAlgError:
        pass  # a singular active-set system: keep SLSQP's point (its residual is reported either way)
    return u, {**best, "slsqp_iterations": float(res.nit), "slsqp_success": float(res.success)}
