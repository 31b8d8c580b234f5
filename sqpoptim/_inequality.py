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
:math:`P_k g_k = g_k + J_k^\top \hat y_k`, :math:`\hat y_k = -(J_kJ_k^\top)^{-1}J_kg_k`: the gradient of the
Lagrangian with least-squares multipliers, zero at a KKT point. Its inequality analogue is the *gradient
mapping* of the linearised feasible set (the step of projected gradient descent, divided by its length),

.. math::

    \bar g_k = -\tfrac{1}{\alpha} d^g_k,\qquad d^g_k = \arg\min_d\ \tfrac12\|d + \alpha g_k\|^2
        \quad\text{s.t.}\quad J_{E,k}d = 0,\quad \min(c_{I,k}, 0) + J_{I,k}d \le 0,

so :math:`\bar g_k = g_k + J_k^\top\hat y_k` with :math:`\hat y_k \ge 0` on the inequalities (``multipliers``:
sign-aware multiplier estimates). On the working set :math:`\hat{\mathcal A}_k` of this QP,
:math:`\bar g_k = P_{\hat{\mathcal A}_k} g_k` plus, for a constraint a distance below :math:`\alpha\|g_k\|`
inside its bound, the part of the push that reaches the bound: the projection onto the null space of the
constraints that are active for the gradient step. It equals :math:`P_k g_k` when only equalities are given or
no inequality is within reach, vanishes exactly at KKT points (exact gradients), and is continuous in
:math:`x_k`: a constraint the iterate has just left feeds the moments only the push back to its bound. (Two
cruder rules were measured first: projecting on the constraints that were active at the last step put the whole
push into the moments each time the iterate left a bound by a hair, and heavy ball fell into an 8-step cycle;
also projecting on the constraints the step would activate stalled Adam 0.005 inside its bounds.) α is the
method's reach: ``lr`` for heavy ball; :math:`\mathrm{lr}\sqrt n/\|g_k\|` for Adam, whose step moves every
coordinate by about ``lr``. A satisfied inequality keeps its slack, a violated one counts as at its bound (the
normal part of the step restores it), and the metric is Euclidean, as in the equality case.

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

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._constraint_solver import ConstraintSolver
from ._dense_solver import DenseSolver
from ._dual_qp import DualQPResult, solve_dual_qp
from ._linalg import gram

__all__ = [
    "ELASTIC_SHIFT",
    "InequalitySolver",
    "InequalityStep",
    "InequalityWarmStart",
    "default_shift",
    "explicit_jacobian",
    "inequality_step",
    "project_gradient",
    "rmatvec64",
]

# ε of the elastic (ℓ2-relaxed) step, relative to the unit diagonal of the scaled Gram matrix: the violation is
# penalised by 1/ε = 1e6, and multipliers of size ‖s̄‖/ε keep the float64 cancellation in J'y near 1e-10 of s̄.
ELASTIC_SHIFT = 1e-6
# A linearised violation above this fraction of max|b| after the exact solve means the linearisation is inconsistent.
_INCONSISTENT = 1e-8

# Dual solver iterations per QP: exact mode stops at convergence (a cold start on a degenerate problem took 24,
# a warm start 0 or 1); sync-free mode runs a fixed budget, and an unconverged solve resumes at the next step
# from where it stopped (warm start).
_EXACT_MAX_ITER = 200
_SYNC_FREE_MAX_ITER = 8

# Columns of J converted to float64 at once in rmatvec64 (bounds the temporary to m * 2**25 doubles... per chunk).
_CHUNK_BYTES = 1 << 28


def default_shift(rank_tol: float) -> float:
    """The dual solver's shift ε (relative to the unit diagonal of the scaled Gram matrix): ``rank_tol²``, as
    the equality path's regularisation of a deficient Gram matrix, at least 1e-12: below, a nearly dependent
    working set (a condition number near 1/ε) costs accuracy in the Cholesky factor faster than the refinement
    steps win it back."""
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


