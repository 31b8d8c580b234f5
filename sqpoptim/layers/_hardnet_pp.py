r"""HardNet++: damped local linearisations for nonlinear equalities and two-sided inequalities.

Goertzen, Alim & Azizan, "HardNet++: Nonlinear Constraint Enforcement in Neural Networks"
(arXiv:2604.19669, Sec. III, Thm. 1).

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
iterations, gradients through the unrolled iterations.

Two iterations (``method=``)
----------------------------
* ``"lm"`` (default, not in the paper): Levenberg–Marquardt on :math:`V` with the residual's own Jacobian
  :math:`J_r = A J_c` (violated rows only), damping :math:`\nu_k = \mu_k \|r_k\|` adapted by the ratio of
  actual to predicted decrease, steps that do not decrease :math:`V` rejected
  (:func:`~sqpoptim.layers._gauss_newton.gauss_newton`). It stops at ``tol``. Why: the paper's step keeps
  every satisfied row in :math:`J_c`, so when :math:`m + q > n` the linearised system it solves is
  overdetermined and the step only reduces :math:`V` by a damped least-squares fraction: on HardNet++'s
  learned-MPC task (90 outputs, 50 dynamics, 40 box and 10 quadratic rows) the box rows alone fix the
  controls, the dynamics then fix the states, and a violated quadratic row can only be traded against the
  others; from an untrained backbone's output 500 paper iterations leave a violation of ~4.5e-3. Dropping the
  satisfied rows makes the linearisation consistent, :math:`\nu_k \to 0` makes the local rate quadratic, and
  the ratio test makes it safe far away. Rows that the step pushes past a bound become violated and join the
  next step. The first ``free_steps`` (10) steps are undamped and always taken, and the monotone phase starts
  from the best of them (escapes valleys of :math:`V` such as KKT-Hardnet's bilinear pooling balances). That
  pick is a discrete choice: the output is then a *discontinuous* function of :math:`\hat y` wherever two
  free iterates tie, and a perturbation of :math:`\hat y` by :math:`10^{-6}` can move the output by
  :math:`O(1)` (measured on HardNet++'s learned-MPC task from an untrained backbone: 8 of 16 samples moved by
  5e-3 to 1.3). A network trained through the layer then sees a loss with jumps that no gradient reports;
  ``free_steps=0`` (the damped iteration from the start) is continuous there (outputs move by
  :math:`\le 10^{-6}`) and is what training should use unless the free steps are needed to converge.
* ``"paper"``: the iteration above with fixed :math:`\varepsilon`, ``max_iter`` steps (500 by default), or
  until ``tol`` is met with ``early_stop=True`` (tested every ``check_every`` iterations, one host sync per
  test). For :math:`m + q > n` the step uses :math:`(J_c^\top J_c + \varepsilon I)^{-1} J_c^\top r` (same
  value, ``n x n`` solve): :func:`~sqpoptim.layers._hardnet.parallel_step`.

Both stop a sample at ``tol`` of :math:`\max_i |r_i|`; ``converged`` in the diagnostics is that test.
Jacobians (``jacobian=``) as for :class:`~sqpoptim.layers.EnforceProjection`: ``"auto"`` is exact with user
Jacobians and Broyden-updated (``"lm"`` only) with ``torch.func`` ones.

Gradients
---------
``"implicit"`` (default): the forward runs without a graph and the backward applies the derivative of the
iteration's limit at the converged point (:mod:`._implicit`): for ``"lm"`` the orthogonal projector onto the
tangent space of the active rows, :math:`I - J_a^\top (J_a J_a^\top)^{-1} J_a`; for ``"paper"`` the
:math:`H`-orthogonal one, :math:`H = J_c^\top J_c + \varepsilon I`, which is what the powers of the paper's
step Jacobian :math:`I - H^{-1}J_a^\top J_a` converge to. Exact when :math:`\hat y` is feasible, within
:math:`O(\|\hat y - y^\star\|)` of the unrolled derivative otherwise (tested). That error is not small when
the backbone's raw output stays far from the constraint set, as it does when nothing pulls it there (no
displacement penalty): the implicit gradient can then point the wrong way along some directions, and training
should use ``gradient="unrolled"`` with ``free_steps=0``. Active rows: equalities, and
inequalities violated or within ``tol`` of a bound at the output. ``"unrolled"``: autograd through every
iteration (the paper's training; exact Jacobians only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._base import _GRADIENTS, ProjectionLayer, ProjectionResult, check_choice
from ._constraints import OutputConstraints
from ._enforce import JACOBIANS
from ._gauss_newton import gauss_newton
from ._hardnet import parallel_step
from ._implicit import LimitBackward
from ._system import StackedSystem

__all__ = ["HardNetPP", "hardnet_pp"]

METHODS = ("lm", "paper")
FREE_STEPS = 10


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
    """HardNet++'s paper iteration in the functional form (see the module docstring)."""
    return _paper_iteration(constraints, x, y_hat, eps, max_iter, tol, early_stop, check_every)[0]


