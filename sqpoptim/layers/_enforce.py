r"""ENFORCE's adaptive-depth neural projection (AdaNP) for nonlinear equality constraints.

Lastrucci & Schweidtmann, "ENFORCE: Nonlinear Constrained Learning with Adaptive-depth Neural Projection"
(arXiv:2502.06774, Sec. 4.1, App. D.1-D.2).

.. math::

    \begin{aligned}
    &\textbf{input: } x,\ \hat y,\ c = h(x, \cdot),\ \text{tolerance } \varepsilon_t,\ d_{\max} \\
    &\tilde y \leftarrow \hat y,\ i \leftarrow 0 \\
    &\textbf{while } m(|c(x, \tilde y)|) > \varepsilon_t \textbf{ and } i < d_{\max}: \\
    &\qquad B = J_y c(x, \tilde y) \\
    &\qquad \tilde y \leftarrow \tilde y - B^\top (B B^\top)^{-1} c(x, \tilde y) \hfill \text{(NP step)} \\
    &\qquad i \leftarrow i + 1
    \end{aligned}

:math:`m` is the batch mean in training (:math:`\varepsilon_T = 10^{-4}`) and the batch max at inference
(:math:`\varepsilon_I = 10^{-6}`), switched by ``module.training``; :math:`d_{\max} = 100`.

``method="line_search"`` (not in the paper) globalises the NP step per sample: with
:math:`d = -B^\top (BB^\top)^{-1} c` and :math:`q = c(x, \tilde y + d)` (the next step's evaluation),

.. math::

    c(x, \tilde y + t d) = (1 - t)\, c + t^2 q + O(t^3), \qquad
    \tilde y \leftarrow \tilde y + t d, \quad
    t = \begin{cases} 1 & \|q\| \le (1 - \alpha)\|c\| \\
    \arg\min_{(0, 1]} \|(1 - t) c + t^2 q\|^2, \text{ halved until }
    \|c(x, \tilde y + t d)\| \le (1 - \alpha t)\|c\| & \text{otherwise} \end{cases}

(:math:`\alpha = 10^{-4}`; the model is exact for :math:`c` quadratic in :math:`y`, so there its step needs one
evaluation and no Jacobian beyond the one at the accepted point; :mod:`sqpoptim.layers._np_line_search`). The
paper's AdaNP adapts the number of full NP steps and takes each whatever it does to :math:`\|c\|`.

Notes and deviations
--------------------
* The NP step is written as :math:`\tilde y - B^\top(BB^\top)^{-1}c`, algebraically the paper's
  :math:`B^*\hat y + v^*` with :math:`B^* = I - B^\top(BB^\top)^{-1}B`, :math:`v^* = B^\top(BB^\top)^{-1}
  (B\hat y - c)`, without ever forming an ``n x n`` matrix (the paper's D.4 memory estimate is dominated by
  :math:`B^*`). Exact in one step for constraints affine in :math:`y`. The loop is
  :func:`~sqpoptim.layers._gauss_newton.gauss_newton` without damping.
* The batch measure is taken over all entries of :math:`|c|`; per-sample ``converged`` in the diagnostics
  is :math:`\max_i |c_i| \le \varepsilon` for the active tolerance, so in training some samples may be
  flagged although the batch mean met :math:`\varepsilon_T`. A sample that meets the tolerance on its own is
  not stepped further (the paper steps the whole batch until the batch measure passes; the extra steps would
  move such a sample by less than the tolerance).
* Jacobians (``jacobian=``): ``"exact"`` is the paper's :math:`B` at every step; ``"broyden"`` forms
  :math:`B` once and then updates it by Broyden's secant rule, forming it exactly again for a sample whose
  step does not halve :math:`\max|c|` (and retaking that step), so no sample does worse than the paper's step
  from where it stands; ``"chord"`` is the same without the secant update. ``"auto"`` is ``"exact"`` when the
  constraints come with user Jacobians (then :math:`B` costs about as much as :math:`c`) or the gradient is
  unrolled, ``"broyden"`` otherwise (a ``torch.func`` Jacobian costs ``min(m, n)`` passes of ``h``). They end
  feasible to the tolerance at slightly different points of the constraint set
  (:mod:`._gauss_newton` for the measurements behind the choice).
* One host synchronisation per depth (the stopping test is a batch decision, as in the paper).
* Gradients: ``"implicit"`` (default) runs the steps without a graph and back-propagates with the projector
  at the converged point, :math:`\bar{\hat y} = (I - B^\top(BB^\top)^{-1}B)\,\bar y` and
  :math:`\bar x = -(\partial_x c)^\top (BB^\top)^{-1}B\,\bar y` (:mod:`._implicit`: the derivative of the
  iteration's limit at a point of the constraint set; exact for constraints affine in :math:`y` whose
  :math:`B` does not depend on :math:`x`, within :math:`O(\|\hat y - \tilde y\|)` of the unrolled derivative
  otherwise: tested). ``"unrolled"`` (the paper's training) differentiates through every step, including
  :math:`\partial B/\partial y` (second derivatives of :math:`h`). The shape notation ``[B, ...]``
  elsewhere is the batch, not this :math:`B`. Parameters captured inside ``h`` receive no gradient in
  implicit mode.
* Rank-deficient :math:`B`: regularised Cholesky (:mod:`._linalg`), flagged in ``regularized``.
* ``mixed_precision=True`` (not in the paper): the NP steps in float32 (:math:`B`, :math:`BB^\top`, its
  Cholesky factor, :math:`c`) until float32's rounding floor, then float64 residuals corrected with the float32
  factor (iterative refinement) to the tolerance, which is tested on float64 values as in the float64 layer
  (:mod:`sqpoptim.layers._mixed_np`). In training the float32 iteration usually meets :math:`\varepsilon_T`
  by itself and the implicit backward then solves with the float32 :math:`B` (relative error within
  :math:`m\,\kappa(BB^\top)\,\epsilon_{32}`, tested against the float64 backward); in evaluation mode the
  backward evaluates :math:`B` in float64. The float32 products (the constraint function's included) run on
  oneDNN's bfloat16 split where it keeps float32's accuracy (:func:`sqpoptim.fast_float32_products`).
* ``mixed_precision="bfloat16"`` (not in the paper): the same, after bfloat16 NP steps while the iterate is far
  from the constraint set (:mod:`sqpoptim.layers._bf16_np`: each sample until :math:`\max_i |c_i|` reaches
  bfloat16's rounding floor). The output is a point of the constraint set reached by a slightly different
  path, not the float32 iteration's point (on C3 0.8 apart, outputs of norm 10; rounding :math:`\hat y` to
  bfloat16 moves the float32 iteration's output by 0.18). For hardware with native bfloat16 products; elsewhere
  they are emulated and far slower than float32, and the layer warns on x86 CPUs without them.
* ``method`` defaults to the paper's iteration, by measurement (2026-12, CPU). On C3's form (200 outputs,
  150 quadratic rows, batch 200 from the untrained backbone, max :math:`|c|` 176) the full steps overshoot
  (176 → 1,760 → 442 → ...) but the line-searched ones do not reach the tolerance sooner: max :math:`|c|` falls
  by only 12-15 % per step for the first three even at the model's optimal :math:`t` (176 → 149 → 131 → 115 →
  68 → ...), both take 8 steps to :math:`\varepsilon_T`, and the extra evaluations at :math:`\tilde y + t d`
  cost 20-25 % more CPU per projection. Where the full step is poor throughout, the line search pays:
  :math:`c = \sin 3y + 3.5 y - x` from :math:`|\hat y| \sim 3` converges in 9 steps against 38, and with
  a singular :math:`B` on the way the paper's steps can diverge while :math:`\|c\|` never increases
  with the line search (a sample that finds no decrease stops there, unconverged). ``gradient="unrolled"``
  differentiates the paper's steps only. With Broyden or chord Jacobians only steps from an exact :math:`B` are
  searched (the quasi-Newton steps keep their refresh rule); with ``mixed_precision`` the float32 steps are.
* :func:`adanp_activation` is the paper's Alg. 2 (use :math:`\hat y` for the batch when one NP step makes
  the task-loss measure worse); it is a function the training loop calls, not state on the layer. With implicit
  gradients the first step is the layer's own, taken without a graph, and the activated output is the layer's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._warnings import warn_user
from ._base import _GRADIENTS, ProjectionLayer, ProjectionResult, check_choice, finite_or_raise
from ._bf16_np import native_bfloat16
from ._constraints import OutputConstraints
from ._gauss_newton import gauss_newton
from ._implicit import LimitBackward
from ._linalg import gram_solve
from ._mixed_np import mixed_np
from ._system import StackedSystem

__all__ = ["EnforceProjection", "adanp", "adanp_activation", "np_step"]

JACOBIANS = ("auto", "exact", "broyden", "chord")
METHODS = ("paper", "line_search")


def np_step(y: Tensor, c: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    r"""One NP step :math:`y - B^\top (BB^\top)^{-1} c`; returns ``(y⁺, regularized)``.

    Guarantees :math:`B y^+ = B y - c` (the linearised constraint holds at :math:`y^+`) and that
    :math:`y^+ - y` lies in the row space of :math:`B` (the least-norm such step).
    """
    B = B.contiguous()  # a permuted user Jacobian would make both products below copy per call
    G = B @ B.mT  # [B, m, m]
    w, flagged = gram_solve(G, c)  # [B, m]
    return y - torch.einsum("bmn,bm->bn", B, w), flagged


def adanp(
    constraints: OutputConstraints,
    x: Tensor | None,
    y_hat: Tensor,
    *,
    tol: float,
    max_depth: int = 100,
    measure: str = "max",
    jacobian: str = "exact",
    line_search: bool = False,
) -> ProjectionResult:
    """AdaNP in the functional form: NP steps until ``measure(|c|) <= tol`` or ``max_depth`` steps
    (``line_search=True``: the globalised steps of :class:`EnforceProjection`'s ``method="line_search"``)."""
    return _adanp(constraints, x, y_hat, tol, max_depth, measure, jacobian, line_search)[0]


def _adanp(constraints, x, y_hat, tol, max_depth, measure, jacobian, line_search):
    system = StackedSystem(constraints, x, y_hat, jacobian=True)
    result, c, J = gauss_newton(
        system,
        y_hat,
        tol=tol,
        max_iter=max_depth,
        damping=False,
        jacobian=jacobian,
        measure=measure,
        line_search=line_search,
    )
    return result, system, c, J


class EnforceProjection(ProjectionLayer):
    r"""ENFORCE's AdaNP layer: repeated projections onto the linearised equalities :math:`h(x, y) = 0`.

    Args:
        constraints: :class:`OutputConstraints` with equalities only, or a callable ``h(x, y) -> [B, m]``.
        train_tol: :math:`\varepsilon_T`, compared with the batch mean of :math:`|c|` in training mode.
        eval_tol: :math:`\varepsilon_I`, compared with the batch max of :math:`|c|` in evaluation mode.
        max_depth: :math:`d_{\max}`.
        gradient: ``"implicit"`` or ``"unrolled"`` (see the module notes).
        method: ``"paper"`` (every full NP step, as AdaNP) or ``"line_search"`` (NP steps shortened per sample
            where they do not decrease :math:`\|c\|`; needs ``gradient="implicit"``); see the module notes.
        jacobian: ``"auto"``, ``"exact"``, ``"broyden"`` or ``"chord"`` (see the module notes).
        solve_dtype: dtype of the iterations (``None``: ``y_hat``'s).
        mixed_precision: ``True``: NP steps in float32 (Jacobian, Gram matrix, Cholesky), then float64 residuals
            with float32 corrections to the tolerance (:mod:`sqpoptim.layers._mixed_np`); ``"bfloat16"``: the same
            after bfloat16 NP steps while far from the constraint set (:mod:`sqpoptim.layers._bf16_np`: for
            hardware with native bfloat16 arithmetic). Needs ``solve_dtype=torch.float64``,
            ``gradient="implicit"`` and exact Jacobians (``jacobian`` ``"auto"`` or ``"exact"``).
        nonconvergence: ``"ignore"``, ``"warn"`` or ``"raise"`` when evaluation-mode outputs miss
            ``eval_tol``.

    Example::

        layer = EnforceProjection(lambda x, y: (0.5 * y[:, :1]) ** 2 + x**2 + y[:, 1:])
        y = layer(x, net(x))                 # projected output
        res = layer.project(x, net(x))       # res.y, res.iterations, res.residual, res.converged
    """

    def __init__(
        self,
        constraints: OutputConstraints | Callable,
        *,
        train_tol: float = 1e-4,
        eval_tol: float = 1e-6,
        max_depth: int = 100,
        gradient: str = "implicit",
        method: str = "paper",
        jacobian: str = "auto",
        solve_dtype: torch.dtype | None = torch.float64,
        mixed_precision: bool | str = False,
        nonconvergence: str = "warn",
    ) -> None:
        super().__init__(constraints, solve_dtype=solve_dtype, nonconvergence=nonconvergence)
        if self.constraints.has_inequalities:
            raise ValueError("EnforceProjection handles equalities only; use HardNetPP or KKTHardNet for g")
        if not train_tol > 0 or not eval_tol > 0:
            raise ValueError(f"Invalid tolerances: train_tol={train_tol}, eval_tol={eval_tol} (must be > 0)")
        if int(max_depth) != max_depth or max_depth < 1:
            raise ValueError(f"Invalid max_depth: {max_depth}")
        self.train_tol, self.eval_tol, self.max_depth = float(train_tol), float(eval_tol), int(max_depth)
        self.gradient = check_choice("gradient", gradient, _GRADIENTS)
        self.jacobian = check_choice("jacobian", jacobian, JACOBIANS)
        self.method = check_choice("method", method, METHODS)
        if self.gradient == "unrolled" and self.method == "line_search":
            raise ValueError("gradient='unrolled' differentiates the paper's iteration: use method='paper'")
        if self.gradient == "unrolled" and self.jacobian in ("broyden", "chord"):
            raise ValueError("gradient='unrolled' differentiates the paper's iteration: use jacobian='exact'")
        if mixed_precision not in (False, True, "bfloat16"):
            raise ValueError(f"Invalid mixed_precision {mixed_precision!r}: expected False, True or 'bfloat16'")
        self.mixed_precision = mixed_precision
        if self.mixed_precision and (
            solve_dtype != torch.float64 or self.gradient != "implicit" or self.jacobian not in ("auto", "exact")
        ):
            raise ValueError(
                f"mixed_precision={mixed_precision!r} needs solve_dtype=torch.float64, gradient='implicit' and "
                "jacobian 'auto' or 'exact'; "
                f"got solve_dtype={solve_dtype}, gradient={gradient!r}, jacobian={jacobian!r}"
            )

    @property
    def tol(self) -> float:
        """The active tolerance: ``train_tol`` in training mode, ``eval_tol`` otherwise."""
        return self.train_tol if self.training else self.eval_tol

    def np_step(self, x: Tensor | None, y_hat: Tensor) -> Tensor:
        """One differentiable NP step from ``y_hat`` (solve dtype inside, ``y_hat``'s dtype out)."""
        xs, ys = self._prepare(x, y_hat)
        ev = self.constraints.evaluate(xs, ys, jacobian=True)
        finite_or_raise(ev.h, "h(x, y)")
        return np_step(ys, ev.h, ev.h_jac)[0].to(y_hat.dtype)

    def _jacobian_mode(self) -> str:
        if self.jacobian != "auto":
            return self.jacobian
        return "exact" if self.gradient == "unrolled" or self.constraints.has_user_jacobians else "broyden"

    def _project(
        self, x: Tensor | None, y: Tensor, start: Tensor | None = None, depth: int | None = None
    ) -> ProjectionResult:
        """AdaNP from ``y``, or (implicit gradients only) from ``start`` with the gradient at the limit taken with
        respect to ``y``: the implicit derivative depends on the limit alone (:mod:`._implicit`). ``depth``
        overrides ``max_depth``."""
        measure, ls = "mean" if self.training else "max", self.method == "line_search"
        depth = self.max_depth if depth is None else depth
        args = (self.tol, depth, measure, self._jacobian_mode(), ls)
        needs_grad = torch.is_grad_enabled() and (y.requires_grad or (x is not None and x.requires_grad))
        y0 = y if start is None else start.detach()
        if self.mixed_precision == "bfloat16" and native_bfloat16(y.device) is False:
            warn_user(
                "EnforceProjection(mixed_precision='bfloat16') on a CPU without native bfloat16 arithmetic "
                "(AVX512-BF16 or AMX): PyTorch emulates the bfloat16 products, which makes the projection several "
                "times slower than with mixed_precision=True (5x on the C3 benchmark); use mixed_precision=True here",
                UserWarning,
            )
        if self.mixed_precision:
            with torch.no_grad():
                res, c, J = mixed_np(
                    self.constraints,
                    x,
                    y0,
                    tol=self.tol,
                    max_iter=depth,
                    measure=measure,
                    line_search=ls,
                    bf16=self.mixed_precision == "bfloat16",
                )
            if not needs_grad:
                return res
            system = StackedSystem(self.constraints, x, res.y, jacobian=False, c0=c)
            y_out = LimitBackward.apply(system, 0.0, self.tol, x, y, res.y, c, J)
            return ProjectionResult(y_out, res.iterations, res.residual, res.converged, res.regularized)
        if self.gradient == "unrolled" or not needs_grad:
            assert start is None or self.gradient == "implicit", "an unrolled iteration starts from y"
            return _adanp(self.constraints, x, y0, *args)[0]
        with torch.no_grad():
            res, system, c, J = _adanp(self.constraints, x, y0, *args)
        y_out = LimitBackward.apply(system, 0.0, self.tol, x, y, res.y, c, J)
        return ProjectionResult(y_out, res.iterations, res.residual, res.converged, res.regularized)

    @torch.no_grad()
    def _first_step(self, x: Tensor | None, y_hat: Tensor) -> Tensor:
        """The iteration's first step from ``y_hat``, without a graph, in the solve dtype (no step where ``y_hat``
        already meets the active tolerance)."""
        xs, ys = self._prepare(x, y_hat)
        return self._project(xs, ys, depth=1).y

    def _continue(self, x: Tensor | None, y_hat: Tensor, start: Tensor) -> Tensor:
        """AdaNP from ``start`` (a point already reached from ``y_hat``), differentiated at its limit with respect to
        ``y_hat`` and ``x``; implicit gradients only."""
        xs, ys = self._prepare(x, y_hat)
        return self._finish(self._project(xs, ys, start=start.to(ys.dtype)), y_hat).y


def adanp_activation(
    layer: EnforceProjection, x: Tensor | None, y_hat: Tensor, loss_measure: Callable[[Tensor], Tensor]
) -> tuple[Tensor, bool]:
    r"""ENFORCE's activation rule (Alg. 2): project only when one NP step does not worsen the task loss.

    Computes :math:`\tilde y = \mathcal{P}(\hat y)` (one NP step); if
    :math:`m_\ell(\tilde y) > m_\ell(\hat y)` returns ``(y_hat, False)`` (the projection is discarded for
    this batch), otherwise ``(AdaNP(ỹ), True)`` (AdaNP continued from :math:`\tilde y`). Call it in the
    training loop in place of ``layer(x, y_hat)``; ``loss_measure(y) -> scalar`` is the task-loss measure
    (e.g. the batch MSE against the targets). Costs one host sync for the comparison.

    With ``gradient="unrolled"`` :math:`\tilde y` is :func:`np_step`'s and the gradient flows through it and every
    later step (the paper's graph). With ``gradient="implicit"`` :math:`\tilde y` is the first step of the layer's
    own iteration (its ``method``, and float32 with ``mixed_precision``), taken without a graph, and AdaNP
    continues from it: with exact Jacobians (always the case with ``mixed_precision``) an activated batch gets the
    output of ``layer(x, y_hat)`` itself; with Broyden's, AdaNP forms the exact Jacobian again at
    :math:`\tilde y`. The gradient is the layer's at that limit (:mod:`sqpoptim.layers._implicit`: the implicit
    derivative depends on the limit alone; the first step is not differentiated apart from the rest of the
    iteration). A discarded projection then costs one step and two loss measures.
    """
    if layer.gradient == "unrolled":
        y1 = layer.np_step(x, y_hat)
        with torch.no_grad():
            worse = bool(loss_measure(y1) > loss_measure(y_hat))
        return (y_hat, False) if worse else (layer(x, y1), True)
    y1 = layer._first_step(x, y_hat)
    with torch.no_grad():
        worse = bool(loss_measure(y1.to(y_hat.dtype)) > loss_measure(y_hat))
    if worse:
        return y_hat, False
    return layer._continue(x, y_hat, y1), True
