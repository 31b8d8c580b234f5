r"""Projected stochastic heavy-ball SQP (Algorithm 2 of Wang, Piermarini, Zhu, Curtis 2026)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._constraint_solver import ConstraintSolver
from ._damping import DEFAULT_NU0
from ._dense_solver import as_solver
from ._finite import both, require_finite
from ._hyperparameters import check_beta, check_nonnegative, check_optional_nonnegative
from ._inequality import InequalitySolver, InequalityWarmStart, explicit_jacobian
from ._linalg import gram, masked, step_info
from ._optimizer import ConstrainedOptimizer, StepContext

__all__ = ["ProjectedHeavyBallSQP", "heavy_ball_sqp_direction"]


class ProjectedHeavyBallSQP(ConstrainedOptimizer):
    r"""Projected stochastic heavy-ball SQP: momentum of *projected* gradients plus a normal step.

    .. math::
        \begin{aligned}
        &\textbf{input: } \alpha \text{ (lr)},\ \beta \text{ (momentum)},\ \gamma \text{ (normal\_lr, default }
            \alpha),\ m_0 = 0 \\
        &\textbf{for } k = 1, 2, \dots \\
        &\quad g_k,\ c_k,\ J_k \text{ from the closure; factor } J_kJ_k^\top \\
        &\quad v_k = -J_k^\top (J_kJ_k^\top)^{-1} c_k \\
        &\quad \bar g_k = P_k g_k, \qquad P_k = I - J_k^\top (J_kJ_k^\top)^{-1} J_k \\
        &\quad m_k = \beta m_{k-1} + (1-\beta)\,\bar g_k \\
        &\quad u_k = -\alpha P_k m_k \qquad (J_k u_k = 0,\ u_k^\top v_k = 0) \\
        &\quad x_{k+1} = x_k + \gamma v_k + u_k
        \end{aligned}

    By default :math:`v_k` is the Levenberg–Marquardt (damped) normal step, a globalisation the paper does not
    have (``normal_damping``, below); ``normal_damping=None`` takes :math:`v_k` as written.

    The momentum is fed projected gradients, and the momentum itself is re-projected onto the current null
    space, since :math:`m_k` mixes projections onto earlier null spaces. The default γ = 1 (``normal_lr=1.0``)
    takes the whole feasibility step, so linear constraints hold after one undamped step (a few damped ones)
    and nonlinear ones converge fast (quadratically undamped); ``normal_lr=None`` sets γ = α, which scales the
    whole step by the learning rate as the authors' code does (c then shrinks only like :math:`(1-\alpha)^k`).
    **Deviation from the authors' code** (γ = α): the measurements behind the default γ = 1 are in the
    algorithms guide of the documentation and in RESULTS.md.

    With no constraints (m = 0) this is exactly the EMA heavy-ball method
    :math:`m_k = \beta m_{k-1} + (1-\beta) g_k,\ x_{k+1} = x_k - \alpha m_k`, i.e. ``torch.optim.SGD`` with
    ``dampening = momentum`` except that SGD seeds its buffer with the first gradient undamped.

    Param groups: each group's ``lr`` (and ``momentum``) multiplies its coordinates *before* the projection,
    :math:`u_k = -P_k(\Lambda m_k)`, so :math:`J_k u_k = 0` still holds. When groups have different normal step
    sizes the normal step is distributed in proportion to them (see :func:`sqpoptim._linalg.scaled_normal_step`).

    Inequalities (the closure returns ``(loss, Constraints(eq=c_E, ineq=c_I))``, :math:`c_I \le 0`): the
    momentum is fed :math:`\bar g_k = P_{\hat{\mathcal A}_k} g_k`, the gradient projected on the null space of
    the equalities and of the inequalities that bind it (sign-aware least-squares multipliers), and the step is
    the QP :math:`\min_d \tfrac12\|d + \alpha m_k\|^2` s.t. :math:`\gamma c_{E,k} + J_{E,k}d = 0`,
    :math:`\gamma c_{I,k} + J_{I,k}d \le 0`, which is :math:`\gamma v_k + u_k` of the box above on its working
    set (:mod:`sqpoptim._inequality`, with the derivation and the deviations from Curtis, Robinson & Zhou,
    arXiv:2302.14790). All groups must share ``normal_lr``. That step is not damped (``normal_damping``, below).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: α > 0, the tangential step size (scheduled by LR schedulers).
        momentum: β ∈ [0, 1).
        normal_lr: γ ≥ 0, the normal step size (default 1: the full feasibility step); ``None`` means γ = lr (and
            follows the scheduler), as in the authors' code.
        jacobian: how J is formed (:mod:`sqpoptim._jacobian_path`): ``"auto"`` (default: per-sample factors
            of the ``nn.Linear`` layers from one backward pass when the constraints are pointwise outputs of such
            layers — checked on random probes —, else one vectorised backward), ``"layers"`` (insist on the
            factors), ``"batched"`` (one vectorised backward over the rows), ``"loop"`` (one backward per
            constraint) or ``"joint"`` (the objective's gradient and J from one vectorised backward: for
            constraints read off the objective's own pass, such as PDE residuals at points the objective uses;
            never chosen by ``"auto"``).
        chunk_size: rows of J per batched backward (bounds memory for large m).
        rank_tol: relative singular-value cutoff for rank-deficient J (default 1e-6 float32, 1e-7 float64).
        sync_free: never wait for the device inside ``step`` (default: True on CUDA, False on CPU); see
            :mod:`sqpoptim._finite`.
        normal_damping: ν0 ∈ [1e-6, 1e4], the initial relative Levenberg–Marquardt damping of the normal step
            (default ``1e-6``), or ``None`` for the paper's undamped Gauss–Newton step. Damped, the normal step is
            :math:`v = -J^\top(JJ^\top + \mu I)^{-1}c` with :math:`\mu = \nu\,\operatorname{mean}\operatorname{diag}
            (JJ^\top)`; ν is adapted by a ratio test and a step that increased ‖c‖ is rejected
            (:mod:`sqpoptim._damping`). It is on by default because the full step, exact for nearly linear
            constraints, overshoots by orders of magnitude where J is nearly rank-deficient — residuals of an
            ODE or PDE at a few points of a small network, pointwise output constraints of a ReLU network — and
            the run then satisfies the constraints at their points with a function that is wrong between them.
            ν0 = 1e-6 (the floor of ν: Gauss–Newton until a step fails, then damped) was chosen by measurement
            against larger ν0 and against caps and trust regions on the length of the normal step, on small
            problems of that kind and on the papers' PINN tasks (RESULTS.md, "Defaults for a first problem"):
            it turns the failing runs into solutions and leaves the PINN results as they were, where a larger ν0
            slows the first steps to feasibility. ``0.1`` fits pointwise output constraints of ReLU networks
            better (RESULTS.md §5). ``diagnostics()`` has ``damping`` (ν), ``damping_ratio`` (ρ), ``rejected``
            and ``rejected_steps``. With inequality constraints the step is one QP with no separate normal step
            to damp: the default then leaves that step undamped (it still damps the steps of the same run whose
            closure gives no inequalities, judging them afresh after an inequality step), and any other value
            is refused with a ``ValueError`` before anything changes; there ``normal_lr`` < 1 shortens the
            feasibility step, and an inconsistent linearisation takes the elastic step.
        solver: ``"auto"`` (default), ``"dense"`` (one float64 Gram factorisation per step) or ``"krylov"``
            (matrix-free MINRES with the inexact-SQP termination tests of Byrd, Curtis and Nocedal, warm-started
            from the last step's multipliers; :mod:`sqpoptim._krylov`). ``"auto"`` takes the dense solver up to
            512 constraints, and above while its Gram matrix and factorisation cost no more than a matrix-free step
            at its iteration cap and fit in memory (:mod:`sqpoptim._constraint_solver`);
            ``diagnostics()["solver"]`` says which was used. On the CPU the dense solver keeps its float64 m × m
            matrices (G, G + μI and their factors: 32·m² bytes, 32 MB at m = 1,000) between steps
            (:mod:`sqpoptim._workspace`). A step with inequality constraints always takes the
            dense solver (its QP is solved in its dual on the Gram matrix); ``"krylov"`` with inequalities is
            refused.
        krylov: options of the matrix-free solver (:class:`sqpoptim._krylov.KrylovOptions`: ``max_iter``,
            ``kappa``, ``epsilon``, ``tau``, ``penalty0``, ``projection_rtol``, ``rtol``, ``jacobi``).
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for all ranks)
            to step as one across its ranks; ``step`` is then a collective that every rank calls. Each rank's
            closure gives the loss on its own data, and the losses and gradients are averaged; constraints are
            replicated (a plain c, the same on every rank, which is checked) or sharded (``Sharded(c)``: each
            rank its own rows, the step uses all of them in rank order). Every rank then takes the same step,
            so the replicas stay bit-identical (checked at every step); an error or a NaN on any rank is raised
            on every rank before anything changes. Costs and design: :mod:`sqpoptim._exchange`.
            ``diagnostics()`` then has ``comm_bytes``. Default ``None``: no communication, even when
            ``torch.distributed`` is initialised — turning ``step`` into a collective unasked would hang
            programs that step on some ranks only, and an optimizer cannot see whether its model is wrapped in
            ``DistributedDataParallel`` (which would not average these gradients anyway); a warning says so
            when several ranks run without a group.

    Example:
        >>> opt = ProjectedHeavyBallSQP(model.parameters(), lr=1e-3, momentum=0.9)
        >>> def closure():
        ...     return objective(model), residuals(model)
        >>> loss, c = opt.step(closure)  # doctest: +SKIP
    """

    _flat_state_names = ("momentum_buffer",)

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.9,
        normal_lr: float | None = 1.0,
        *,
        jacobian: str = "auto",
        chunk_size: int | None = None,
        rank_tol: float | None = None,
        sync_free: bool | None = None,
        normal_damping: float | None = DEFAULT_NU0,
        solver: str = "auto",
        krylov: dict[str, Any] | None = None,
        process_group: Any = None,
    ) -> None:
        self._check_group(dict(lr=lr, momentum=momentum, normal_lr=normal_lr))
        defaults = dict(lr=lr, momentum=momentum, normal_lr=normal_lr)
        super().__init__(
            params,
            defaults,
            jacobian=jacobian,
            chunk_size=chunk_size,
            rank_tol=rank_tol,
            sync_free=sync_free,
            normal_damping=normal_damping,
            solver=solver,
            krylov=krylov,
            process_group=process_group,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative(group["lr"], "learning rate")
        check_beta(group["momentum"], "momentum")
        check_optional_nonnegative(group["normal_lr"], "normal_lr")

    def _direction(self, ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        layout, groups = ctx.layout, self.param_groups
        flat = self._flat_state(layout)
        return heavy_ball_sqp_direction(
            ctx.g,
            ctx.c,
            ctx.J,
            flat["momentum_buffer"],
            lr=self._per_coordinate(layout, [g["lr"] for g in groups]),
            momentum=self._per_coordinate(layout, [g["momentum"] for g in groups]),
            normal_lr=self._normal_step_sizes(layout),
            rank_tol=self._rank_tol(layout),
            sync_free=ctx.sync_free,
            ok=ctx.stats,
            damping=ctx.damping,
            num_ineq=ctx.num_ineq,
            warm=ctx.warm,
        )


def heavy_ball_sqp_direction(
    g: Tensor,
    c: Tensor,
    J: Tensor | ConstraintSolver,
    momentum_buffer: Tensor,
    *,
    lr: float | Tensor,
    momentum: float | Tensor,
    normal_lr: float | Tensor,
    rank_tol: float,
    sync_free: bool = False,
    ok: Tensor | None = None,
    damping: Tensor | None = None,
    num_ineq: int = 0,
    warm: InequalityWarmStart | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Functional form of one :class:`ProjectedHeavyBallSQP` step on flat vectors.

    Updates ``momentum_buffer`` in place and returns ``(δ, diagnostics)`` with :math:`x_{k+1} = x_k + δ`.
    Hyperparameters are floats or per-coordinate ``[n]`` tensors. ``ok`` (0-d bool) turns the step into a no-op
    on the momentum when False. The projected gradient and the normal step are checked before the momentum
    changes (:func:`sqpoptim._finite.require_finite`); ``multipliers`` in the diagnostics are the least-squares
    estimates :math:`-(JJ^\top)^{-1}Jg`. With ``num_ineq`` > 0 the last rows of c and J are inequalities
    :math:`c_i \\le 0` (``warm``: the last step's partitions; the new ones are in the diagnostics, see
    :class:`sqpoptim._inequality.InequalitySolver`) and the multipliers the sign-aware ones.
    """
    m = c.shape[0]
    if num_ineq:
        return _with_inequalities(
            g, c, J, momentum_buffer, lr, momentum, normal_lr, rank_tol, sync_free, ok, num_ineq, warm
        )
    S = as_solver(J, rank_tol=rank_tol, sync_free=sync_free)
    normal = None
    if m:
        gbar, lam = S.project(g, multipliers=True)  # [n], [m]
        normal = S.normal_part(c, normal_lr, damping)  # None: the solver forms it with the step (one solve)
    else:
        gbar, lam = g, None
    checked = {} if normal is None else {"normal_step": normal[1]}
    formed = require_finite(sync_free=sync_free, projected_gradient=gbar, **checked)
    ok = both(ok, formed)
    _feed_momentum(momentum_buffer, gbar, momentum, ok)
    if not m:
        u = -(lr * momentum_buffer)
        return u, {**step_info(c, None, torch.zeros_like(u), u), "formed": formed, "multipliers": lam}
    delta, info = S.step(lr * momentum_buffer, c, normal_lr, damping, normal)
    return delta, {**info, "formed": formed, "multipliers": lam}


