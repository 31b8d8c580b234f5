r"""KKT-Hardnet: Newton on the KKT system of the Euclidean projection, with Fischer–Burmeister slacks.

Iftakher, Golder, Roy & Hasan, "KKT-Hardnet" (``../shared/papers/003_*.txt``, Sec. 2.1, App. B). The layer
solves the KKT conditions of :math:`\tilde y = \arg\min_y \tfrac12\|y - \hat y\|^2` s.t. :math:`h(x, y) = 0`,
:math:`\hat g(x, y) \le 0`, in :math:`z = [y, \mu_E, \mu_I, s]`:

.. math::

    F(z) = \begin{bmatrix}
        y - \hat y + J_h^\top \mu_E + J_{\hat g}^\top \mu_I \\
        h \\
        \hat g + s \\
        \phi(\mu_I, s)
    \end{bmatrix} = 0, \qquad
    \phi(\mu, s) = \mu + s - \sqrt{\mu^2 + s^2 + \epsilon^2},

    K = \frac{\partial F}{\partial z} = \begin{bmatrix}
        I + W & J_h^\top & J_{\hat g}^\top & 0 \\
        J_h & 0 & 0 & 0 \\
        J_{\hat g} & 0 & 0 & I \\
        0 & 0 & \mathrm{diag}(1 - \mu_I/\rho) & \mathrm{diag}(1 - s/\rho)
    \end{bmatrix}, \quad
    W = \sum_i \mu_{E,i} \nabla^2 h_i + \sum_j \mu_{I,j} \nabla^2 \hat g_j, \quad
    \rho = \sqrt{\mu_I^2 + s^2 + \epsilon^2}.

Each iteration takes the Newton step :math:`K d = -F`; where the LU solve fails or the per-sample Armijo
search on :math:`\tfrac12\|F\|^2` (:math:`\alpha \in \{1, \beta, \beta^2, \dots\}`) finds no decrease, the
regularised Gauss–Newton step :math:`(K^\top K + \gamma I) d = -K^\top F` replaces it for that sample. Start
:math:`y = \hat y`, :math:`\mu = 0`, :math:`s = \max(-\hat g(\hat y), 10^{-3})`; a sample stops (its
iterate is frozen) once :math:`\|F\|_\infty \le` ``tol`` (``1e-10`` in float64, ``1e-5`` in float32), the
batch after ``max_iter`` steps.

Notes and deviations
--------------------
* Two-sided bounds :math:`b_l \le g \le b_u` of :class:`OutputConstraints` become rows
  :math:`\hat g = [g - b_u;\ b_l - g]` for the finite sides. A side that is infinite for some samples only
  becomes the inert row :math:`\hat g = -1` (zero Jacobian, :math:`s = 1`, :math:`\mu = 0`) for those.
* :math:`W` needs second derivatives of the constraints: ``lagrangian_hessian`` of
  :class:`OutputConstraints` (user-supplied or ``torch.func``). The paper's log-exponential reformulation
  (to simplify these for monomial constraints) is not implemented: the plain KKT system is solved.
* Globalisation is only the merit line search: on nonconvex constraints with :math:`\hat y` far from the
  feasible set, Newton/Gauss–Newton from the prescribed start can stall at a stationary point of
  :math:`\tfrac12\|F\|^2` that is not a KKT point (a stress test with quadratic equalities and bounds that
  force :math:`\|\tilde y - \hat y\| \approx 1`–5: 39 of 320 samples; on one 64-sample seed 18, where
  HardNet++ left 7 infeasible). Such samples are reported unconverged, never silently returned as feasible.
* The paper's affine closed form has a sign error; the correct one,
  :math:`\tilde y = \hat y - B^\top(BB^\top)^{-1}(B\hat y - b)`, is :class:`HardNetAffine`.
* Host synchronisation: one read per iteration (any sample still active), one per Armijo trial while some
  sample has not accepted (usually none: the full step is accepted near the solution), one when deciding
  whether any sample needs the Gauss–Newton fallback.
* Gradients: ``"unrolled"`` differentiates through every Newton step (third derivatives of the constraints
  through :math:`W`); ``"implicit"`` solves :math:`K^\top v = [\bar y; 0]` once at the solution (App. B):
  :math:`\bar{\hat y} = v_y`, :math:`\bar x = -(\partial F/\partial x)^\top v`. Both are exact at a converged
  point; the implicit one keeps no graph of the iterations. Parameters captured inside ``h``/``g`` receive
  no gradient in implicit mode. A singular :math:`K` at the solution falls back to the ridge
  :math:`(KK^\top + \gamma I) v = K [\bar y; 0]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import vjp

from ._base import _GRADIENTS, ProjectionLayer, ProjectionResult, check_bounds, check_choice, finite_or_raise
from ._constraints import OutputConstraints

__all__ = ["KKTHardNet"]


class _KKTSystem:
    """The KKT residual and Jacobian for one call: constraints, inputs, and the static inequality rows."""

    def __init__(self, cons: OutputConstraints, x: Tensor | None, y_hat: Tensor, fb_eps: float) -> None:
        self.cons, self.x, self.y_hat, self.fb_eps = cons, x, y_hat, fb_eps
        self.n, self.m, self.q = y_hat.shape[-1], 0, 0
        ev = cons.evaluate(x, y_hat, jacobian=False)
        finite_or_raise(ev.c, "the constraint function")
        self.iu = self.il = torch.zeros(0, dtype=torch.long, device=y_hat.device)
        if ev.h is not None:
            self.m = ev.h.shape[-1]
        if ev.g is not None:
            self.q = ev.g.shape[-1]
            lower, upper = cons.bounds(x, ev.g)
            check_bounds(lower, upper)
            # Static row selection (one sync): a side becomes rows where it is finite for some sample.
            self.iu = torch.isfinite(upper).any(dim=0).nonzero().flatten()
            self.il = torch.isfinite(lower).any(dim=0).nonzero().flatten()
        self.p = self.iu.numel() + self.il.numel()
        self.g_hat0 = self.g_hat(x, ev.g) if ev.g is not None else y_hat.new_zeros(y_hat.shape[0], 0)

    # ---------------------------------------------------------------- inequality rows ĝ <= 0
    def _sides(self, x: Tensor | None, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lower, upper = self.cons.bounds(x, g)
        bu, bl = upper[:, self.iu], lower[:, self.il]  # [B, pu], [B, pl]
        return bu, bl, torch.isfinite(bu), torch.isfinite(bl)

    def g_hat(self, x: Tensor | None, g: Tensor) -> Tensor:
        bu, bl, fu, fl = self._sides(x, g)
        gu = torch.where(fu, g[:, self.iu] - torch.where(fu, bu, 0), -1.0)
        gl = torch.where(fl, torch.where(fl, bl, 0) - g[:, self.il], -1.0)
        return torch.cat([gu, gl], dim=-1)  # [B, p]

    def g_weights(self, x: Tensor | None, g: Tensor, mu_i: Tensor) -> Tensor:
        """``w_g`` with :math:`J_g^\\top w_g = J_{\\hat g}^\\top \\mu_I` (inert rows get weight 0)."""
        _, _, fu, fl = self._sides(x, g)
        pu = self.iu.numel()
        w = g.new_zeros(g.shape).index_add(1, self.iu, torch.where(fu, mu_i[:, :pu], 0))
        return w.index_add(1, self.il, -torch.where(fl, mu_i[:, pu:], 0))  # [B, q]

    def g_hat_jac(self, x: Tensor | None, g: Tensor, Jg: Tensor) -> Tensor:
        _, _, fu, fl = self._sides(x, g)
        return torch.cat([Jg[:, self.iu] * fu[..., None], -Jg[:, self.il] * fl[..., None]], dim=-2)  # [B, p, n]

    # ---------------------------------------------------------------- F and K
    def split(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, m, p = self.n, self.m, self.p
        return z[:, :n], z[:, n : n + m], z[:, n + m : n + m + p], z[:, n + m + p :]

    def start(self) -> Tensor:
        zeros = self.y_hat.new_zeros(self.y_hat.shape[0], self.m + self.p)
        return torch.cat([self.y_hat, zeros, self.g_hat0.neg().clamp_min(1e-3)], dim=-1)  # [B, N]

    def fb(self, mu_i: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        rho = torch.sqrt(mu_i**2 + s**2 + self.fb_eps**2)
        return mu_i + s - rho, rho

    def residual(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """:math:`F(z)`, ``[B, N]``, with one reverse pass for the stationarity row (``x``: an override)."""
        x = self.x if x is None else x
        y, mu_e, mu_i, s = self.split(z)
        # The bounds only need g's shape: no extra evaluation of g before the vector-Jacobian product.
        w_g = self.g_weights(x, y.new_empty(y.shape[0], self.q), mu_i) if self.cons.has_inequalities else None
        h, g, jty = self.cons.vjp(x, y, mu_e if self.cons.has_equalities else None, w_g)
        parts = [y - self.y_hat + jty]
        if h is not None:
            parts.append(h)
        if g is not None:
            parts += [self.g_hat(x, g) + s, self.fb(mu_i, s)[0]]
        return torch.cat(parts, dim=-1)

    def system(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(F [B, N], K [B, N, N])`` at ``z``."""
        x, (y, mu_e, mu_i, s) = self.x, self.split(z)
        B, n, m, p = y.shape[0], self.n, self.m, self.p
        ev = self.cons.evaluate(x, y, jacobian=True)
        Jh = ev.h_jac if ev.h is not None else y.new_zeros(B, 0, n)  # [B, m, n]
        if ev.g is not None:
            w_g, Jg = self.g_weights(x, ev.g, mu_i), self.g_hat_jac(x, ev.g, ev.g_jac)  # [B, q], [B, p, n]
        else:
            w_g, Jg = None, y.new_zeros(B, 0, n)
        W = self.cons.lagrangian_hessian(x, y, mu_e if ev.h is not None else None, w_g)  # [B, n, n]
        phi, rho = self.fb(mu_i, s)
        stat = y - self.y_hat + torch.einsum("bmn,bm->bn", Jh, mu_e) + torch.einsum("bpn,bp->bn", Jg, mu_i)
        feas = self.g_hat(x, ev.g) + s if ev.g is not None else s  # [B, p]
        F = torch.cat([stat, *([ev.h] if ev.h is not None else []), feas, phi], dim=-1)  # [B, N]
        # Blocks are written into one preallocated K (no row-block intermediates: K is the memory peak).
        r1, r2, r3 = n, n + m, n + m + p  # block offsets of μ_E, μ_I, s
        K = y.new_zeros(B, r3 + p, r3 + p)  # [B, N, N]
        K[:, :n, :n] = W
        K[:, :n, :n].diagonal(dim1=-2, dim2=-1).add_(1.0)
        K[:, :n, r1:r2], K[:, r1:r2, :n] = Jh.mT, Jh
        K[:, :n, r2:r3], K[:, r2:r3, :n] = Jg.mT, Jg
        K[:, r2:r3, r3:].diagonal(dim1=-2, dim2=-1).fill_(1.0)
        K[:, r3:, r2:r3].diagonal(dim1=-2, dim2=-1).copy_(1 - mu_i / rho)
        K[:, r3:, r3:].diagonal(dim1=-2, dim2=-1).copy_(1 - s / rho)
        return F, K

    def violation(self, z: Tensor) -> Tensor:
        """Largest violation of :math:`h = 0`, :math:`\\hat g \\le 0` at ``z``'s ``y``, ``[B]``."""
        y = self.split(z)[0]
        return self.cons.violation(self.x, y)