def explicit_jacobian(J: Tensor | ConstraintSolver) -> tuple[Tensor, Tensor | None]:
    r"""``(J, G)``: the explicit ``[m, n]`` Jacobian the QPs are posed on, and the solver's :math:`JJ^\top`
    (float64; the one whose diagonal validated the step, from the operator — cheaper from per-sample layer
    factors than from J) when the method factors the Euclidean Gram matrix, else ``None``. A tensor passes
    through; the dense solver gives its operator's matrix (formed from the layer factors when the step took that
    path). The matrix-free solver is refused: the dual QP needs the Gram matrix, and the optimizers never build
    one for a step with inequalities."""
    if isinstance(J, Tensor):
        return J, None
    if not isinstance(J, DenseSolver):
        raise ValueError(
            f"inequality constraints need the dense constraint solver (got the {J.kind!r} one): the step QP is "
            "solved in its dual on the m x m Gram matrix; pass solver='dense' or 'auto'"
        )
    G = J.gram if J.weight is None and J.needs_gram else None
    return J.op.dense(), G


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
    c: Tensor,
    J: Tensor,
    m_eq: int,
    alpha: float | Tensor,
    *,
    G: Tensor | None = None,
    held: Tensor | None = None,
    shift: float = 1e-12,
    max_iter: int = 50,
    early_exit: bool = True,
) -> tuple[Tensor, Tensor, DualQPResult]:
    r"""``(ḡ, λ, dual)``: the gradient mapping :math:`\bar g = g + J^\top\lambda` of the linearised feasible set
    with step α (see the module docstring; λ = ŷ/α, float64, nonnegative on the inequalities). ``G`` may pass
    :math:`JJ^\top`; ``held`` is the previous partition."""
    m = J.shape[0]
    if G is None:
        G = gram(J)
    nonneg = torch.arange(m, device=J.device) >= m_eq
    if held is not None and held.shape != (m,):
        held = None
    slack = torch.where(nonneg, c.to(torch.float64).clamp_max(0.0), torch.zeros_like(c, dtype=torch.float64))
    b = slack - alpha * (J @ g).to(torch.float64)  # the constraints of d = -αg - J'y, shifted by the slack
    dual = solve_dual_qp(G, b, nonneg, held=held, shift=shift, max_iter=max_iter, early_exit=early_exit)
    lam = dual.y / alpha
    gbar = (g.to(torch.float64) + rmatvec64(J, lam)).to(g.dtype)
    return gbar, lam, dual


@dataclass
class InequalityWarmStart:
    """The dual partitions of the last step, ``[m]`` bool (True: in the working set), or ``None`` (cold):
    ``active`` of the step QP, ``projection_active`` of the gradient projection. They are the
    ``inequality_active`` and ``projection_active`` of the optimizers' ``state_dict``."""

    active: Tensor | None = None
    projection_active: Tensor | None = None


