r"""What a step tells about the constraints: the violation the linearised step leaves, a stalled violation
(infeasible constraints, or an iterate at a stationary point of :math:`\|c\|^2`), a rank-deficient Jacobian and
all-zero Jacobian rows — each reported once, in words a user can act on.

The quantities (``c_k`` the violation vector — :math:`[c_E; \max(c_I, 0)]` with inequalities —, δ_k the
displacement taken):

* the predicted violation :math:`\|c_k + J_k\delta_k\| / \|c_k\|`: 0 for the whole Gauss–Newton step of a
  full-rank J, near 1 when the linearised constraints cannot be reduced from here;
* stationarity of :math:`\tfrac12\|c\|^2`, whose gradient is :math:`J^\top c`: the cosine
  :math:`\|J_k^\top c_k\| / (\sigma_{\max}(J_k)\|c_k\|)`, near 0 at an infeasible stationary point (a local
  minimum of the violation that is not zero), of order one elsewhere.

A violation that has not fallen for a window of steps while every step's linearisation predicted that most of
it would stay is a *stall*. A stall alone does not say that the constraints are infeasible: a heavily damped
normal step (:mod:`sqpoptim._damping`, ν escalated after rejections) predicts little progress by design, and
after a rejection it moves again. So the stationarity cosine decides, evaluated only when a stall is seen (two
to six Jacobian products, at most once per window): below ``STATIONARY_COSINE`` the optimizer warns with
:class:`~sqpoptim.InfeasibilityWarning`; otherwise the window starts afresh.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._warnings import warn_user

__all__ = [
    "STATIONARY_COSINE",
    "FeasibilityMonitor",
    "InfeasibilityWarning",
    "RankDeficiencyWarning",
    "predicted_violation",
    "stationarity_cosine",
    "violation",
    "zero_rows_error",
]

STATIONARY_COSINE = 1e-2  # ‖Jᵀc‖ / (σ_max ‖c‖) below this: the violation is (nearly) stationary
_WINDOW = 20  # steps over which a stall is judged


class RankDeficiencyWarning(UserWarning):
    """The constraint Jacobian was rank-deficient or ill-conditioned; the step used its independent part."""


class InfeasibilityWarning(UserWarning):
    """The constraint violation stalled at a stationary point of ‖c‖² while the linearised constraints could not
    reduce it."""


def violation(c: Tensor, num_ineq: int) -> Tensor:
    r""":math:`[c_E; \max(c_I, 0)]`: the constraint violations (``c`` itself without inequalities)."""
    if not num_ineq:
        return c
    m_eq = c.shape[0] - num_ineq
    return torch.cat([c[:m_eq], c[m_eq:].clamp_min(0.0)])


def predicted_violation(
    c: Tensor, Jdelta: Tensor | None, gamma_max: float, c_norm: Tensor | None = None, left: Tensor | None = None
) -> Tensor:
    r""":math:`\|c_k + J_k\delta_k\| / \|c_k\|` (0-d float64). ``Jdelta`` ``None`` means an undamped step of a
    full-rank J, whose normal part scaled by γ gives :math:`J\delta = -\gamma c` exactly: then
    :math:`|1 - \gamma_{\max}|`. ``c_norm`` and ``left``: ‖c‖ and ‖c + Jδ‖ in float64 where the caller has them."""
    c64 = c.double()
    c_norm = torch.linalg.vector_norm(c64) if c_norm is None else c_norm
    if Jdelta is None:
        return torch.full_like(c_norm, abs(1.0 - gamma_max))
    left = torch.linalg.vector_norm(c64 + Jdelta.double()) if left is None else left
    return torch.where(c_norm > 0, left / c_norm, 0.0)  # (no autograd here: the 0/0 of c = 0 is discarded)


def stationarity_cosine(c: Tensor, mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor]) -> float:
    r""":math:`\|J^\top c\| / (\sigma_{\max}(J)\|c\|)` with J given by its products (``mv``: x ↦ Jx, ``rmv``:
    y ↦ Jᵀy); σ_max by two power steps on :math:`J^\top J` started from :math:`J^\top c` (a lower bound, so the
    cosine is an upper bound: a stationary point is never missed for want of power steps)."""
    c_norm = float(torch.linalg.vector_norm(c.double()))
    if c_norm == 0.0:
        return 1.0
    jtc = rmv(c)
    jtc_norm = float(torch.linalg.vector_norm(jtc.double()))
    if jtc_norm == 0.0:
        return 0.0
    x, sigma = jtc / jtc_norm, 0.0
    for _ in range(2):
        y = rmv(mv(x))
        y_norm = float(torch.linalg.vector_norm(y.double()))
        if y_norm == 0.0:
            break
        sigma, x = max(sigma, y_norm**0.5), y / y_norm
    sigma = max(sigma, jtc_norm / c_norm)  # σ_max ≥ ‖Jᵀc‖/‖c‖
    return jtc_norm / (sigma * c_norm)


class FeasibilityMonitor:
    """Exact mode: watches ‖c‖ and the predicted violation step by step and warns once each about a stalled,
    stationary violation (:class:`~sqpoptim.InfeasibilityWarning`) and a truncated rank
    (:class:`~sqpoptim.RankDeficiencyWarning`). Not checkpointed: a resumed run watches afresh."""

    def __init__(self) -> None:
        self.window: deque[tuple[float, float]] = deque(maxlen=_WINDOW)
        self.peak = 0.0  # the largest ‖c‖ seen
        self.infeasibility_warned = False
        self.rank_warned = False

    def stalled(self, c: Tensor, predicted: Tensor, c_norm: float | None = None) -> bool:
        """Record this step's ‖c‖ and predicted violation; whether the window now shows a stall worth testing for
        stationarity. Not where ‖c‖ has fallen by three orders of magnitude from its largest value: there the
        damped normal step leaves what lies along J's near-null directions, which is no infeasibility.
        ``c_norm``: ‖c‖ where the caller has it."""
        c_norm = float(torch.linalg.vector_norm(c.double())) if c_norm is None else c_norm
        self.window.append((c_norm, float(predicted)))
        self.peak = max(self.peak, c_norm)
        if self.infeasibility_warned or len(self.window) < self.window.maxlen:
            return False
        first, last = self.window[0][0], self.window[-1][0]
        stalled = last > 1e-6 and last > 1e-3 * self.peak and last > 0.99 * first
        return stalled and all(p > 0.5 for _, p in self.window)

    def judge_stall(self, cosine: float) -> None:
        """Warn when the stalled violation is stationary (``cosine`` from :func:`stationarity_cosine`); otherwise
        forget the window (a damped step that predicts little is no evidence of infeasibility)."""
        last_norm, last_predicted = self.window[-1]
        if cosine >= STATIONARY_COSINE:
            self.window.clear()
            return
        self.infeasibility_warned = True
        warn_user(
            f"the constraint violation has stalled at ‖c‖ = {last_norm:.3g} for {len(self.window)} steps while the "
            f"linearised constraints cannot remove it (‖c + Jδ‖/‖c‖ = {last_predicted:.2f}, "
            f"‖Jᵀc‖/(σ_max(J)‖c‖) = {cosine:.1e}): the constraints may be infeasible, or the iterate is near a "
            "stationary point of ‖c‖² (see optimizer.diagnostics()['c_predicted'])",
            InfeasibilityWarning,
        )

    def rank(self, info: dict[str, Any], m: int) -> None:
        """Warn once when the step used a truncated (rank-deficient) Jacobian."""
        if info.get("truncated") and not self.rank_warned:
            self.rank_warned = True
            warn_user(
                f"the constraint Jacobian is rank-deficient or ill-conditioned (rank used {int(info['rank'])} "
                f"of {m}); steps use its independent part (see optimizer.diagnostics())",
                RankDeficiencyWarning,
            )


def zero_rows_error(
    rows: list[int], c: Tensor, *, given: bool, last_step_norm: float | None, x_norm: float
) -> ValueError:
    """Say why Jacobian rows of unsatisfied constraints can be zero: c_i does not depend on the parameters
    (autograd cannot tell this apart from a zero derivative: a row of ``torch.cat`` has a graph to every part),
    or c_i is stationary here — an infeasible constraint at a minimum of |c_i|, or units saturated, typically by
    the optimizer's own large previous step (``last_step_norm`` against ``x_norm``), which the message then
    names. ``given``: the closure supplied J (and c has no graph)."""
    shown = rows[:10]
    values = ", ".join(f"{c[i].item():.3g}" for i in shown)
    moved = ""
    if last_step_norm is not None and last_step_norm > 0.5 * max(x_norm, 1e-12):
        moved = (
            f" The optimizer's previous step moved the parameters by ‖δ‖ = {last_step_norm:.3g} against "
            f"‖x‖ = {x_norm:.3g}, which can saturate units: globalise the normal step (normal_damping) "
            "or lower normal_lr."
        )
    where = " (in the given J)" if given else ""
    return ValueError(
        f"constraint(s) {shown} cannot be reduced from this point: all-zero Jacobian rows{where} while "
        f"c = [{values}]. Either they do not depend on the parameters at all (remove them, or check that "
        "c is computed from the model), or they are stationary here: an infeasible constraint at a local "
        f"minimum of |c_i|, or units saturated by a large step.{moved} The step was refused and the "
        "parameters and optimizer state are unchanged."
    )
