r"""ENFORCE's NP iteration in mixed precision: float32 Newton steps, float64 residuals for the last digits.

The NP step :math:`y_{k+1} = y_k - B_k^\top (B_k B_k^\top)^{-1} c_k` (:class:`~sqpoptim.layers.EnforceProjection`)
spends nearly all of its time on :math:`B_k = J_y c(x, y_k)` and the Gram matrix :math:`B_k B_k^\top` with its
Cholesky factor (for C3's 150 quadratic rows in 200 outputs: one ``[b, 200] x [200, 30000]`` product for every
:math:`A_i y`, a batched ``150 x 200 x 150`` product, 150 x 150 factorisations). In float32 these cost about half
(measured on this package's CPU benchmark machine), but float32 cannot *evaluate* :math:`c` to the evaluation
tolerance: rounding :math:`y` and the terms of :math:`c` leaves :math:`|c| \approx 10^{-5}`–:math:`10^{-4}` on C3.
Only the residual has to be accurate, not the step, so the iteration is split (and an optional bfloat16 phase
before it, :mod:`sqpoptim.layers._bf16_np`). The float32 products run on oneDNN's bfloat16 split where that keeps
float32's accuracy (:func:`sqpoptim.fast_float32_products`):

.. math::

    \begin{aligned}
    &\textbf{phase 1 (float32): } \tilde y \leftarrow \tilde y - B^\top (BB^\top)^{-1} c
        \quad (c, B, BB^\top, \text{Cholesky in float32}),\\
    &\qquad \text{until } \max_i |c_i| \le \max(\varepsilon, K \varphi), \quad
        \varphi = \epsilon_{32}\, \max_i \|B_i\|_2\, \|\tilde y\|_2 \\
    &\textbf{phase 2 (float64 residual): } \tilde y \leftarrow \tilde y - B_\star^\top L_\star^{-\top}
        L_\star^{-1} c_{64}(x, \tilde y) \quad (\tilde y,\ c_{64} \text{ in float64};\ B_\star, L_\star
        \text{ float32})
    \end{aligned}

* :math:`\varphi` bounds the change of :math:`c` that rounding :math:`\tilde y` to float32 causes
  (:math:`|\delta c_i| \le \|B_i\| \|\delta y\|`, :math:`\|\delta y\| \le \epsilon_{32}\|\tilde y\|`), a floor
  below which float32 steps cannot make progress; :math:`K = 4`. A sample leaves phase 1 there (or at the
  tolerance), so phase 1 never spends steps at its floor. In evaluation mode a sample also leaves phase 1
  right after a step when Newton's rate predicts the residual there below that level
  (:math:`r_{k+1} \approx r_k^3 / r_{k-1}^2` from the last two float32 residuals): its next residual is
  then evaluated in float64 only, which saves the float32 evaluation of :math:`c` and :math:`B` there (on the
  benchmark: 6 → 0.3 → 5e-3 → predicted 1.4e-6, actual 1.5e-6). A wrong prediction costs nothing but speed:
  phase 2 converges from anywhere the chord contracts, and refreshes the factor where it does not.
* Phase 1 steps the whole batch while at least half of it is above its switch level: the samples already
  below it take the step with :math:`c` replaced by 0 (:math:`\tilde y` unchanged, bit for bit) and get a fresh
  factor at their point, and the evaluation after the step covers the whole batch when at least half of it
  needs one. Stepping a sub-batch costs copies of :math:`B` (``[b, m, n]``) in and out of the batch, more than
  the few extra rows' Gram matrices and factorisations (batch 4,096 of the benchmark: 4 of 4,096 samples
  switched a step early, and the gathers and copies of the sub-batch step took about 2 s in a profile). Below
  half, the active samples step alone. The Gram factor is formed in place in one buffer reused by every whole-batch step
  (:func:`~sqpoptim.layers._linalg.gram_cholesky_`).
* Phase 2 starts from each sample's last phase-1 factor (formed one step back: the chord, or at its point for a
  sample that rode along a whole-batch step), so entering it costs no Gram matrix; a sample that took no
  phase-1 step gets the factor at its point.
* Phase 2 is iterative refinement (a chord iteration): the residual is evaluated in float64 at the float64
  iterate, the correction uses the last float32 Jacobian :math:`B_\star` and the Cholesky factor
  :math:`L_\star` of its Gram matrix. With :math:`B` the exact Jacobian at the current point,
  :math:`c_{k+1} = (I - B B_\star^\top (B_\star B_\star^\top)^{-1}) c_k + O(\|d_k\|^2)`, and
  :math:`\|B - B_\star\| / \|B\|` is the float32 rounding (:math:`\approx \epsilon_{32}`) plus the distance the
  iterate moved since :math:`B_\star` was formed, so the residual contracts by about
  :math:`\kappa(BB^\top)\,\epsilon_{32}` per step near the solution (:math:`\kappa \approx 265` on the
  benchmark instance: :math:`10^{-5}` per step). The accuracy of the output is set by the float64 residual
  alone: the loop stops on :math:`\max_i |c_{64,i}| \le \varepsilon`, the same test as the float64 iteration.
  A sample whose refinement step does not halve :math:`\max_i |c_{64,i}|` gets a fresh float32
  :math:`B_\star, L_\star` at its point; if a step from a fresh factor still does not halve it (float32 too
  coarse for its conditioning, :math:`\kappa \gtrsim 1/\epsilon_{32}`), the sample continues with float64
  NP steps (float64 :math:`B`, Gram and Cholesky), the plain iteration.
* Training (``measure="mean"``): phase 1 stops when the batch mean of the float32 :math:`|c|` is at most
  :math:`\varepsilon_T = 10^{-4}` — float32 evaluates :math:`c` to :math:`\lesssim 10^{-5}` there, so the
  mean is met in float64 terms up to that error — and the output is the float32 iterate. Samples that reached
  their float32 floor first are refined in phase 2 as above.
* Every step is taken (AdaNP takes every NP step); ``iterations`` counts phase-1 and phase-2 steps. With
  ``line_search=True`` a phase-1 step that does not decrease the float32 :math:`\|c\|` is shortened by the line
  search of :mod:`sqpoptim.layers._np_line_search` (its trials evaluated in float32 like the step; a sample that
  finds no decrease there has reached what float32 can do and moves to phase 2). Phase 2 is not searched: it starts
  where the float32 Newton steps already contract.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._fast_float32 import fast_float32_products
from ._base import ProjectionResult, finite_or_raise
from ._bf16_np import bf16_np
from ._constraints import OutputConstraints
from ._linalg import cholesky_apply, gram_cholesky_, gram_solve, transpose_apply
from ._np_line_search import line_search
from ._system import put, take

__all__ = ["mixed_np"]

_K = 4.0  # phase 1 stops at K times its float32 rounding floor
_THETA = 0.5  # a refinement step must at least halve max |c|


def _max_abs(c: Tensor) -> Tensor:
    return c.abs().amax(dim=-1)


class _Evaluator:
    """``c`` (and ``B``) on sub-batches, in bfloat16, float32 or float64."""

    def __init__(self, constraints: OutputConstraints, x: Tensor | None) -> None:
        self.cons = constraints
        floating = x is not None and x.is_floating_point()
        self.x64 = x
        self.x32 = x.float() if floating else x
        self.x16 = x.bfloat16() if floating else x

    def jacobian_bf16(self, y_bf16: Tensor) -> tuple[Tensor, Tensor]:
        ev = self.cons.evaluate(self.x16, y_bf16, jacobian=True)
        return ev.h, ev.h_jac

    def jacobian32(self, y32: Tensor, idx: Tensor | None) -> tuple[Tensor, Tensor]:
        ev = self.cons.evaluate(take(self.x32, idx), y32, jacobian=True)
        return ev.h, ev.h_jac

    def jacobian64(self, y: Tensor, idx: Tensor | None) -> tuple[Tensor, Tensor]:
        ev = self.cons.evaluate(take(self.x64, idx), y, jacobian=True)
        return ev.h, ev.h_jac

    def values64(self, y: Tensor, idx: Tensor | None) -> Tensor:
        return self.cons.evaluate(take(self.x64, idx), y, jacobian=False).h


def _factor(J: Tensor, work: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The Cholesky factor of :math:`BB^\\top` in ``work`` (fresh memory when ``None``), its rank flag and
    :math:`\\max_i \\|B_i\\|` (for :func:`_floor`)."""
    if work is None:
        work = J.new_zeros(J.shape[0], J.shape[1], J.shape[1])
    L, flagged, rows = gram_cholesky_(J, work)
    return L, flagged, rows.amax(dim=-1).sqrt()


