r"""E4: the Haverly pooling surrogate of KKT-Hardnet (Iftakher et al., "Physics-Informed Neural Networks with Hard
Nonlinear Equality and Inequality Constraints", Sec. 3.5).

Feeds A (3 % sulfur) and B (1 %) are pooled; the pool (sulfur content m %) is split into :math:`P_x, P_y`
and blended with feed C (2 %), split :math:`C_x, C_y`, into the products X (at most 2.5 % sulfur) and Y (at
most 1.5 %). Inputs :math:`(A, B, X, Y)`, outputs :math:`(m, P_x, P_y, C_x, C_y)`:

.. math::
    \begin{aligned}
    h_1 &= P_x + P_y - A - B = 0, & h_2 &= X - P_x - C_x = 0, & h_3 &= Y - P_y - C_y = 0, \\
    h_4 &= m P_x + m P_y - 3A - B = 0, & g_1 &= m P_x + 2 C_x - 2.5 X \le 0, & g_2 &= m P_y + 2 C_y - 1.5 Y \le 0.
    \end{aligned}

Data (generated here; the paper does not say how). The balances fix :math:`m = (3A + B)/(A + B)` and leave
one degree of freedom, the split :math:`P_x` (then :math:`P_y = A + B - P_x`, :math:`C_x = X - P_x`,
:math:`C_y = Y - P_y`). With :math:`C_x = X - P_x` the specifications read :math:`(m - 2) P_x \le X/2` and
:math:`(2 - m) P_y \ge Y/2`; asking also for non-negative flows, the feasible splits form the interval

.. math::
    P_x \in [\ell, u], \quad \ell = \max(0,\ A + B - Y), \quad
    u = \min\!\Big(X,\ A + B - \frac{Y}{2(2 - m)}\Big) \qquad (m < 2),

(for :math:`m < 2` the X specification holds for every :math:`P_x \ge 0`). **The split is the midpoint**
:math:`P_x = (\ell + u)/2`: a deterministic function of the inputs (so the task is a regression, not a fit of
noise) with the largest margin to the flow bounds and the Y specification. The inputs are drawn uniformly from
the paper's box :math:`A, B \in [0, 500]`, :math:`X \in [0, 100]`, :math:`Y \in [0, 200]` and kept when
:math:`m < 2` and :math:`u - \ell \ge 1` (a split interval of at least one flow unit), i.e. uniformly on that
part of the box; about 1 % of the draws are kept (``numpy.random.default_rng(4)``, in blocks, in order, so
smaller sizes are prefixes). Every point satisfies the four balances to rounding and both specifications
strictly.

Settings (paper and the authors' code): 2,000 points split 1,600 training / 400 validation, ReLU MLP
4-64-64-5, Adam lr 1e-3, 1,200 epochs of mini-batches of 64 (25 iterations per epoch: 30,000 iterations),
PINN weight ω = 1, unscaled data. KKT-Hardnet: 100 Newton steps (the paper also fixes the step to 0.5 and
γ = 1e-2; see the report on that layer's options). Paper Table 6 (validation): MLP MSE 67.758, violation
5.51e2; PINN 71.32, 2.94e1; KKT-Hardnet 92.257, 1.05e-5.

Notes and deviations
--------------------
* The paper's text has :math:`g_2 = m P_y + 2 C_y - 1.5 X`; the product Y's specification (and the authors'
  code) is :math:`1.5 Y`, used here.
* The authors' data (a CSV in their repository) have an MSE floor of about 50 for every model, which suggests
  a random split; ours is deterministic, so our MSE values are not comparable with Table 6 in absolute terms.
* The paper's warm start (train the MLP alone until its loss falls below η = 75, then switch the layer on)
  is the method option ``kkt-hardnet:eta=75`` (:mod:`problems.methods.layers`); without it the layer is on
  from the first step.
* Training-time methods impose the four balances at the first 50 training inputs (m = 200; "small" 25,
  "tiny" 4).
* Sizes: "paper" 1,600/400, "small" 400/100, "tiny" 40/10.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from sqpoptim.layers import OutputConstraints

from ..core.problem import ProblemDefaults
from .regression import OutputRegression

__all__ = [
    "Pooling",
    "pooling_data",
    "pooling_equalities",
    "pooling_hessian",
    "pooling_inequalities",
    "pooling_jacobians",
    "split_interval",
]

INPUT_BOX = ((0.0, 500.0), (0.0, 500.0), (0.0, 100.0), (0.0, 200.0))  # A, B, X, Y
MIN_SPLIT_WIDTH = 1.0
_SEED = 4


def pooling_equalities(x: Tensor, y: Tensor) -> Tensor:
    """The four balances ``[B, 4]`` at inputs ``(A, B, X, Y)`` and outputs ``(m, Px, Py, Cx, Cy)``."""
    a, b, xx, yy = x.unbind(-1)
    m, px, py, cx, cy = y.unbind(-1)
    return torch.stack([px + py - a - b, xx - px - cx, yy - py - cy, m * px + m * py - 3 * a - b], dim=-1)


def pooling_inequalities(x: Tensor, y: Tensor) -> Tensor:
    """The two product specifications ``[B, 2]`` (``<= 0``)."""
    _, _, xx, yy = x.unbind(-1)
    m, px, py, cx, cy = y.unbind(-1)
    return torch.stack([m * px + 2 * cx - 2.5 * xx, m * py + 2 * cy - 1.5 * yy], dim=-1)


def pooling_jacobians(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form Jacobians in y of the balances ``[B, 4, 5]`` and the specifications ``[B, 2, 5]``."""
    m, px, py, _, _ = y.unbind(-1)
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    jh = [[zero, one, one, zero, zero], [zero, -one, zero, -one, zero], [zero, zero, -one, zero, -one]]
    jh.append([px + py, m, m, zero, zero])
    jg = [[px, m, zero, 2 * one, zero], [py, zero, m, zero, 2 * one]]
    stack = lambda rows: torch.stack([torch.stack(r, dim=-1) for r in rows], dim=1)  # noqa: E731
    return stack(jh), stack(jg)


