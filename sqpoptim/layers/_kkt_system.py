r"""The KKT system of the Euclidean projection and its structured (reduced) Newton solves.

Unknowns :math:`z = [y, \mu_E, \mu_I, s]` (``n + m + 2p``), inequality rows :math:`\hat g \le 0`,
:math:`\phi(\mu, s) = \mu + s - \sqrt{\mu^2 + s^2 + \epsilon^2}`:

.. math::

    F(z) = \begin{bmatrix} y - \hat y + J_h^\top \mu_E + J_{\hat g}^\top \mu_I \\ h \\ \hat g + s \\
        \phi(\mu_I, s) \end{bmatrix}, \qquad
    K = \frac{\partial F}{\partial z} = \begin{bmatrix}
        H & J_h^\top & J_{\hat g}^\top & 0 \\
        J_h & 0 & 0 & 0 \\
        J_{\hat g} & 0 & 0 & I \\
        0 & 0 & D_\mu & D_s
    \end{bmatrix},

:math:`H = I + \sum_i \mu_{E,i} \nabla^2 h_i + \sum_j \mu_{I,j} \nabla^2 \hat g_j`,
:math:`D_\mu = \mathrm{diag}(1 - \mu_I/\rho)`, :math:`D_s = \mathrm{diag}(1 - s/\rho)`,
:math:`\rho = \sqrt{\mu_I^2 + s^2 + \epsilon^2}`. Both diagonals lie in :math:`[0, 2]` and
:math:`D_\mu + D_s \ge 2 - \sqrt 2`, so in every row one of them is at least :math:`1 - 1/\sqrt 2`.

Reduced solve of :math:`K d = b` (:class:`ReducedKKT`). Eliminate :math:`ds = b_3 - J_{\hat g} dy`; row 4
becomes :math:`D_s J_{\hat g} dy - D_\mu d\mu_I = D_s b_3 - b_4 =: t`. A row with :math:`D_s \ge D_\mu`
("active": :math:`s \approx 0`) keeps :math:`d\mu_I` as an unknown, divided by :math:`D_s`; a row with
:math:`D_\mu > D_s` ("inactive": :math:`\mu \approx 0`) eliminates it,
:math:`d\mu_I = (D_s J_{\hat g} dy - t)/D_\mu`. Every ratio left is in :math:`[0, 1]`, and the system is
symmetric quasi-definite:

.. math::

    \begin{bmatrix} \tilde H & C^\top \\ C & -\Delta \end{bmatrix}
    \begin{bmatrix} dy \\ \nu \end{bmatrix} = \begin{bmatrix} b_1 + J_{in}^\top (t/D_\mu)_{in} \\ b_2 \\
    (t / D_s)_{act} \end{bmatrix}, \quad
    \tilde H = H + J_{in}^\top \tfrac{D_s}{D_\mu} J_{in}, \quad C = \begin{bmatrix} J_h \\ J_{act}
    \end{bmatrix}, \quad \Delta = \mathrm{diag}\big(0,\ \tfrac{D_\mu}{D_s}\big|_{act}\big),

solved through the Schur complement :math:`(C \tilde H^{-1} C^\top + \Delta)\,\nu = C\tilde H^{-1} r_1 - r_2`,
:math:`dy = \tilde H^{-1}(r_1 - C^\top \nu)`: an ``n x n`` and a ``(m + p_act) x (m + p_act)`` Cholesky
instead of an LU of the ``(n + m + 2p)``-square :math:`K` (and no ``n x n`` factorisation at all when
:math:`\tilde H = I`, e.g. constraints affine in :math:`y`). The same factorisation solves
:math:`K^\top v = b` (the implicit gradient): there row 4 reads :math:`v_3 + D_s v_4 = b_4` and row 3
:math:`J_{\hat g} v_1 + D_\mu v_4 = b_3`, which reduce to the same matrix with the right-hand side
:math:`[b_1 - J_{in}^\top (b_4 - D_s b_3/D_\mu)_{in};\ b_2;\ (b_3 - D_\mu b_4/D_s)_{act}]`. A sample whose
:math:`\tilde H` is not positive definite (nonconvex constraints with large multipliers) is flagged; the
caller solves it densely.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import check_bounds, finite_or_raise
from ._constraints import OutputConstraints
from ._linalg import cholesky_apply, gram_factor, gram_solve
from ._system import take

__all__ = ["KKTBlocks", "KKTSystem", "ReducedKKT"]


class KKTBlocks:
    """The blocks of :math:`K` at one ``z`` (module docstring), per sample."""

    def __init__(self, H: Tensor, Jh: Tensor, Jg: Tensor, d_mu: Tensor, d_s: Tensor) -> None:
        self.H, self.Jh, self.Jg, self.d_mu, self.d_s = H, Jh, Jg, d_mu, d_s  # [B,n,n] [B,m,n] [B,p,n] [B,p] [B,p]

    def equal(self, other: KKTBlocks) -> bool:
        """Bitwise equality of every block (one host sync per block)."""
        mine = (self.H, self.Jh, self.Jg, self.d_mu, self.d_s)
        theirs = (other.H, other.Jh, other.Jg, other.d_mu, other.d_s)
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, theirs))

    def take(self, idx: Tensor | None) -> KKTBlocks:
        return self if idx is None else KKTBlocks(*(t[idx] for t in (self.H, self.Jh, self.Jg, self.d_mu, self.d_s)))

    def dense(self) -> Tensor:
        """:math:`K` ``[B, N, N]``."""
        H, Jh, Jg = self.H, self.Jh, self.Jg
        B, n, m, p = H.shape[0], H.shape[-1], Jh.shape[-2], Jg.shape[-2]
        r1, r2, r3 = n, n + m, n + m + p  # block offsets of μ_E, μ_I, s
        K = H.new_zeros(B, r3 + p, r3 + p)
        K[:, :n, :n] = H
        K[:, :n, r1:r2], K[:, r1:r2, :n] = Jh.mT, Jh
        K[:, :n, r2:r3], K[:, r2:r3, :n] = Jg.mT, Jg
        K[:, r2:r3, r3:].diagonal(dim1=-2, dim2=-1).fill_(1.0)
        K[:, r3:, r2:r3].diagonal(dim1=-2, dim2=-1).copy_(self.d_mu)
        K[:, r3:, r3:].diagonal(dim1=-2, dim2=-1).copy_(self.d_s)
        return K


class ReducedKKT:
    """One factorisation of the reduced system (module docstring); :meth:`solve` and :meth:`solve_transpose`."""

    def __init__(self, blocks: KKTBlocks, shift: Tensor | None = None, gamma: Tensor | None = None) -> None:
        """``shift`` ``[B]``: a multiple of the identity added to :math:`\\tilde H` (an inertia correction; the
        solves are then those of the shifted system). ``gamma`` ``[B]``: solve through the augmented
        :math:`\\tilde H + \\gamma C^\\top C` instead (the same solution: row 1 plus :math:`\\gamma C^\\top` times
        row 2), positive definite whenever :math:`\\tilde H` is on the null space of :math:`C`, i.e. whenever
        the system has the inertia of a minimum; the Schur complement
        :math:`C H_\\gamma^{-1} C^\\top (I - \\gamma\\Delta) + \\Delta` is then solved by LU."""
        H, Jh, Jg, d_mu, d_s = blocks.H, blocks.Jh, blocks.Jg, blocks.d_mu, blocks.d_s
        n, m = H.shape[-1], Jh.shape[-2]
        self.blocks, self.n, self.m, self.p = blocks, n, m, Jg.shape[-2]
        self.act = d_s >= d_mu  # [B, p]
        act = self.act.to(H.dtype)
        inact = 1 - act
        # Ratios in [0, 1]; the denominators are >= 1 - 1/sqrt(2) on the rows where they are used.
        self.ratio_in = inact * d_s / torch.where(self.act, 1.0, d_mu)  # D_s/D_mu on inactive rows
        self.ratio_act = act * d_mu / torch.where(self.act, d_s, 1.0)  # D_mu/D_s on active rows
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        Ht = H
        if bool((self.ratio_in != 0).any()):  # one sync; inactive rows add J_inᵀ (D_s/D_mu) J_in
            Ht = H + torch.einsum("bpi,bp,bpj->bij", Jg, self.ratio_in, Jg)  # [B, n, n]
        if shift is not None:
            Ht = Ht + shift[:, None, None] * eye
        self.Ht = Ht
        self.C = torch.cat([Jh, Jg * act[..., None]], dim=-2)  # [B, m + p, n]
        # Δ: 0 on h rows, D_mu/D_s on active rows, 1 on masked inactive rows (whose right-hand side is 0).
        self.delta = torch.cat([torch.zeros_like(Jh[..., 0]), self.ratio_act + inact], dim=-1)  # [B, m + p]
        self.gamma = gamma
        if gamma is not None:
            Ht = Ht + gamma[:, None, None] * (self.C.mT @ self.C)
        self.identity = gamma is None and not bool((Ht != eye).any())  # one sync; e.g. affine constraints
        if self.identity:
            self.L_H, not_pd = None, torch.zeros(H.shape[0], dtype=torch.bool, device=H.device)
            HinvCt = self.C.mT
        else:
            self.L_H, info = torch.linalg.cholesky_ex(Ht)
            not_pd = info != 0
            self.L_H = torch.where(not_pd[:, None, None], eye, self.L_H)  # placeholder, flagged below
            HinvCt = torch.cholesky_solve(self.C.mT, self.L_H)  # [B, n, m + p]
        self.not_pd = not_pd
        S = self.C @ HinvCt
        if gamma is None:
            L_S, singular = gram_factor(S + torch.diag_embed(self.delta))
            self._S_solve = lambda rhs: (cholesky_apply(L_S, rhs), singular)
        else:
            S = S * (1 - gamma[:, None, None] * self.delta[:, None, :]) + torch.diag_embed(self.delta)
            LU, piv, info = torch.linalg.lu_factor_ex(S)
            u = LU.detach().diagonal(dim1=-2, dim2=-1).abs()
            singular = (info != 0) | (u.amin(-1) <= 1e3 * torch.finfo(S.dtype).eps * u.amax(-1))
            self._S_solve = lambda rhs: (torch.linalg.lu_solve(LU, piv, rhs[..., None])[..., 0], singular)

    def _hinv(self, v: Tensor) -> Tensor:
        if self.identity:
            return v
        return torch.cholesky_solve(v[..., None], self.L_H)[..., 0]

    def _reduced(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.gamma is not None:
            r1 = r1 + self.gamma[:, None] * torch.einsum("bkn,bk->bn", self.C, r2)
        rhs = torch.einsum("bkn,bn->bk", self.C, self._hinv(r1)) - r2
        nu, singular = self._S_solve(rhs)  # [B, m + p]
        coef = nu if self.gamma is None else nu * (1 - self.gamma[:, None] * self.delta)
        dy = self._hinv(r1 - torch.einsum("bkn,bk->bn", self.C, coef))
        return dy, nu, singular

    def _split(self, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, m, p = self.n, self.m, self.p
        return b[:, :n], b[:, n : n + m], b[:, n + m : n + m + p], b[:, n + m + p :]

    def solve(self, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(d, flagged)`` with :math:`K d = b`; flagged: :math:`\\tilde H` not positive definite or the Schur
        complement (estimated) singular."""
        blk = self.blocks
        b1, b2, b3, b4 = self._split(b)
        t = blk.d_s * b3 - b4  # [B, p]
        act = self.act
        r1 = b1 + torch.einsum("bpn,bp->bn", blk.Jg, torch.where(act, 0.0, t / torch.where(act, 1.0, blk.d_mu)))
        r2 = torch.cat([b2, torch.where(act, t / torch.where(act, blk.d_s, 1.0), 0.0)], dim=-1)
        dy, nu, singular = self._reduced(r1, r2)
        Jg_dy = torch.einsum("bpn,bn->bp", blk.Jg, dy)
        dmu_in = (blk.d_s * Jg_dy - t) / torch.where(act, 1.0, blk.d_mu)
        dmu_i = torch.where(act, nu[:, self.m :], dmu_in)
        ds = b3 - Jg_dy
        return torch.cat([dy, nu[:, : self.m], dmu_i, ds], dim=-1), self.not_pd | singular

    def solve_transpose(self, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(v, flagged)`` with :math:`K^\\top v = b`."""
        blk = self.blocks
        b1, b2, b3, b4 = self._split(b)
        act = self.act
        d_mu_in, d_s_act = torch.where(act, 1.0, blk.d_mu), torch.where(act, blk.d_s, 1.0)
        r1 = b1 - torch.einsum("bpn,bp->bn", blk.Jg, torch.where(act, 0.0, b4 - blk.d_s * b3 / d_mu_in))
        r2 = torch.cat([b2, torch.where(act, b3 - blk.d_mu * b4 / d_s_act, 0.0)], dim=-1)
        v1, nu, singular = self._reduced(r1, r2)
        Jg_v1 = torch.einsum("bpn,bn->bp", blk.Jg, v1)
        v4_in = (b3 - Jg_v1) / d_mu_in
        v3 = torch.where(act, nu[:, self.m :], b4 - blk.d_s * v4_in)
        v4 = torch.where(act, (b4 - v3) / d_s_act, v4_in)
        return torch.cat([v1, nu[:, : self.m], v3, v4], dim=-1), self.not_pd | singular


class KKTSystem:
    """:math:`F` and the blocks of :math:`K` for one call, on any subset ``idx`` of the batch."""

    def __init__(self, cons: OutputConstraints, x: Tensor | None, y_hat: Tensor, fb_eps: float) -> None:
        self.cons, self.x, self.y_hat, self.fb_eps = cons, x, y_hat, fb_eps
        self.n, self.m, self.q = y_hat.shape[-1], 0, 0
        ev = cons.evaluate(x, y_hat, jacobian=False)
        finite_or_raise(ev.c, "the constraint function")
        self.iu = self.il = torch.zeros(0, dtype=torch.long, device=y_hat.device)
        self.lower = self.upper = None
        if ev.h is not None:
            self.m = ev.h.shape[-1]
        if ev.g is not None:
            self.q = ev.g.shape[-1]
            lower, upper = cons.bounds(x, ev.g)
            check_bounds(lower, upper)
            self.lower, self.upper = lower, upper  # [B, q], for sub-batches
            # Static row selection (one sync): a side becomes rows where it is finite for some sample.
            self.iu = torch.isfinite(upper).any(dim=0).nonzero().flatten()
            self.il = torch.isfinite(lower).any(dim=0).nonzero().flatten()
        self.p = self.iu.numel() + self.il.numel()
        self.size = self.n + self.m + 2 * self.p
        self.g_hat0 = self.g_hat(None, ev.g) if ev.g is not None else y_hat.new_zeros(y_hat.shape[0], 0)

    # ---------------------------------------------------------------- inequality rows ĝ <= 0
    def _sides(self, x: Tensor | None, g: Tensor, idx: Tensor | None = None):
        """Bounds of the rows: recomputed from an override ``x`` (so ``x``-dependent bounds are
        differentiated), else the call's bounds at the rows ``idx``."""
        lower, upper = self.cons.bounds(x, g) if x is not None else (take(self.lower, idx), take(self.upper, idx))
        bu, bl = upper[:, self.iu], lower[:, self.il]  # [B, pu], [B, pl]
        return bu, bl, torch.isfinite(bu), torch.isfinite(bl)

    def g_hat(self, x: Tensor | None, g: Tensor, idx: Tensor | None = None) -> Tensor:
        bu, bl, fu, fl = self._sides(x, g, idx)
        gu = torch.where(fu, g[:, self.iu] - torch.where(fu, bu, 0), -1.0)
        gl = torch.where(fl, torch.where(fl, bl, 0) - g[:, self.il], -1.0)
        return torch.cat([gu, gl], dim=-1)  # [B, p]

    def g_weights(self, x: Tensor | None, g: Tensor, mu_i: Tensor, idx: Tensor | None = None) -> Tensor:
        """``w_g`` with :math:`J_g^\\top w_g = J_{\\hat g}^\\top \\mu_I` (inert rows get weight 0)."""
        _, _, fu, fl = self._sides(x, g, idx)
        pu = self.iu.numel()
        w = g.new_zeros(g.shape).index_add(1, self.iu, torch.where(fu, mu_i[:, :pu], 0))
        return w.index_add(1, self.il, -torch.where(fl, mu_i[:, pu:], 0))  # [B, q]

    def g_hat_jac(self, x: Tensor | None, g: Tensor, Jg: Tensor, idx: Tensor | None = None) -> Tensor:
        _, _, fu, fl = self._sides(x, g, idx)
        return torch.cat([Jg[:, self.iu] * fu[..., None], -Jg[:, self.il] * fl[..., None]], dim=-2)  # [B, p, n]

    # ---------------------------------------------------------------- F and K
    def split(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, m, p = self.n, self.m, self.p
        return z[:, :n], z[:, n : n + m], z[:, n + m : n + m + p], z[:, n + m + p :]

    def start(self) -> Tensor:
        """The paper's start: :math:`y = \\hat y`, :math:`\\mu = 0`, :math:`s = \\max(-\\hat g(\\hat y), 10^{-3})`."""
        zeros = self.y_hat.new_zeros(self.y_hat.shape[0], self.m + self.p)
        return torch.cat([self.y_hat, zeros, self.g_hat0.neg().clamp_min(1e-3)], dim=-1)  # [B, N]

    def dual_estimate(self, y: Tensor, idx: Tensor | None = None) -> Tensor:
        r"""``z`` at ``y`` with least-squares multipliers: :math:`\min \|y - \hat y + J_h^\top \mu_E +
        J_a^\top \mu_a\|` over the equalities and the inequality rows with :math:`\hat g \ge 0` (then
        :math:`\mu_I \ge 0` clipped, 0 elsewhere), and :math:`s = \max(-\hat g, 0)`: duals consistent with a
        primal point reached by a step that was not a Newton step."""
        x = take(self.x, idx)
        ev = self.cons.evaluate(x, y, jacobian=True)
        B, n = y.shape[0], self.n
        Jh = ev.h_jac if ev.h is not None else y.new_zeros(B, 0, n)
        if ev.g is not None:
            g_hat, Jg = self.g_hat(None, ev.g, idx), self.g_hat_jac(None, ev.g, ev.g_jac, idx)
        else:
            g_hat, Jg = y.new_zeros(B, 0), y.new_zeros(B, 0, n)
        act = g_hat >= 0
        C = torch.cat([Jh, Jg * act[..., None]], dim=-2)  # [B, m + p, n]
        free = torch.cat([torch.zeros_like(Jh[..., 0], dtype=torch.bool), ~act], dim=-1)
        G = C @ C.mT + torch.diag_embed(free.to(y.dtype))
        nu, _ = gram_solve(G, -torch.einsum("bkn,bn->bk", C, y - take(self.y_hat, idx)))
        mu_i = torch.where(act, nu[:, self.m :].clamp_min(0.0), 0.0)
        return torch.cat([y, nu[:, : self.m], mu_i, g_hat.neg().clamp_min(0.0)], dim=-1)

    def fb(self, mu_i: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        rho = torch.sqrt(mu_i**2 + s**2 + self.fb_eps**2)
        return mu_i + s - rho, rho

    def penalty(self, y: Tensor, rho: Tensor, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""``(merit, violation)``, both ``[b]`` (``rho`` ``[b]``): the exact penalty merit
        :math:`\tfrac12\|y - \hat y\|^2 + \rho(\|h\|_1 + \|\max(\hat g, 0)\|_1)` and its violation term. For
        :math:`\rho > \|\mu^\star\|_\infty` its local minimisers are the local projections."""
        ev = self.cons.evaluate(take(self.x, idx), y, jacobian=False)
        viol = y.new_zeros(y.shape[0])
        if ev.h is not None:
            viol = viol + ev.h.abs().sum(-1)
        if ev.g is not None:
            viol = viol + torch.relu(self.g_hat(None, ev.g, idx)).sum(-1)
        return 0.5 * (y - take(self.y_hat, idx)).square().sum(-1) + rho * viol, viol

    def residual(self, z: Tensor, idx: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        """:math:`F(z)` ``[b, N]`` with one reverse pass for the stationarity row (``x``: an override of the
        whole batch's inputs, for their derivative)."""
        xs = take(self.x, idx) if x is None else x
        y_hat = take(self.y_hat, idx)
        y, mu_e, mu_i, s = self.split(z)
        # The bounds only need g's shape: no extra evaluation of g before the vector-Jacobian product.
        w_g = None
        if self.cons.has_inequalities:
            w_g = self.g_weights(x, y.new_empty(y.shape[0], self.q), mu_i, idx)
        h, g, jty = self.cons.vjp(xs, y, mu_e if self.cons.has_equalities else None, w_g)
        parts = [y - y_hat + jty]
        if h is not None:
            parts.append(h)
        if g is not None:
            parts += [self.g_hat(x, g, idx) + s, self.fb(mu_i, s)[0]]
        return torch.cat(parts, dim=-1)

    def system(self, z: Tensor, idx: Tensor | None = None) -> tuple[Tensor, KKTBlocks]:
        """``(F [b, N], blocks of K)`` at ``z``."""
        x, y_hat, (y, mu_e, mu_i, s) = take(self.x, idx), take(self.y_hat, idx), self.split(z)
        B, n = y.shape[0], self.n
        ev = self.cons.evaluate(x, y, jacobian=True)
        Jh = ev.h_jac if ev.h is not None else y.new_zeros(B, 0, n)  # [B, m, n]
        if ev.g is not None:
            w_g, Jg = self.g_weights(None, ev.g, mu_i, idx), self.g_hat_jac(None, ev.g, ev.g_jac, idx)  # [B,q] [B,p,n]
        else:
            w_g, Jg = None, y.new_zeros(B, 0, n)
        W = self.cons.lagrangian_hessian(x, y, mu_e if ev.h is not None else None, w_g)  # [B, n, n]
        phi, rho = self.fb(mu_i, s)
        stat = y - y_hat + torch.einsum("bmn,bm->bn", Jh, mu_e) + torch.einsum("bpn,bp->bn", Jg, mu_i)
        feas = self.g_hat(None, ev.g, idx) + s if ev.g is not None else s  # [B, p]
        F = torch.cat([stat, *([ev.h] if ev.h is not None else []), feas, phi], dim=-1)  # [B, N]
        H = W + torch.eye(n, dtype=W.dtype, device=W.device)
        return F, KKTBlocks(H, Jh, Jg, 1 - mu_i / rho, 1 - s / rho)

    def violation(self, z: Tensor) -> Tensor:
        """Largest violation of :math:`h = 0`, :math:`\\hat g \\le 0` at ``z``'s ``y``, ``[B]``."""
        return self.cons.violation(self.x, self.split(z)[0])