def _floor(row_norm: Tensor, y: Tensor) -> Tensor:
    """:math:`\\varphi` of the module docstring, ``[b]``, from :math:`\\max_i \\|B_i\\|` ``[b]``."""
    eps = torch.finfo(y.dtype).eps
    return eps * row_norm * torch.linalg.vector_norm(y, dim=-1)


def _patched(J: Tensor, patches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``J`` with the rows ``idx`` of each ``(idx, rows)`` in ``patches`` replaced, in order (one copy of ``J``,
    which belongs to the caller of the iteration, then in place)."""
    for k, (idx, rows) in enumerate(patches):
        J = J.index_copy(0, idx, rows) if k == 0 else J.index_copy_(0, idx, rows)
    return J


def _searched(ev: _Evaluator, sub: Tensor | None, y_from: Tensor, y_to: Tensor, c: Tensor, J: Tensor, c_to, J_to):
    """The line search of :mod:`sqpoptim.layers._np_line_search` on float32 NP steps ``y_from -> y_to`` (float64
    iterates, ``sub`` their rows in the batch): ``(y, c, J, stalled)`` at :math:`y + t d`."""
    d = y_to - y_from

    def trial(t, rows):
        return ev.jacobian32((y_from[rows] + t.double()[:, None] * d[rows]).float(), rows if sub is None else sub[rows])

    t, (c_t, J_t), stalled = line_search(trial, c, (c_to, J_to), (c, J))
    return y_from + t.double()[:, None] * d, c_t, J_t, stalled


def mixed_np(
    constraints: OutputConstraints,
    x: Tensor | None,
    y0: Tensor,
    *,
    tol: float,
    max_iter: int,
    measure: str,
    line_search: bool = False,
    bf16: bool = False,
) -> tuple[ProjectionResult, Tensor, Tensor | None]:
    """Run the two phases of the module docstring from ``y0`` (float64, ``[B, n]``); ``line_search``: phase 1's
    steps are globalised by :mod:`sqpoptim.layers._np_line_search` (module docstring); ``bf16``: bfloat16 NP
    steps first (:mod:`sqpoptim.layers._bf16_np`), counted in the iterations.

    Returns ``(result, c, J)``: ``result.y`` in float64, :math:`c` at it (float64 where phase 2 evaluated
    it, the float32 values otherwise) and the float32 Jacobian at ``result.y`` when the iteration ended in
    phase 1 (training mode; else ``None``: the implicit backward then evaluates :math:`B` in float64).
    """
    if y0.dtype != torch.float64:
        raise ValueError(f"mixed precision iterates from a float64 y; got {y0.dtype}")
    with fast_float32_products(y0.device):
        return _mixed_np(constraints, x, y0, tol, max_iter, measure, line_search, bf16)


def _mixed_np(constraints, x, y0, tol, max_iter, measure, line_search, bf16):
    ev = _Evaluator(constraints, x)
    batch, dev = y0.shape[0], y0.device
    it = 0
    if bf16:
        y0, it = bf16_np(ev.jacobian_bf16, y0, max_iter)
    y, y32 = y0, y0.float()  # the iterate in float64 (float32 steps added to it) and its rounding
    c32, J = ev.jacobian32(y32, None)  # [B, m], [B, m, n] at y32
    finite_or_raise(c32, "the constraint function (float32)")
    m = c32.shape[-1]
    c, err = c32.double(), _max_abs(c32).double()
    err_prev = torch.full_like(err, float("inf"))
    regularized = torch.zeros(batch, dtype=torch.bool, device=dev)
    row_norm = torch.linalg.vector_norm(J, dim=-1).amax(dim=-1)
    switch = err <= torch.clamp(_K * _floor(row_norm, y32).double(), min=tol)
    # Each sample's float32 factor, the chord of phase 2: B in J_step with the rows of `patches` written over it
    # (written only if phase 2 runs: training usually ends in phase 1), the Cholesky factor L (a view of `work`,
    # reused by every whole-batch factorisation); `at_point`: formed at the sample's current point.
    J_step, patches, L, work = J, [], None, None
    factored, at_point = torch.zeros_like(switch), torch.zeros_like(switch)
    pending = torch.zeros_like(switch)  # y moved, c not evaluated there (predicted below the float32 floor)
    # Phase 1: float32 NP steps on the samples above their switch level.
    while it < max_iter:
        if measure == "mean" and float(c.abs().mean()) <= tol:
            return ProjectionResult(y, it, err, err <= tol, regularized), c, J
        act = ~switch
        n_act = int(act.sum())
        if n_act == 0:
            break
        if 2 * n_act >= batch:  # the whole batch; the switched samples take a zero step
            idx, b_act = None, act
            work = J.new_zeros(batch, m, m) if work is None else work
            L, flagged, rn = _factor(J, work)
            J_s, c_s = J, (c32 if n_act == batch else c32 * act[:, None])
            J_step, patches = J, []
            regularized = regularized | flagged
            at_point = ~act & ~pending
        else:
            idx, b_act = act.nonzero().squeeze(1), None
            J_s, c_s = J[idx], c32[idx]
            L_s, flagged, rn = _factor(J_s)
            if work is None:
                work = J.new_zeros(batch, m, m)
                L = work.mT
            work.index_copy_(0, idx, L_s.mT)  # L is work's column-major view
            patches.append((idx, J_s))
            regularized = regularized.index_copy(0, idx, regularized[idx] | flagged)
            at_point = at_point.index_fill(0, idx, False)
        factored = torch.ones_like(factored) if idx is None else factored.index_fill(0, idx, True)
        y_from = take(y, idx)
        y64_s = y_from - transpose_apply(J_s, cholesky_apply(L if idx is None else L_s, c_s)).double()
        y_s = y64_s.float()
        y, y32 = put(y, idx, y64_s), put(y32, idx, y_s)
        it += 1
        # Newton's rate r_{k+1} ~ r_k^3 / r_{k-1}^2 predicts the next residual; below the floor, phase 2 takes
        # over without a float32 evaluation there (evaluation mode only: training stops on float32 values).
        floor = torch.clamp(_K * _floor(rn, y_s).double(), min=tol)
        e_s, e_prev = take(err, idx), take(err_prev, idx)
        contracting = (e_s < e_prev) & torch.isfinite(e_prev)
        predicted = torch.where(contracting, e_s**3 / e_prev.square(), torch.full_like(e_s, float("inf")))
        jump = (predicted <= floor) if measure == "max" else torch.zeros_like(floor, dtype=torch.bool)
        if b_act is not None:
            jump = jump & b_act
            pending = torch.where(b_act, jump, pending)
            evaluate = b_act & ~jump
        else:
            pending = pending.index_copy(0, idx, jump)
            evaluate = ~jump
        ev_idx = evaluate.nonzero().squeeze(1)
        n_ev = ev_idx.numel()
        if n_ev and b_act is not None and 2 * n_ev >= batch and not line_search:
            # The whole batch again (the others at their current points): no gathers or copies of J.
            c_n, J_n = ev.jacobian32(y32, None)
            e_n = _max_abs(c_n).double()
            err_prev = torch.where(evaluate, err, err_prev)
            c32, J = c_n, J_n
            c, err = torch.where(evaluate[:, None], c_n.double(), c), torch.where(evaluate, e_n, err)
            done_n = (e_n <= floor) | ~torch.isfinite(e_n)
            switch = switch | (evaluate & done_n)
        elif n_ev:
            whole = n_ev == evaluate.numel()  # every sample of this step: no selection
            sub = idx if whole else (ev_idx if idx is None else idx[ev_idx])
            c_n, J_n = ev.jacobian32(y_s if whole else y_s[ev_idx], sub)
            if line_search:
                y0_e, y1_e, c_e, J_e = (t if whole else t[ev_idx] for t in (y_from, y64_s, c_s, J_s))
                y_n, c_n, J_n, stuck = _searched(ev, sub, y0_e, y1_e, c_e, J_e, c_n, J_n)
                y, y32 = put(y, sub, y_n), put(y32, sub, y_n.float())
            e_n = _max_abs(c_n).double()
            err_prev = put(err_prev, sub, take(err, sub))
            c32, J = put(c32, sub, c_n), put(J, sub, J_n)
            c, err = put(c, sub, c_n.double()), put(err, sub, e_n)
            done_n = (e_n <= (floor if whole else floor[ev_idx])) | ~torch.isfinite(e_n)
            if line_search:
                done_n = done_n | stuck  # no float32 decrease left: phase 2 takes over
            switch = put(switch, sub, done_n)
        jumped = jump.nonzero().squeeze(1)
        if jumped.numel():
            switch = switch.index_fill(0, jumped if idx is None else idx[jumped], True)
    if measure == "mean" and float(c.abs().mean()) <= tol and not bool(pending.any()):
        return ProjectionResult(y, it, err, err <= tol, regularized), c, J
    # Phase 2: float64 residuals. Every sample is certified in evaluation mode (a float32 |c| may hide > tol).
    todo = ((err > tol) | pending) if measure == "mean" else torch.ones_like(switch)
    sel = todo.nonzero().squeeze(1)
    if sel.numel():
        sel = None if sel.numel() == batch else sel
        c_sel = ev.values64(take(y, sel), sel)
        c, err = put(c, sel, c_sel), put(err, sel, _max_abs(c_sel))
    # Samples that never stepped in phase 1 get the factor at their point; the others refine by the chord.
    first = (~factored & (err > tol)).nonzero().squeeze(1)
    if first.numel():
        L_new, flagged, _ = _factor(J[first])
        if work is None:
            work = J.new_zeros(batch, m, m)
            L = work.mT
        work.index_copy_(0, first, L_new.mT)
        patches.append((first, J[first]))
        at_point = at_point.index_fill(0, first, True)
        regularized = regularized.index_copy(0, first, regularized[first] | flagged)
    J = _patched(J_step, patches)
    fresh = at_point  # the factor was formed at the sample's current point
    exact = torch.zeros_like(fresh)  # float64 NP steps (float32 too coarse for this sample)
    refresh = torch.zeros_like(fresh)
    while True:
        active = err > tol
        if measure == "mean":
            stop = float(c.abs().mean()) <= tol
        else:
            stop = not bool(active.any())
        if stop or it == max_iter:
            break
        new = (refresh & active & ~exact).nonzero().squeeze(1)
        if new.numel():
            _, J_new = ev.jacobian32(y[new].float(), new)
            L_new, flagged, _ = _factor(J_new)
            work.index_copy_(0, new, L_new.mT)
            J = J.index_copy(0, new, J_new)
            fresh = fresh.index_fill(0, new, True)
            regularized = regularized.index_copy(0, new, regularized[new] | flagged)
        idx = active.nonzero().squeeze(1)
        ex = exact[idx]
        if not bool(ex.any()) and idx.numel() == batch:  # the common case: every sample refines by its chord
            y_s = y - transpose_apply(J, cholesky_apply(L, c.float())).double()
            c_s = ev.values64(y_s, None)
            idx = None
        else:
            d = torch.zeros_like(y[idx])
            if bool(ex.any()):
                sub = idx[ex]
                _, J64 = ev.jacobian64(y[sub], sub)
                w, flagged = gram_solve(J64 @ J64.mT, c[sub])
                d[ex] = -transpose_apply(J64, w)
                regularized = regularized.index_copy(0, sub, regularized[sub] | flagged)
            ch = ~ex
            if bool(ch.any()):
                sub = idx[ch]
                d[ch] = -transpose_apply(J[sub], cholesky_apply(L[sub], c[sub].float())).double()
            y_s = y[idx] + d
            c_s = ev.values64(y_s, idx)
        err_s = _max_abs(c_s)
        poor = ~(err_s <= _THETA * take(err, idx)) & (err_s > tol)
        escalate = poor & take(fresh, idx) & ~ex
        y, c, err = put(y, idx, y_s), put(c, idx, c_s), put(err, idx, err_s)
        exact = put(exact, idx, ex | escalate)
        fresh = put(fresh, idx, torch.zeros_like(poor))
        refresh = put(torch.zeros_like(refresh), idx, poor & ~escalate)
        it += 1
    return ProjectionResult(y, it, err, err <= tol, regularized), c, None
