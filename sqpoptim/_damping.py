r"""Globalisation of the normal step: Levenberg–Marquardt damping with a ratio test and step rejection.

The normal step of the SQP methods is the Gauss–Newton step of the linearised constraints,
:math:`v = -J^\top(JJ^\top)^{-1}c`. Where the linear model is poor against the size of that step (a large
initial violation, a nearly rank-deficient J, a piecewise-linear network whose model is exact only until a
step crosses a kink) it overshoots by orders of magnitude. With ``normal_damping=ν0`` the optimizers take

.. math::

    v = -J^\top(JJ^\top + \mu_k I)^{-1}c_k,\qquad \mu_k = \nu_k \operatorname{mean}_i (JJ^\top)_{ii}

(:func:`sqpoptim._linalg.damped`) and adapt ν from step to step:

* after step k the linear model predicted :math:`\|c_k + J_k\delta_k\|` (δ_k the whole step taken); the next
  closure gives :math:`\|c_{k+1}\|` and
  :math:`\rho = (\|c_k\| - \|c_{k+1}\|)/(\|c_k\| - \|c_k + J_k\delta_k\|)` — when the closure returned
  as many constraints as at step k (a different number means other constraints: the step is not judged; a
  closure that resamples its constraint points at a fixed number is judged as if they were the same, so with
  resampled points ν adapts to the sampling noise as well);
* ρ ≥ 0 (success): :math:`\nu \leftarrow \nu\max(1/3,\ 1 - (2\rho-1)^3)` — Nielsen's rule (H. B. Nielsen,
  "Damping parameter in Marquardt's method", IMM-REP-1999-05) — and the escalation factor resets to 2;
* ρ < 0 (the violation grew): the step is **rejected** — the parameters go back to :math:`x_k` — and ν is
  multiplied by the escalation factor, which doubles on consecutive failures (2, 4, 8, ...).

ν stays in [1e-6, 1e4]: the floor bounds the amplification of the near-null directions of J
(:math:`\|v\| \le \|c\|/(2\sqrt{\mu})`). The model's error is second order in the *whole* step, so ρ judges the
normal step only when it was the larger part (:math:`\|\gamma v_k\| > \|u_k\|`). Otherwise nothing is rejected
(damping the normal step cannot shrink an error made by the tangential step, and rejecting it would repeat it
forever) and ν relaxes by 10 % per step, so that a damped — hence small — normal step is judged again later
instead of leaving ν where a failure left it. The step after a rejection (taken from the same point, its model
set to predict no decrease) is not judged. Nor is any other step whose model predicted no decrease — unless its
normal part was the larger and ‖c‖ grew: that is a failure (ρ reported as −∞). The exact damped step always
predicts a decrease (:math:`\|c + Jv\| < \|c\|`), and so does the matrix-free one, whose truncated solve falls
back to the Cauchy point where it does not (:func:`sqpoptim._krylov.cauchy_safeguard`); so that case is left to an
inexact tangential part (:math:`Ju \ne 0`) or a normal step size γ ≥ 2. Before the safeguard, a truncated
MINRES step predicted growth (‖c + Jδ‖ = 1.06‖c‖ on the scaling benchmark's m = 10,000 cell), was not judged,
and raised max|c| 33-fold. Non-finite values are not a failure of this kind: they
are refused with parameters and state unchanged (:mod:`sqpoptim._finite`).

This is on by default (ν0 = ``DEFAULT_NU0`` = 1e-6) in every SQP optimizer's fixed-step rule and in Adam(con);
``normal_damping=None`` gives the papers' undamped step.

Everything here is a device computation (no host synchronisation) in sync-free mode; the exact mode reads the
few scalars of the judgement once and decides on the host.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._state import DampingState

__all__ = [
    "DEFAULT_NU0",
    "NU_MAX",
    "NU_MIN",
    "Verdict",
    "initial_state",
    "judge",
    "record",
    "rejected",
    "values_after",
]

NU_MIN, NU_MAX = 1e-6, 1e4  # range of ν
DEFAULT_NU0 = 1e-6  # the optimizers' default ``normal_damping``: chosen by measurement (RESULTS.md)
_NU_RELAX = 0.9  # ν's factor per step while the tangential step dominates
_MAX_ESCALATION = 2.0**20


@dataclass
class Verdict:
    """The judgement of the last step: ν for this step, the next escalation factor, the ratio ρ (NaN when not
    judged) as 0-d device tensors, and whether the last step is rejected (a 0-d device tensor, or a Python bool
    when judged on the host)."""

    nu: Tensor
    escalation: Tensor
    rho: Tensor
    reject: Tensor | bool


def initial_state(nu0: float, device: torch.device) -> DampingState:
    nu = torch.full((), nu0, dtype=torch.float64, device=device)
    return DampingState(nu=nu, escalation=torch.full_like(nu, 2.0))


def judge(
    state: DampingState, loss: Tensor, c: Tensor, n: int, *, host: bool = False, c_norm: Tensor | None = None
) -> Verdict:
    """Judge the last step from the new residual ``c`` (and ``loss``, for finiteness); see the module docstring.

    ``host=True`` (exact mode): the few scalars are read once and the rule runs on Python floats — on the CPU
    some forty 0-d tensor operations cost more than the rest of a small step's bookkeeping. Both ways evaluate
    the same rule (``_rule``); ``reject`` is then a Python bool. ``c_norm``: ‖c‖ in float64 where the caller has it."""
    nu, escalation, model = state.nu, state.escalation, state.model
    x_prev = state.x_accepted
    if x_prev is not None and x_prev.numel() != n:  # the trainable parameters changed: start afresh
        model = None
    if state.accepted_c is not None and state.accepted_c.shape != c.shape:  # other constraints: nothing to judge
        model = None
    if model is None:
        no = torch.zeros((), dtype=torch.bool, device=nu.device)
        return Verdict(nu, escalation, torch.full_like(nu, math.nan), False if host else no)
    actual = torch.linalg.vector_norm(c.double()) if c_norm is None else c_norm
    if not host:
        before, predicted, dominates = model.unbind()
        new_nu, new_escalation, rho, reject = _rule(
            nu, escalation, before, predicted, dominates > 0, actual, loss.isfinite(), _DEVICE
        )
        return Verdict(new_nu, new_escalation, rho, reject)
    values = torch.cat([model, torch.stack([nu, escalation, actual, loss.double()])]).tolist()  # the one read
    before, predicted, dominates, nu_f, escalation_f, actual_f, loss_f = values
    new_nu, new_escalation, rho, reject = _rule(
        nu_f, escalation_f, before, predicted, dominates > 0, actual_f, math.isfinite(loss_f), _HOST
    )
    new_nu_t, new_escalation_t, rho_t = torch.tensor(
        [new_nu, new_escalation, rho], dtype=torch.float64, device=nu.device
    ).unbind()
    return Verdict(new_nu_t, new_escalation_t, rho_t, reject)


class _DeviceOps:
    """The operations ``_rule`` needs, on 0-d tensors (no host synchronisation)."""

    isfinite = staticmethod(torch.isfinite)

    @staticmethod
    def where(cond: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
        if not isinstance(a, Tensor) and not isinstance(b, Tensor):  # float64, not the default dtype
            a = torch.full_like(cond, a, dtype=torch.float64)
        return torch.where(cond, a, b)

    @staticmethod
    def not_(a: Tensor) -> Tensor:
        return ~a

    @staticmethod
    def clamp(x: Tensor, low: float | None = None, high: float | None = None) -> Tensor:
        return x.clamp(low, high)


class _HostOps:
    """The same operations on Python floats and bools."""

    isfinite = staticmethod(math.isfinite)

    @staticmethod
    def where(cond: bool, a: float, b: float) -> float:
        return a if cond else b

    @staticmethod
    def not_(a: bool) -> bool:
        return not a

    @staticmethod
    def clamp(x: float, low: float | None = None, high: float | None = None) -> float:
        if low is not None and x < low:  # (NaN passes through, as in Tensor.clamp)
            x = low
        if high is not None and x > high:
            x = high
        return x


_DEVICE, _HOST = _DeviceOps(), _HostOps()


def _rule(
    nu: Any, escalation: Any, before: Any, predicted: Any, dominates: Any, actual: Any, loss_finite: Any, ops: Any
) -> tuple[Any, Any, Any, Any]:
    """``(ν, escalation, ρ, reject)`` after the step whose model predicted ‖c_k + J_kδ_k‖ = ``predicted`` from
    ‖c_k‖ = ``before`` and whose closure now gives ‖c_{k+1}‖ = ``actual``: the module docstring's rule, written
    once for 0-d tensors and for Python floats (``ops``)."""
    pred = before - predicted
    positive = pred > 0
    rho = (before - actual) / ops.where(positive, pred, 1.0)
    finite = ops.isfinite(actual) & loss_finite  # non-finite values are refused as without damping
    judged = positive & dominates & finite
    grew = ops.not_(positive) & dominates & finite & (actual > before)  # predicted no decrease, and it grew
    failure = judged & (rho < 0) | grew
    success = judged & (rho >= 0)
    t = 2.0 * rho - 1.0
    nielsen = ops.clamp(1.0 - t * t * t, low=1.0 / 3.0)  # (a product, not a power: a float power may raise)
    relax = finite & positive & ops.not_(dominates)
    factor = ops.where(failure, escalation, ops.where(success, nielsen, ops.where(relax, _NU_RELAX, 1.0)))
    return (
        ops.clamp(nu * factor, NU_MIN, NU_MAX),
        ops.where(failure, ops.clamp(2.0 * escalation, high=_MAX_ESCALATION), ops.where(success, 2.0, escalation)),
        ops.where(judged, rho, ops.where(grew, -math.inf, math.nan)),
        failure,
    )


def _unjudged(model: Tensor) -> Tensor:
    """The model after a rejection: no predicted decrease, so the next step (taken from the same point with the
    escalated ν) neither judges nor relaxes ν."""
    return torch.stack([model[0], model[0], torch.zeros_like(model[0])])


def rejected(state: DampingState, verdict: Verdict) -> DampingState:
    """Exact mode: the state after rejecting the last step (the caller moves the parameters back to
    ``state.x_accepted``)."""
    assert state.model is not None
    count = state.rejected_steps
    count = torch.zeros((), dtype=torch.long, device=verdict.nu.device) if count is None else count
    return dataclasses.replace(
        state,
        nu=verdict.nu,
        escalation=verdict.escalation,
        model=_unjudged(state.model),
        retry=torch.ones((), dtype=torch.bool, device=verdict.nu.device),
        rejected_steps=count + 1,
    )


def values_after(state: DampingState, reject: Tensor | None, loss: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """What ``step`` returns: the closure's ``(loss, c)``, or — where the last step is rejected (``reject``;
    ``None``: rejected) — the values at the accepted point the parameters go back to."""
    if state.accepted_loss is None or state.accepted_c is None or state.accepted_c.shape != c.shape:
        return loss, c
    if reject is None:
        return state.accepted_loss, state.accepted_c
    return torch.where(reject, state.accepted_loss, loss), torch.where(reject, state.accepted_c, c)


def record(
    state: DampingState,
    verdict: Verdict,
    *,
    loss: Tensor,
    c: Tensor,
    Jdelta: Tensor,
    normal_norm: Tensor,
    u_norm: Tensor,
    x: Tensor,
    ok: Tensor | None,
    reject: Tensor | None,
    c_norm: Tensor | None = None,
    residual_norm: Tensor | None = None,
) -> DampingState:
    """The state after this step: ν, the point x_k it was taken from with its ``loss`` and ``c``, and its model
    (‖c_k‖, ‖c_k + J_kδ_k‖, whether the normal displacement ``normal_norm`` = ‖γv_k‖ exceeded ``u_norm`` =
    ‖u_k‖).

    Exact mode (``ok`` and ``reject`` are ``None``): the step was accepted. Sync-free mode: ``ok`` says the step
    was applied, ``reject`` that it moved back to ``state.x_accepted``; neither means it was refused, which
    leaves ν unchanged. ``c_norm`` and ``residual_norm``: ‖c‖ and ‖c + Jδ‖ in float64 where the caller has
    them."""
    c64 = c.double()
    model = torch.stack(
        [
            torch.linalg.vector_norm(c64) if c_norm is None else c_norm,
            torch.linalg.vector_norm(c64 + Jdelta.double()) if residual_norm is None else residual_norm,
            (normal_norm.double() > u_norm.double()).double(),
        ]
    )
    nu, escalation = verdict.nu, verdict.escalation
    count = state.rejected_steps
    no = torch.zeros((), dtype=torch.bool, device=nu.device)
    if ok is None:
        return DampingState(nu, escalation, model, x, loss, c, no, count)
    assert reject is not None
    if state.model is not None:
        model = torch.where(ok, model, torch.where(reject, _unjudged(state.model), state.model))
    keep = ~(ok | reject)  # refused: ν unchanged
    nu = torch.where(keep, state.nu, nu)
    escalation = torch.where(keep, state.escalation, escalation)
    x_prev = state.x_accepted
    if x_prev is None or x_prev.numel() != x.numel():
        x_new, loss_new, c_new = x, loss, c
    else:
        x_new = torch.where(ok, x, x_prev)
        same = state.accepted_c is not None and state.accepted_c.shape == c.shape
        loss_new = torch.where(ok, loss, state.accepted_loss) if same else loss
        c_new = torch.where(ok, c, state.accepted_c) if same else c
    retry = reject | (state.retry if state.retry is not None else no) & keep
    count = torch.zeros((), dtype=torch.long, device=x.device) if count is None else count
    return DampingState(nu, escalation, model, x_new, loss_new, c_new, retry, count + reject.long())
