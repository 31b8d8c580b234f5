r"""The trust region of the damped normal step: the smallest Levenberg–Marquardt damping whose step fits a radius.

The damped normal step :math:`v(\mu) = -J^\top(JJ^\top + \mu I)^{-1}c` is the minimiser of
:math:`\tfrac12\|c + Jv\|^2` over :math:`\|v\| \le \|v(\mu)\|` (J. J. Moré, "The Levenberg–Marquardt algorithm:
implementation and theory", Numerical Analysis, LNM 630, 1978), and :math:`\|v(\mu)\|` decreases with μ. Given the
radius :math:`\Delta_k` of :mod:`sqpoptim._damping` and the normal step size γ, a step takes

.. math::

    \boxed{\mu_k = \max\bigl(\nu_k \operatorname{mean}_i (J_kJ_k^\top)_{ii},\ \mu_\Delta\bigr),\qquad
    \|v(\mu_\Delta)\| = \Delta_k/\gamma}

so that the normal displacement :math:`\gamma v_k` stays within :math:`\Delta_k` (within the tolerance below).
:math:`\mu_\Delta` solves the secular equation :math:`\phi(\mu) = 1/\|v(\mu)\| - \gamma/\Delta_k = 0` by Newton's
method (Moré & Sorensen, "Computing a trust region step", SIAM J. Sci. Stat. Comput. 4, 1983; Nocedal & Wright,
*Numerical Optimization*, Alg. 4.3) in the m-dimensional dual form: with
:math:`G + \mu I = LL^\top`, :math:`y = (G + \mu I)^{-1}c`, :math:`z = (G + \mu I)^{-1}y`,

.. math::

    \|v\|^2 = y^\top G y,\qquad \|q\|^2 = v^\top(J^\top J + \mu I)^{-1}v = y^\top G z,\qquad
    \mu \leftarrow \mu + \frac{\|v\|^2}{\|q\|^2}\,\frac{\|v\| - \Delta_k/\gamma}{\Delta_k/\gamma}

(one Cholesky factorisation of the m×m matrix per iteration, cheap beside forming J). φ is concave and increasing
in μ, so from :math:`\mu_0 = \nu_k\operatorname{mean}\operatorname{diag}G` (left of the root whenever the radius
binds) the iterates increase monotonically towards the root without passing it: the step found is at least as
long as the radius and within ``TOLERANCE`` of it once converged. Where the radius does not bind
(:math:`\|v(\mu_0)\| \le (1 + \text{TOLERANCE})\Delta_k/\gamma`, or :math:`\Delta_k = \infty`, the state before the
first failure) the step is the ν-damped one, bit for bit.

Synchronisation. The exact mode (CPU) reads one flag on the host — does the radius bind? — and, when it does,
iterates until :math:`|\|v\| - \Delta_k/\gamma| \le \text{TOLERANCE}\cdot\Delta_k/\gamma` or ``ITERATIONS``
factorisations. The sync-free mode runs the same iterations as device computations, a fixed ``ITERATIONS`` of
them, and keeps μ₀ where the radius does not bind (``torch.where``); the two modes give the same μ whenever the
exact mode's iteration ran to ``ITERATIONS`` or the radius did not bind.

Where this applies. The dense solver's Euclidean normal step (every method with ``projection="euclidean"``): the
factor of the last iterate is memoised on the Gram factor (:func:`sqpoptim._linalg.damped`), so the solver's own
solve reuses it. The matrix-free solver has no factorisation to iterate with; it takes the μ of the bound
:math:`\|v(\mu)\| \le \|c\|/(2\sqrt\mu)` (true for every J), :math:`\mu_\Delta = (\gamma\|c\|/(2\Delta_k))^2` —
a step inside the radius, shorter than the exact one. A normal step in another metric (``projection="scaled"``)
is damped by ν alone: the radius is in the Euclidean norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._constraint_solver import ConstraintSolver
from ._linalg import damped

__all__ = ["ITERATIONS", "TOLERANCE", "damping_within"]

TOLERANCE = 0.1  # relative tolerance on ‖γv‖ = Δ (Moré 1978 accepts 10 %)
ITERATIONS = 3  # Newton iterations on the secular equation: at most (exact mode), exactly (sync-free mode)


def damping_within(
    solver: ConstraintSolver, c: Tensor, nu: Tensor, radius: Tensor, gamma: float, *, sync_free: bool
) -> tuple[Tensor, Tensor]:
    """``(ν_eff, binds)``: the relative damping :math:`\\mu_k/\\operatorname{mean}\\operatorname{diag}G` of this step
    and whether the radius set it (0-d float64 and bool device tensors). ``nu`` is ν_k, ``radius`` Δ_k (``inf``:
    none), ``gamma`` the normal step size; the normal step is the solver's unweighted one. Where the radius does
    not bind, ``ν_eff`` is ``nu`` itself (the same tensor in exact mode)."""
    no = torch.zeros((), dtype=torch.bool, device=nu.device)
    m = c.shape[0]
    if m == 0 or gamma == 0.0 or (not sync_free and not math.isfinite(float(radius))):  # one host read (exact)
        return nu, no
    target = radius / gamma  # bound on ‖v‖
    if solver.kind != "dense":
        return _bound(solver, c, nu, target)
    return _secular(solver, c, nu, target, sync_free)


def _bound(solver: ConstraintSolver, c: Tensor, nu: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The matrix-free solver: μ from :math:`\\|v(\\mu)\\| \\le \\|c\\|/(2\\sqrt\\mu)`."""
    scale = solver.op.mean_row_sq_norm(None).double()
    mu = (torch.linalg.vector_norm(c.double()) / (2.0 * target)).square()
    nu_r = mu / torch.where(scale > 0, scale, 1.0)
    binds = target.isfinite() & (nu_r > nu)
    return torch.where(binds, nu_r, nu), binds


