r"""Projected stochastic Adam SQP (Algorithm 3 of Wang, Piermarini, Zhu, Curtis 2026)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._constraint_solver import ConstraintSolver
from ._damping import DEFAULT_NU0
from ._dense_solver import as_solver
from ._finite import both, require_finite
from ._hyperparameters import check_betas, check_eps, check_nonnegative, check_optional_nonnegative
from ._inequality import InequalitySolver, InequalityWarmStart, explicit_jacobian
from ._layout import StepCounts
from ._linalg import gram, masked, step_info
from ._optimizer import ConstrainedOptimizer, StepContext

__all__ = ["ProjectedAdamSQP", "adam_sqp_direction"]

_PROJECTIONS = ("euclidean", "scaled")
_BIAS_CORRECTIONS = ("defossez", "standard")


class ProjectedAdamSQP(ConstrainedOptimizer):
    r"""Projected stochastic Adam SQP: Adam moments of *projected* gradients plus a normal step.

    .. math::
        \begin{aligned}
        &\textbf{input: } \alpha \text{ (lr)},\ (\beta_1, \beta_2) \text{ (betas)},\ \epsilon \text{ (eps, inside
            the square root)},\ \gamma \text{ (normal\_lr, default 1)},\ m_0 = w_0 = 0 \\
        &\textbf{for } k = 1, 2, \dots \\
        &\quad g_k,\ c_k,\ J_k;\ \text{factor } J_kJ_k^\top;\ v_k = -J_k^\top(J_kJ_k^\top)^{-1}c_k;\
            \bar g_k = P_k g_k \\
        &\quad \textit{defossez: } m_k = \beta_1 m_{k-1} + \bar g_k,\ w_k = \beta_2 w_{k-1} + \bar g_k^2,\
            \alpha_k = \alpha(1-\beta_1)\sqrt{(1-\beta_2^k)/(1-\beta_2)},\ D_k = \sqrt{w_k + \epsilon},\
            p_k = \alpha_k m_k \\
        &\quad \textit{standard: } m_k = \beta_1 m_{k-1} + (1-\beta_1)\bar g_k,\ w_k = \beta_2 w_{k-1} +
            (1-\beta_2)\bar g_k^2,\ D_k = \sqrt{w_k/(1-\beta_2^k) + \epsilon},\ p_k = \alpha\, m_k/(1-\beta_1^k) \\
        &\quad \textit{euclidean: } u_k = -P_k (D_k^{-1} p_k),\quad x_{k+1} = x_k + \gamma v_k + u_k \\
        &\quad \textit{scaled: } W_k = D_k^{-1},\ u_k = -P_{W_k}(W_k p_k),\ x_{k+1} = x_k + \gamma v_{W_k} + u_k
        \end{aligned}

    with :math:`v_W = -WJ^\top(JWJ^\top)^{-1}c` and :math:`P_W = I - WJ^\top(JWJ^\top)^{-1}J`. In both forms
    :math:`J_k u_k = 0` and the normal part satisfies :math:`J_k v = -c_k`.

    ``projection="scaled"`` is the KKT step with the Adam metric :math:`H = D_k`: for γ = α it equals
    α times the solution :math:`s` of :math:`[[D_k, J^\top],[J, 0]][s;\lambda] = -[m_k/D\text{-scaled};\ c_k]`,
    the form of the authors' earlier code ("P-Adam") and of :class:`~sqpoptim.ConstrainedAdam`, which differs
    from it *only* in feeding raw gradients to the moments (``project_gradients=False``). The spec writes this
    step as :math:`\gamma v + u` with :math:`u = -P_W(Wp + v)`; for γ ≠ 1 that literal reading would cancel the
    normal step (:math:`\gamma v - P_W v \to -P_W v` as γ → 0, and :math:`J(-P_Wv) = 0`), so the H-metric
    normal step :math:`(I - P_W)v = v_W` is the one scaled by γ — which is what the authors' code computes.

    ``bias_correction="defossez"`` is the variant analysed by Défossez, Bottou, Bach, Usunier (TMLR 2022) and
    used in the paper's Algorithm 3 (its step size :math:`\alpha_k` is nondecreasing in k);
    ``"standard"`` is Kingma & Ba's. With no constraints and ``bias_correction="standard"`` this is Adam with
    ε inside the square root (:class:`~sqpoptim.AdamUnc`).

    Defaults: ``projection="euclidean"`` and ``bias_correction="defossez"`` follow the paper's Algorithm 3;
    ``eps=1e-7`` is the paper's setting. ``normal_lr=1.0`` takes the whole feasibility step; the
    authors' code scales it by the learning rate (``normal_lr=None``), with which c shrinks only like
    :math:`(1-\alpha)^k`. That default deviates from the authors' code (γ = α); why, and the comparison of
    the projection and bias-correction options, is in the algorithms guide of the documentation and in
    RESULTS.md.

    Inequalities (``(loss, Constraints(eq=c_E, ineq=c_I))``, :math:`c_I \le 0`): the moments are fed the
    gradient projected on the null space of the equalities and of the inequalities that bind it, and the step is
    the QP :math:`\min_d \tfrac12\|d + D_k^{-1}p_k\|_H^2` s.t. :math:`\gamma c_{E,k} + J_{E,k}d = 0`,
    :math:`\gamma c_{I,k} + J_{I,k}d \le 0` (H = I for ``"euclidean"``, :math:`H = D_k` for ``"scaled"``), which
    with no active inequality is the step of the box above (:mod:`sqpoptim._inequality`: derivation, solver,
    the elastic step of an infeasible linearisation, deviations from Curtis, Robinson & Zhou, arXiv:2302.14790).
    All groups must share ``normal_lr``. That step is not damped: see ``normal_damping`` in
    :class:`~sqpoptim.ProjectedHeavyBallSQP` for what the default means with inequalities.

    Globalisation of the normal step (every SQP method here and :class:`~sqpoptim.ConstrainedAdam`): the paper
    takes the full Gauss–Newton step of the *linearised* constraints, with no merit function or line search.
    Where the Jacobian is nearly rank-deficient against the size of the violation — residuals of an ODE or PDE
    at a few points of a small network, pointwise output constraints of a ReLU network — that step overshoots by
    orders of magnitude; the run then either blows up or, worse, satisfies the constraints at their points with
    a function that is wrong between them (``optimizer.diagnostics()`` shows it: ``step_norm`` far above the
    parameters' norm, ``c_inf`` jumping). By default the normal step is therefore the Levenberg–Marquardt step
    :math:`v = -J^\top(JJ^\top + \mu_k I)^{-1}c_k`, :math:`\mu_k = \nu_k\,\operatorname{mean}\operatorname{diag}
    (JJ^\top)`, from ν0 = ``normal_damping`` = 1e-6; ν follows Nielsen's ratio rule, and a step that increased
    ‖c‖ while its normal part dominated is rejected (the parameters go back; no extra closure calls: the
    rejection happens at the next ``step``, which then returns without moving on). See :mod:`sqpoptim._damping`.
    ν0 = 1e-6 is Gauss–Newton until a step fails; it was chosen by measurement against the undamped step,
    larger ν0, and caps and trust regions on the normal step's length (RESULTS.md, "Defaults for a first
    problem"): it turns the overshooting runs into solutions and leaves the papers' PINN results as they were.
    ``normal_damping=None`` is the paper's step; ``0.1`` fits pointwise output constraints of ReLU networks
    better (RESULTS.md §5).

    Param groups: each group's ``lr`` (and betas) multiplies its coordinates *before* the projection, so
    :math:`J_k u_k = 0` holds with several groups; the schedulers of ``torch.optim.lr_scheduler`` act on the
    tangential step and, when ``normal_lr`` is ``None``, on the normal step. ``OneCycleLR`` may cycle
    ``betas``. Mixed precision: run the closure's forward under ``torch.autocast``; gradients and Jacobians come
    back in the parameters' dtype and the Gram matrix and its solves are always float64. (``GradScaler`` cannot
    be used: it refuses closures, and loss scaling is unnecessary with float32 parameters.)

    Args:
        params: iterable of parameters or param-group dicts.
        lr: α ≥ 0.
        betas: (β1, β2), each in [0, 1).
        eps: ε > 0, added inside the square root.
        normal_lr: γ ≥ 0, the normal step size (default 1); ``None`` means γ = lr, as in the authors' code.
        projection: ``"euclidean"`` or ``"scaled"`` (see above).
        bias_correction: ``"defossez"`` or ``"standard"``.
        project_gradients: feed :math:`P_k g_k` (True, the paper) or :math:`g_k` (False: Adam(con)) to the
            moments.
        jacobian, chunk_size, rank_tol, sync_free, normal_damping, solver, krylov, process_group: see
            :class:`~sqpoptim.ProjectedHeavyBallSQP`.
    """

    _flat_state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        normal_lr: float | None = 1.0,
        projection: str = "euclidean",
        bias_correction: str = "defossez",
        *,
        project_gradients: bool = True,
        jacobian: str = "auto",
        chunk_size: int | None = None,
        rank_tol: float | None = None,
        sync_free: bool | None = None,
        normal_damping: float | None = DEFAULT_NU0,
        solver: str = "auto",
        krylov: dict[str, Any] | None = None,
        process_group: Any = None,
    ) -> None:
        self._check_group(dict(lr=lr, betas=betas, eps=eps, normal_lr=normal_lr))
        if projection not in _PROJECTIONS:
            raise ValueError(f"Invalid projection {projection!r}: expected one of {_PROJECTIONS}")
        if bias_correction not in _BIAS_CORRECTIONS:
            raise ValueError(f"Invalid bias_correction {bias_correction!r}: expected one of {_BIAS_CORRECTIONS}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, normal_lr=normal_lr)
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
        self.projection = projection
        self.bias_correction = bias_correction
        self.project_gradients = project_gradients
        self._counts = StepCounts()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative(group["lr"], "learning rate")
        check_betas(group["betas"])
        check_eps(group["eps"])
        check_optional_nonnegative(group["normal_lr"], "normal_lr")

    def _direction(self, ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        layout, groups = ctx.layout, self.param_groups
        flat = self._flat_state(layout)
        return adam_sqp_direction(
            ctx.g,
            ctx.c,
            ctx.J,
            flat["exp_avg"],
            flat["exp_avg_sq"],
            self._counts.step_for(layout, self.state, ctx.stats),
            lr=self._per_coordinate(layout, [g["lr"] for g in groups]),
            beta1=self._per_coordinate(layout, [g["betas"][0] for g in groups]),
            beta2=self._per_coordinate(layout, [g["betas"][1] for g in groups]),
            eps=self._per_coordinate(layout, [g["eps"] for g in groups]),
            normal_lr=self._normal_step_sizes(layout),
            projection=self.projection,
            bias_correction=self.bias_correction,
            project_gradients=self.project_gradients,
            rank_tol=self._rank_tol(layout),
            sync_free=ctx.sync_free,
            ok=ctx.stats,
            damping=ctx.damping,
            num_ineq=ctx.num_ineq,
            warm=ctx.warm,
        )

    def _factors_gram(self) -> bool:
        return self.project_gradients or self.projection == "euclidean"

    def _commit_step(self, ctx: StepContext, counted: Tensor | None) -> None:
        super()._commit_step(ctx, counted)
        self._counts.advance(ctx.layout, self.state, counted)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._counts.invalidate()


def adam_sqp_direction(
    g: Tensor,
    c: Tensor,
    J: Tensor | ConstraintSolver,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor | float,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    normal_lr: float | Tensor,
    projection: str = "euclidean",
    bias_correction: str = "defossez",
    project_gradients: bool = True,
    rank_tol: float,
    sync_free: bool = False,
    ok: Tensor | None = None,
    damping: Tensor | None = None,
    num_ineq: int = 0,
    warm: InequalityWarmStart | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Functional form of one :class:`ProjectedAdamSQP` step on flat vectors.

    Updates ``exp_avg`` and ``exp_avg_sq`` in place and returns ``(δ, diagnostics)``, :math:`x_{k+1} = x_k + δ`.
    ``step`` is k for this step (1 on the first; a per-coordinate ``[n]`` tensor when parameters have taken
    different numbers of steps). Hyperparameters are floats or per-coordinate ``[n]`` tensors. ``ok`` (0-d bool)
    makes the step a no-op on the moments when False; ``damping`` is ν of the Levenberg–Marquardt normal step
    (:func:`sqpoptim._linalg.damped`). The projected gradient (and, for the Euclidean projection, the normal
    step) is checked before it touches the moments (:func:`sqpoptim._finite.require_finite`): exact mode raises,
    sync-free mode masks the moments and reports ``formed`` in the diagnostics. ``multipliers`` in the
    diagnostics are the least-squares estimates :math:`-(JJ^\top)^{-1}Jg` (in the Adam metric when the Euclidean
    factor is not formed). With ``num_ineq`` > 0 the last rows of c and J are inequalities :math:`c_i \\le 0`:
    the moments are fed the cone-projected gradient and the step is the QP of :mod:`sqpoptim._inequality` in the
    metric of ``projection`` (``warm``: the last step's partitions; the multipliers are the sign-aware ones, or
    the step QP's when the gradients are not projected).
    """
    m = c.shape[0]
    euclidean = projection == "euclidean"
    if num_ineq:  # the solver refuses a per-group normal_lr before anything changes
        solver = InequalitySolver(num_ineq, warm, gamma=normal_lr, rank_tol=rank_tol, sync_free=sync_free)
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, defossez=bias_correction == "defossez")
        return _with_inequalities(g, c, J, exp_avg, exp_avg_sq, step, solver, hyper, euclidean, project_gradients, ok)
    S = as_solver(J, rank_tol=rank_tol, sync_free=sync_free)
    lam = None
    if m and project_gradients:
        gbar, lam = S.project(g, multipliers=True)  # [n], [m]
    else:
        gbar = g
    normal = None
    if m and euclidean:  # the normal step does not depend on the moments: check it before they change
        normal = S.normal_part(c, normal_lr, damping)  # None: the solver forms it with the step (one solve)
    checked = {} if normal is None else {"normal_step": normal[1]}
    formed = require_finite(sync_free=sync_free, projected_gradient=gbar, **checked)
    ok = both(ok, formed)
    defossez = bias_correction == "defossez"
    _feed_moments(exp_avg, exp_avg_sq, gbar, beta1, beta2, defossez, ok)
    d, denom = _scaled_direction(exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, defossez)
    if not m:
        u = -d
        return u, {**step_info(c, None, torch.zeros_like(u), u), "formed": formed}
    if euclidean:
        delta, info = S.step(d, c, normal_lr, damping, normal)
    else:
        W = denom.reciprocal()  # H^{-1} with H = D_k
        SW = S.weighted(W)
        delta, info = SW.step(d, c, normal_lr, damping)
        if lam is None and SW.kind == "dense":  # (a matrix-free solve for diagnostics alone is not worth it)
            lam = SW.project(W * g, multipliers=True)[1]  # -(J W Jᵀ)⁻¹ J W g
    return delta, {**info, "formed": formed, "multipliers": lam}


