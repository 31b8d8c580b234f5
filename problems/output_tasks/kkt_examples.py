r"""E1–E3: the illustrative examples of KKT-Hardnet (Iftakher et al., "Physics-Informed Neural Networks with Hard
Nonlinear Equality and Inequality Constraints", Sec. 3.1–3.3).

E1 (``kkt_e1``), nonlinear in input and output: :math:`x \sim U(1, 2)`,

.. math::
    y(x) = (8x^3 + 5,\ 2x - 1), \qquad h(x, y) = y_1 - y_2^3 - 12x^2 + 6x - 6 = 0

(the data satisfy :math:`h = 0` exactly: :math:`(2x - 1)^3 = 8x^3 - 12x^2 + 6x - 1`). Network 1-64-64-2.

E2 (``kkt_e2``), nonlinear in the input only (affine in y): :math:`x \sim U([1, 2]^2)`,

.. math::
    y(x) = (x_1^2 + x_2^2,\ 4x_1^2 + 4x_2^3 - 2x_2^2), \qquad h(x, y) = y_1 + \tfrac12 y_2 - 3x_1^2 - 2x_2^3 = 0.

Network 2-64-64-2.

E3 (``kkt_e3``), an inequality that every data point violates: :math:`x \sim U(1, 2)`, :math:`y = x^2`,
:math:`g(x, y) = y - x \le 0`. The best feasible predictor is :math:`y = x` (pointwise
:math:`\arg\min_{y \le x} (y - x^2)^2`), whose MSE under :math:`x \sim U(1, 2)` is
:math:`\int_1^2 (x^2 - x)^2\,dx = 31/30` (:data:`E3_BEST_FEASIBLE_MSE`): no feasible model does better in
expectation (the paper's KKT-Hardnet: 1.059 training, 0.986 validation). Network 1-64-64-1.

Settings (paper): 1200 training / 300 validation points, ReLU, Adam lr 1e-4, 1200 epochs, PINN weight ω = 100
(E1, E2). Inputs and outputs are fed raw (no scaling), as in the paper.

Notes and deviations
--------------------
* The paper gives the data size for E1 and E3 only (E3 draws 1,500 points and splits 1,200/300); E2 uses the
  same. It does not give the batch size; its MLP errors at lr 1e-4 after 1,200 epochs (E1: MSE 136) fit
  full-batch training, so the paper's budget is 1,200 full-batch iterations here. Mini-batch runs draw 64
  points.
* The PINN weight of E3 is not stated; ω = 100 as in E1 and E2.
* Training-time methods impose h = 0 at the first 100 training inputs (size "paper"; 50 "small", 8 "tiny").
  E3 has no equalities: ``constraints`` is empty there.
* Data: ``numpy.random.default_rng`` with seeds 1, 2, 3 (E1, E2, E3); sizes "small" (300/100) and "tiny"
  (48/16) are prefixes of the same stream.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sqpoptim.layers import OutputConstraints

from ..core.problem import ProblemDefaults
from .regression import OutputRegression

__all__ = [
    "E3_BEST_FEASIBLE_MSE",
    "KKTExample1",
    "KKTExample2",
    "KKTExample3",
    "e1_target",
    "e2_target",
]

E3_BEST_FEASIBLE_MSE = 31.0 / 30.0
_SIZES = {"paper": (1200, 300), "small": (300, 100), "tiny": (48, 16)}
_CONSTRAINT_POINTS = {"paper": 100, "small": 50, "tiny": 8}


def _defaults(extra: dict[str, object]) -> ProblemDefaults:
    return ProblemDefaults(
        lrs=(1e-4,),
        iterations_full=1200,
        iterations_mini=1200,
        quick_iterations=1200,
        extra={
            "data": "1200 train / 300 validation (paper size)",
            "network": "ReLU MLP, 2 hidden layers of 64",
            "mini_batch": 64,
            "constraint_points": _CONSTRAINT_POINTS,
            "soft_rho": 100.0,
            **extra,
        },
    )


def e1_target(x: np.ndarray) -> np.ndarray:
    """E1's ground truth ``[n, 2]`` at ``x`` ``[n, 1]``."""
    return np.concatenate([8 * x**3 + 5, 2 * x - 1], axis=1)


def e2_target(x: np.ndarray) -> np.ndarray:
    """E2's ground truth ``[n, 2]`` at ``x`` ``[n, 2]``."""
    x1, x2 = x[:, :1], x[:, 1:]
    return np.concatenate([x1**2 + x2**2, 4 * x1**2 + 4 * x2**3 - 2 * x2**2], axis=1)