def _secular(solver: ConstraintSolver, c: Tensor, nu: Tensor, target: Tensor, sync_free: bool) -> tuple[Tensor, Tensor]:
    factor = solver.factor  # type: ignore[attr-defined]  # the undamped factor of G (formed anyway)
    G = factor.gram
    mode = solver.sync_free or not solver.truncate  # type: ignore[attr-defined]  # as the solver damps
    rank_tol = solver.rank_tol  # type: ignore[attr-defined]
    c64 = c.double()
    scale = torch.diagonal(G).mean()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))

    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)

    def lengths(nu_i: Tensor, first: bool = False) -> tuple[Tensor, Tensor]:
        if first:  # the solver's own damped factor (memoised: reused by its solve when the radius does not bind)
            solve = damped(factor, nu_i, rank_tol, sync_free=mode).solve
        else:  # a plain factorisation: only ‖v‖ and its derivative are needed
            L = torch.linalg.cholesky_ex(G + (nu_i * scale) * eye)[0]
            solve = lambda b: torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)  # noqa: E731
        y = solve(c64)
        z = solve(y)
        v2 = (y @ (G @ y)).clamp_min(0.0)
        q2 = (y @ (G @ z)).clamp_min(torch.finfo(torch.float64).tiny)
        return v2.sqrt(), q2

    v, q2 = lengths(nu, first=True)
    binds = target.isfinite() & (v > (1.0 + TOLERANCE) * target)
    if not sync_free and not bool(binds):  # one host read (exact mode): the ν-damped step fits
        return nu, binds
    safe_target = torch.where(target.isfinite(), target, v)
    mu = nu * scale
    nu_i = nu
    for i in range(ITERATIONS):
        done = (v - safe_target).abs() <= TOLERANCE * safe_target
        if not sync_free and bool(done):  # converged (one host read, exact mode)
            break
        # Newton on 1/‖v(μ)‖ = γ/Δ: monotone from the left, so μ only grows (the max guards rounding); once
        # converged the sync-free mode keeps μ, as the exact mode stops
        newton = torch.maximum(mu, mu + v.square() / q2 * (v - safe_target) / safe_target)
        mu = torch.where(done, mu, newton)
        nu_i = mu / scale
        if i + 1 < ITERATIONS:  # the last iterate is taken unchecked: the solver factors it anyway
            v, q2 = lengths(nu_i)
    return torch.where(binds, nu_i, nu), binds