def _scaled_direction(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor | float,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    defossez: bool,
) -> tuple[Tensor, Tensor]:
    """``(D_k^{-1} p_k, D_k)``: Adam's direction from the updated moments, learning rate and bias correction
    included, and the metric diagonal."""
    scalars = not any(isinstance(h, Tensor) for h in (lr, beta1, beta2))
    host = scalars and (not isinstance(step, Tensor) or (step.dim() == 0 and step.device.type == "cpu"))
    # the bias correction in Python floats where k can be read for free (a read costs less than five 0-d ops on
    # the CPU); k = 0, a step that is not counted, keeps the tensors' inf, which is masked
    k: float | Tensor = float(step) if host else 0.0
    if k < 1.0:
        k = torch.as_tensor(step, dtype=torch.float64, device=exp_avg.device)
    if isinstance(k, float):
        sqrt, cast = math.sqrt, float
    else:
        sqrt, cast = torch.sqrt, lambda t: t.to(exp_avg.dtype)
    if defossez:
        alpha_k = lr * (1.0 - beta1) * cast(sqrt((1.0 - beta2**k) / (1.0 - beta2)))
        denom = (exp_avg_sq + eps).sqrt_()  # D_k
        p = alpha_k * exp_avg
    else:
        bc1 = cast(1.0 - beta1**k)
        bc2 = cast(1.0 - beta2**k)
        denom = (exp_avg_sq / bc2 + eps).sqrt_()
        p = (lr / bc1) * exp_avg
    return p / denom, denom