def _paper_iteration(constraints, x, y_hat, eps, max_iter, tol, early_stop, check_every):
    system = StackedSystem(constraints, x, y_hat, jacobian=True)
    y, c, J = y_hat, system.c0, system.J0
    regularized = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    it = 0
    while True:
        r, _ = system.residual(c)  # [B, m + q]
        if it == max_iter or (early_stop and it % check_every == 0 and float(r.detach().abs().amax()) <= tol):
            break
        y, flagged = parallel_step(y, r, J, eps)
        regularized = regularized | flagged
        it += 1
        if it == max_iter and not system.cheap_jacobian:
            c, J = system.values(y), None  # no further step: the values suffice
        else:
            c, J = system.jacobian(y)
    residual = r.detach().abs().amax(dim=-1)
    return ProjectionResult(y, it, residual, residual <= tol, regularized), system, c, J


class HardNetPP(ProjectionLayer):
    r"""HardNet++ layer: projections onto linearised equalities and bounds (module docstring).

    Args:
        constraints: :class:`OutputConstraints` (equalities ``h``, inequalities ``g`` with bounds) or a
            callable ``h(x, y)``.
        method: ``"lm"`` (globalised Levenberg–Marquardt, default) or ``"paper"`` (fixed damping).
        eps: the paper's damping :math:`\varepsilon > 0` (0.3; ``method="paper"`` only).
        max_iter: iteration cap (default: 100 for ``"lm"``, the paper's 500 for ``"paper"``).
        tol: violation tolerance for ``converged`` and for stopping.
        early_stop: ``method="paper"``: stop once every sample meets ``tol`` (checked every ``check_every``
            iterations); ``"lm"`` always stops at ``tol``.
        free_steps: ``method="lm"``: undamped Gauss–Newton steps before the monotone phase (10; 0 keeps the
            output a continuous function of the raw output, see the module docstring).
        gradient: ``"implicit"`` (default) or ``"unrolled"``.
        jacobian: ``"auto"``, ``"exact"``, ``"broyden"`` or ``"chord"`` (the last two ``"lm"`` only).
        solve_dtype, nonconvergence: see :class:`~sqpoptim.layers.EnforceProjection`.
    """

    def __init__(
        self,
        constraints: OutputConstraints | Callable,
        *,
        method: str = "lm",
        eps: float = 0.3,
        max_iter: int | None = None,
        tol: float = 1e-6,
        early_stop: bool = False,
        check_every: int = 10,
        free_steps: int = FREE_STEPS,
        gradient: str = "implicit",
        jacobian: str = "auto",
        solve_dtype: torch.dtype | None = torch.float64,
        nonconvergence: str = "warn",
    ) -> None:
        super().__init__(constraints, solve_dtype=solve_dtype, nonconvergence=nonconvergence)
        self.method = check_choice("method", method, METHODS)
        if max_iter is None:
            max_iter = 500 if method == "paper" else 100
        if not eps > 0:
            raise ValueError(f"Invalid eps: {eps} (HardNet++ needs eps > 0; eps = 0 is HardNetAffine's step)")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"Invalid max_iter: {max_iter}")
        if int(check_every) != check_every or check_every < 1:
            raise ValueError(f"Invalid check_every: {check_every}")
        if not tol > 0:
            raise ValueError(f"Invalid tol: {tol}")
        if int(free_steps) != free_steps or free_steps < 0:
            raise ValueError(f"Invalid free_steps: {free_steps} (a number of steps >= 0)")
        self.free_steps = int(free_steps)
        self.eps, self.max_iter, self.tol = float(eps), int(max_iter), float(tol)
        self.early_stop, self.check_every = bool(early_stop), int(check_every)
        self.gradient = check_choice("gradient", gradient, _GRADIENTS)
        self.jacobian = check_choice("jacobian", jacobian, JACOBIANS)
        if self.jacobian in ("broyden", "chord") and (self.gradient == "unrolled" or self.method == "paper"):
            raise ValueError(
                "jacobian='broyden' needs method='lm' and gradient='implicit' (unrolled and paper "
                "iterations differentiate or reproduce the paper's exact-Jacobian steps)"
            )

    def _jacobian_mode(self) -> str:
        if self.jacobian != "auto":
            return self.jacobian
        exact = self.gradient == "unrolled" or self.method == "paper" or self.constraints.has_user_jacobians
        return "exact" if exact else "broyden"

    def _solve(self, x: Tensor | None, y: Tensor):
        if self.method == "paper":
            return _paper_iteration(
                self.constraints, x, y, self.eps, self.max_iter, self.tol, self.early_stop, self.check_every
            )
        system = StackedSystem(self.constraints, x, y, jacobian=True)
        result, c, J = gauss_newton(
            system,
            y,
            tol=self.tol,
            max_iter=self.max_iter,
            damping=True,
            jacobian=self._jacobian_mode(),
            free_steps=self.free_steps,
        )
        return result, system, c, J

    def _project(self, x: Tensor | None, y: Tensor) -> ProjectionResult:
        needs_grad = torch.is_grad_enabled() and (y.requires_grad or (x is not None and x.requires_grad))
        if self.gradient == "unrolled" or not needs_grad:
            return self._solve(x, y)[0]
        with torch.no_grad():
            res, system, c, J = self._solve(x, y)
        eps = self.eps if self.method == "paper" else 0.0
        y_out = LimitBackward.apply(system, eps, self.tol, x, y, res.y, c, J)
        return ProjectionResult(y_out, res.iterations, res.residual, res.converged, res.regularized)
