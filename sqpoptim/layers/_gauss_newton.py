r"""Least-norm Gauss–Newton and Levenberg–Marquardt iterations on :math:`r(y) = 0`, with exact or Broyden Jacobians.

The iteration behind :class:`~sqpoptim.layers.EnforceProjection` (AdaNP's NP steps) and the globalised
:class:`~sqpoptim.layers.HardNetPP` (``method="lm"``). With :math:`J_{r,k} = A_k J_{c,k}` the residual's
Jacobian (``sqpoptim.layers._system``), each sample takes

.. math::

    d_k = -J_{r,k}^\top (J_{r,k} J_{r,k}^\top + \nu_k I)^{-1} r_k
        \;\big(= -(J_{r,k}^\top J_{r,k} + \nu_k I)^{-1} J_{r,k}^\top r_k\big), \qquad y_{k+1} = y_k + d_k,

* ``damping=False`` (ENFORCE): :math:`\nu_k = 0`, the NP step; every step is taken, as in AdaNP, unless
  ``line_search=True``: then a step that does not decrease :math:`\|r\|` enough is shortened to
  :math:`y_k + t_k d_k` by the per-sample line search of :mod:`sqpoptim.layers._np_line_search` (with Broyden or chord
  Jacobians only the steps from an exact Jacobian; the others keep the refresh rule below). A sample that
  passes no trial of the search is left where it is and no longer stepped.
* ``damping=True`` (Levenberg–Marquardt on :math:`V = \tfrac12\|r\|^2`): :math:`\nu_k = \mu_k \|r_k\|`
  (Fan & Yuan's choice, so the damping vanishes at a solution and the local rate is quadratic), the step is
  kept only if the ratio of actual to predicted decrease
  :math:`\rho_k = (V(y_k) - V(y_k + d_k)) / (V(y_k) - \tfrac12\|r_k + J_{r,k} d_k\|^2)` exceeds
  :math:`10^{-4}`, and :math:`\mu` grows fourfold when :math:`\rho_k < 1/4` and shrinks fourfold when
  :math:`\rho_k > 3/4`. Since :math:`\nabla V = J_{r}^\top r` and :math:`V` is :math:`C^1` (the ReLU enters
  squared), this is a trust-region-type method on a smooth merit: every accepted step decreases :math:`V`, and
  nothing can blow up. :math:`\mu_0` makes :math:`\nu_0 = 10^{-3}` of the mean diagonal of
  :math:`J_{r,0} J_{r,0}^\top`.

Jacobians (``jacobian=``):

* ``"exact"``: :math:`J_c` at every accepted point (with user Jacobians ``h_jac``/``g_jac`` the pair
  ``(c, J_c)`` costs one call, so it is evaluated at each trial point).
* ``"broyden"``: :math:`J_c` exactly at the start, then Broyden's secant update
  :math:`J_+ = J + (\Delta c - J d)\, d^\top / d^\top d` after every trial step, so an iteration costs one
  evaluation of the constraint *values*. A sample whose quasi-Newton step fails (rejected by the ratio test;
  without damping: :math:`\|r_{k+1}\|_\infty > \theta \|r_k\|_\infty`, :math:`\theta = 1/2`) or makes poor
  progress (:math:`\|r_{k+1}\| > \theta \|r_k\|`) gets its exact Jacobian at its current point, evaluated on
  that sub-batch only. ``"chord"``: the same without the secant update (:math:`J` is only ever replaced by an
  exact one).

  Why reuse, and why Broyden: with ``torch.func`` Jacobians one :math:`J` costs 50-100 evaluations of the values
  on the 200-variable, 150-quadratic-row benchmark (``benchmarks/layer_projection.py``), while Newton's rate
  only pays off near the solution. Measured there (ENFORCE to max :math:`|c| \le 10^{-8}`, batch 16, CPU): from
  :math:`\hat y` at distance 0.1 per coordinate, exact Jacobians need 4 steps and 5 Jacobians (~12 s), the chord
  iteration 11 steps (3.2 s), Broyden 10 (3.1 s); at 0.3, chord 12.0 s and Broyden 9.6 s; at 0.6, 13.2 s and
  12.6 s. Both contract linearly (about 0.2 per step) rather than superlinearly in this underdetermined,
  least-norm setting; the secant update mostly saves exact refreshes further away.

Samples stop (are no longer stepped or evaluated) once :math:`\max_i |r_i| \le` ``tol``; the loop ends when
every sample has (``measure="max"``), or when the batch mean of :math:`|r|` is at most ``tol``
(``measure="mean"``, AdaNP's training rule), or after ``max_iter`` iterations. One host synchronisation per
iteration (the stopping test and the indices of the samples still iterating).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import ProjectionResult
from ._linalg import cholesky_apply, gram_cholesky_, gram_solve, transpose_apply
from ._np_line_search import line_search as np_line_search
from ._system import StackedSystem, broyden_update, put, take

__all__ = ["gauss_newton", "least_norm_step"]

_ACCEPT = 1e-4
_THETA = 0.5
_MU_MIN, _MU_MAX = 1e-12, 1e12


def least_norm_step(
    J: Tensor, r: Tensor, active: Tensor | None, nu: Tensor | float = 0.0, work: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r""":math:`d = -J_r^\top (J_r J_r^\top + \nu I)^{-1} r` with :math:`J_r = A J` (inactive rows removed).

    ``J`` ``[B, k, n]``, ``r`` ``[B, k]`` (zero on inactive rows), ``active`` ``[B, k]`` (``None``: all rows),
    ``nu`` ``[B]`` or a float. Guarantees :math:`J_r d = -r` when :math:`\nu = 0` and :math:`J_r` has full row rank (the
    linearised active rows hold at :math:`y + d`) with :math:`d` in the row space of :math:`J_r`. For
    :math:`k > n` and :math:`\nu > 0` the same value comes from an ``n x n`` solve. Returns ``(d, regularized)``.

    ``work`` (``[>= B, k, k]``, contiguous): a buffer for the Gram factor of the undamped step on every row
    (``active=None``, :math:`\nu = 0`) outside autograd, factored there in place by
    :func:`~sqpoptim.layers._linalg.gram_cholesky_` (no fresh ``[B, k, k]`` matrices per step).
    """
    k, n = J.shape[-2:]
    in_place = work is not None and active is None and isinstance(nu, float) and nu == 0.0
    if in_place and not (torch.is_grad_enabled() and (J.requires_grad or r.requires_grad)):
        L, flagged, _ = gram_cholesky_(J, work[: J.shape[0]])
        return -transpose_apply(J, cholesky_apply(L, r)), flagged
    Jr = J if active is None else J * active[..., None]  # [B, k, n]
    if k > n and isinstance(nu, Tensor):
        step, flagged = gram_solve(Jr.mT @ Jr, torch.einsum("bkn,bk->bn", Jr, r), shift=nu)  # [B, n]
        return -step, flagged
    # Inactive rows are zero in J_r: an identity there keeps G nonsingular, and r = 0 gives w = 0 on them.
    G = Jr @ Jr.mT  # [B, k, k]
    if active is not None:
        G = G + torch.diag_embed((~active).to(J.dtype))
    w, flagged = gram_solve(G, r, shift=nu)  # [B, k]
    return -transpose_apply(Jr, w), flagged


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _max_abs(r: Tensor) -> Tensor:
    return r.detach().abs().amax(dim=-1) if r.shape[-1] else r.new_zeros(r.shape[0])


def _searched(system, idx, sel, y, d, c, J, c_t, J_t):
    """The line search on the samples ``sel`` (``None``: all) of the sub-batch ``idx``; returns the sub-batch's
    ``(y_t, d, c_t, J_t, stalled)`` with the searched samples at :math:`y + t d`."""
    y_b, d_b = take(y, sel), take(d, sel)
    where_b = take(idx, sel) if idx is not None else sel
    with_jac = J_t is not None

    def trial(t, rows):
        at = y_b[rows] + t[:, None] * d_b[rows]
        where = rows if where_b is None else where_b[rows]
        return system.jacobian(at, where) if with_jac else (system.values(at, where),)

    full = (take(c_t, sel), take(J_t, sel)) if with_jac else (take(c_t, sel),)
    start = (take(c, sel), take(J, sel)) if with_jac else (take(c, sel),)
    t, out, stalled = np_line_search(trial, start[0], full, start)
    d_b = t[:, None] * d_b
    y_t, d = put(y + d, sel, y_b + d_b), put(d, sel, d_b)
    c_t = put(c_t, sel, out[0])
    J_t = put(J_t, sel, out[1]) if with_jac else None
    return y_t, d, c_t, J_t, put(torch.zeros_like(y[:, 0], dtype=torch.bool), sel, stalled)


def gauss_newton(
    system: StackedSystem,
    y0: Tensor,
    *,
    tol: float,
    max_iter: int,
    damping: bool,
    jacobian: str = "exact",
    measure: str = "max",
    free_steps: int = 0,
    line_search: bool = False,
) -> tuple[ProjectionResult, Tensor, Tensor | None]:
    """Run the iteration of the module docstring from ``y0``.

    Returns ``(result, c, J)``: the result, :math:`c` at its output, and :math:`J_c` there when it is exact for
    every sample (else ``None``; the implicit backward then evaluates it).
    """
    broyden = jacobian in ("broyden", "chord")  # a reused Jacobian, updated (Broyden) or not (chord)
    if line_search and (damping or system.lower is not None):
        raise ValueError("the NP line search takes undamped steps on equality constraints")
    y = y0
    c, J = system.c0, system.J0  # [B, k], [B, k, n] at y0
    r, active = system.residual(c)
    batch, dtype = y.shape[0], y.dtype
    fresh = torch.ones(batch, dtype=torch.bool, device=y.device)  # J exact at y
    regularized = torch.zeros_like(fresh)
    stalled = torch.zeros_like(fresh)  # the line search found no decrease: left where they are
    mu = torch.zeros(batch, dtype=dtype, device=y.device)
    if damping:
        diag = (J * active[..., None]).square().sum(-1).sum(-1) / active.sum(-1).clamp_min(1)  # [B]
        mu = 1e-3 * diag / r.detach().norm(dim=-1).clamp_min(torch.finfo(dtype).tiny)
        mu = mu.clamp(_MU_MIN, _MU_MAX)
    if free_steps:
        best = [y, c, J, r, active, fresh]
        v_best = 0.5 * r.detach().square().sum(-1)
    it = 0
    work = None
    while True:
        err = _max_abs(r)  # [B]
        done = err <= tol
        if it == max_iter:
            break
        stop = bool(done.all()) if measure == "max" else float(r.detach().abs().mean()) <= tol
        if stop:
            break
        idx = (~(done | stalled)).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        idx = None if idx.numel() == batch else idx
        y_s, c_s, J_s, r_s, a_s = (take(t, idx) for t in (y, c, J, r, active))
        mu_s, fresh_s = take(mu, idx), take(fresh, idx)
        rnorm = r_s.detach().norm(dim=-1)  # [b]
        free = damping and it < free_steps
        nu = mu_s * rnorm if damping and not free else 0.0
        # Satisfied rows within the current violation of a bound are held (r = 0 in the step, as in HardNet++'s
        # J_c): dropping them lets a row that the previous step pushed just inside cross back, and the
        # iteration chatters between the two sides at a linear rate.
        equalities_only = not damping or system.lower is None  # every row active: no masked copy of J
        rows = None if equalities_only else system.near_active(c_s, _max_abs(r_s), idx)
        if rows is None and not damping and (work is None or work.shape[0] < J_s.shape[0]):
            work = J_s.new_empty(J_s.shape[0], J_s.shape[1], J_s.shape[1])  # the NP steps' Gram factors, reused
        d, flagged = least_norm_step(J_s, r_s, rows, nu, work)  # [b, n]
        y_t = y_s + d
        if not broyden and system.cheap_jacobian:
            c_t, J_t = system.jacobian(y_t, idx)  # the pair costs one call
        else:
            c_t, J_t = system.values(y_t, idx), None
        if line_search:
            sel = fresh_s.nonzero().squeeze(1) if broyden else None
            if sel is None or sel.numel():
                sel = None if sel is not None and sel.numel() == fresh_s.numel() else sel
                y_t, d, c_t, J_t, stuck = _searched(system, idx, sel, y_s, d, c_s, J_s, c_t, J_t)
                stalled = put(stalled, idx, stuck)
        r_t, a_t = system.residual(c_t, idx)
        rnorm_t = r_t.detach().norm(dim=-1)
        finite = torch.isfinite(rnorm_t)
        if free:
            ok = finite
        elif damping:
            Jd = torch.einsum("bkn,bn->bk", J_s if rows is None else J_s * rows[..., None], d.detach())
            pred = -(r_s.detach() * Jd).sum(-1) - 0.5 * Jd.square().sum(-1)
            actual = 0.5 * (rnorm.square() - rnorm_t.square())
            rho = actual / pred.clamp_min(torch.finfo(dtype).tiny)
            ok = finite & (pred > 0) & (rho > _ACCEPT)
            # A stale quasi-Newton model failing says nothing about the damping: refresh J, keep mu.
            grow = (rho < 0.25) & (fresh_s | (not broyden))
            shrink = ok & (rho > 0.75)
            mu_s = torch.where(grow, mu_s * 4, torch.where(shrink, mu_s / 4, mu_s)).clamp(_MU_MIN, _MU_MAX)
        elif broyden:
            ok = finite & (fresh_s | (_max_abs(r_t) <= _THETA * _max_abs(r_s)))
        else:
            ok = torch.ones_like(fresh_s)  # AdaNP takes every NP step
        keep = ok[:, None]
        c_old = c_s
        every = bool(ok.all())  # the common case: no selection, no copies of J
        y_s = y_t if every else torch.where(keep, y_t, y_s)
        c_s, r_s = (c_t, r_t) if every else (torch.where(keep, c_t, c_s), torch.where(keep, r_t, r_s))
        a_s = a_t if every else torch.where(keep, a_t, a_s)
        regularized = put(regularized, idx, take(regularized, idx) | (flagged & ok))
        if broyden:
            J_upd = J_s if jacobian == "chord" else broyden_update(J_s, d.detach(), (c_t - c_old).detach())
            # A rejected step from an exact J keeps it (the damping, not J, was wrong); others take the secant.
            J_s = torch.where((ok | ~fresh_s)[:, None, None], J_upd, J_s)
            continuing = _max_abs(r_s) > tol
            refresh = (~ok & ~fresh_s) | (ok & (rnorm_t > _THETA * rnorm) & continuing)
            fresh_s = ~ok & fresh_s
        elif J_t is not None:
            J_s = J_t if every else torch.where(keep[..., None], J_t, J_s)
            refresh = torch.zeros_like(ok)
        else:
            refresh = ok & (_max_abs(r_s) > tol)  # J at the new point only where another step follows
            fresh_s = ~ok
        if bool(refresh.any()):
            sub = refresh.nonzero().squeeze(1)
            _, J_new = system.jacobian(y_s[sub], sub if idx is None else idx[sub])
            J_s = J_s.index_copy(0, sub, J_new)
            fresh_s = fresh_s.index_copy(0, sub, torch.ones_like(sub, dtype=torch.bool))
        y, c, J, r, active = (put(t, idx, s) for t, s in ((y, y_s), (c, c_s), (J, J_s), (r, r_s), (active, a_s)))
        mu, fresh = put(mu, idx, mu_s), put(fresh, idx, fresh_s)
        it += 1
        if free_steps:
            state = [y, c, J, r, active, fresh]
            v = 0.5 * r.detach().square().sum(-1)
            better = v < v_best
            best = [_where(better, s, b) for s, b in zip(state, best)]
            v_best = torch.where(better, v, v_best)
            if it == free_steps:  # the monotone phase starts from each sample's best point
                y, c, J, r, active, fresh = best
    exact = not broyden and bool(fresh.all())
    return ProjectionResult(y, it, err, done, regularized), c, (J if exact else None)
