r"""The trust region of the damped normal step: the smallest Levenberg–Marquardt damping whose step fits a radius.

The damped normal step :math:`v(\mu) = -J^\top(JJ^\top + \mu I)^{-1}c` is the minimiser of
:math:`\tfrac12\|c + Jv\|^2` over :math:`\|v\| \le \|v(\mu)\|` (J. J. Moré, "The Levenberg–Marquardt algorithm:
implementation and theory", Numerical Analysis, LNM 630, 1978), and :math:`\|v(\mu)\|` decreases with μ. Given the
radius :math:`\Delta_k` of :mod:`sqpoptim._damping` and the normal step size γ, a step takes

.. math::

    \boxed{\mu_k = \max\bigl(\nu_k \operatorname{mean}_i (J_kJ_k^\top)_{ii},\ \mu_\Delta\bigr),\qquad
    \|v(\mu_\Delta)\| = \Delta_k/\gamma}

so that the normal displacement :math:`\gamma v_k` has the length :math:`\Delta_k` (within the tolerance below).
:math:`\mu_\Delta` solves the secular equation :math:`\phi(\mu) = 1/\|v(\mu)\| - \gamma/\Delta_k = 0` by Newton's
method (Moré & Sorensen, "Computing a trust region step", SIAM J. Sci. Stat. Comput. 4, 1983; Nocedal & Wright,
*Numerical Optimization*, Alg. 4.3) in the m-dimensional dual form: with
:math:`G + \mu I = LL^\top`, :math:`y = (G + \mu I)^{-1}c`, :math:`z = (G + \mu I)^{-1}y`,

.. math::

    \|v\|^2 = y^\top G y,\qquad \|q\|^2 = v^\top(J^\top J + \mu I)^{-1}v = y^\top G z,\qquad
    \mu \leftarrow \mu + \frac{\|v\|^2}{\|q\|^2}\,\frac{\|v\| - \Delta_k/\gamma}{\Delta_k/\gamma}

(one Cholesky factorisation of the m×m matrix per iteration, cheap beside forming J for m up to a few
thousand). Deviation from Moré–Sorensen, who iterate on :math:`1/\|v(\mu)\|` (concave and increasing in μ, so
Newton's iterate from any μ is a lower bound on the root): from μ = 0 those iterates climb through the tiny
eigenvalues of an ill-conditioned G about a decade per factorisation (4–6 at cond(G) = 1e13). Here that step is
taken once, from μ = 0 with the factor the step forms anyway (a certified lower bound, no factorisation), and the
iteration then is Newton's on :math:`\log\|v\|` against :math:`\log\mu`,

.. math::

    \log\mu \leftarrow \log\mu + \frac{\|v\|^2}{\mu\|q\|^2}\,\bigl(\log\|v\| - \log(\Delta_k/\gamma)\bigr),

exact where μ dominates the eigenvalues that carry c (:math:`\|v\| \propto 1/\mu`, the regime of a binding
radius), kept inside the bracket of the iterates on either side of the root (else its geometric mean), and
started from the last step's damping scaled to this radius where the radius set that one. It stops at the
first iterate within ``TOLERANCE`` of the radius: its factor, made by :func:`sqpoptim._linalg.damped` and
memoised there, is the one the solver's own solve then uses, so the last iteration costs nothing extra.
Measured on the tanh MLP of the scaling benchmark: one or two factorisations per step where the radius binds
(the first of them the solver's own), about four after a rejection. Where the radius does not bind
(:math:`\|v(\mu_\nu)\| \le (1 + \text{TOLERANCE})\Delta_k/\gamma`, or no radius yet, the state before the first
failure) the step is the ν-damped one, bit for bit; μ never falls below :math:`\mu_\nu =
\nu_k\operatorname{mean}\operatorname{diag}G`.

Synchronisation. The exact mode (CPU) reads one flag on the host per iteration — does the radius bind, is the
iterate within the tolerance? The sync-free mode runs ``ITERATIONS`` iterations as device computations and keeps
μ once it has settled, and keeps μ₀ where the radius does not bind (``torch.where``): the two modes give the same μ.

Where this applies. The dense solver's Euclidean normal step (every method with ``projection="euclidean"``).
The iteration starts from μ = 0 with the undamped factor the step forms anyway (for the projection), so a step
where the radius does not bind costs two triangular solve pairs more, and one where it binds a factorisation
per iteration after the first. The matrix-free solver has no factorisation to iterate with; it takes the μ of
the bound :math:`\|v(\mu)\| \le \|c\|/(2\sqrt\mu)` (true for every J),
:math:`\mu_\Delta = (\gamma\|c\|/(2\Delta_k))^2` — a step inside the radius, shorter than the exact one. A
normal step in another metric (``projection="scaled"``) is damped by ν alone: the radius is in the Euclidean
norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._constraint_solver import ConstraintSolver
from ._damping import NO_RADIUS
from ._linalg import _cholesky_solve, damped

__all__ = ["ITERATIONS", "TOLERANCE", "damping_within"]

TOLERANCE = 0.1  # the step taken is within this of Δ, relative (Moré 1978 accepts ±10 %), unless ITERATIONS ran out
ITERATIONS = 5  # Newton iterations on the secular equation: at most (exact mode), exactly (sync-free mode)


def damping_within(
    solver: ConstraintSolver,
    c: Tensor,
    nu: Tensor,
    radius: Tensor,
    gamma: float,
    *,
    sync_free: bool,
    warm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(ν_eff, binds)``: the relative damping :math:`\\mu_k/\\operatorname{mean}\\operatorname{diag}G` of this step
    and whether the radius set it (0-d float64 and bool device tensors). ``nu`` is ν_k, ``radius`` Δ_k
    (``NO_RADIUS`` or more: none), ``gamma`` the normal step size, ``warm`` a guess of the relative damping (0:
    none); the normal step is the solver's unweighted one. Where the radius does not bind, ``ν_eff`` is ``nu``
    itself (the same tensor in exact mode)."""
    no = torch.zeros((), dtype=torch.bool, device=nu.device)
    m = c.shape[0]
    if m == 0 or gamma == 0.0 or (not sync_free and float(radius) >= NO_RADIUS):  # one host read (exact)
        return nu, no
    target = torch.where(radius < NO_RADIUS, radius / gamma, math.inf)  # bound on ‖v‖
    if solver.kind != "dense":
        return _bound(solver, c, nu, target)
    return _secular(solver, c, nu, target, sync_free, warm)


