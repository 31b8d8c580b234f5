r"""KKT-Hardnet: Newton on the KKT system of the Euclidean projection, with Fischer–Burmeister slacks.

Iftakher, Golder, Roy & Hasan, "Physics-Informed Neural Networks with Hard Nonlinear Equality and Inequality
Constraints" (KKT-Hardnet; Sec. 2.1, App. B). The layer
solves the KKT conditions :math:`F(z) = 0` (:mod:`._kkt_system`) of
:math:`\tilde y = \arg\min_y \tfrac12\|y - \hat y\|^2` s.t. :math:`h(x, y) = 0`, :math:`\hat g(x, y) \le 0` in
:math:`z = [y, \mu_E, \mu_I, s]`, from the paper's start :math:`y = \hat y`, :math:`\mu = 0`,
:math:`s = \max(-\hat g(\hat y), 10^{-3})`. A sample stops once :math:`\|F\|_\infty \le` ``tol``
(``1e-10`` in float64, ``1e-5`` in float32), the batch after ``max_iter`` iterations.

Two iterations (``method=``)
----------------------------
* ``"newton"`` (default, not in the paper), per sample and iteration:

  1. the Newton direction :math:`K d = -F` through the reduced symmetric system of
     :class:`~sqpoptim.layers._kkt_system.ReducedKKT`; where its :math:`\tilde H` is not positive definite,
     through the augmented :math:`\tilde H + \gamma C^\top C` (the exact Newton step whenever the system has
     the inertia of a minimum: used once a full step has been accepted, near a solution), else through
     :math:`\tilde H + \delta I` with :math:`\delta = 1.1\,|\lambda_{\min}(\tilde H)|` (an inertia
     correction: a descent direction for the merit below, long along negative curvature so that the iterate
     leaves a saddle of the distance);
  2. the full step if it at least halves :math:`\|F\|` (the local phase, quadratically convergent);
  3. else a backtracking search along :math:`dy` on the exact penalty merit
     :math:`\tfrac12\|y - \hat y\|^2 + \rho(\|h\|_1 + \|\max(\hat g, 0)\|_1)`,
     :math:`\rho \ge 1.1\,\|\mu + d\mu\|_\infty`, whose local minimisers are the local projections; the duals
     at the accepted point are then re-estimated by least squares (those of a shortened step belong to no
     point);
  4. else (no descent, no decrease) a Levenberg–Marquardt step :math:`(K^\top K + \nu I) d = -K^\top F`,
     :math:`\nu = \mu\|F\|`, accepted when it decreases :math:`\tfrac12\|F\|^2` by at least
     :math:`10^{-4}` of its prediction (:math:`\mu` fourfold up or down by the ratio).

  Samples not converged after ``restart`` iterations (10) start again from a feasible point: HardNet++'s
  Levenberg–Marquardt iteration from :math:`\hat y` to the constraint set, and least-squares duals there.
  Why: from an untrained backbone the paper's iteration (Newton with an Armijo search on
  :math:`\tfrac12\|F\|^2`) halves its step 20-30 times per iteration on E1 and stalls there at stationary
  points of :math:`\tfrac12\|F\|^2` that are no KKT points (where a component of :math:`H` vanishes near the
  curve: tested), and through its unrolled iterations C1 diverged to NaN. A merit on :math:`F` alone cannot
  tell a minimum of the distance from a saddle or a maximum; the penalty merit can. The restart handles the
  pooling task's bilinear balance, where Newton from the raw output lands where the balances' gradients are
  parallel. Every accepted step decreases one of the merits, and non-finite trials are rejected, so nothing
  overflows; samples that still miss the tolerance (a stationary point of both) are reported unconverged.
* ``"paper"``: Newton by dense LU with the per-sample Armijo search on :math:`\varphi`
  (:math:`\alpha \in \{1, \beta, \beta^2, \dots\}`) and the regularised Gauss–Newton step
  :math:`(K^\top K + \gamma I) d = -K^\top F` where the LU solve fails or the search finds no decrease
  (:math:`\gamma =` ``gn_reg`` :math:`\cdot \max(1, \mathrm{mean\,diag}\,K^\top K)`); ``step_size=α`` replaces
  the search by a fixed step (the paper's pooling study: :math:`\alpha = 0.5`, :math:`\gamma = 10^{-2}`,
  :math:`K = 100`).

Notes and deviations
--------------------
* Two-sided bounds :math:`b_l \le g \le b_u` of :class:`OutputConstraints` become rows
  :math:`\hat g = [g - b_u;\ b_l - g]` for the finite sides. A side that is infinite for some samples only
  becomes the inert row :math:`\hat g = -1` (zero Jacobian, :math:`s = 1`, :math:`\mu = 0`) for those.
* :math:`H` needs second derivatives of the constraints: ``lagrangian_hessian`` of
  :class:`OutputConstraints` (user-supplied or ``torch.func``). The paper's log-exponential reformulation
  (to simplify these for monomial constraints) is not implemented: the plain KKT system is solved.
* The paper's affine closed form has a sign error; the correct one,
  :math:`\tilde y = \hat y - B^\top(BB^\top)^{-1}(B\hat y - b)`, is :class:`HardNetAffine`.
* Host synchronisation: a few reads per iteration (samples still active, which need the fallback, whether
  :math:`\tilde H` is the identity); ``"paper"``: one per Armijo trial while some sample has not accepted.
* Gradients: ``"implicit"`` (default) solves :math:`K^\top v = [\bar y; 0]` once at the solution (App. B),
  through the same reduced factorisation: :math:`\bar{\hat y} = v_y`, :math:`\bar x = -(\partial F/\partial
  x)^\top v`; exact at a converged point. A sample whose reduced system is not positive definite there is
  solved by dense LU, and a singular :math:`K` by the ridge :math:`(KK^\top + \gamma I) v = K [\bar y; 0]`.
  ``"unrolled"`` (the paper's training) differentiates through every iteration (third derivatives of the
  constraints through :math:`H`). Parameters captured inside ``h``/``g`` receive no gradient in implicit
  mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import vjp

from ._base import _GRADIENTS, ProjectionLayer, ProjectionResult, check_choice
from ._constraints import OutputConstraints
from ._gauss_newton import gauss_newton
from ._hardnet_pp import FREE_STEPS
from ._kkt_system import KKTBlocks, KKTSystem, ReducedKKT
from ._system import StackedSystem, put, take

__all__ = ["KKTHardNet"]

METHODS = ("newton", "paper")
_ACCEPT = 1e-4
_MU_MIN, _MU_MAX = 1e-12, 1e12


def lu_solve_checked(K: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    r"""Solve ``K d = rhs`` (``[B, N, N]``, ``[B, N]``) by LU; flag (near) singular factorisations.

    Partial pivoting leaves a tiny ``U`` pivot when ``K`` is (numerically) singular — duplicated constraints,
    or the start :math:`\mu = 0` with dependent rows — where LU still returns finite garbage: those samples
    are flagged when :math:`\min_i |U_{ii}| \le 10^3\,\epsilon_{\text{mach}} \max_i |U_{ii}|`. A flagged
    sample's system is replaced by the identity before solving, so no non-finite value enters a graph.
    """
    LU, _, info = torch.linalg.lu_factor_ex(K.detach())
    u = LU.diagonal(dim1=-2, dim2=-1).abs()  # [B, N]
    tiny = u.amin(dim=-1) <= 1e3 * torch.finfo(K.dtype).eps * u.amax(dim=-1)
    bad = (info != 0) | tiny | ~torch.isfinite(u).all(dim=-1)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    d = torch.linalg.solve(torch.where(bad[:, None, None], eye, K), rhs)
    bad = bad | ~torch.isfinite(d.detach()).all(dim=-1)
    return torch.where(bad[:, None], 0.0, d), bad


def _merit(F: Tensor) -> Tensor:
    return 0.5 * F.detach().square().sum(-1)


def _lm_step(K: Tensor, F: Tensor, nu: Tensor) -> tuple[Tensor, Tensor]:
    """``(d, predicted decrease)`` of the Levenberg–Marquardt step :math:`(K^\\top K + \\nu I) d = -K^\\top F`."""
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    A = K.mT @ K + nu[:, None, None] * eye
    L, info = torch.linalg.cholesky_ex(A)
    L = torch.where((info != 0)[:, None, None], eye, L)  # only for a non-finite K: such a step is rejected
    d = -torch.cholesky_solve(torch.einsum("bij,bi->bj", K, F)[..., None], L)[..., 0]
    model = F.detach() + torch.einsum("bij,bj->bi", K.detach(), d.detach())
    return d, _merit(F) - 0.5 * model.square().sum(-1)


def _line_search(system, z, d, phi0, slope, todo, idx, *, c1, beta, max_backtracks):
    r"""Per-sample Armijo: the largest :math:`\alpha = \beta^j` with
    :math:`\varphi(z + \alpha d) \le \varphi_0 + c_1 \alpha\, \text{slope}`; ``(alpha [B], accepted [B])``."""
    alpha = torch.ones_like(phi0)
    accepted = ~todo
    with torch.no_grad():
        for _ in range(max_backtracks):
            phi = _merit(system.residual(z + alpha[:, None] * d, idx))
            ok = torch.isfinite(phi) & (phi <= phi0 + c1 * alpha * slope)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            alpha = torch.where(accepted, alpha, alpha * beta)
    return alpha, accepted & todo


def _newton_direction(blocks: KKTBlocks, rhs: Tensor, augment: Tensor):
    r"""Solve :math:`K d = ` ``rhs`` per sample; ``(d, singular, shifted, usable, factors)`` (``factors``: the
    :class:`ReducedKKT` when it served every sample, else ``None``).

    Through :class:`ReducedKKT`; where :math:`\tilde H` is not positive definite and ``augment`` ``[B]`` allows
    it, through the augmented
    :math:`\tilde H + \gamma C^\top C` (:math:`\gamma = 10^{2j}` times the ratio of the mean diagonals of
    :math:`\tilde H` and :math:`CC^\top`, :math:`j = 0, 1, 2`: the exact Newton step whenever the system has the
    inertia of a minimum); where that fails too (negative curvature on the constraints' tangent space, far from
    a solution), through :math:`\tilde H + \delta I`, :math:`\delta = 1.1|\lambda_{\min}(\tilde H)| + 10^{-8}`
    scale (``shifted``: no longer a Newton step).
    """
    reduced = ReducedKKT(blocks)
    d, singular = reduced.solve(rhs)
    usable = ~reduced.not_pd
    shifted = torch.zeros_like(usable)
    if not bool(reduced.not_pd.any()):
        return d, singular, shifted, usable, reduced
    sub = (reduced.not_pd & augment).nonzero().squeeze(1)
    for j in range(3):
        if sub.numel() == 0:
            break
        Ht, C = reduced.Ht[sub].detach(), reduced.C[sub].detach()
        h_scale = Ht.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1.0)
        c_scale = C.square().sum(-1).mean(-1).clamp_min(torch.finfo(Ht.dtype).tiny)
        aug = ReducedKKT(blocks.take(sub), gamma=(100.0**j) * (h_scale / c_scale))
        d_aug, sing_aug = aug.solve(rhs[sub])
        good = ~aug.not_pd
        d = d.index_copy(0, sub, torch.where(good[:, None], d_aug, d[sub]))
        singular = singular.index_copy(0, sub, torch.where(good, sing_aug, singular[sub]))
        usable = usable.index_copy(0, sub, good)
        sub = sub[~good]
    sub = (~usable).nonzero().squeeze(1)
    if sub.numel():
        Ht = reduced.Ht[sub].detach()
        h_scale = Ht.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1.0)
        # 1.1 |λ_min|: the step along the most negative direction is g_v / (0.1 |λ_min|), large enough to leave a
        # saddle of the distance (2 |λ_min| measured 92 iterations on E1 from one seed, 1.1 |λ_min| 25).
        shift = 1.1 * torch.relu(-torch.linalg.eigvalsh(Ht).amin(-1)) + 1e-8 * h_scale
        fixed = ReducedKKT(blocks.take(sub), shift=shift)
        d_fix, sing_fix = fixed.solve(rhs[sub])
        d = d.index_copy(0, sub, d_fix)
        singular = singular.index_copy(0, sub, sing_fix)
        usable = usable.index_copy(0, sub, ~fixed.not_pd)
        shifted = shifted.index_copy(0, sub, torch.ones_like(sub, dtype=torch.bool))
    return d, singular, shifted, usable, None


class _KKTBackward(torch.autograd.Function):
    """Identity on the converged ``y``; backward: one adjoint solve with the KKT Jacobian (App. B)."""

    @staticmethod
    def forward(ctx, system, gn_reg, cache, x, y_hat, z_star):
        ctx.system, ctx.gn_reg, ctx.cache = system, gn_reg, cache
        ctx.save_for_backward(x, z_star)
        return z_star[:, : system.n].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        system: KKTSystem = ctx.system
        x, z = ctx.saved_tensors
        _, blocks = system.system(z)
        rhs = torch.cat([grad_y, grad_y.new_zeros(grad_y.shape[0], system.size - system.n)], dim=-1)  # [B, N]
        if ctx.cache is not None and ctx.cache.blocks.equal(blocks):
            reduced = ctx.cache  # K did not change in the last step (constraints affine in y): reuse its factors
        else:
            reduced = ReducedKKT(blocks)
        v, _ = reduced.solve_transpose(rhs)
        if bool(reduced.not_pd.any()):
            sub = reduced.not_pd.nonzero().squeeze(1)
            K = blocks.take(sub).dense()
            v_lu, bad = lu_solve_checked(K.mT, rhs[sub])
            if bool(bad.any()):
                KKt = K @ K.mT
                gamma = ctx.gn_reg * KKt.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1.0)
                ridge = KKt + gamma[:, None, None] * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
                v_ridge = torch.linalg.solve(ridge, (K @ rhs[sub][..., None]).squeeze(-1))
                v_lu = torch.where(bad[:, None], v_ridge, v_lu)
            v = v.index_copy(0, sub, v_lu)
        grad_x = None
        if x is not None and ctx.needs_input_grad[3]:
            _, pull = vjp(lambda xx: system.residual(z, x=xx), x)
            (grad_x,) = pull(-v)
        return None, None, None, grad_x, v[:, : system.n], None


class KKTHardNet(ProjectionLayer):
    r"""KKT-Hardnet layer: Newton on the projection's KKT system (module docstring).

    Args:
        constraints: :class:`OutputConstraints` or a callable ``h(x, y)``.
        method: ``"newton"`` (globalised Newton, default) or ``"paper"``.
        max_iter: iterations :math:`K`.
        tol: stop when :math:`\|F\|_\infty \le` ``tol`` (``None``: 1e-10 in float64, 1e-5 in float32).
        fb_eps: Fischer–Burmeister smoothing :math:`\epsilon`.
        gn_reg: ``"paper"``'s Gauss–Newton ridge, :math:`\gamma = \text{gn\_reg}\cdot\max(1, \mathrm{mean\
            diag}\, K^\top K)` (also the ridge of a singular adjoint solve).
        armijo_c, backtrack, max_backtracks: the Armijo constant, the step shrink factor and the trial count of
            the paper's search (``"newton"``'s penalty search halves, with the same constant and trial count).
        step_size: ``"paper"`` only: a fixed step :math:`\alpha` instead of the Armijo search.
        restart: ``"newton"`` only: iterations after which unconverged samples restart from a feasible point
            (``None``: never).
        gradient: ``"implicit"`` (default) or ``"unrolled"``.
        solve_dtype, nonconvergence: see :class:`~sqpoptim.layers.EnforceProjection`.
    """

    def __init__(
        self,
        constraints: OutputConstraints | Callable,
        *,
        method: str = "newton",
        max_iter: int = 100,
        tol: float | None = None,
        fb_eps: float = 1e-8,
        gn_reg: float = 1e-8,
        armijo_c: float = 1e-4,
        backtrack: float = 0.5,
        max_backtracks: int = 30,
        step_size: float | None = None,
        restart: int | None = 10,
        gradient: str = "implicit",
        solve_dtype: torch.dtype | None = torch.float64,
        nonconvergence: str = "warn",
    ) -> None:
        super().__init__(constraints, solve_dtype=solve_dtype, nonconvergence=nonconvergence)
        self.method = check_choice("method", method, METHODS)
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"Invalid max_iter: {max_iter}")
        if tol is not None and not tol > 0:
            raise ValueError(f"Invalid tol: {tol}")
        if not fb_eps >= 0 or not gn_reg > 0:
            raise ValueError(f"Invalid fb_eps={fb_eps} or gn_reg={gn_reg}")
        if not 0 < armijo_c < 0.5 or not 0 < backtrack < 1 or max_backtracks < 1:
            raise ValueError(f"Invalid line search: armijo_c={armijo_c}, backtrack={backtrack}, {max_backtracks=}")
        if step_size is not None and (method != "paper" or not 0 < step_size <= 1):
            raise ValueError(f"Invalid step_size {step_size!r}: a fixed step in (0, 1] with method='paper'")
        self.max_iter, self.tol, self.fb_eps, self.gn_reg = int(max_iter), tol, float(fb_eps), float(gn_reg)
        self.armijo_c, self.backtrack, self.max_backtracks = float(armijo_c), float(backtrack), int(max_backtracks)
        self.step_size = None if step_size is None else float(step_size)
        self.gradient = check_choice("gradient", gradient, _GRADIENTS)
        if restart is not None and (int(restart) != restart or restart < 1):
            raise ValueError(f"Invalid restart: {restart!r} (a positive number of iterations, or None)")
        self.restart = None if restart is None else int(restart)

    def _project(self, x: Tensor | None, y: Tensor) -> ProjectionResult:
        system = KKTSystem(self.constraints, x, y, self.fb_eps)
        solve = self._newton if self.method == "newton" else self._paper_newton
        needs_grad = torch.is_grad_enabled() and (y.requires_grad or (x is not None and x.requires_grad))
        if self.gradient == "unrolled" or not needs_grad:
            return solve(system)[0]
        with torch.no_grad():
            res, factors = solve(system)
        y_out = _KKTBackward.apply(system, self.gn_reg, factors, x, y, res.extras["z"])
        return ProjectionResult(y_out, res.iterations, res.residual, res.converged, res.regularized, res.extras)

    def _tol(self, z: Tensor) -> float:
        return self.tol if self.tol is not None else (1e-10 if z.dtype == torch.float64 else 1e-5)

    def _result(self, system: KKTSystem, z: Tensor, F: Tensor, it: int, tol: float, flags: Tensor):
        kkt = F.detach().abs().amax(dim=-1)
        y, mu_e, mu_i, _ = system.split(z)
        extras = {"kkt_residual": kkt, "z": z, "multipliers_eq": mu_e, "multipliers_ineq": mu_i}
        return ProjectionResult(y, it, system.violation(z.detach()), kkt <= tol, flags, extras)

    def _newton(self, system: KKTSystem) -> ProjectionResult:
        z = system.start()  # [B, N]
        tol, batch, dtype = self._tol(z), z.shape[0], z.dtype
        tiny = torch.finfo(dtype).tiny
        n, m, p = system.n, system.m, system.p
        F = system.residual(z)
        mu_lm = torch.full((batch,), torch.nan, dtype=dtype, device=z.device)  # set at a sample's first LM step
        rho = torch.zeros(batch, dtype=dtype, device=z.device)  # penalty parameter, never decreased
        regularized = torch.zeros(batch, dtype=torch.bool, device=z.device)
        # The exact Newton step through an indefinite H̃ (augmented) only after a full step was accepted: far
        # from a solution a barely positive reduced Hessian makes it huge, and the merit search then crawls.
        local = torch.zeros(batch, dtype=torch.bool, device=z.device)
        factors = None  # the last iteration's factorisation, when it covered the batch (reused by the backward)
        it = 0
        while it < self.max_iter:
            active = F.detach().abs().amax(dim=-1) > tol
            if not bool(active.any()):
                break
            if it == self.restart:  # samples still iterating start again from a feasible point
                z = torch.where(active[:, None], self._feasible_start(system, z, active), z)
                F = torch.where(active[:, None], system.residual(z), F)
                mu_lm = torch.where(active, torch.nan, mu_lm)
                rho, local = torch.where(active, 0.0, rho), local & ~active
                regularized = regularized | active
            idx = active.nonzero().squeeze(1)
            idx = None if idx.numel() == batch else idx
            z_s, rho_s = take(z, idx), take(rho, idx)
            F_s, blocks = system.system(z_s, idx)
            phi = _merit(F_s)
            # 1. The Newton step (module docstring: reduced, augmented, or inertia-corrected).
            d, flagged, shifted, usable, reduced = _newton_direction(blocks, -F_s, take(local, idx))
            factors = reduced if idx is None and not bool(shifted.any()) else None
            usable = usable & torch.isfinite(d.detach()).all(-1)
            # 2. The full step where it at least halves ‖F‖ (the local, quadratically convergent phase).
            z_t = z_s + torch.where(usable[:, None], d, 0.0)
            F_t = system.residual(z_t, idx)
            ok = usable & torch.isfinite(_merit(F_t)) & (_merit(F_t) <= 0.25 * phi)
            full = ok.clone()
            # 3. Elsewhere a backtracking search on the exact penalty merit along the same direction.
            search = usable & ~ok
            if bool(search.any()):
                sub = search.nonzero().squeeze(1)
                gsub = sub if idx is None else idx[sub]
                y0, dy = z_s[sub, :n].detach(), d[sub, :n].detach()
                mult = (z_s[sub] + d[sub])[:, n : n + m + p].detach()
                bound = mult.abs().amax(-1) if mult.shape[-1] else torch.zeros_like(rho_s[sub])
                rho_sub = torch.maximum(rho_s[sub], 1.1 * bound + 1e-8)
                P0, viol = system.penalty(y0, rho_sub, gsub)
                slope = ((y0 - take(system.y_hat, gsub)) * dy).sum(-1) - rho_sub * viol
                alpha, found = self._penalty_search(system, y0, dy, rho_sub, P0, slope, gsub)
                full = full.index_copy(0, sub, found & (alpha == 1))
                # The step length is chosen for y; the duals of a shortened (or nearly singular) step would be
                # unrelated to the new point, so they are re-estimated there.
                z_ls = system.dual_estimate(y0 + alpha[:, None] * dy, gsub)
                F_ls = system.residual(z_ls, gsub)
                found = found & torch.isfinite(_merit(F_ls))
                z_t = z_t.index_copy(0, sub, torch.where(found[:, None], z_ls, z_t[sub]))
                F_t = F_t.index_copy(0, sub, torch.where(found[:, None], F_ls, F_t[sub]))
                ok = ok.index_copy(0, sub, found)
                rho_s = rho_s.index_copy(0, sub, rho_sub)
            regularized = put(regularized, idx, take(regularized, idx) | flagged | shifted)
            # 4. Levenberg–Marquardt on ½‖F‖² where neither applies.
            lm = ~ok
            if bool(lm.any()):
                sub = lm.nonzero().squeeze(1)
                gsub = sub if idx is None else idx[sub]
                K = blocks.take(sub).dense()
                mu_sub = take(mu_lm, gsub)
                diag = K.detach().square().sum(-2).mean(-1)  # mean diagonal of KᵀK
                fnorm = F_s[sub].detach().norm(dim=-1).clamp_min(tiny)
                mu_sub = torch.where(torch.isnan(mu_sub), (1e-3 * diag / fnorm).clamp(_MU_MIN, _MU_MAX), mu_sub)
                d_lm, pred = _lm_step(K, F_s[sub], mu_sub * fnorm)
                F_lm = system.residual(z_s[sub] + d_lm, gsub)
                rho_lm = (phi[sub] - _merit(F_lm)) / pred.clamp_min(tiny)
                ok_lm = torch.isfinite(_merit(F_lm)) & (pred > 0) & (rho_lm > _ACCEPT)
                mu_sub = torch.where(rho_lm < 0.25, mu_sub * 4, torch.where(rho_lm > 0.75, mu_sub / 4, mu_sub))
                mu_lm = mu_lm.index_copy(0, gsub, mu_sub.clamp(_MU_MIN, _MU_MAX))
                z_t = z_t.index_copy(0, sub, z_s[sub] + d_lm)
                F_t = F_t.index_copy(0, sub, F_lm)
                ok = ok.index_copy(0, sub, ok_lm)
                regularized = regularized.index_copy(0, gsub, torch.ones_like(gsub, dtype=torch.bool))
            keep = ok[:, None]
            z, F = put(z, idx, torch.where(keep, z_t, z_s)), put(F, idx, torch.where(keep, F_t, F_s))
            rho, local = put(rho, idx, rho_s), put(local, idx, full)
            it += 1
        return self._result(system, z, F, it, tol, regularized), factors

    def _feasible_start(self, system: KKTSystem, z: Tensor, todo: Tensor) -> Tensor:
        """For the samples ``todo``: HardNet++'s globalised iteration from ŷ to the constraint set, then
        least-squares duals there (the others keep ``z``; they are frozen at once in the restoration, which
        starts them at their feasible ``y``)."""
        y0 = torch.where(todo[:, None], system.y_hat, system.split(z)[0])
        restore = StackedSystem(system.cons, system.x, y0, jacobian=True)
        tol = self._tol(y0)
        res, _, _ = gauss_newton(restore, y0, tol=tol, max_iter=self.max_iter, damping=True, free_steps=FREE_STEPS)
        sub = todo.nonzero().squeeze(1)
        return z.index_copy(0, sub, system.dual_estimate(res.y[sub], sub))

    def _penalty_search(self, system, y0, dy, rho, P0, slope, idx):
        """Backtracking (halving, ``max_backtracks`` trials) on the penalty merit; ``(alpha, found)``."""
        alpha = torch.ones_like(P0)
        found = torch.zeros_like(P0, dtype=torch.bool)
        todo = slope < 0  # not a descent direction of the merit: leave it to the LM step
        with torch.no_grad():
            for _ in range(self.max_backtracks):
                if not bool((todo & ~found).any()):
                    break
                P, _ = system.penalty(y0 + alpha[:, None] * dy, rho, idx)
                found = found | (todo & torch.isfinite(P) & (P <= P0 + self.armijo_c * alpha * slope))
                alpha = torch.where(found, alpha, 0.5 * alpha)
        return alpha, found

    def _paper_newton(self, system: KKTSystem) -> ProjectionResult:
        z = system.start()  # [B, N]
        tol = self._tol(z)
        gauss_newton = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        ls = {"c1": self.armijo_c, "beta": self.backtrack, "max_backtracks": self.max_backtracks}
        it = 0
        while True:
            if it == self.max_iter:
                F = system.residual(z)
                break
            F, blocks = system.system(z)
            K = blocks.dense()
            Fd = F.detach()
            active = Fd.abs().amax(dim=-1) > tol  # [B]
            if not bool(active.any()):
                break
            phi0 = 0.5 * (Fd**2).sum(dim=-1)  # [B]
            d, bad = lu_solve_checked(K, -F)  # [B, N]
            if self.step_size is not None:
                alpha, ok = torch.full_like(phi0, self.step_size), ~bad
            else:
                # Newton direction: slope of φ = ½‖F‖² along d is Fᵀ K d = -‖F‖².
                alpha, ok = _line_search(system, z.detach(), d.detach(), phi0, -2 * phi0, active & ~bad, None, **ls)
            fallback = active & ~ok
            if bool(fallback.any()):
                KtF = torch.einsum("bij,bi->bj", K, F)  # [B, N]
                KtK = K.mT @ K
                gamma = self.gn_reg * KtK.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1.0)
                eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
                d_gn = torch.linalg.solve(KtK + gamma[:, None, None] * eye, -KtF)
                if self.step_size is not None:
                    a_gn, ok_gn = torch.full_like(phi0, self.step_size), fallback
                else:
                    slope = (KtF.detach() * d_gn.detach()).sum(-1)
                    a_gn, ok_gn = _line_search(system, z.detach(), d_gn.detach(), phi0, slope, fallback, None, **ls)
                d = torch.where(fallback[:, None], d_gn, d)
                alpha = torch.where(fallback, a_gn, alpha)
                ok = torch.where(fallback, ok_gn, ok)
                gauss_newton = gauss_newton | fallback
            step = (active & ok)[:, None]
            z = torch.where(step, z + alpha[:, None] * d, z)
            it += 1
        return self._result(system, z, F, it, tol, gauss_newton), None