def lu_solve_checked(K: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    r"""Solve ``K d = rhs`` (``[B, N, N]``, ``[B, N]``) by LU; flag (near) singular factorisations.

    Partial pivoting leaves a tiny ``U`` pivot when ``K`` is (numerically) singular — duplicated constraints,
    or the start :math:`\mu = 0` with dependent rows — where LU still returns finite garbage: those samples
    are flagged when :math:`\min_i |U_{ii}| \le 10^3\,\epsilon_{\text{mach}} \max_i |U_{ii}|`.
    """
    LU, pivots, info = torch.linalg.lu_factor_ex(K)
    d = torch.linalg.lu_solve(LU, pivots, rhs.unsqueeze(-1)).squeeze(-1)
    u = LU.detach().diagonal(dim1=-2, dim2=-1).abs()  # [B, N]
    tiny = u.amin(dim=-1) <= 1e3 * torch.finfo(K.dtype).eps * u.amax(dim=-1)
    bad = (info != 0) | tiny | ~torch.isfinite(d.detach()).all(dim=-1)
    return torch.where(bad[:, None], 0.0, d), bad


def _line_search(
    system: _KKTSystem,
    z: Tensor,
    d: Tensor,
    phi0: Tensor,
    slope: Tensor,
    todo: Tensor,
    *,
    c1: float,
    beta: float,
    max_backtracks: int,
) -> tuple[Tensor, Tensor]:
    r"""Per-sample Armijo: the largest :math:`\alpha = \beta^j` with
    :math:`\varphi(z + \alpha d) \le \varphi_0 + c_1 \alpha\, \text{slope}`.

    Returns ``(alpha [B], accepted [B])``; samples outside ``todo`` are skipped.
    """
    alpha = torch.ones_like(phi0)
    accepted = ~todo
    with torch.no_grad():
        for _ in range(max_backtracks):
            F_try = system.residual(z + alpha[:, None] * d)
            phi = 0.5 * (F_try**2).sum(dim=-1)
            ok = torch.isfinite(phi) & (phi <= phi0 + c1 * alpha * slope)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            alpha = torch.where(accepted, alpha, alpha * beta)
    return alpha, accepted & todo


class _KKTBackward(torch.autograd.Function):
    """Identity on the converged ``y``; backward: one adjoint solve with the KKT Jacobian (App. B)."""

    @staticmethod
    def forward(ctx, system, gn_reg, x, y_hat, z_star):
        ctx.system, ctx.gn_reg = system, gn_reg
        ctx.save_for_backward(x, z_star)
        return z_star[:, : system.n].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        system, (x, z) = ctx.system, ctx.saved_tensors
        _, K = system.system(z)
        rhs = torch.cat([grad_y, grad_y.new_zeros(grad_y.shape[0], K.shape[-1] - system.n)], dim=-1)  # [B, N]
        v, bad = lu_solve_checked(K.mT, rhs)
        if bool(bad.any()):
            KKt = K @ K.mT
            gamma = ctx.gn_reg * KKt.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1.0)
            ridge = KKt + gamma[:, None, None] * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
            v = torch.where(bad[:, None], torch.linalg.solve(ridge, (K @ rhs[..., None]).squeeze(-1)), v)
        grad_x = None
        if x is not None and ctx.needs_input_grad[2]:
            _, pull = vjp(lambda xx: system.residual(z, x=xx), x)
            (grad_x,) = pull(-v)
        return None, None, grad_x, v[:, : system.n], None


