r"""ENFORCE's adaptive-depth neural projection (AdaNP) for nonlinear equality constraints.

Lastrucci & Schweidtmann, "ENFORCE: Nonlinear Constrained Learning with Adaptive-depth Neural Projection"
(``../shared/papers/001_*.txt``, Sec. 4.1, App. D.1-D.2).

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

Notes and deviations
--------------------
* The NP step is written as :math:`\tilde y - B^\top(BB^\top)^{-1}c`, algebraically the paper's
  :math:`B^*\hat y + v^*` with :math:`B^* = I - B^\top(BB^\top)^{-1}B`, :math:`v^* = B^\top(BB^\top)^{-1}
  (B\hat y - c)`, without ever forming an ``n x n`` matrix (the paper's D.4 memory estimate is dominated by
  :math:`B^*`). Exact in one step for constraints affine in :math:`y`.
* The batch measure is taken over all entries of :math:`|c|`; per-sample ``converged`` in the diagnostics
  is :math:`\max_i |c_i| \le \varepsilon` for the active tolerance, so in training some samples may be
  flagged although the batch mean met :math:`\varepsilon_T`.
* One host synchronisation per depth (the stopping test is a batch decision, as in the paper).
* Gradients: ``"unrolled"`` differentiates through every step, including :math:`\partial B/\partial y`
  (second derivatives of :math:`h`). ``"implicit"`` runs the steps without a graph and back-propagates with
  the projector at the converged point, :math:`\bar{\hat y} = (I - B^\top(BB^\top)^{-1}B)\,\bar y` and
  :math:`\bar x = -(\partial_x c)^\top (BB^\top)^{-1}B\,\bar y` (spec formula). This is the exact derivative
  of AdaNP's output for constraints affine in :math:`y` whose :math:`B` does not depend on :math:`x`. For
  curved constraints it is not: it drops the curvature term :math:`\sum_i \lambda_i \nabla^2 c_i`
  (:math:`\lambda = (BB^\top)^{-1}B(\hat y - \tilde y)`) of the exact projection's derivative, and
  AdaNP's limit is itself not the exact projection; both gaps are of order :math:`\|\hat y - \tilde y\|`
  (tested: the difference to the unrolled gradient shrinks linearly as :math:`\hat y` approaches the
  constraint set). The shape notation ``[B, ...]`` elsewhere is the batch, not this :math:`B`. Parameters
  captured inside ``h`` receive no gradient in implicit mode.
* Rank-deficient :math:`B`: regularised Cholesky (:mod:`._linalg`), flagged in ``regularized``.
* :func:`adanp_activation` is the paper's Alg. 2 (use :math:`\hat y` for the batch when one NP step makes
  the task-loss measure worse); it is a function the training loop calls, not state on the layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import vjp

from ._base import _GRADIENTS, ProjectionLayer, ProjectionResult, check_choice, finite_or_raise
from ._constraints import OutputConstraints
from ._linalg import gram_solve

__all__ = ["EnforceProjection", "adanp", "adanp_activation", "np_step"]


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
) -> ProjectionResult:
    """AdaNP in the functional form: NP steps until ``measure(|c|) <= tol`` or ``max_depth`` steps."""
    reduce = torch.amax if measure == "max" else torch.mean
    y = y_hat
    regularized = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    depth = 0
    while True:
        ev = constraints.evaluate(x, y, jacobian=depth < max_depth)
        c = ev.h  # [B, m]
        if depth == 0:
            finite_or_raise(c, "h(x, y)")
        if depth == max_depth or float(reduce(c.detach().abs())) <= tol:  # the one sync per depth
            break
        y, flagged = np_step(y, c, ev.h_jac)
        regularized = regularized | flagged
        depth += 1
    residual = c.detach().abs().amax(dim=-1)
    return ProjectionResult(
        y=y, iterations=depth, residual=residual, converged=residual <= tol, regularized=regularized
    )


class _ProjectorBackward(torch.autograd.Function):
    """Identity on the converged point; backward: the projector at that point (see module notes)."""

    @staticmethod
    def forward(ctx, constraints, x, y_hat, y_star):
        ctx.constraints = constraints
        ctx.save_for_backward(x, y_star)
        return y_star.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, y_star = ctx.saved_tensors
        cons: OutputConstraints = ctx.constraints
        B = cons.evaluate(x, y_star, jacobian=True).h_jac  # [B, m, n]
        w, _ = gram_solve(B @ B.mT, torch.einsum("bmn,bn->bm", B, grad_y))  # [B, m]
        grad_y_hat = grad_y - torch.einsum("bmn,bm->bn", B, w)
        grad_x = None
        if x is not None and ctx.needs_input_grad[1]:
            _, pull = vjp(lambda xx: cons.h(xx, y_star), x)
            (grad_x,) = pull(-w)
        return None, grad_x, grad_y_hat, None


class EnforceProjection(ProjectionLayer):
    r"""ENFORCE's AdaNP layer: repeated projections onto the linearised equalities :math:`h(x, y) = 0`.

    Args:
        constraints: :class:`OutputConstraints` with equalities only, or a callable ``h(x, y) -> [B, m]``.
        train_tol: :math:`\varepsilon_T`, compared with the batch mean of :math:`|c|` in training mode.
        eval_tol: :math:`\varepsilon_I`, compared with the batch max of :math:`|c|` in evaluation mode.
        max_depth: :math:`d_{\max}`.
        gradient: ``"unrolled"`` or ``"implicit"`` (see the module notes).
        solve_dtype: dtype of the iterations (``None``: ``y_hat``'s).
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
        gradient: str = "unrolled",
        solve_dtype: torch.dtype | None = torch.float64,
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

    def _project(self, x: Tensor | None, y: Tensor) -> ProjectionResult:
        kwargs = {"tol": self.tol, "max_depth": self.max_depth, "measure": "mean" if self.training else "max"}
        needs_grad = torch.is_grad_enabled() and (y.requires_grad or (x is not None and x.requires_grad))
        if self.gradient == "unrolled" or not needs_grad:
            return adanp(self.constraints, x, y, **kwargs)
        with torch.no_grad():
            res = adanp(self.constraints, x, y, **kwargs)
        y_out = _ProjectorBackward.apply(self.constraints, x, y, res.y)
        return ProjectionResult(y_out, res.iterations, res.residual, res.converged, res.regularized)


def adanp_activation(
    layer: EnforceProjection, x: Tensor | None, y_hat: Tensor, loss_measure: Callable[[Tensor], Tensor]
) -> tuple[Tensor, bool]:
    r"""ENFORCE's activation rule (Alg. 2): project only when one NP step does not worsen the task loss.

    Computes :math:`\tilde y = \mathcal{P}(\hat y)` (one NP step); if
    :math:`m_\ell(\tilde y) > m_\ell(\hat y)` returns ``(y_hat, False)`` (the projection is discarded for
    this batch), otherwise ``(layer(x, ỹ), True)`` (AdaNP continued from :math:`\tilde y`). Call it in the
    training loop in place of ``layer(x, y_hat)``; ``loss_measure(y) -> scalar`` is the task-loss measure
    (e.g. the batch MSE against the targets). Costs one host sync for the comparison.
    """
    y1 = layer.np_step(x, y_hat)
    with torch.no_grad():
        worse = bool(loss_measure(y1) > loss_measure(y_hat))
    if worse:
        return y_hat, False
    return layer(x, y1), True