def _with_inequalities(
    g: Tensor,
    c: Tensor,
    J: Tensor | ConstraintSolver,
    momentum_buffer: Tensor,
    lr: float | Tensor,
    momentum: float | Tensor,
    normal_lr: float | Tensor,
    rank_tol: float,
    sync_free: bool,
    ok: Tensor | None,
    num_ineq: int,
    warm: InequalityWarmStart | None,
) -> tuple[Tensor, dict[str, Any]]:
    r"""The inequality path of :func:`heavy_ball_sqp_direction`: the same momentum, the step QP in place of
    :math:`\gamma v + u`."""
    solver = InequalitySolver(num_ineq, warm, gamma=normal_lr, rank_tol=rank_tol, sync_free=sync_free)
    J, G = explicit_jacobian(J)
    G = gram(J) if G is None else G  # Euclidean: the projection and the step QP share it
    reach = lr.max() if isinstance(lr, Tensor) else lr
    gbar, lam = solver.project_gradient(g, c, J, reach, G)
    formed = require_finite(sync_free=sync_free, projected_gradient=gbar)
    ok = both(ok, formed)
    _feed_momentum(momentum_buffer, gbar, momentum, ok)
    step = solver.step(-(lr * momentum_buffer), c, J, G=G)
    return step.delta, {**solver.info(step, c), "formed": formed, "multipliers": lam}


def _feed_momentum(momentum_buffer: Tensor, gbar: Tensor, momentum: float | Tensor, ok: Tensor | None) -> None:
    """:math:`m_k = \beta m_{k-1} + (1-\beta)\bar g_k` in place; where ``ok`` is false (a refused sync-free step)
    the buffer stays bit-identical (weight 0)."""
    weight = 1.0 - momentum
    if ok is not None:
        gbar = torch.where(ok, gbar, torch.zeros_like(gbar))
        weight = masked(ok, weight, 0.0, gbar)
    momentum_buffer.lerp_(gbar, weight)
