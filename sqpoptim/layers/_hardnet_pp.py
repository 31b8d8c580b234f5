r"""HardNet++: damped local linearisations for nonlinear equalities and two-sided inequalities.

Goertzen, Alim & Azizan, "HardNet++: Nonlinear Constraint Enforcement in Neural Networks"
(``../shared/papers/002_*.txt``, Sec. III, Thm. 1).

.. math::

    \begin{aligned}
    &c(y) = [h(y);\ g(y)], \quad
      r(y) = [h(y);\ \mathrm{ReLU}(g(y) - b_u) - \mathrm{ReLU}(b_l - g(y))] \\
    &y_{k+1} = y_k - J_{c,k}^\top (J_{c,k} J_{c,k}^\top + \varepsilon I)^{-1} r(y_k), \qquad
      J_{c,k} = \partial c / \partial y\,(y_k)
    \end{aligned}

:math:`J_c` is the Jacobian of :math:`c`, not of :math:`r`: satisfied inequality rows stay in :math:`J_c`
with :math:`r = 0`, which keeps the step parallel to their linearised boundary (damped by
:math:`\varepsilon`). The violation energy :math:`V = \tfrac12\|r\|^2` decays linearly for
:math:`\varepsilon > L/2` under a PL condition (Thm. 1). Paper settings: :math:`\varepsilon = 0.3`, 500
iterations.

Notes and deviations
--------------------
* For :math:`m + q > n` the step uses :math:`(J_c^\top J_c + \varepsilon I)^{-1} J_c^\top r` (same value,
  ``n x n`` solve): :func:`~sqpoptim.layers._hardnet.parallel_step`.
* Optional early stop (not in the paper): with ``early_stop=True`` the loop ends once every sample's
  violation is at most ``tol``, tested every ``check_every`` iterations (one host sync per test). Without
  it the layer runs exactly ``max_iter`` steps and never synchronises inside the loop. ``converged`` in the
  diagnostics is ``violation <= tol`` either way.
* Gradients: unrolled only. An implicit gradient needs an equation that pins the output to its input, and
  HardNet++'s limit has none: every feasible point is a fixed point of the iteration
  (:math:`r(y^\star) = 0 \Rightarrow y_{k+1} = y_k`), so :math:`y^\star = T(y^\star)` does not involve
  :math:`\hat y` and the implicit function theorem gives nothing; the limit's derivative is the product of
  the step Jacobians along the path, which is what unrolling computes. For equalities the step Jacobian at a
  feasible point is :math:`I - J^\top(JJ^\top + \varepsilon I)^{-1}J`, whose powers tend to the null-space
  projector, so near the constraint set the unrolled gradient approaches ENFORCE's implicit projector
  (``EnforceProjection(gradient="implicit")``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._base import ProjectionLayer, ProjectionResult
from ._constraints import OutputConstraints
from ._hardnet import parallel_step, stacked_residual

__all__ = ["HardNetPP", "hardnet_pp"]


def hardnet_pp(
    constraints: OutputConstraints,
    x: Tensor | None,
    y_hat: Tensor,
    *,
    eps: float = 0.3,
    max_iter: int = 500,
    tol: float = 1e-6,
    early_stop: bool = False,
    check_every: int = 10,
) -> ProjectionResult:
    """HardNet++ in the functional form (see the module docstring)."""
    y = y_hat
    bounds = None
    regularized = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    it = 0
    while it < max_iter:
        ev = constraints.evaluate(x, y, jacobian=True)
        r, bounds = stacked_residual(constraints, x, ev, bounds)  # [B, m+q]
        if early_stop and it % check_every == 0 and float(r.detach().abs().amax()) <= tol:
            break
        y, flagged = parallel_step(y, r, ev.c_jac, eps)
        regularized = regularized | flagged
        it += 1
    r, _ = stacked_residual(constraints, x, constraints.evaluate(x, y, jacobian=False), bounds)
    residual = r.detach().abs().amax(dim=-1)
    return ProjectionResult(y, it, residual, residual <= tol, regularized)


class HardNetPP(ProjectionLayer):
    r"""HardNet++ layer: :math:`\varepsilon`-damped projections onto linearised equalities and bounds.

    Args:
        constraints: :class:`OutputConstraints` (equalities ``h``, inequalities ``g`` with bounds) or a
            callable ``h(x, y)``.
        eps: damping :math:`\varepsilon > 0` (paper: 0.3).
        max_iter: iterations (paper: 500).
        tol: violation tolerance for ``converged`` and for the optional early stop.
        early_stop: stop once every sample meets ``tol`` (checked every ``check_every`` iterations).
        gradient: ``"unrolled"`` (the only mode; see the module notes for why there is no implicit one).
        solve_dtype, nonconvergence: see :class:`~sqpoptim.layers.EnforceProjection`.
    """

    def __init__(
        self,
        constraints: OutputConstraints | Callable,
        *,
        eps: float = 0.3,
        max_iter: int = 500,
        tol: float = 1e-6,
        early_stop: bool = False,
        check_every: int = 10,
        gradient: str = "unrolled",
        solve_dtype: torch.dtype | None = torch.float64,
        nonconvergence: str = "warn",
    ) -> None:
        super().__init__(constraints, solve_dtype=solve_dtype, nonconvergence=nonconvergence)
        if not eps > 0:
            raise ValueError(f"Invalid eps: {eps} (HardNet++ needs eps > 0; eps = 0 is HardNetAffine's step)")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"Invalid max_iter: {max_iter}")
        if int(check_every) != check_every or check_every < 1:
            raise ValueError(f"Invalid check_every: {check_every}")
        if not tol > 0:
            raise ValueError(f"Invalid tol: {tol}")
        if gradient != "unrolled":
            raise ValueError(
                f"Invalid gradient {gradient!r}: HardNetPP offers 'unrolled' only (its limit is not defined "
                "by an equation in y_hat, so there is no implicit gradient; see the module docstring)"
            )
        self.eps, self.max_iter, self.tol = float(eps), int(max_iter), float(tol)
        self.early_stop, self.check_every, self.gradient = bool(early_stop), int(check_every), gradient

    def _project(self, x: Tensor | None, y: Tensor) -> ProjectionResult:
        return hardnet_pp(
            self.constraints,
            x,
            y,
            eps=self.eps,
            max_iter=self.max_iter,
            tol=self.tol,
            early_stop=self.early_stop,
            check_every=self.check_every,
        )