def _with_inequalities(
    g: Tensor,
    c: Tensor,
    J: Tensor | ConstraintSolver,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor | float,
    solver: InequalitySolver,
    hyper: dict[str, Any],
    euclidean: bool,
    project_gradients: bool,
    ok: Tensor | None,
) -> tuple[Tensor, dict[str, Any]]:
    """The inequality path of :func:`adam_sqp_direction`: the moments fed the gradient mapping (reach
    lr·√n, :mod:`sqpoptim._inequality`), and the step QP in the method's metric in place of the projection and
    the normal step."""
    beta1, beta2, defossez, lr = hyper["beta1"], hyper["beta2"], hyper["defossez"], hyper["lr"]
    lam = None
    J, G = explicit_jacobian(J)
    if project_gradients:
        G = gram(J) if G is None else G
        lr_max = lr.max() if isinstance(lr, Tensor) else lr
        reach = lr_max * g.numel() ** 0.5 / torch.linalg.vector_norm(g).clamp_min(torch.finfo(g.dtype).tiny)
        gbar, lam = solver.project_gradient(g, c, J, reach.to(torch.float64), G)
    else:
        gbar = g
    formed = require_finite(sync_free=solver.sync_free, projected_gradient=gbar)
    ok = both(ok, formed)
    _feed_moments(exp_avg, exp_avg_sq, gbar, beta1, beta2, defossez, ok)
    d, denom = _scaled_direction(exp_avg, exp_avg_sq, step, lr, beta1, beta2, hyper["eps"], defossez)
    if euclidean:
        st = solver.step(-d, c, J, G=G)
    else:
        st = solver.step(-d, c, J, weight=denom.reciprocal())
    return st.delta, {**solver.info(st, c), "formed": formed, "multipliers": st.y if lam is None else lam}


