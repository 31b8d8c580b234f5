r"""Stochastic SQP (Algorithm 1; Berahas, Curtis, Robinson, Zhou, SIAM J. Optim. 31(2), 2021)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._adaptive_step import _adaptive_rule, _violation_l1, adaptive_step_size
from ._constraint_solver import ConstraintSolver
from ._damping import DEFAULT_NU0
from ._dense_solver import as_solver
from ._finite import both, require_finite
from ._hyperparameters import check_nonnegative, check_optional_nonnegative
from ._inequality import InequalitySolver, InequalityWarmStart, explicit_jacobian
from ._jacobian_operator import DenseJacobian
from ._linalg import step_info
from ._optimizer import ConstrainedOptimizer, StepContext
from ._state import OptimizerState

__all__ = ["StochasticSQP", "adaptive_step_size", "sqp_direction"]  # adaptive_step_size: re-exported


@dataclass
class StochasticSQPState(OptimizerState):
    """:class:`StochasticSQP`'s optimizer-wide state: the adaptive rule's merit parameter τ, ratio ξ, last step
    size α and the Lipschitz constants ``(L, Γ)`` (0-d float64 tensors; ``None`` until the first adaptive step)."""

    tau: Tensor | None = None
    xi: Tensor | None = None
    alpha: Tensor | None = None
    lipschitz: tuple[Tensor, Tensor] | None = None


class StochasticSQP(ConstrainedOptimizer):
    r"""Stochastic SQP with H = I: the step :math:`d_k = v_k + u_k` solves
    :math:`\min_d g_k^\top d + \tfrac12\|d\|^2` s.t. :math:`c_k + J_k d = 0`.

    .. math::
        \begin{aligned}
        &\textbf{for } k = 1, 2, \dots \\
        &\quad g_k \approx \nabla f(x_k) \text{ (mini-batch)},\ c_k,\ J_k \text{ (deterministic, in full)} \\
        &\quad v_k = -J_k^\top(J_kJ_k^\top)^{-1}c_k,\quad u_k = -P_k g_k,\quad d_k = v_k + u_k \\
        &\quad \text{fixed: } x_{k+1} = x_k + \gamma v_k + \alpha u_k \qquad
               \text{adaptive: } x_{k+1} = x_k + \alpha_k d_k
        \end{aligned}

    ``step_rule="fixed"`` (what the SQP paper's experiments use) takes the learning rate α for the tangential
    part and γ (``normal_lr``; default 1, the full feasibility step; ``None`` for γ = α) for the normal part.
    ``step_rule="adaptive"`` is the rule of Berahas et al. (2021), Algorithm 3.1, with merit function
    :math:`\phi_\tau(x) = \tau f(x) + \|c(x)\|_1`:

    .. math::
        \begin{aligned}
        &\tau^{trial}_k = \begin{cases} \frac{(1-\sigma)\|c_k\|_1}{g_k^\top d_k + \|d_k\|^2} &
            g_k^\top d_k + \|d_k\|^2 > 0 \\ \infty & \text{otherwise}\end{cases},\quad
         \tau_k = \begin{cases}\tau_{k-1} & \tau_{k-1} \le \tau^{trial}_k \\
            \min\{(1-\epsilon_\tau)\tau_{k-1}, \tau^{trial}_k\} & \text{otherwise}\end{cases} \\
        &\Delta l_k = -\tau_k g_k^\top d_k + \|c_k\|_1,\quad
         \xi^{trial}_k = \frac{\Delta l_k}{\tau_k\|d_k\|^2},\quad
         \xi_k = \begin{cases}\xi_{k-1} & \xi_{k-1} \le \xi^{trial}_k \\
            \min\{(1-\epsilon_\xi)\xi_{k-1}, \xi^{trial}_k\} & \text{otherwise}\end{cases} \\
        &\hat\alpha_k = \frac{\beta_k\xi_k\tau_k}{\tau_k L + \Gamma},\quad
         \tilde\alpha_k = \hat\alpha_k - \frac{4\|c_k\|_1}{(\tau_k L + \Gamma)\|d_k\|^2},\quad
         \alpha_k = \begin{cases}\hat\alpha_k & \hat\alpha_k < 1 \\ 1 & \tilde\alpha_k \le 1 \le \hat\alpha_k \\
            \tilde\alpha_k & \tilde\alpha_k > 1\end{cases}
        \end{aligned}

    Here the learning rate ``lr`` plays β_k (so schedulers drive the β_k sequence); defaults τ₀ = 0.1, ξ₀ = 1,
    σ = 0.1, ε_τ = ε_ξ = 0.01. L and Γ (Lipschitz constants of ∇f and c) are given as ``lipschitz=(L, Γ)`` or,
    when ``None``, estimated once at the first step from ``lipschitz_samples`` re-evaluations of the closure at
    nearby points (a power iteration; see :meth:`_lipschitz_constants`; the closure must evaluate the same batch
    on every call, as ``torch.optim`` closures do). τ, ξ, α, L and Γ are kept in the optimizer's state
    (:class:`StochasticSQPState`) and reported by :meth:`diagnostics`.
    A zero step (d_k = 0) leaves τ and ξ unchanged and does not move.

    Inequalities (the closure returns ``(loss, Constraints(eq=c_E, ineq=c_I))``, :math:`c_I \le 0`): the step
    solves the QP of Curtis, Robinson & Zhou (arXiv:2302.14790) with H = I,

    .. math::
        d_k = \arg\min_d\ g_k^\top d + \tfrac12\|d\|^2 \quad\text{s.t.}\quad c_{E,k} + J_{E,k}d = 0,\quad
        c_{I,k} + J_{I,k}d \le 0,

    which with no inequality active is :math:`v_k + u_k` above. The fixed rule takes the QP with the targets
    scaled by γ and the direction by α (:math:`\min_d \tfrac12\|d + \alpha g_k\|^2` s.t.
    :math:`\gamma c_{E,k} + J_{E,k}d = 0`, :math:`\gamma c_{I,k} + J_{I,k}d \le 0`); the adaptive rule takes
    :math:`x_{k+1} = x_k + \alpha_k d_k` with the merit function
    :math:`\tau f + \|c_E\|_1 + \|\max(c_I, 0)\|_1` and the model's decrease of that violation in place of
    :math:`\|c_k\|_1` (``_adaptive_with_inequalities``). The QP is solved in its dual on the Gram matrix,
    warm-started from the last working set, with an elastic relaxation when the linearisation is inconsistent
    (:mod:`sqpoptim._inequality`, which states the deviations from the paper). All groups must share
    ``normal_lr``; the QP step is not damped (``normal_damping`` in :class:`~sqpoptim.ProjectedHeavyBallSQP`).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: α (fixed rule) or β_k (adaptive rule; then all groups must share it).
        normal_lr: γ for the fixed rule (default 1; ``None``: γ = lr); ignored by the adaptive rule.
        step_rule: ``"fixed"`` or ``"adaptive"``.
        tau0, xi0, sigma, eps_tau, eps_xi: parameters of the adaptive rule.
        lipschitz: ``(L, Γ)`` or ``None`` (estimate).
        jacobian, chunk_size, rank_tol, sync_free, solver, krylov, process_group: see
            :class:`~sqpoptim.ProjectedHeavyBallSQP`.
        normal_damping: the fixed rule's ν0 (default 1e-6: damped, as in :class:`~sqpoptim.ProjectedHeavyBallSQP`,
            which says why; ``None``: the undamped step). The adaptive rule always takes the undamped normal
            step — its merit model needs :math:`Jv = -c`, and its step size already globalises the whole step —
            so with ``step_rule="adaptive"`` the default means "undamped" and any other value is an error.
    """

    _state_type = StochasticSQPState
    _global: StochasticSQPState

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        normal_lr: float | None = 1.0,
        step_rule: str = "fixed",
        *,
        tau0: float = 0.1,
        xi0: float = 1.0,
        sigma: float = 0.1,
        eps_tau: float = 0.01,
        eps_xi: float = 0.01,
        lipschitz: tuple[float, float] | None = None,
        lipschitz_samples: int = 5,
        jacobian: str = "auto",
        chunk_size: int | None = None,
        rank_tol: float | None = None,
        sync_free: bool | None = None,
        normal_damping: float | None = DEFAULT_NU0,
        solver: str = "auto",
        krylov: dict[str, Any] | None = None,
        process_group: Any = None,
    ) -> None:
        self._check_group(dict(lr=lr, normal_lr=normal_lr))
        if step_rule not in ("fixed", "adaptive"):
            raise ValueError(f"Invalid step_rule {step_rule!r}: expected 'fixed' or 'adaptive'")
        for name, val in (("tau0", tau0), ("xi0", xi0)):
            if not val > 0.0:
                raise ValueError(f"Invalid {name}: {val} (expected > 0)")
        for name, val in (("sigma", sigma), ("eps_tau", eps_tau), ("eps_xi", eps_xi)):
            if not 0.0 < val < 1.0:
                raise ValueError(f"Invalid {name}: {val} (expected 0 < {name} < 1)")
        if lipschitz is not None and not (len(lipschitz) == 2 and all(x > 0 for x in lipschitz)):
            raise ValueError(f"Invalid lipschitz: {lipschitz!r} (expected (L, Gamma), both > 0)")
        if lipschitz_samples < 1:
            raise ValueError(f"Invalid lipschitz_samples: {lipschitz_samples}")
        if step_rule == "adaptive":
            if normal_damping not in (None, DEFAULT_NU0):
                raise ValueError(
                    "normal_damping applies to step_rule='fixed'; the adaptive rule globalises the whole step "
                    "through its merit function and needs the undamped normal step (J v = -c)"
                )
            normal_damping = None
        defaults = dict(lr=lr, normal_lr=normal_lr)
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
        self.step_rule = step_rule
        self.rule = dict(tau0=tau0, xi0=xi0, sigma=sigma, eps_tau=eps_tau, eps_xi=eps_xi)
        self.lipschitz = lipschitz
        self.lipschitz_samples = lipschitz_samples
        self._closure: Callable[[], Any] | None = None

    def step(self, closure: Callable[[], Any] | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        self._closure = closure  # the Lipschitz estimate re-evaluates it
        try:
            return super().step(closure)
        finally:
            self._closure = None

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative(group["lr"], "learning rate")
        check_optional_nonnegative(group["normal_lr"], "normal_lr")

    def _check_groups(self) -> None:
        super()._check_groups()
        lrs = [g["lr"] for g in self.param_groups]
        if self.step_rule == "adaptive" and any(lr != lrs[0] for lr in lrs):
            raise ValueError("step_rule='adaptive' needs one learning rate (β_k) shared by all param groups")

    def _direction(self, ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        layout, groups = ctx.layout, self.param_groups
        lrs = [g["lr"] for g in groups]
        if self.step_rule == "fixed":
            return sqp_direction(
                ctx.g,
                ctx.c,
                ctx.J,
                lr=self._per_coordinate(layout, lrs),
                normal_lr=self._normal_step_sizes(layout),
                rank_tol=self._rank_tol(layout),
                sync_free=ctx.sync_free,
                damping=ctx.damping,
                num_ineq=ctx.num_ineq,
                warm=ctx.warm,
            )
        state = self._global
        lipschitz = state.lipschitz if state.lipschitz is not None else self._lipschitz_constants(ctx)
        dev = ctx.g.device
        tau, xi = state.tau, state.xi
        if tau is None or xi is None:  # first step only: later steps never create tensors from host values
            tau = torch.full((), self.rule["tau0"], dtype=torch.float64, device=dev)
            xi = torch.full((), self.rule["xi0"], dtype=torch.float64, device=dev)
        L, Gamma = lipschitz
        rule = dict(beta=lrs[0], L=L, Gamma=Gamma, **{k: self.rule[k] for k in ("sigma", "eps_tau", "eps_xi")})
        m = ctx.c.shape[0]
        if ctx.num_ineq:
            d, info, alpha, tau_new, xi_new = self._adaptive_with_inequalities(ctx, tau, xi, rule)
            formed = None
        else:
            S = ctx.J
            v = S.normal_step(ctx.c) if m else torch.zeros_like(ctx.g)
            gbar, lam = S.project(ctx.g, multipliers=True) if m else (ctx.g, None)
            u = -gbar
            d = v + u
            formed = require_finite(sync_free=ctx.sync_free, projected_gradient=gbar, normal_step=v)
            alpha, tau_new, xi_new = adaptive_step_size(ctx.g, v, u, ctx.c, tau, xi, **rule)
            factor = getattr(S, "factor", None) if m else None
            info = {**step_info(ctx.c, factor, v, alpha.to(u.dtype) * u), "multipliers": lam}
        ok = both(ctx.stats, formed)
        if ok is not None:  # a refused step keeps τ and ξ
            tau_new, xi_new = torch.where(ok, tau_new, tau), torch.where(ok, xi_new, xi)
        state.lipschitz, state.tau, state.xi, state.alpha = lipschitz, tau_new, xi_new, alpha
        info.update(tau=tau_new, xi=xi_new, alpha=alpha, L=L, Gamma=Gamma, formed=formed)
        return alpha.to(d.dtype) * d, info

    def _adaptive_with_inequalities(
        self, ctx: StepContext, tau: Tensor, xi: Tensor, rule: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any], Tensor, Tensor, Tensor]:
        r"""The adaptive rule on the step of the QP :math:`\min_d g^\top d + \tfrac12\|d\|^2` s.t.
        :math:`c_E + J_E d = 0`, :math:`c_I + J_I d \le 0`, with the merit function
        :math:`\phi_\tau = \tau f + \|c_E\|_1 + \|\max(c_I, 0)\|_1` of Curtis, Robinson & Zhou (arXiv:2302.14790):
        the model's decrease of the violation :math:`\Delta V = V(c) - V(c + Jd)` takes the place of
        :math:`\|c\|_1` (the two agree when only equalities are active), and
        :math:`g^\top d + \|d\|^2 = y^\top(c - r)`, :math:`r = c + Jd`, from the QP's multipliers y
        (:math:`d = -g - J^\top y`), which is O(‖c‖) without the cancellation of forming it from d."""
        solver = InequalitySolver(
            ctx.num_ineq, ctx.warm, gamma=1.0, rank_tol=self._rank_tol(ctx.layout), sync_free=ctx.sync_free
        )
        J, G = explicit_jacobian(ctx.J)
        st = solver.step(-ctx.g, ctx.c, J, G=G)
        c64 = ctx.c.double()
        r = c64 + (J @ st.delta).double()
        m_eq = ctx.c.shape[0] - ctx.num_ineq
        before, after = _violation_l1(c64, m_eq), _violation_l1(r, m_eq)
        dd = torch.dot(st.delta, st.delta).double()
        denom = torch.dot(st.y, c64 - r)  # g'd + ‖d‖²
        alpha, tau_new, xi_new = _adaptive_rule(denom - dd, dd, denom, (before - after).clamp_min(0.0), tau, xi, **rule)
        info = {**solver.info(st, ctx.c), "multipliers": st.y}
        info["u_norm"] = alpha.to(info["u_norm"].dtype) * info["u_norm"]
        return st.delta, info, alpha, tau_new, xi_new

    def _lipschitz_constants(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        r"""``(L, Γ)`` as given, or estimated from the closure at nearby points (parameters restored exactly).

        L: a power iteration on gradient differences, :math:`e_{j+1} \propto g(x + \delta e_j) - g(x)`, so
        the secant :math:`\|g(x+\delta e) - g(x)\|/\delta` tends to the largest curvature rather than the
        average one a random direction sees (a step 1/L from an average-curvature L diverges on stiff problems).
        Γ bounds the constraints' curvature in the merit function's ℓ1 norm,
        :math:`\|c(x+s)\|_1 \le \|c + Js\|_1 + \tfrac{\Gamma}{2}\|s\|^2`: the largest
        :math:`\sum_i \|\nabla c_i(x+\delta e) - \nabla c_i(x)\|/\delta` over the same directions.
        Runs once, at the first step (one host read per closure call); the extra evaluations are checked like the
        step's own (non-finite values refuse the step with the parameters and state unchanged)."""
        dev = ctx.g.device
        if self.lipschitz is not None:
            return tuple(torch.tensor(float(x), dtype=torch.float64, device=dev) for x in self.lipschitz)
        layout = ctx.layout
        x0 = layout.gather()
        gen = torch.Generator(device="cpu").manual_seed(0)
        radius = 1e-3 * max(1.0, float(torch.linalg.vector_norm(x0)))
        e = torch.randn(layout.n, generator=gen, dtype=torch.float64).to(dev, layout.dtype)
        L_est, G_est = 0.0, 0.0
        try:
            for _ in range(self.lipschitz_samples):
                e = e * (radius / torch.linalg.vector_norm(e))
                layout.assign(x0 + e)
                with torch.enable_grad():
                    inputs, g, J = self._evaluate(self._closure, layout)  # every rank's, with a process group
                    if inputs.c.shape != ctx.c.shape:
                        raise ValueError(
                            f"the closure returned {inputs.c.shape[0]} constraints at a nearby point (Lipschitz "
                            f"estimate) but {ctx.c.shape[0]} at the iterate; it must evaluate the same batch"
                        )
                try:  # the same checks as the step's own inputs: NaN here would make α = 1 silently
                    rows = DenseJacobian(J).row_check() if J.shape[0] else None
                    self._guard.check(inputs.loss.detach(), inputs.c.detach(), g, rows, sync_free=False)
                except (FloatingPointError, ValueError) as err:
                    kind = FloatingPointError if isinstance(err, FloatingPointError) else ValueError
                    raise kind(
                        f"while estimating the Lipschitz constants (step_rule='adaptive') at a point {radius:.3g} "
                        f"from the iterate: {err}; the step was refused and the parameters are unchanged"
                    ) from None
                dg = g - ctx.g
                dg_norm = float(torch.linalg.vector_norm(dg))
                L_est = max(L_est, dg_norm / radius)
                if J.shape[0]:
                    J0 = ctx.J.op.dense()
                    G_est = max(G_est, float(torch.linalg.vector_norm(J - J0, dim=1).sum()) / radius)
                if dg_norm == 0.0:
                    break  # f is linear along e: nothing to iterate on
                e = dg
        finally:
            layout.assign(x0)
        tiny = 1e-12
        return (
            torch.tensor(max(L_est, tiny), dtype=torch.float64, device=dev),
            torch.tensor(max(G_est, tiny), dtype=torch.float64, device=dev),
        )


