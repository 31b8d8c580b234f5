r"""The SQP step with inequality constraints: one small QP per step, solved in its dual on the Gram matrix.

Constraints :math:`c_E(x) = 0` (:math:`m_E` rows) and :math:`c_I(x) \le 0` (:math:`m_I` rows) are stacked as
:math:`c_k = [c_{E,k}; c_{I,k}]`, :math:`J_k = [J_{E,k}; J_{I,k}]` (:math:`m = m_E + m_I`). Each method of the
package proposes an unconstrained direction :math:`\hat d_k` in a diagonal metric :math:`H_k`
(:math:`W_k = H_k^{-1}`): :math:`-\alpha g_k` for SQP, :math:`-\alpha m_k` for heavy ball, :math:`-D_k^{-1}p_k`
for Adam (:math:`H_k = I`, or :math:`H_k = D_k` for Adam's ``projection="scaled"``). The step is

.. math::

    \begin{aligned}
    &d_k = \arg\min_d\ \tfrac12\|d - \hat d_k\|_{H_k}^2 \quad\text{s.t.}\quad
        \gamma c_{E,k} + J_{E,k} d = 0,\quad \gamma c_{I,k} + J_{I,k} d \le 0 \\
    &\text{dual: } y_k = \arg\min_{y_I \ge 0}\ \tfrac12 y^\top G_k y - b_k^\top y,\qquad
        G_k = J_k W_k J_k^\top,\quad b_k = J_k\hat d_k + \gamma c_k \\
    &d_k = \hat d_k - W_k J_k^\top y_k
    \end{aligned}

(γ is ``normal_lr``.) With :math:`\mathcal A_k = E \cup \{i \in I : y_{k,i} > 0\}` the working set, the step is
the equality-constrained step on it, :math:`d_k = u_k + \gamma v_k` with
:math:`u_k = P_{W,\mathcal A_k}\hat d_k` and :math:`v_k = -W J_{\mathcal A}^\top G_{\mathcal{AA}}^{-1}
c_{\mathcal A}`; with no inequality active it *is* the equality step of the package (``tangential`` and
``normal`` below return :math:`u_k` and :math:`\gamma v_k`). The dual is solved by
:func:`sqpoptim._dual_qp.solve_dual_qp`, warm-started from the previous partition.

Projected gradients for the momentum and Adam statistics. In the equality case the moments are fed
:math:`P_k g_k = g_k + J_k^\top \hat y_k`, :math:`\hat y_k = \arg\min_y \|g_k + J_k^\top y\|`: the gradient of
the Lagrangian with least-squares multipliers, zero at a KKT point. With inequalities the multipliers of the
constraints that may bind carry a sign:

.. math::

    \bar g_k = g_k + J_k^\top \hat y_k,\qquad \hat y_k = \arg\min\ \tfrac12\|g_k + J_k^\top y\|^2
        \ \text{ s.t. }\ y_i \ge 0\ (i \in \mathcal C_k),\ y_i = 0\ (i \in I\setminus\mathcal C_k),

with candidates :math:`\mathcal C_k = (\mathcal A_{k-1} \cap I) \cup \{i \in I: c_{i,k} \ge 0\}` (active in the last
step, or on or beyond their bound now). Then :math:`\bar g_k = P_{\hat{\mathcal A}_k} g_k`, the orthogonal
projection onto the null space of :math:`J_E` and of the candidates with :math:`\hat y_i > 0` — "the projection
onto the active constraints' null space", where a constraint is active for g only if g pushes against it.
Equivalently :math:`-\bar g_k` is the projection of :math:`-g_k` onto the cone
:math:`\{d: J_E d = 0,\ J_i d \le 0,\ i \in \mathcal C_k\}` (Moreau). The sign matters: projecting out a
constraint that g pulls away from would keep the moments from ever leaving the bound. At a KKT point (exact
gradients, active set among the candidates) :math:`\bar g_k = 0`, as :math:`P_k g_k = 0` in the equality case. The
projection is always Euclidean (:math:`G^{(0)}_k = J_kJ_k^\top`), as in the equality case.

Infeasible linearisation. When the exact solve leaves a linearised violation (above 1e-8 of :math:`\max|b_k|`) the
constraints are inconsistent, and the step is the *elastic* one, the solution of the ℓ2-relaxed QP

.. math::

    \min_{d,\,t}\ \tfrac12\|d - \hat d_k\|_{H_k}^2 + \frac{1}{2\varepsilon_e}\sum_i \frac{t_i^2}{\|J_i\|_{W_k}^2}
    \quad\text{s.t.}\quad \gamma c_{E,k} + J_{E,k}d = t_E,\quad \gamma c_{I,k} + J_{I,k}d \le t_I,

(:math:`\varepsilon_e` = ``elastic_shift``, 1e-6: nearly the least-squares violation, measured in distance units
:math:`t_i/\|J_i\|_W`, and the least change of :math:`\hat d_k` among such steps), whose dual is the same dual
with :math:`\varepsilon_e` added to the diagonal of the Jacobi-scaled :math:`G_k`. No exception; ``elastic`` and
``violation`` report it. (The equality path treats an inconsistent :math:`J v = -c` the same way, by its
least-squares normal step.)

Deviations from Curtis, Robinson & Zhou, *Sequential quadratic optimization for stochastic optimization with
deterministic nonlinear inequality and equality constraints* (SIAM J. Optim. 2024, arXiv:2302.14790), whose
step is the QP above with :math:`\hat d_k = -H_k^{-1}g_k` and a merit-function step size:

* :math:`\hat d_k` is a momentum or Adam direction of projected gradients (the projected-momentum methods of
  the equality-constrained package), and γ scales the constraint targets as ``normal_lr`` scales the normal
  step of the equality case (γ = 1: the full linearised step).
* An inconsistent linearisation is relaxed in ℓ2 (the elastic QP above, one more dual solve with a shift),
  as the equality path relaxes an inconsistent J v = −c (least squares); Curtis, Robinson & Zhou relax by the
  minimum ℓ1 linearised violation, found by a linear program before the QP. An ℓ1 relaxation bounds the
  multipliers (:math:`|y_i| \le \rho`), and block pivoting on a box-constrained dual cycles where it is finite
  on the nonnegative orthant.
* The QP is solved in its dual by pivoting with a shift ε relative to the Jacobi-scaled Gram matrix, so the
  working-set constraints hold to :math:`O((\varepsilon/\lambda)^3)` on an eigenvalue λ of its Gram matrix:
  near-dependent constraints are regularised as the rank tolerance does in the equality path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._dual_qp import DualQPResult, solve_dual_qp
from ._linalg import gram

__all__ = ["ELASTIC_SHIFT", "InequalityStep", "default_shift", "inequality_step", "project_gradient", "rmatvec64"]

# ε of the elastic (ℓ2-relaxed) step, relative to the unit diagonal of the scaled Gram matrix: the violation is
# penalised by 1/ε = 1e6, and multipliers of size ‖s̄‖/ε keep the float64 cancellation in J'y near 1e-10 of s̄.
ELASTIC_SHIFT = 1e-6
# A linearised violation above this fraction of max|b| after the exact solve means the linearisation is inconsistent.
_INCONSISTENT = 1e-8

# Columns of J converted to float64 at once in rmatvec64 (bounds the temporary to m * 2**25 doubles... per chunk).
_CHUNK_BYTES = 1 << 28


def default_shift(rank_tol: float) -> float:
    """The dual solver's shift ε (relative to the unit diagonal of the scaled Gram matrix): ``rank_tol²``, at
    least 1e-12, so that an inconsistent linearisation (multipliers of size ‖s̄‖/ε) keeps the float64
    cancellation in :math:`J^\\top y` below 1e-3 of the violation."""
    return max(rank_tol * rank_tol, 1e-12)


def rmatvec64(J: Tensor, y: Tensor) -> Tensor:
    r""":math:`J^\top y` accumulated in float64 (``[n]`` float64), column chunk by column chunk. Multipliers of an
    elastic step are large and their contributions cancel; float32 accumulation would lose the step."""
    m, n = J.shape
    y = y.to(torch.float64)
    if J.dtype == torch.float64:
        return J.T @ y
    chunk = max(1, _CHUNK_BYTES // (8 * max(m, 1)))
    out = torch.empty(n, dtype=torch.float64, device=J.device)
    for start in range(0, n, chunk):
        out[start : start + chunk] = J[:, start : start + chunk].to(torch.float64).T @ y
    return out


@dataclass
class InequalityStep:
    r"""One step, all device tensors. ``delta`` [n] (J's dtype) the step :math:`d_k`; ``y`` [m] float64 the
    multipliers (equalities first); ``active`` [m] bool the working set (equality rows and inequality rows whose
    multiplier is free); ``held`` [m] bool the dual partition (warm start of the next step); ``converged`` and
    ``iterations`` of the dual solver; ``elastic`` 0-d bool, the linearisation was inconsistent and the step is
    the elastic one; ``violation`` 0-d float64, the largest linearised violation left
    :math:`\max(|r_E|, \max(r_I, 0))`, :math:`r = \gamma c_k + J_k d_k`. :meth:`tangential` gives
    :math:`u_k`."""

    delta: Tensor
    y: Tensor
    active: Tensor
    held: Tensor
    converged: Tensor
    iterations: Tensor
    elastic: Tensor
    violation: Tensor
    dual: DualQPResult
    _J: Tensor
    _d0: Tensor
    _weight: Tensor | None

    def tangential(self) -> Tensor:
        r""":math:`u_k = P_{W,\mathcal A_k}\hat d_k`, the part of the step in the null space of the working set (one
        more solve with the last factor and one more :math:`J^\top y`); the normal part is ``delta - u``."""
        yt = self.dual.solve_free(self._J @ self._d0)
        r = rmatvec64(self._J, yt)
        r = r if self._weight is None else r * self._weight.to(torch.float64)
        return (self._d0.to(torch.float64) - r).to(self._d0.dtype)


def _violation(res: Tensor, nonneg: Tensor) -> Tensor:
    viol = torch.where(nonneg, res.clamp_min(0.0), res.abs())
    return viol.max() if viol.numel() else res.new_zeros(())


def inequality_step(
    d0: Tensor,
    c: Tensor,
    J: Tensor,
    m_eq: int,
    *,
    gamma: float | Tensor,
    weight: Tensor | None = None,
    G: Tensor | None = None,
    held: Tensor | None = None,
    shift: float = 1e-12,
    elastic_shift: float = ELASTIC_SHIFT,
    max_iter: int = 50,
    early_exit: bool = True,
) -> InequalityStep:
    r"""The step :math:`d_k` of the module docstring for the direction ``d0`` (:math:`\hat d_k`), constraints
    ``c`` [m] and ``J`` [m, n] with the first ``m_eq`` rows equalities, scalar γ (``gamma``, a float or 0-d
    tensor), metric :math:`W = \operatorname{diag}(\text{weight})` (``None``: identity). ``G`` may pass
    :math:`JWJ^\top` when the caller has it; ``held`` is the previous partition. ``early_exit`` (exact mode)
    reads the dual solver's flags on the host; without it nothing is read and the elastic solve always runs."""
    m = c.shape[0]
    dev = c.device
    if G is None:
        G = gram(J, weight)
    b = (J @ d0).to(torch.float64) + gamma * c.to(torch.float64)
    nonneg = torch.arange(m, device=dev) >= m_eq
    if held is not None and held.shape != (m,):
        held = None  # the number of constraints changed: cold start
    dual = solve_dual_qp(G, b, nonneg, held=held, shift=shift, max_iter=max_iter, early_exit=early_exit)
    violation = _violation(b - G @ dual.y, nonneg)
    scale = b.abs().max() if m else b.new_zeros(())
    elastic = (violation > _INCONSISTENT * scale) | ~dual.converged
    if not early_exit or bool(elastic):
        el = solve_dual_qp(
            G, b, nonneg, held=dual.held, shift=elastic_shift, refine=0, max_iter=max_iter, early_exit=early_exit
        )
        dual = el if early_exit else el.where(elastic, dual)
        violation = _violation(b - G @ dual.y, nonneg)
    r = rmatvec64(J, dual.y)
    if weight is not None:
        r = r * weight.to(torch.float64)
    delta = (d0.to(torch.float64) - r).to(d0.dtype)
    return InequalityStep(
        delta, dual.y, ~dual.held, dual.held, dual.converged, dual.iterations, elastic, violation, dual, J, d0, weight
    )


def project_gradient(
    g: Tensor,
    J: Tensor,
    m_eq: int,
    candidates: Tensor,
    *,
    G: Tensor | None = None,
    held: Tensor | None = None,
    shift: float = 1e-12,
    max_iter: int = 50,
    early_exit: bool = True,
) -> tuple[Tensor, DualQPResult]:
    r"""``(ḡ, dual)``: :math:`\bar g = g + J^\top\hat y`, the gradient projected onto the null space of the
    equalities and of the inequality candidates (``candidates`` [m] bool, read on rows ≥ ``m_eq``) that bind it
    (see the module docstring). ``G`` may pass :math:`JJ^\top`; ``held`` is the previous partition."""
    m = J.shape[0]
    dev = J.device
    if G is None:
        G = gram(J)
    idx = torch.arange(m, device=dev)
    nonneg = idx >= m_eq
    rows = ~nonneg | candidates.to(device=dev, dtype=torch.bool)
    if held is not None and held.shape != (m,):
        held = None
    b = -(J @ g).to(torch.float64)
    dual = solve_dual_qp(G, b, nonneg, rows=rows, held=held, shift=shift, max_iter=max_iter, early_exit=early_exit)
    gbar = (g.to(torch.float64) + rmatvec64(J, dual.y)).to(g.dtype)
    return gbar, dual
