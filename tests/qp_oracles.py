"""Oracles for the inequality-constrained step QP, independent of sqpoptim's solver (float64, numpy/scipy).

:func:`qp_reference` solves min ½‖d − d0‖²_H s.t. γc_E + J_E d = 0, γc_I + J_I d ≤ 0 with scipy's SLSQP, reads
the active set off its solution, re-solves the KKT system on that set densely and *certifies* the result
(multipliers of the inequalities ≥ 0, every other inequality satisfied): the KKT conditions of a strictly
convex QP are sufficient, so a certified point is the solution, to the accuracy of a dense solve. A wrong
active set from SLSQP cannot pass: it fails the certificate instead.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize

CERT_TOL = 1e-11


def kkt_on_active_set(J, c, d0, h, m_eq, active, gamma=1.0):
    """Dense KKT solve on the rows E ∪ active: returns (d, multipliers over all rows, zero off the set)."""
    J, c, d0, h = (np.asarray(a, dtype=np.float64) for a in (J, c, d0, h))
    m, n = J.shape
    rows = np.flatnonzero(np.concatenate([np.ones(m_eq, bool), np.asarray(active, bool)[m_eq:]]))
    JA = J[rows]
    K = np.block([[np.diag(h), JA.T], [JA, np.zeros((len(rows), len(rows)))]])
    rhs = np.concatenate([h * d0, -gamma * c[rows]])
    d = np.linalg.lstsq(K, rhs, rcond=1e-13)[0][:n]  # d is unique even when the active rows are dependent
    # ... their multipliers are not: take nonnegative ones for the inequalities (bounded least squares)
    lb = np.where(rows < m_eq, -np.inf, 0.0)
    fit = scipy.optimize.lsq_linear(JA.T, -h * (d - d0), bounds=(lb, np.full(len(rows), np.inf)), tol=1e-15)
    y = np.zeros(m)
    y[rows] = fit.x
    return d, y


def certify(J, c, d, y, d0, h, m_eq, gamma=1.0, tol=CERT_TOL):
    """Largest violation of the KKT conditions of the step QP at (d, y), relative to the problem's scale."""
    J, c, d, y, d0, h = (np.asarray(a, dtype=np.float64) for a in (J, c, d, y, d0, h))
    r = gamma * c + J @ d
    scale = max(1.0, np.abs(gamma * c).max(initial=0.0), np.abs(J @ d0).max(initial=0.0))
    stat = np.abs(h * (d - d0) + J.T @ y).max(initial=0.0) / max(1.0, np.abs(h * d0).max())
    eq = np.abs(r[:m_eq]).max(initial=0.0) / scale
    ineq = np.maximum(r[m_eq:], 0).max(initial=0.0) / scale
    sign = np.maximum(-y[m_eq:], 0).max(initial=0.0) / max(1.0, np.abs(y).max(initial=0.0))
    comp = np.abs(y[m_eq:] * r[m_eq:]).max(initial=0.0) / (scale * max(1.0, np.abs(y).max(initial=0.0)))
    return max(stat, eq, ineq, sign, comp)


def qp_reference(J, c, d0, m_eq, gamma=1.0, h=None, start=None, active_tol=1e-7):
    """The certified solution (d, y) of the step QP. SLSQP from d0, then from ``start`` (a feasible point, when
    known), then trust-constr; the first whose active set certifies wins, else AssertionError."""
    J, c, d0 = (np.asarray(a, dtype=np.float64) for a in (J, c, d0))
    m, n = J.shape
    h = np.ones(n) if h is None else np.asarray(h, dtype=np.float64)
    cons = []
    if m_eq:
        cons.append({"type": "eq", "fun": lambda x: gamma * c[:m_eq] + J[:m_eq] @ x, "jac": lambda x: J[:m_eq]})
    if m > m_eq:
        cons.append({"type": "ineq", "fun": lambda x: -(gamma * c[m_eq:] + J[m_eq:] @ x), "jac": lambda x: -J[m_eq:]})
    lin = scipy.optimize.LinearConstraint(J, np.r_[-gamma * c[:m_eq], np.full(m - m_eq, -np.inf)], -gamma * c)
    attempts = [("SLSQP", d0)] + ([("SLSQP", np.asarray(start, dtype=np.float64))] if start is not None else [])
    attempts.append(("trust-constr", d0))
    errors = []
    for method, x0 in attempts:
        res = scipy.optimize.minimize(
            lambda x: 0.5 * np.sum(h * (x - d0) ** 2),
            x0,
            jac=lambda x: h * (x - d0),
            hess=(lambda x: np.diag(h)) if method == "trust-constr" else None,
            constraints=cons if method == "SLSQP" else [lin],
            method=method,
            options={"ftol": 1e-15, "maxiter": 2000}
            if method == "SLSQP"
            else {"gtol": 1e-13, "xtol": 1e-15, "maxiter": 5000},
        )
        r = gamma * c + J @ res.x
        scale = max(1.0, np.abs(r).max())
        active = r > -active_tol * scale
        d, y = kkt_on_active_set(J, c, d0, h, m_eq, active, gamma)
        err = certify(J, c, d, y, d0, h, m_eq, gamma)
        if err < CERT_TOL:
            return d, y
        errors.append(f"{method}: KKT error {err:.1e} (status {res.status})")
    raise AssertionError("no scipy solution certifies: " + "; ".join(errors))