def _bound(solver: ConstraintSolver, c: Tensor, nu: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The matrix-free solver: μ from :math:`\\|v(\\mu)\\| \\le \\|c\\|/(2\\sqrt\\mu)`."""
    scale = solver.op.mean_row_sq_norm(None).double()
    mu = (torch.linalg.vector_norm(c.double()) / (2.0 * target)).square()
    nu_r = mu / torch.where(scale > 0, scale, 1.0)
    binds = target.isfinite() & (nu_r > nu)
    return torch.where(binds, nu_r, nu), binds


def _plain(L: Tensor):
    return lambda b: _cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)


def _secular(
    solver: ConstraintSolver, c: Tensor, nu: Tensor, target: Tensor, sync_free: bool, warm: Tensor | None
) -> tuple[Tensor, Tensor]:
    factor = solver.factor  # type: ignore[attr-defined]  # the undamped factor of G (the projection's)
    G = factor.gram
    sync_free_f, truncate = solver.sync_free, solver.truncate  # type: ignore[attr-defined]  # as the solver damps
    rank_tol = solver.rank_tol  # type: ignore[attr-defined]
    c64 = c.double()
    scale = torch.diagonal(G).mean()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))

    def lengths(solve) -> tuple[Tensor, Tensor]:  # ‖v‖ and ‖q‖²
        y = solve(c64)
        z = solve(y)
        v2 = (y @ (G @ y)).clamp_min(0.0)
        q2 = (y @ (G @ z)).clamp_min(torch.finfo(torch.float64).tiny)
        return v2.sqrt(), q2

    # Newton starts from μ = 0 with the factor the step has anyway: no factorisation where the radius does not
    # bind, since ‖v(μ_ν)‖ ≤ ‖v(0)‖
    # (its Cholesky factor without the refinement steps: lengths known to a few digits are enough; a truncated
    # eigendecomposition of a rank-deficient G gives the least-norm step of its kept part)
    v, q2 = lengths(factor.solve if factor.chol is None else _plain(factor.chol))
    may_bind = target.isfinite() & (v > (1.0 + TOLERANCE) * target)
    if not sync_free and not bool(may_bind):  # one host read (exact mode)
        return nu, may_bind
    safe_target = torch.where(target.isfinite(), target, v)
    mu_nu = nu * scale
    # the first iterate: Newton on 1/‖v(μ)‖ from μ = 0 (the concavity puts it left of the root, μ_Δ ≥ it)
    lo = mu = torch.maximum(mu_nu, v.square() / q2 * (v - safe_target) / safe_target)
    hi = torch.full_like(mu, math.inf)
    if warm is not None and (sync_free or bool(warm > lo / scale)):  # (one host read, exact mode)
        # the last step's damping scaled to this radius (μ ∝ 1/Δ where μ dominates the eigenvalues that carry c)
        mu = torch.where(warm * scale > lo, warm * scale, lo)
    settled = ~may_bind
    nu_i = mu / scale
    for it in range(ITERATIONS):
        # (exact mode: at μ_ν, ν itself, whose factor the solver then finds memoised if ν's step fits)
        nu_i = nu if not sync_free and it == 0 and bool(mu <= mu_nu) else mu / scale
        # memoised: the solver's own solve at ν_i reuses it
        F = damped(factor, nu_i, rank_tol, sync_free=sync_free_f, truncate=truncate)
        v, q2 = lengths(F.solve if F.chol is None else _plain(F.chol))
        left = v >= safe_target
        lo = torch.where(left, torch.maximum(lo, mu), lo)
        hi = torch.where(left, hi, torch.minimum(hi, mu))
        fits = (mu <= mu_nu) & (v <= (1.0 + TOLERANCE) * safe_target)  # ν's own step: the radius does not bind
        settled = settled | fits | ((v - safe_target).abs() <= TOLERANCE * safe_target)
        if it + 1 == ITERATIONS or (not sync_free and bool(settled)):  # one host read (exact mode)
            break
        # Newton on log‖v‖ against log μ (slope -μ‖q‖²/‖v‖²): exact for ‖v‖ ∝ 1/μ, the regime where the radius
        # binds hard, and quadratic near the root; kept inside the bracket [lo, hi] (else its geometric mean);
        # the sync-free mode keeps μ once settled, as the exact mode stops
        step = mu * torch.exp((torch.log(v) - torch.log(safe_target)) * v.square() / (mu * q2))
        step = torch.where((step >= lo) & (step <= hi), step, torch.where(hi.isfinite(), (lo * hi).sqrt(), 10.0 * lo))
        mu = torch.where(settled, mu, torch.maximum(mu_nu, step))
    binds = may_bind & (mu > mu_nu)
    if not sync_free:  # (exact mode: ν itself, or the very tensor whose factor the solver will find memoised)
        return (nu_i if bool(binds) else nu), binds
    return torch.where(binds, mu / scale, nu), binds
