r"""Globalisation of the normal step: Levenberg–Marquardt damping with a trust radius, a ratio test and step
rejection.

The normal step of the SQP methods is the Gauss–Newton step of the linearised constraints,
:math:`v = -J^\top(JJ^\top)^{-1}c`. Where the linear model is poor against the size of that step (a large
initial violation, a nearly rank-deficient J, a piecewise-linear network whose model is exact only until a
step crosses a kink) it overshoots by orders of magnitude. With ``normal_damping=ν0`` the optimizers take

.. math::

    v = -J^\top(JJ^\top + \mu_k I)^{-1}c_k,\qquad
    \mu_k = \max\bigl(\nu_k \operatorname{mean}_i (JJ^\top)_{ii},\ \mu_\Delta\bigr),\quad
    \|\gamma v(\mu_\Delta)\| = \Delta_k

(:func:`sqpoptim._linalg.damped`; μ_Δ, the damping whose step has the length of the radius Δ_k, by Newton's
method on the secular equation, :mod:`sqpoptim._trust_region`) and adapt ν and Δ from step to step:

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

The radius (J. J. Moré, "The Levenberg–Marquardt algorithm: implementation and theory", 1978; Nocedal & Wright,
*Numerical Optimization*, ch. 4 and 10) is what makes a failure shorten the next step: where μ_ν is far below
the eigenvalues of :math:`JJ^\top` that carry c, doubling ν leaves the step's length unchanged, and a run from a
random network spent ten steps escalating ν from 1e-6 without moving. Δ starts at ∞ (``NO_RADIUS``; the steps
are the ν-damped ones, bit for bit, until a step fails) and, with ℓ_k = ‖γv_k‖ the normal displacement taken,

.. math::

    \boxed{\Delta_{k+1} = \frac{\ell_k}{4(1 - \rho)}\ \text{ on a failure, or when } \rho < \tfrac14
    \text{ and } \Delta_k \text{ set the step};\qquad \Delta_{k+1} = 2\Delta_k \text{ when } \rho > \tfrac34
    \text{ and } \Delta_k \text{ set the step}}

— the length at which a model error quadratic in the step (so that 1 − ρ grows linearly with the length) would
give ρ = 3/4; at ρ = 0 it is Nocedal & Wright's Δ/4, and a failure by a factor 100 (ρ = −100) shortens the step
400-fold in one rejection instead of a dozen doublings. Deviation from Moré's algorithm: ν keeps its own rule and
bounds μ from below, so a step inside the radius is the ν-damped step of before; Δ is judged only where it set
the step, except on a failure.

ν stays in [1e-6, 1e4]: the floor bounds the amplification of the near-null directions of J
(:math:`\|v\| \le \|c\|/(2\sqrt{\mu})`). The model's error is second order in the *whole* step, so ρ judges the
normal step only when it was the larger part (:math:`\|\gamma v_k\| > \|u_k\|`). Otherwise nothing is rejected
(damping the normal step cannot shrink an error made by the tangential step, and rejecting it would repeat it
forever) and ν relaxes by 10 % per step (Δ grows by as much), so that a damped — hence small — normal step is
judged again later instead of leaving ν where a failure left it. A step whose model predicted no decrease, and
the step after a rejection (taken from the same point), are not judged. Non-finite values are not a failure of
this kind: they are refused with parameters and state unchanged (:mod:`sqpoptim._finite`).

This is on by default (ν0 = ``DEFAULT_NU0`` = 1e-6) in every SQP optimizer's fixed-step rule and in Adam(con);
``normal_damping=None`` gives the papers' undamped step. The radius bounds the Euclidean normal step; a normal
step in another metric (``projection="scaled"``, Adam(con)) is damped by ν alone.

Everything here is a device computation (no host synchronisation); only the exact mode reads the rejection
flag on the host, to return early.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._state import DampingState

__all__ = [
    "DEFAULT_NU0",
    "NO_RADIUS",
    "NU_MAX",
    "NU_MIN",
    "Verdict",
    "initial_state",
    "judge",
    "radius_of",
    "record",
    "rejected",
    "values_after",
    "warm_start",
]

NU_MIN, NU_MAX = 1e-6, 1e4  # range of ν
DEFAULT_NU0 = 1e-6  # the optimizers' default ``normal_damping``: chosen by measurement (RESULTS.md)
_NU_RELAX = 0.9  # ν's factor per step while the tangential step dominates (Δ's is its inverse)
_MAX_ESCALATION = 2.0**20
_RADIUS_MIN = 1e-30  # Δ stays positive: the secular equation needs a target
NO_RADIUS = 1e300  # Δ at or above this: no radius (a finite sentinel: the state holds no inf, no NaN)


@dataclass
class Verdict:
    """The judgement of the last step: ν for this step, the next escalation factor, the ratio ρ (NaN when not
    judged) and whether the last step is rejected (0-d device tensors)."""

    nu: Tensor
    escalation: Tensor
    rho: Tensor
    reject: Tensor
    radius: Tensor


def initial_state(nu0: float, device: torch.device) -> DampingState:
    nu = torch.full((), nu0, dtype=torch.float64, device=device)
    return DampingState(nu=nu, escalation=torch.full_like(nu, 2.0), radius=torch.full_like(nu, NO_RADIUS))


def radius_of(state: DampingState) -> Tensor:
    """Δ of the state (``NO_RADIUS`` for a state saved before the radius existed)."""
    return torch.full_like(state.nu, NO_RADIUS) if state.radius is None else state.radius


def warm_start(state: DampingState | None, verdict: Verdict) -> Tensor | None:
    """A guess of the relative damping that fits this step in the radius: the last step's, where the radius set it,
    times ‖γv_{k-1}‖/Δ_k (0: no guess; ``None`` before any step)."""
    if state is None or state.model is None:
        return None
    model = _full_model(state.model)
    return torch.where(model[4] > 0, model[4] * model[3] / verdict.radius, 0.0)


def _full_model(model: Tensor) -> Tensor:
    """The model with the normal displacement's length and the radius' damping (a saved three-entry model: length
    unknown, 0, and the radius not binding)."""
    if model.numel() == 5:
        return model
    return torch.cat([model, model.new_zeros(2)])


def judge(state: DampingState, loss: Tensor, c: Tensor, n: int) -> Verdict:
    """Judge the last step from the new residual ``c`` (and ``loss``, for finiteness); see the module docstring."""
    nu, escalation, model, radius = state.nu, state.escalation, state.model, radius_of(state)
    x_prev = state.x_accepted
    if x_prev is not None and x_prev.numel() != n:  # the trainable parameters changed: start afresh
        model = None
    if state.accepted_c is not None and state.accepted_c.shape != c.shape:  # other constraints: nothing to judge
        model = None
    if model is None:
        no = torch.zeros((), dtype=torch.bool, device=nu.device)
        return Verdict(nu, escalation, torch.full_like(nu, math.nan), no, radius)
    model = _full_model(model)
    before, predicted, normal_dominates = model[0], model[1], model[2] > 0
    length, bound = model[3], model[4] > 0
    actual = torch.linalg.vector_norm(c.double())
    pred = before - predicted
    rho = (before - actual) / torch.where(pred > 0, pred, 1.0)
    finite = actual.isfinite() & loss.isfinite()  # non-finite values are refused as without damping
    judged = (pred > 0) & normal_dominates & finite
    failure = judged & (rho < 0)
    success = judged & (rho >= 0)
    nielsen = (1.0 - (2.0 * rho - 1.0) ** 3).clamp_min(1.0 / 3.0)
    relax = finite & (pred > 0) & ~normal_dominates
    factor = torch.where(
        failure,
        escalation,
        torch.where(success, nielsen, torch.where(relax, torch.full_like(nu, _NU_RELAX), torch.ones_like(nu))),
    )
    # the radius: on a failure, and on a poor step the radius made, the length at which a remainder quadratic in
    # the step would give ρ = 3/4 (the error 1 - ρ grows linearly with the length): ‖γv‖ / (4(1 - ρ))
    shrink = (failure | success & bound & (rho < 0.25)) & (length > 0)
    shrunk = (length / (4.0 * (1.0 - torch.where(shrink, rho, 0.0)))).clamp_min(_RADIUS_MIN)
    grow = success & bound & (rho > 0.75)
    radius = torch.where(
        shrink, shrunk, torch.where(grow, 2.0 * radius, torch.where(relax, radius / _NU_RELAX, radius))
    ).clamp_max(NO_RADIUS)
    return Verdict(
        nu=(nu * factor).clamp(NU_MIN, NU_MAX),
        escalation=torch.where(
            failure, (2.0 * escalation).clamp_max(_MAX_ESCALATION), torch.where(success, 2.0, escalation)
        ),
        rho=torch.where(judged, rho, torch.full_like(rho, math.nan)),
        reject=failure,
        radius=radius,
    )


def _unjudged(model: Tensor) -> Tensor:
    """The model after a rejection: no predicted decrease, so the next step (taken from the same point with the
    escalated ν) neither judges nor relaxes ν."""
    zero = torch.zeros_like(model[0])
    return torch.stack([model[0], model[0], zero, zero, zero])


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
        radius=verdict.radius,
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
    bound: Tensor,
    nu_applied: Tensor,
    x: Tensor,
    ok: Tensor | None,
    reject: Tensor | None,
) -> DampingState:
    """The state after this step: ν, Δ, the point x_k it was taken from with its ``loss`` and ``c``, and its model
    (‖c_k‖, ‖c_k + J_kδ_k‖, whether the normal displacement ``normal_norm`` = ‖γv_k‖ exceeded ``u_norm`` =
    ‖u_k‖, ‖γv_k‖, and the damping ``nu_applied`` where the radius set it — ``bound`` —, 0 elsewhere:
    :mod:`sqpoptim._trust_region`).

    Exact mode (``ok`` and ``reject`` are ``None``): the step was accepted. Sync-free mode: ``ok`` says the step
    was applied, ``reject`` that it moved back to ``state.x_accepted``; neither means it was refused, which
    leaves ν unchanged."""
    c64 = c.double()
    model = torch.stack(
        [
            torch.linalg.vector_norm(c64),
            torch.linalg.vector_norm(c64 + Jdelta.double()),
            (normal_norm.double() > u_norm.double()).double(),
            torch.where(normal_norm.isfinite(), normal_norm.double(), 0.0),  # (a refused step's is NaN: 0, unknown)
            torch.where(bound, nu_applied.double(), 0.0),
        ]
    )
    nu, escalation, radius = verdict.nu, verdict.escalation, verdict.radius
    count = state.rejected_steps
    no = torch.zeros((), dtype=torch.bool, device=nu.device)
    if ok is None:
        return DampingState(nu, escalation, model, x, loss, c, no, count, radius)
    assert reject is not None
    if state.model is not None:
        last = _full_model(state.model)
        model = torch.where(ok, model, torch.where(reject, _unjudged(last), last))
    keep = ~(ok | reject)  # refused: ν and Δ unchanged
    nu = torch.where(keep, state.nu, nu)
    escalation = torch.where(keep, state.escalation, escalation)
    radius = torch.where(keep, radius_of(state), radius)
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
    return DampingState(nu, escalation, model, x_new, loss_new, c_new, retry, count + reject.long(), radius)
