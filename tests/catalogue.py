"""Small smooth equality-constrained problems with known solutions.

Most are from Hock & Schittkowski, *Test Examples for Nonlinear Programming Codes* (1981); the rest have
closed-form solutions. Each gives f(x), c(x) (torch, float64), a starting point and the solution x*. The tests
also solve each with scipy's SLSQP from the same start, so a transcription error in a solution cannot pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

T = torch.Tensor


@dataclass(frozen=True)
class Case:
    name: str
    f: Callable[[T], T]
    c: Callable[[T], T]
    x0: tuple[float, ...]
    x_star: tuple[float, ...]
    sign_symmetric: bool = False  # f and c are even: -x* is a solution too

    def error(self, x: T) -> float:
        ref = torch.tensor(self.x_star, dtype=x.dtype)
        err = (x - ref).abs().max().item()
        return min(err, (x + ref).abs().max().item()) if self.sign_symmetric else err


_A = torch.tensor([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 1.0]], dtype=torch.float64)
_eig_val, _eig_vec = torch.linalg.eigh(_A)
_v = _eig_vec[:, 0] * torch.sign(_eig_vec[0, 0])  # smallest eigenvector, sign fixed: positive first entry
_a = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)

CASES = [
    Case(
        "circle_linear",
        lambda x: x[0] + x[1],
        lambda x: (x[0] ** 2 + x[1] ** 2 - 2).reshape(1),
        (-1.2, -0.6),
        (-1.0, -1.0),
    ),
    Case("hs006", lambda x: (1 - x[0]) ** 2, lambda x: (10 * (x[1] - x[0] ** 2)).reshape(1), (-1.2, 1.0), (1.0, 1.0)),
    Case(
        "hs007",
        lambda x: torch.log(1 + x[0] ** 2) - x[1],
        lambda x: ((1 + x[0] ** 2) ** 2 + x[1] ** 2 - 4).reshape(1),
        (0.5, 1.5),
        (0.0, math.sqrt(3.0)),
    ),
    Case(
        "hs028",
        lambda x: (x[0] + x[1]) ** 2 + (x[1] + x[2]) ** 2,
        lambda x: (x[0] + 2 * x[1] + 3 * x[2] - 1).reshape(1),
        (-4.0, 1.0, 1.0),
        (0.5, -0.5, 0.5),
    ),
    Case(
        "hs027",
        lambda x: 0.01 * (x[0] - 1) ** 2 + (x[1] - x[0] ** 2) ** 2,
        lambda x: (x[0] + x[2] ** 2 + 1).reshape(1),
        (-1.2, 1.3, 0.3),
        (-1.0, 1.0, 0.0),
    ),
    Case(
        "hs039",
        lambda x: -x[0],
        lambda x: torch.stack([x[1] - x[0] ** 3 - x[2] ** 2, x[0] ** 2 - x[1] - x[3] ** 2]),
        (1.2, 1.1, 0.2, 0.2),
        (1.0, 1.0, 0.0, 0.0),
    ),
    Case(
        "hs040",
        lambda x: -x[0] * x[1] * x[2] * x[3],
        lambda x: torch.stack([x[0] ** 3 + x[1] ** 2 - 1, x[0] ** 2 * x[3] - x[2], x[3] ** 2 - x[1]]),
        (0.8, 0.8, 0.5, 0.8),
        (2 ** (-1 / 3), 2 ** (-1 / 2), 2 ** (-11 / 12), 2 ** (-1 / 4)),
    ),
    Case(
        "hs061",
        lambda x: 4 * x[0] ** 2 + 2 * x[1] ** 2 + 2 * x[2] ** 2 - 33 * x[0] + 16 * x[1] - 24 * x[2],
        lambda x: torch.stack([3 * x[0] - 2 * x[1] ** 2 - 7, 4 * x[0] - x[2] ** 2 - 11]),
        (5.0, -2.0, 3.0),
        (5.32677015744, -2.11899863998, 3.21046423906),
    ),
    Case(
        "hs048",
        lambda x: (x[0] - 1) ** 2 + (x[1] - x[2]) ** 2 + (x[3] - x[4]) ** 2,
        lambda x: torch.stack([x.sum() - 5, x[2] - 2 * (x[3] + x[4]) + 3]),
        (3.0, 5.0, -3.0, 2.0, -2.0),
        (1.0, 1.0, 1.0, 1.0, 1.0),
    ),
    Case(
        "rayleigh_quotient",
        lambda x: x @ _A @ x,
        lambda x: (x @ x - 1).reshape(1),
        (0.3, -0.5, 0.9),
        tuple(_v.tolist()),
        sign_symmetric=True,
    ),
    Case(
        "sphere_projection",
        lambda x: ((x - _a) ** 2).sum(),
        lambda x: (x @ x - 1).reshape(1),
        (0.2, 0.1, 0.9),
        tuple((_a / _a.norm()).tolist()),
    ),
]