class KKTHardNet(ProjectionLayer):
    r"""KKT-Hardnet layer: Newton on the projection's KKT system (module docstring).

    Args:
        constraints: :class:`OutputConstraints` or a callable ``h(x, y)``.
        max_iter: Newton steps :math:`K`.
        tol: stop when :math:`\|F\|_\infty \le` ``tol`` (``None``: 1e-10 in float64, 1e-5 in float32).
        fb_eps: Fischer–Burmeister smoothing :math:`\epsilon`.
        gn_reg: Gauss–Newton ridge, :math:`\gamma = \text{gn\_reg}\cdot\max(1, \mathrm{mean\ diag}\,
            K^\top K)`.
        armijo_c, backtrack, max_backtracks: the Armijo constant, the step shrink factor, the trial count.
        gradient: ``"unrolled"`` or ``"implicit"``.
        solve_dtype, nonconvergence: see :class:`~sqpoptim.layers.EnforceProjection`.
    """

    def __init__(
        self,
        constraints: OutputConstraints | Callable,
        *,
        max_iter: int = 50,
        tol: float | None = None,
        fb_eps: float = 1e-8,
        gn_reg: float = 1e-8,
        armijo_c: float = 1e-4,
        backtrack: float = 0.5,
        max_backtracks: int = 30,
        gradient: str = "unrolled",
        solve_dtype: torch.dtype | None = torch.float64,
        nonconvergence: str = "warn",
    ) -> None:
        super().__init__(constraints, solve_dtype=solve_dtype, nonconvergence=nonconvergence)
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"Invalid max_iter: {max_iter}")
        if tol is not None and not tol > 0:
            raise ValueError(f"Invalid tol: {tol}")
        if not fb_eps >= 0 or not gn_reg > 0:
            raise ValueError(f"Invalid fb_eps={fb_eps} or gn_reg={gn_reg}")
        if not 0 < armijo_c < 0.5 or not 0 < backtrack < 1 or max_backtracks < 1:
            raise ValueError(f"Invalid line search: armijo_c={armijo_c}, backtrack={backtrack}, {max_backtracks=}")
        self.max_iter, self.tol, self.fb_eps, self.gn_reg = int(max_iter), tol, float(fb_eps), float(gn_reg)
        self.armijo_c, self.backtrack, self.max_backtracks = (
            float(armijo_c),
            float(backtrack),
            int(max_backtracks),
        )
        self.gradient = check_choice("gradient", gradient, _GRADIENTS)

    def _project(self, x: Tensor | None, y: Tensor) -> ProjectionResult:
        system = _KKTSystem(self.constraints, x, y, self.fb_eps)
        needs_grad = torch.is_grad_enabled() and (y.requires_grad or (x is not None and x.requires_grad))
        if self.gradient == "unrolled" or not needs_grad:
            return self._newton(system)
        with torch.no_grad():
            res = self._newton(system)
        y_out = _KKTBackward.apply(system, self.gn_reg, x, y, res.extras["z"])
        return ProjectionResult(y_out, res.iterations, res.residual, res.converged, res.regularized, res.extras)

    def _newton(self, system: _KKTSystem) -> ProjectionResult:
        z = system.start()  # [B, N]
        tol = self.tol if self.tol is not None else (1e-10 if z.dtype == torch.float64 else 1e-5)
        gauss_newton = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        ls = {"c1": self.armijo_c, "beta": self.backtrack, "max_backtracks": self.max_backtracks}
        it = 0
        while True:
            if it == self.max_iter:
                F = system.residual(z)
                break
            F, K = system.system(z)
            Fd = F.detach()
            active = Fd.abs().amax(dim=-1) > tol  # [B]
            if not bool(active.any()):
                break
            phi0 = 0.5 * (Fd**2).sum(dim=-1)  # [B]
            d, bad = lu_solve_checked(K, -F)  # [B, N]
            # Newton direction: slope of φ = ½‖F‖² along d is Fᵀ K d = -‖F‖².
            alpha, ok = _line_search(system, z.detach(), d.detach(), phi0, -2 * phi0, active & ~bad, **ls)
            fallback = active & ~ok
            if bool(fallback.any()):
                KtF = torch.einsum("bij,bi->bj", K, F)  # [B, N]
                KtK = K.mT @ K
                gamma = self.gn_reg * KtK.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1.0)
                eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
                d_gn = torch.linalg.solve(KtK + gamma[:, None, None] * eye, -KtF)
                slope = (KtF.detach() * d_gn.detach()).sum(-1)
                a_gn, ok_gn = _line_search(system, z.detach(), d_gn.detach(), phi0, slope, fallback, **ls)
                d = torch.where(fallback[:, None], d_gn, d)
                alpha = torch.where(fallback, a_gn, alpha)
                ok = torch.where(fallback, ok_gn, ok)
                gauss_newton = gauss_newton | fallback
            step = (active & ok)[:, None]
            z = torch.where(step, z + alpha[:, None] * d, z)
            it += 1
        kkt = F.detach().abs().amax(dim=-1)
        y_mu = system.split(z)
        extras = {"kkt_residual": kkt, "z": z, "multipliers_eq": y_mu[1], "multipliers_ineq": y_mu[2]}
        return ProjectionResult(
            y=y_mu[0],
            iterations=it,
            residual=system.violation(z.detach()),
            converged=kkt <= tol,
            regularized=gauss_newton,
            extras=extras,
        )