def _feed_moments(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    gbar: Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    defossez: bool,
    ok: Tensor | None,
) -> None:
    """Adam's moments of the projected gradient ḡ, in place: :math:`p_k = \beta_1 p_{k-1} + w_1\bar g_k`,
    :math:`v_k = \beta_2 v_{k-1} + w_2\bar g_k^2` with :math:`w = 1` (Défossez et al.) or :math:`1 - \beta`
    (Kingma & Ba). Where ``ok`` is false (a refused sync-free step) the moments stay bit-identical: β → 1,
    weights → 0."""
    w1 = 1.0 if defossez else 1.0 - beta1
    w2 = 1.0 if defossez else 1.0 - beta2
    b1, b2 = beta1, beta2
    if ok is None and not isinstance(w1, Tensor) and not isinstance(w2, Tensor):
        exp_avg.mul_(b1).add_(gbar, alpha=w1)
        exp_avg_sq.mul_(b2).addcmul_(gbar, gbar, value=w2)
        return
    if ok is not None:
        gbar = torch.where(ok, gbar, torch.zeros_like(gbar))
        b1, b2 = (masked(ok, b, 1.0, gbar) for b in (beta1, beta2))
        w1, w2 = (masked(ok, w, 0.0, gbar) for w in (w1, w2))
    exp_avg.mul_(b1).add_(gbar * w1)
    exp_avg_sq.mul_(b2).add_(gbar * gbar * w2)
