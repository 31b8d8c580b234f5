r"""The dual of the inequality-constrained SQP step: a convex QP in m multipliers, free or nonnegative.

Solves

.. math::

    \min_y\ q(y) = \tfrac12 y^\top G y - b^\top y \quad\text{s.t.}\quad y_i \ge 0\ (i \in \mathcal I),
    \qquad y_i = 0\ (i \notin \mathcal R),

with :math:`G \succeq 0` (m×m, float64), :math:`\mathcal I` the multipliers of inequalities (``nonneg``) and
:math:`\mathcal R` the rows taking part (``rows``; the others are held at zero). With the dual gradient
:math:`z = Gy - b` the optimality conditions are :math:`z_i = 0` for free multipliers, and
:math:`y_i \ge 0,\ z_i \ge 0,\ y_i z_i = 0` for :math:`i \in \mathcal I`: a mixed linear complementarity problem.

Method: the primal active-set method of Lawson & Hanson's NNLS (*Solving Least Squares Problems*, 1974,
ch. 23), for a general convex quadratic and with free multipliers, on the multipliers: y stays feasible and
q decreases. With F the free multipliers (every equality multiplier, and the inequality multipliers not held at
zero), one iteration is one solve on F:

.. math::

    \begin{aligned}
    &s_F = (G_{FF} + \varepsilon I)^{-1} b_F \ \text{(refined, see below)},\quad s_{\bar F} = 0 \\
    &\text{if } s_i \ge 0 \ \forall i \in F\cap\mathcal I:\ y \leftarrow s;\ \text{free every held } i
        \text{ with } w_i = (b - Gy)_i > 0 \ \text{(none: optimal)} \\
    &\text{else: } y \leftarrow y + \alpha(s - y),\ \alpha = \min_{s_i < 0} \tfrac{y_i}{y_i - s_i};\
        \text{hold the multipliers that reached zero}
    \end{aligned}

:math:`w = b - Gy` is the linearised residual of the primal constraints (:math:`w_i > 0`: constraint i violated
by the step of y). Lawson and Hanson free one multiplier at a time (the largest :math:`w_i`), which from an
optimal y always moves and decreases q, so no partition repeats: finite. Here every violated constraint is
freed at once (a cold start with many active constraints takes a few iterations, not one per constraint), and
when a freed multiplier would at once turn negative (α = 0) the block is undone and the next addition is a
single one: still finite. Block principal pivoting (Júdice & Pires 1994; the primal–dual active-set method of
Hintermüller, Ito & Kunisch 2003), which jumps between partitions without keeping y feasible, was tried first:
on degenerate problems (more active constraints than parameters) it needed hundreds of iterations or cycled,
where this needs about twenty; from a warm start both take one.

The shift ε and the proximal refinement. ε (``shift``, relative to the unit diagonal after Jacobi scaling)
makes every reduced matrix positive definite, so dependent active rows (duplicate constraints, more active
constraints than parameters) need no rank decision. Each solve then takes ``refine`` steps of
:math:`y_F \leftarrow y_F + (G_{FF}+\varepsilon I)^{-1}(b_F - G_{FF}y_F)` (the proximal point method on the
dual, iterated Tikhonov regularisation), which remove the shift: on an eigenvalue λ of
:math:`G_{FF}` the error is :math:`(\varepsilon/(\lambda+\varepsilon))^{1+\text{refine}}` relative, and y keeps
no component in the null space of :math:`G_{FF}`.

*Inconsistent primal constraints.* Then :math:`b_F` has a component outside the range of :math:`G_{FF}` and
the dual is unbounded. With ``refine=0`` the shifted problem is exactly the dual of the ℓ2-elastic primal
(the violation :math:`t_i` of row i penalised by :math:`t_i^2/(2\varepsilon G_{ii})`), bounded, with y of size
:math:`\|\bar s\|/\varepsilon`; the refinement steps are then proximal steps on an unbounded dual and only grow
y. No exception either way; the caller reads the violation left (see :mod:`sqpoptim._inequality`).

Device and synchronisation. Every iteration works on fixed shapes: the reduced matrix is the m×m matrix with
the rows and columns outside F replaced by the identity, factored by ``torch.linalg.cholesky_ex``; partition,
counters and the convergence flag are device tensors, and a converged partition is frozen (the iteration from
an optimal point repeats it). ``early_exit=True`` (exact mode, on the CPU, where reading a flag
is free) stops at convergence; ``early_exit=False`` runs the whole budget without a host read, and the caller
reads ``converged`` when it wants to. Warm start: ``held`` of the previous solve.

Decisions ignore violations below a relative tolerance ``tol`` (rounding; degenerate indices with
:math:`y_i = w_i = 0`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DualQPResult", "solve_dual_qp"]


@dataclass
class DualQPResult:
    """One solve, all device tensors.

    ``y`` [m] float64 multipliers; ``held`` [m] bool, the partition (True: held at zero; the warm start of
    the next solve); ``converged`` 0-d bool (optimal); ``iterations`` 0-d long (iterations before the optimal
    partition was reached: 0 when the warm start was optimal; the budget when not converged); ``infeasible``
    0-d long (violated conditions left; 0 when converged). :meth:`solve_free` reuses the last factorisation."""

    y: Tensor
    held: Tensor
    converged: Tensor
    iterations: Tensor
    infeasible: Tensor
    _chol: Tensor
    _Gs: Tensor
    _scale: Tensor
    _free: Tensor

    def where(self, cond: Tensor, other: DualQPResult) -> DualQPResult:
        """This result where the 0-d bool ``cond`` holds, else ``other`` (selection on the device)."""
        pick = [torch.where(cond, a, b) for a, b in zip(self._tensors(), other._tensors())]
        return DualQPResult(*pick)

    def _tensors(self) -> tuple[Tensor, ...]:
        return (
            self.y,
            self.held,
            self.converged,
            self.iterations,
            self.infeasible,
            self._chol,
            self._Gs,
            self._scale,
            self._free,
        )

    def solve_free(self, rhs: Tensor) -> Tensor:
        r""":math:`x` with :math:`G_{FF} x_F = \text{rhs}_F` and :math:`x = 0` off F, on the returned partition,
        with the last factor and two refinement steps (whatever ``refine`` the solve used). ``rhs`` is [m] or
        [m, k]."""
        vec = rhs.dim() == 1
        R = rhs.to(torch.float64)
        R = R.unsqueeze(1) if vec else R
        f = self._free.unsqueeze(1)
        Rs = torch.where(f, self._scale.unsqueeze(1) * R, torch.zeros_like(R))
        X = self._scale.unsqueeze(1) * _refined_solve(self._chol, _block(self._Gs, self._free), Rs, 2)
        return X.squeeze(1) if vec else X


def _block(Gs: Tensor, free: Tensor) -> Tensor:
    """:math:`G_{FF}` embedded in the m×m matrix (zeros outside F)."""
    return torch.where(free.unsqueeze(1) & free.unsqueeze(0), Gs, torch.zeros_like(Gs))


def _refined_solve(L: Tensor, G_ff: Tensor, R: Tensor, refine: int) -> Tensor:
    """Solve with the shifted factor ``L``, then ``refine`` proximal steps against the unshifted ``G_ff``."""
    X = torch.cholesky_solve(R, L)
    for _ in range(refine):
        X = X + torch.cholesky_solve(R - G_ff @ X, L)
    return X


def solve_dual_qp(
    G: Tensor,
    b: Tensor,
    nonneg: Tensor,
    *,
    rows: Tensor | None = None,
    held: Tensor | None = None,
    max_iter: int = 50,
    shift: float = 1e-12,
    refine: int = 2,
    tol: float = 1e-12,
    early_exit: bool = True,
) -> DualQPResult:
    """Solve :math:`\\min \\tfrac12 y^\\top G y - b^\\top y` s.t. :math:`y_i \\ge 0` where ``nonneg`` and
    :math:`y_i = 0` outside ``rows`` (see the module docstring). ``G`` [m, m] symmetric PSD, ``b`` [m]
    (used in float64), ``nonneg``, ``rows``, ``held`` [m] bool: the warm start, True for a multiplier held at
    zero (``None``: every nonnegative multiplier held, the unconstrained step first)."""
    G = G.to(torch.float64)
    b = b.to(torch.float64)
    m = G.shape[0]
    dev = G.device
    nonneg = nonneg.to(device=dev, dtype=torch.bool)
    rows = torch.ones(m, dtype=torch.bool, device=dev) if rows is None else rows.to(device=dev, dtype=torch.bool)
    if m == 0:
        z = torch.zeros((), dtype=torch.long, device=dev)
        e = G.new_zeros((0, 0))
        return DualQPResult(b.new_zeros(0), nonneg.clone(), z == 0, z, z, e, e, b.new_zeros(0), nonneg.clone())
    # Jacobi scaling y = s ŷ, s_i = G_ii^{-1/2} (rows with G_ii = 0, constraints with a zero gradient, keep 1)
    dg = torch.diagonal(G)
    s = torch.where(dg > 0, dg.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.ones_like(dg))
    Gs = s.unsqueeze(1) * G * s.unsqueeze(0)
    bs = s * b
    eligible = nonneg & rows  # multipliers that may join or leave the free set
    free = ~nonneg & rows  # equality multipliers are always free
    if held is not None:
        free = free | (eligible & ~held.to(device=dev, dtype=torch.bool))
    y = torch.zeros_like(bs)
    single = torch.zeros((), dtype=torch.bool, device=dev)
    done = torch.zeros((), dtype=torch.bool, device=dev)
    iters = torch.zeros((), dtype=torch.long, device=dev)
    scale_b = bs.abs().max()
    shift_diag = torch.full_like(bs, shift)
    ones = torch.ones_like(bs)
    labels = torch.arange(m, device=dev)
    tiny = torch.finfo(torch.float64).tiny
    L = F_used = count = None
    for _ in range(max(1, max_iter)):
        A = _block(Gs, free) + torch.diag(torch.where(free, shift_diag, ones))
        L, _ = torch.linalg.cholesky_ex(A)
        rhs = torch.where(free, bs, torch.zeros_like(bs)).unsqueeze(1)
        sol = _refined_solve(L, _block(Gs, free), rhs, refine).squeeze(1)
        sol = torch.where(free, sol, torch.zeros_like(sol))  # the minimiser with the held multipliers at zero
        tol_y = tol * sol.abs().max().clamp_min(1.0)
        neg = free & nonneg & (sol < -tol_y)
        feasible = ~neg.any()
        # (a) feasible: accept it, then free the held multipliers whose constraint is violated (w_i > 0)
        y_a = torch.where(free & nonneg, sol.clamp_min(0.0), sol)
        Gy = Gs @ y_a
        w = bs - Gy  # minus the dual gradient: the linearised residual, scaled
        # the rounding of w_i is of the order of the terms summed, sum_j |G_ij y_j|, which exceed |b| by far when
        # nearly parallel active rows make y large: a tolerance on |Gy| alone let rounding noise re-admit an
        # inactive row at every iteration (cycling until the budget ran out)
        tol_w = tol * (scale_b + (Gs.abs() @ y_a.abs()).max())
        cand = eligible & ~free & (w > tol_w)
        count = torch.where(feasible, cand.sum(), neg.sum())
        converged = feasible & (count == 0)
        best = torch.where(cand, w, torch.full_like(w, -math.inf)).argmax()
        add = torch.where(single, cand & (labels == best), cand)
        # (b) infeasible: move from y towards the minimiser while y stays nonnegative; what reaches zero is held.
        # A multiplier already at zero that would go negative (a block addition, a warm start) stops the move:
        # it is held again and the next addition is a single one, which from an optimal y always moves (Lawson &
        # Hanson), so q decreases between the partitions visited and none repeats.
        ratio = torch.where(neg, y / (y - sol).clamp_min(tiny), torch.full_like(y, 2.0))
        alpha = ratio.min().clamp(0.0, 1.0)
        stuck = alpha <= 0.0
        y_b = torch.where(free, y + alpha * (sol - y), torch.zeros_like(y))
        drop = torch.where(stuck, neg & (y <= tol_y), free & nonneg & (y_b <= tol_y))
        y_b = torch.where(drop, torch.zeros_like(y_b), y_b)
        keep = done | converged
        F_used = free
        y = torch.where(keep | feasible, y_a, y_b)
        free = torch.where(keep, free, torch.where(feasible, free | add, free & ~drop))
        single = torch.where(keep, single, torch.where(feasible, torch.zeros_like(single), single | stuck))
        iters = iters + (~keep).long()
        done = keep
        if early_exit and bool(done):
            break
    assert L is not None and F_used is not None and count is not None
    return DualQPResult(
        s * y,
        ~free,
        done,
        iters,
        torch.where(done, torch.zeros_like(count), count),
        L,
        Gs,
        s,
        F_used,
    )