def sqp_direction(
    g: Tensor,
    c: Tensor,
    J: Tensor | ConstraintSolver,
    *,
    lr: float | Tensor,
    normal_lr: float | Tensor,
    rank_tol: float,
    sync_free: bool = False,
    damping: Tensor | None = None,
    num_ineq: int = 0,
    warm: InequalityWarmStart | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Functional form of the fixed-step :class:`StochasticSQP` step: ``(γ v + u, diagnostics)`` with
    :math:`u = -P(\\Lambda g)` (per-group learning rates applied before the projection). ``multipliers`` in the
    diagnostics are the least-squares estimates :math:`-(JJ^\top)^{-1}Jg`. With ``num_ineq`` > 0 the last rows
    of c and J are inequalities :math:`c_i \\le 0` and the step is the QP
    :math:`\\min_d \\tfrac12\\|d + \\Lambda g\\|^2` s.t. :math:`\\gamma c_E + J_E d = 0`,
    :math:`\\gamma c_I + J_I d \\le 0` (:mod:`sqpoptim._inequality`); its multipliers divided by the (largest)
    learning rate are the multiplier estimates."""
    m = c.shape[0]
    if num_ineq:
        solver = InequalitySolver(num_ineq, warm, gamma=normal_lr, rank_tol=rank_tol, sync_free=sync_free)
        Jm, G = explicit_jacobian(J)
        st = solver.step(-(lr * g), c, Jm, G=G)
        scale = lr.max().double() if isinstance(lr, Tensor) else lr
        lam = st.y / scale if not (isinstance(scale, float) and scale == 0.0) else st.y
        return st.delta, {**solver.info(st, c), "multipliers": lam}
    if not m:
        u = -(lr * g)
        return u, step_info(c, None, torch.zeros_like(u), u)
    S = as_solver(J, rank_tol=rank_tol, sync_free=sync_free)
    delta, info = S.step(lr * g, c, normal_lr, damping)
    lam = S.project(g, multipliers=True)[1] if S.kind == "dense" else None  # (no matrix-free solve for it)
    return delta, {**info, "multipliers": lam}
