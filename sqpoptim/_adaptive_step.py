r"""The adaptive step size of stochastic SQP: Berahas, Curtis, Robinson & Zhou, "Sequential quadratic
optimization for nonlinear equality constrained stochastic optimization", SIAM J. Optim. 31(2),
2021, Algorithm 1 with H = I.

With the merit function :math:`\phi(x) = \tau f(x) + \|c(x)\|_1` and the step :math:`d_k = v_k + u_k`, the rule
keeps the merit parameter τ small enough that the model reduction
:math:`\Delta l = -\tau g^\top d + \|c\|_1 \ge \tau\|d\|^2 + \sigma\|c\|_1` (τ ≤ τ^trial), tracks the ratio
:math:`\xi \le \Delta l / (\tau\|d\|^2)` and takes

.. math::

    \hat\alpha = \frac{\beta\,\xi\,\tau}{\tau L + \Gamma},\qquad
    \tilde\alpha = \hat\alpha - \frac{4\|c\|_1}{(\tau L + \Gamma)\|d\|^2},\qquad
    \alpha = \begin{cases} \hat\alpha & \hat\alpha < 1 \\ 1 & \tilde\alpha \le 1 \le \hat\alpha \\
    \tilde\alpha & \tilde\alpha > 1 \end{cases}

with L and Γ the Lipschitz constants of ∇f and J (estimated by :class:`~sqpoptim.StochasticSQP`). Everything here
is a device computation on 0-d float64 tensors (no host synchronisation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adaptive_step_size"]


def adaptive_step_size(
    g: Tensor,
    v: Tensor,
    u: Tensor,
    c: Tensor,
    tau: Tensor,
    xi: Tensor,
    *,
    beta: float,
    L: Tensor,
    Gamma: Tensor,
    sigma: float = 0.1,
    eps_tau: float = 0.01,
    eps_xi: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(α_k, τ_k, ξ_k)`` of the Berahas et al. (2021) rule for :math:`d = v + u`, :math:`u = -Pg` (see
    :class:`StochasticSQP`), as float64 device tensors, computed without host synchronisation. A zero direction
    returns α = 0 and the old τ, ξ.

    The inner products use the identities of the decomposition instead of forming :math:`g^\top d` and
    :math:`\\|d\\|^2` from d: :math:`g^\top u = -\\|u\\|^2` and :math:`u^\top v = 0`, so
    :math:`g^\top d + \\|d\\|^2 = g^\top v + \\|v\\|^2`, which is O(‖c‖). Computed from d directly it is the
    difference of two O(‖u‖²) numbers, and once c reaches rounding level that cancellation alone drives τ to
    zero. The model reduction is :math:`\\Delta l = -\tau g^\top d + \\|c\\|_1` (J d = -c); with
    :math:`\tau \\le \tau^{trial}` it is at least :math:`\tau\\|d\\|^2 + \\sigma\\|c\\|_1 > 0`, so ξ stays
    positive.
    """
    gv = torch.dot(g, v).double()
    vv, uu = torch.dot(v, v).double(), torch.dot(u, u).double()
    gd, dd = gv - uu, vv + uu
    c1 = c.abs().sum().double() if c.numel() else gd.new_zeros(())
    denom = gv + vv  # = g'd + max(d'Hd, 0) with H = I
    return _adaptive_rule(
        gd, dd, denom, c1, tau, xi, beta=beta, L=L, Gamma=Gamma, sigma=sigma, eps_tau=eps_tau, eps_xi=eps_xi
    )


def _violation_l1(r: Tensor, m_eq: int) -> Tensor:
    """:math:`\\|r_E\\|_1 + \\|\\max(r_I, 0)\\|_1`."""
    return r[:m_eq].abs().sum() + r[m_eq:].clamp_min(0.0).sum()


def _adaptive_rule(
    gd: Tensor,
    dd: Tensor,
    denom: Tensor,
    c1: Tensor,
    tau: Tensor,
    xi: Tensor,
    *,
    beta: float,
    L: Tensor,
    Gamma: Tensor,
    sigma: float,
    eps_tau: float,
    eps_xi: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The rule of :func:`adaptive_step_size` from :math:`g^\\top d`, :math:`\\|d\\|^2`,
    :math:`g^\\top d + \\|d\\|^2` and the model's decrease of the ℓ1 violation (:math:`\\|c\\|_1` when
    :math:`Jd = -c`)."""
    inf = torch.full_like(gd, math.inf)
    tau_trial = torch.where(denom > 0, (1.0 - sigma) * c1 / torch.where(denom > 0, denom, 1.0), inf)
    tau_new = torch.where(tau > tau_trial, torch.minimum((1.0 - eps_tau) * tau, tau_trial), tau)
    dl = -tau_new * gd + c1
    safe_dd = torch.where(dd > 0, dd, 1.0)
    xi_trial = dl / (tau_new * safe_dd)
    xi_new = torch.where(xi > xi_trial, torch.minimum((1.0 - eps_xi) * xi, xi_trial), xi)
    scale = tau_new * L + Gamma
    a_hat = beta * xi_new * tau_new / scale
    a_tilde = a_hat - 4.0 * c1 / (scale * safe_dd)
    alpha = torch.where(a_hat < 1, a_hat, torch.where(a_tilde > 1, a_tilde, torch.ones_like(a_hat)))
    moving = dd > 0
    return torch.where(moving, alpha, 0.0), torch.where(moving, tau_new, tau), torch.where(moving, xi_new, xi)