class InequalitySolver:
    """The inequality path of one direction: the gradient projection and the step QP of the module docstring,
    warm-started from the last step's partitions, and the step's diagnostics (device tensors).

    ``num_ineq``: the last rows of c and J are inequalities. ``sync_free``: a fixed iteration budget and no host
    read (else stop at convergence, reading a flag per dual iteration: free on the CPU)."""

    def __init__(
        self,
        num_ineq: int,
        warm: InequalityWarmStart | None,
        *,
        gamma: float | Tensor,
        rank_tol: float,
        sync_free: bool,
    ) -> None:
        if isinstance(gamma, Tensor) and gamma.dim() > 0:  # checked before any state changes
            raise ValueError(
                "inequality constraints need one normal step size (normal_lr) shared by all param groups; the "
                "groups have different ones"
            )
        self.gamma = gamma
        self.num_ineq = num_ineq
        self.warm = warm or InequalityWarmStart()
        self.shift = default_shift(rank_tol)
        self.sync_free = sync_free
        self.max_iter = _SYNC_FREE_MAX_ITER if sync_free else _EXACT_MAX_ITER
        self._projection: DualQPResult | None = None

    def _held(self, active: Tensor | None, m: int) -> Tensor | None:
        return None if active is None or active.shape != (m,) else ~active

    def project_gradient(
        self, g: Tensor, c: Tensor, J: Tensor, alpha: float | Tensor, G: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""``(ḡ, λ)``: the gradient mapping with reach α and its sign-aware multipliers (see
        :func:`project_gradient`)."""
        m = c.shape[0]
        gbar, lam, dual = project_gradient(
            g,
            c,
            J,
            m - self.num_ineq,
            alpha,
            G=G,
            held=self._held(self.warm.projection_active, m),
            shift=self.shift,
            max_iter=self.max_iter,
            early_exit=not self.sync_free,
        )
        self._projection = dual
        return gbar, lam

    def step(
        self, d0: Tensor, c: Tensor, J: Tensor, weight: Tensor | None = None, G: Tensor | None = None
    ) -> InequalityStep:
        """The step QP for the direction ``d0`` (see :func:`inequality_step`)."""
        m = c.shape[0]
        return inequality_step(
            d0,
            c,
            J,
            m - self.num_ineq,
            gamma=self.gamma,
            weight=weight,
            G=G,
            held=self._held(self.warm.active, m),
            shift=self.shift,
            max_iter=self.max_iter,
            early_exit=not self.sync_free,
        )

    def info(self, step: InequalityStep, c: Tensor) -> dict[str, Any]:
        """The step's diagnostics in the keys of the equality path (``v_norm``: the working set's normal step
        ‖v_k‖, ``u_norm``: ‖u_k‖, ``rank``: the working-set size, ``gram_cond``: a lower bound on the condition
        number of its scaled Gram matrix, ``c_predicted``: :math:`\\|V(c + Jd)\\|/\\|V(c)\\|` with the violations
        :math:`V = [c_E; \\max(c_I, 0)]` and d the QP step) plus ``eq_violation``
        (:math:`\\max_i |c_{E,i}|`), ``ineq_violation`` (max(0, max c_I)), ``active_inequalities``,
        ``qp_iterations``, ``qp_converged`` and ``elastic``; and the partitions for the next step
        (``active_set``, ``projection_active_set``)."""
        m = c.shape[0]
        m_eq = m - self.num_ineq
        u = step.tangential()
        normal = torch.linalg.vector_norm(step.delta - u)
        gamma = self.gamma
        if isinstance(gamma, Tensor):
            v_norm = torch.where(gamma > 0, normal / gamma.clamp_min(torch.finfo(gamma.dtype).tiny), normal)
        else:
            v_norm = normal / gamma if gamma > 0 else normal
        c_eq, c_in = c[:m_eq], c[m_eq:]
        zero = c.new_zeros(())
        r = c.double() + (step._J @ step.delta).double()  # c + J d: the violation the full QP step leaves
        before = torch.linalg.vector_norm(torch.cat([c_eq.double(), c_in.double().clamp_min(0.0)]))
        after = torch.linalg.vector_norm(torch.cat([r[:m_eq], r[m_eq:].clamp_min(0.0)]))
        eq_viol = c_eq.abs().max() if m_eq else zero
        in_viol = c_in.clamp_min(0.0).max() if self.num_ineq else zero
        pivots = torch.diagonal(step.dual._chol).square()
        free = step.dual._free
        big = torch.where(free, pivots, torch.zeros_like(pivots)).max()
        small = torch.where(free, pivots, torch.full_like(pivots, math.inf)).min()
        iters = step.iterations
        converged = step.converged
        if self._projection is not None:
            iters = iters + self._projection.iterations
            converged = converged & self._projection.converged
        info: dict[str, Any] = {
            "c_inf": torch.maximum(eq_viol, in_viol),
            "v_norm": v_norm,
            "u_norm": torch.linalg.vector_norm(u),
            "rank": step.active.sum(),
            "gram_cond": torch.where(free.any(), big / small, torch.ones_like(big)),
            "truncated": False,
            "eq_violation": eq_viol,
            "ineq_violation": in_viol,
            "active_inequalities": step.active[m_eq:].sum(),
            "qp_iterations": iters,
            "qp_converged": converged,
            "elastic": step.elastic,
            "c_predicted": torch.where(
                before > 0, after / torch.where(before > 0, before, 1.0), torch.zeros_like(after)
            ),
            "active_set": step.active,
        }
        if self._projection is not None:
            info["projection_active_set"] = ~self._projection.held
        return info
