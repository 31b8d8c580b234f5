r"""A per-sample line search on :math:`\|c\|` along the NP (Gauss–Newton) direction, without extra Jacobians.

The NP step :math:`d = -B^\top (BB^\top)^{-1} c` solves :math:`B d = -c`, so along it

.. math::

    c(y + t d) = (1 - t)\, c + t^2 q + O(t^3), \qquad q = c(y + d) \quad
    (\text{exact, no remainder, for } c \text{ quadratic in } y),

and :math:`c(y + d)` is the evaluation the next NP step needs anyway. A sample whose full step fails the
sufficient-decrease (Armijo) test on the merit :math:`\|c\|_2`,

.. math::

    \boxed{\ \|c(y + t d)\| \le (1 - \alpha t)\, \|c(y)\|, \quad \alpha = 10^{-4}\ }

(the directional derivative of :math:`\|c\|` along :math:`d` is :math:`-\|c\|`), tries instead the minimiser of
the quartic model :math:`\phi(t) = \|(1 - t) c + t^2 q\|^2` on :math:`(0, 1]`, a real root of

.. math::

    \tfrac12 \phi'(t) = 2\|q\|^2 t^3 - 3\langle c, q\rangle t^2 + (\|c\|^2 + 2\langle c, q\rangle)\, t - \|c\|^2
    \quad (\tfrac12\phi'(0) = -\|c\|^2 < 0),

in closed form (Cardano's formula, or the trigonometric one for three real roots, each polished by two Newton
steps; :math:`t = 1` is a candidate too and the smallest :math:`\phi` wins). For quadratic :math:`c` the model is
exact and this trial is accepted unless :math:`\|q\| \gtrsim \|c\| / (4\alpha)`; for general :math:`c` a rejected
trial is halved (backtracking) at most ``max_trials - 1`` times. A sample that passes no trial keeps its point
(:math:`t = 0`, flagged ``stalled``), so :math:`\|c\|` never increases from one step to the next.

This is the textbook globalisation of Newton and Gauss–Newton steps for nonlinear equations by a line search on
a merit function with backtracking and polynomial interpolation (Nocedal & Wright, *Numerical Optimization*,
2nd ed., Sec. 11.2 and 3.5), with the interpolating polynomial taken from the structure of the residual along a
least-norm Newton step. ENFORCE's AdaNP (arXiv:2502.06774) adapts the *number* of full NP steps to the tolerance
and takes every step, whatever it does to :math:`\|c\|`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["line_search", "quartic_model_step"]

ALPHA = 1e-4  # sufficient decrease of ||c||, as fraction of the first-order prediction
MAX_TRIALS = 12  # the model's step, then up to 11 halvings (t >= t_model / 2048)


def _real_cbrt(v: Tensor) -> Tensor:
    return v.sign() * v.abs().pow(1.0 / 3.0)


def quartic_model_step(c: Tensor, q: Tensor) -> Tensor:
    r"""The minimiser over :math:`t \in (0, 1]` of :math:`\|(1 - t) c + t^2 q\|^2`, per sample, ``[b]``.

    ``c``, ``q`` ``[b, m]``; computed in float64 whatever their dtype. Samples with :math:`q = 0` get
    :math:`t = 1` (the full step is exact); non-finite ``q`` gives :math:`t = 1/2`.
    """
    c64, q64 = c.double(), q.double()
    a = q64.square().sum(-1)  # ||q||^2
    b = (c64 * q64).sum(-1)  # <c, q>
    e = c64.square().sum(-1)  # ||c||^2
    usable = torch.isfinite(a) & torch.isfinite(b) & (a > 0)
    a_s = torch.where(usable, a, torch.ones_like(a))
    b_s, e_s = torch.where(usable, b, torch.zeros_like(b)), torch.where(usable, e, torch.ones_like(e))
    # Monic cubic t^3 + p2 t^2 + p1 t + p0, depressed by t = s - p2 / 3 to s^3 + P s + Q.
    p2, p1, p0 = -1.5 * b_s / a_s, (e_s + 2 * b_s) / (2 * a_s), -e_s / (2 * a_s)
    P = p1 - p2.square() / 3
    Q = 2 * p2.pow(3) / 27 - p2 * p1 / 3 + p0
    disc = (Q / 2).square() + (P / 3).pow(3)
    sq = disc.clamp_min(0).sqrt()
    one_root = _real_cbrt(-Q / 2 + sq) + _real_cbrt(-Q / 2 - sq)  # [b]
    Pn = P.clamp_max(-torch.finfo(P.dtype).tiny)  # three real roots need P < 0
    r = 2 * (-Pn / 3).sqrt()
    theta = torch.acos((1.5 * Q / Pn * (-3 / Pn).sqrt()).clamp(-1, 1)) / 3
    three = torch.stack([r * torch.cos(theta - 2 * math.pi * k / 3) for k in range(3)], -1)  # [b, 3]
    s = torch.where((disc > 0)[:, None], one_root[:, None].expand(-1, 3), three)
    t = s - p2[:, None] / 3  # [b, 3]

    def dphi(t):  # phi'(t) / 2 and its derivative
        val = 2 * a_s[:, None] * t**3 - 3 * b_s[:, None] * t**2 + (e_s + 2 * b_s)[:, None] * t - e_s[:, None]
        return val, 6 * a_s[:, None] * t**2 - 6 * b_s[:, None] * t + (e_s + 2 * b_s)[:, None]

    for _ in range(2):  # the closed forms lose digits near a double root; Newton restores them
        val, der = dphi(t)
        t = torch.where(der.abs() > 0, t - val / der.where(der.abs() > 0, torch.ones_like(der)), t)
    t = torch.cat([t.nan_to_num(1.0).clamp(torch.finfo(torch.float32).eps, 1.0), torch.ones_like(t[:, :1])], -1)
    phi = (1 - t).square() * e_s[:, None] + 2 * (1 - t) * t**2 * b_s[:, None] + t**4 * a_s[:, None]  # [b, 4]
    best = t.gather(-1, phi.argmin(-1, keepdim=True)).squeeze(-1)
    best = torch.where(usable, best, torch.where(a == 0, torch.ones_like(a), torch.full_like(a, 0.5)))
    return best.to(c.dtype)


Outcome = tuple[Tensor, ...]


def line_search(
    trial: Callable[[Tensor, Tensor], Outcome], c0: Tensor, full: Outcome, at_start: Outcome
) -> tuple[Tensor, Outcome, Tensor]:
    r"""The step lengths of the module docstring for a batch of NP steps.

    Args:
        trial: ``trial(t, rows)`` evaluates at :math:`y + t d` for the samples ``rows`` (indices into this
            batch, ``t`` ``[r]``) and returns a tuple whose first entry is :math:`c` there (``[r, m]``), followed
            by anything else the caller evaluates with it (a Jacobian).
        c0: :math:`c(y)` ``[b, m]``.
        full: the evaluation at :math:`y + d` (``trial``'s tuple for all samples, :math:`t = 1`).
        at_start: the same tuple at :math:`y` (returned for stalled samples).

    Returns:
        ``(t, outcome, stalled)``: ``t`` ``[b]`` (0 where no trial passed), the tuple at :math:`y + t d`, and
        the ``[b]`` mask of stalled samples. One host synchronisation when every full step passes, one more per
        round of trials otherwise.
    """
    n0 = torch.linalg.vector_norm(c0, dim=-1)  # [b]
    n1 = torch.linalg.vector_norm(full[0], dim=-1)
    ok = torch.isfinite(n1) & (n1 <= (1 - ALPHA) * n0)
    t = torch.ones_like(n0)
    if bool(ok.all()):
        return t, full, torch.zeros_like(ok)
    outcome = full
    pending = ~ok
    t_try = torch.where(pending, quartic_model_step(c0, full[0]), t)
    for _ in range(MAX_TRIALS):
        rows = pending.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        t_rows = t_try[rows]
        got = trial(t_rows, rows)
        n_t = torch.linalg.vector_norm(got[0], dim=-1)
        passed = torch.isfinite(n_t) & (n_t <= (1 - ALPHA * t_rows) * n0[rows])
        acc = rows[passed]
        outcome = tuple(o.index_copy(0, acc, g[passed]) for o, g in zip(outcome, got))
        t = t.index_copy(0, acc, t_rows[passed])
        pending = pending.index_fill(0, acc, False)
        t_try = t_try.index_copy(0, rows, torch.where(passed, t_rows, 0.5 * t_rows))
    stalled = pending
    if bool(stalled.any()):
        rows = stalled.nonzero().squeeze(1)
        outcome = tuple(o.index_copy(0, rows, s[rows]) for o, s in zip(outcome, at_start))
        t = t.index_fill(0, rows, 0.0)
    return t, outcome, stalled