# Closed-form Jacobians and Lagrangian Hessians: the layers would otherwise form them with torch.func every
# iteration (the tests compare the two).
def _h1(x: Tensor, y: Tensor) -> Tensor:
    return y[:, :1] - y[:, 1:2] ** 3 - 12 * x**2 + 6 * x - 6  # [B, 1]


def _h1_jac(x: Tensor, y: Tensor) -> Tensor:
    return torch.stack([torch.ones_like(y[:, 0]), -3 * y[:, 1] ** 2], dim=-1).unsqueeze(1)  # [B, 1, 2]


def _h1_hessian(x: Tensor, y: Tensor, w_h: Tensor | None, w_g: Tensor | None) -> Tensor:
    zero = torch.zeros_like(y[:, 0])
    d22 = -6 * y[:, 1] * w_h[:, 0]
    return torch.stack([zero, zero, zero, d22], dim=-1).reshape(-1, 2, 2)  # [B, 2, 2]


def _h2(x: Tensor, y: Tensor) -> Tensor:
    return y[:, :1] + 0.5 * y[:, 1:2] - 3 * x[:, :1] ** 2 - 2 * x[:, 1:2] ** 3  # [B, 1]


def _h2_jac(x: Tensor, y: Tensor) -> Tensor:
    return y.new_tensor([[1.0, 0.5]]).expand(y.shape[0], 1, 2)  # [B, 1, 2]


def _g3(x: Tensor, y: Tensor) -> Tensor:
    return y - x  # [B, 1], <= 0


def _g3_jac(x: Tensor, y: Tensor) -> Tensor:
    return torch.ones_like(y).unsqueeze(-1)  # [B, 1, 1]


def _zero_hessian(x: Tensor, y: Tensor, w_h: Tensor | None, w_g: Tensor | None) -> Tensor:
    return y.new_zeros(y.shape[0], y.shape[1], y.shape[1])  # constraints affine in y


class KKTExample1(OutputRegression):
    """E1: y = (8x³ + 5, 2x − 1) under y₁ − y₂³ − 12x² + 6x − 6 = 0 (module docstring)."""

    name = "kkt_e1"
    defaults = _defaults({"example": "E1", "constraint": "y1 - y2^3 - 12x^2 + 6x - 6 = 0"})
    layers = (1, 64, 64, 2)
    sizes = _SIZES
    constraint_points = _CONSTRAINT_POINTS
    soft_rho = 100.0

    def generate(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.random.default_rng(1).uniform(1.0, 2.0, size=(n, 1))
        return x, e1_target(x)

    def make_constraints(self) -> OutputConstraints:
        return OutputConstraints(h=_h1, h_jac=_h1_jac, lagrangian_hessian=_h1_hessian)


class KKTExample2(OutputRegression):
    """E2: y = (x₁² + x₂², 4x₁² + 4x₂³ − 2x₂²) under y₁ + ½y₂ = 3x₁² + 2x₂³ (module docstring)."""

    name = "kkt_e2"
    defaults = _defaults({"example": "E2", "constraint": "y1 + y2/2 - 3 x1^2 - 2 x2^3 = 0"})
    layers = (2, 64, 64, 2)
    sizes = _SIZES
    constraint_points = _CONSTRAINT_POINTS
    soft_rho = 100.0

    def generate(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.random.default_rng(2).uniform(1.0, 2.0, size=(n, 2))
        return x, e2_target(x)

    def make_constraints(self) -> OutputConstraints:
        return OutputConstraints(h=_h2, h_jac=_h2_jac, lagrangian_hessian=_zero_hessian)


class KKTExample3(OutputRegression):
    """E3: y = x² under y ≤ x, which every data point violates (module docstring)."""

    name = "kkt_e3"
    defaults = _defaults({"example": "E3", "constraint": "y - x <= 0", "best_feasible_mse": E3_BEST_FEASIBLE_MSE})
    layers = (1, 64, 64, 1)
    sizes = _SIZES
    constraint_points = _CONSTRAINT_POINTS
    soft_rho = 100.0

    def generate(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.random.default_rng(3).uniform(1.0, 2.0, size=(n, 1))
        return x, x**2

    def make_constraints(self) -> OutputConstraints:
        return OutputConstraints(g=_g3, g_jac=_g3_jac, lagrangian_hessian=_zero_hessian)