def pooling_hessian(x: Tensor, y: Tensor, w_h: Tensor, w_g: Tensor) -> Tensor:
    r""":math:`\sum_i w_{h,i}\nabla^2 h_i + \sum_j w_{g,j}\nabla^2 g_j` ``[B, 5, 5]``: only the products of m
    with the pool flows are curved (∂²/∂m∂P_x from h_4 and g_1, ∂²/∂m∂P_y from h_4 and g_2)."""
    a = w_h[:, 3] + w_g[:, 0]  # [B]: weight of m·P_x
    b = w_h[:, 3] + w_g[:, 1]  # [B]: weight of m·P_y
    H = y.new_zeros(y.shape[0], 5, 5)
    H[:, 0, 1], H[:, 1, 0], H[:, 0, 2], H[:, 2, 0] = a, a, b, b
    return H


def split_interval(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(m, lower, upper)`` of the feasible splits P_x at inputs ``x`` ``[n, 4]`` (module docstring); where
    ``m >= 2`` no split meets the Y specification and ``upper`` is ``-inf``."""
    a, b, xx, yy = x.T
    total = a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        m = (3 * a + b) / total
        y_spec = np.where(m < 2, total - yy / (2 * (2 - m)), -np.inf)
    lower = np.maximum(0.0, total - yy)
    upper = np.minimum(xx, y_spec)
    return m, lower, upper


def pooling_data(n: int, seed: int = _SEED, block: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """``n`` feasible points ``(x [n, 4], y [n, 5])``: inputs uniform on the feasible part of the box, midpoint
    split (module docstring)."""
    rng = np.random.default_rng(seed)
    lo, hi = np.array(INPUT_BOX).T
    kept: list[np.ndarray] = []
    count = 0
    while count < n:
        x = lo + (hi - lo) * rng.random((block, 4))
        m, lower, upper = split_interval(x)
        x = x[(m < 2) & (upper - lower >= MIN_SPLIT_WIDTH)]
        kept.append(x)
        count += len(x)
    x = np.concatenate(kept)[:n]
    m, lower, upper = split_interval(x)
    px = 0.5 * (lower + upper)
    a, b, xx, yy = x.T
    py = a + b - px
    y = np.stack([m, px, py, xx - px, yy - py], axis=1)
    return x, y


class Pooling(OutputRegression):
    """E4: predict the pool's sulfur content and the flows from (A, B, X, Y) (module docstring)."""

    name = "pooling"
    defaults = ProblemDefaults(
        lrs=(1e-3,),
        iterations_full=1200,
        iterations_mini=30_000,
        quick_iterations=2000,
        extra={
            "data": "1600 train / 400 validation (paper size), midpoint split, unscaled",
            "input_box": INPUT_BOX,
            "network": "ReLU MLP 4-64-64-5",
            "mini_batch": 64,
            "constraint_points": {"paper": 50, "small": 25, "tiny": 4},
            "soft_rho": 1.0,
        },
    )
    layers = (4, 64, 64, 5)
    sizes = MappingProxyType({"paper": (1600, 400), "small": (400, 100), "tiny": (40, 10)})
    constraint_points = MappingProxyType({"paper": 50, "small": 25, "tiny": 4})
    soft_rho = 1.0

    def data_params(self) -> dict[str, object]:
        return {"seed": _SEED, "box": INPUT_BOX, "min_split_width": MIN_SPLIT_WIDTH, "split": "midpoint"}

    def generate(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return pooling_data(n)

    def make_constraints(self) -> OutputConstraints:
        return OutputConstraints(
            h=pooling_equalities,
            g=pooling_inequalities,
            h_jac=lambda x, y: pooling_jacobians(x, y)[0],
            g_jac=lambda x, y: pooling_jacobians(x, y)[1],
            lagrangian_hessian=pooling_hessian,
        )
