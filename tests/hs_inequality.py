"""Hock–Schittkowski problems with inequality constraints, in the package's convention c_I(x) <= 0.

Transcribed from W. Hock and K. Schittkowski, *Test Examples for Nonlinear Programming Codes*, Lecture Notes in
Economics and Mathematical Systems 187, Springer 1981 (problem numbers as there). The book writes inequalities
g(x) >= 0; here they are c = -g <= 0, and bounds l <= x <= u are the inequalities l - x <= 0, x - u <= 0. Each
problem gives f, the equalities, the inequalities, the book's start x0, its solution x* and optimal value f*.
``tests/test_hs_inequality.py`` checks every transcription against scipy (SLSQP and trust-constr reach f* from
near x*, and x* is feasible with f(x*) = f*), so a transcription error cannot pass silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

T = torch.Tensor


def _none(x: T) -> T:
    return x.new_zeros(0)


def _bounds(lower: dict[int, float], upper: dict[int, float]) -> Callable[[T], list[T]]:
    def rows(x: T) -> list[T]:
        return [lo - x[i] for i, lo in lower.items()] + [x[i] - up for i, up in upper.items()]

    return rows


@dataclass(frozen=True)
class HSProblem:
    number: int
    f: Callable[[T], T]
    eq: Callable[[T], T]
    ineq: Callable[[T], T]
    x0: tuple[float, ...]
    x_star: tuple[float, ...]
    f_star: float

    @property
    def name(self) -> str:
        return f"hs{self.number:03d}"

    def violation(self, x: T) -> float:
        ce, ci = self.eq(x), self.ineq(x)
        v = [ce.abs().max().item()] if ce.numel() else []
        v += [ci.clamp_min(0).max().item()] if ci.numel() else []
        return max(v, default=0.0)


def _stack(*parts: list[T] | T) -> T:
    rows: list[T] = []
    for p in parts:
        rows.extend(p if isinstance(p, list) else [p])
    return torch.stack(rows)


def _rosenbrock(x: T) -> T:
    return 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2


_SQ3 = math.sqrt(3.0)

PROBLEMS = [
    HSProblem(1, _rosenbrock, _none, lambda x: _stack(_bounds({1: -1.5}, {})(x)), (-2.0, 1.0), (1.0, 1.0), 0.0),
    HSProblem(
        2,
        _rosenbrock,
        _none,
        lambda x: _stack(_bounds({1: 1.5}, {})(x)),
        (-2.0, 1.0),
        (1.2243707487363527, 1.5),
        0.0504261879,
    ),
    HSProblem(
        3,
        lambda x: x[1] + 1e-5 * (x[1] - x[0]) ** 2,
        _none,
        lambda x: _stack(_bounds({1: 0.0}, {})(x)),
        (10.0, 1.0),
        (0.0, 0.0),
        0.0,
    ),
    HSProblem(
        4,
        lambda x: (x[0] + 1) ** 3 / 3 + x[1],
        _none,
        lambda x: _stack(_bounds({0: 1.0, 1: 0.0}, {})(x)),
        (1.125, 0.125),
        (1.0, 0.0),
        8.0 / 3.0,
    ),
    HSProblem(
        5,
        lambda x: torch.sin(x[0] + x[1]) + (x[0] - x[1]) ** 2 - 1.5 * x[0] + 2.5 * x[1] + 1,
        _none,
        lambda x: _stack(_bounds({0: -1.5, 1: -3.0}, {0: 4.0, 1: 3.0})(x)),
        (0.0, 0.0),
        (-math.pi / 3 + 0.5, -math.pi / 3 - 0.5),
        -_SQ3 / 2 - math.pi / 3,
    ),
    HSProblem(
        10,
        lambda x: x[0] - x[1],
        _none,
        lambda x: _stack(3 * x[0] ** 2 - 2 * x[0] * x[1] + x[1] ** 2 - 1),
        (-10.0, 10.0),
        (0.0, 1.0),
        -1.0,
    ),
    HSProblem(
        11,
        lambda x: (x[0] - 5) ** 2 + x[1] ** 2 - 25,
        _none,
        lambda x: _stack(x[0] ** 2 - x[1]),
        (4.9, 0.1),
        (1.2348, 1.5247),
        -8.498464223,
    ),
    HSProblem(
        12,
        lambda x: 0.5 * x[0] ** 2 + x[1] ** 2 - x[0] * x[1] - 7 * x[0] - 7 * x[1],
        _none,
        lambda x: _stack(4 * x[0] ** 2 + x[1] ** 2 - 25),
        (0.0, 0.0),
        (2.0, 3.0),
        -30.0,
    ),
    HSProblem(
        14,
        lambda x: (x[0] - 2) ** 2 + (x[1] - 1) ** 2,
        lambda x: _stack(x[0] - 2 * x[1] + 1),
        lambda x: _stack(x[0] ** 2 / 4 + x[1] ** 2 - 1),
        (2.0, 2.0),
        (0.5 * (math.sqrt(7) - 1), 0.25 * (math.sqrt(7) + 1)),
        9 - 23 * math.sqrt(7) / 8,
    ),
    HSProblem(
        15,
        _rosenbrock,
        _none,
        lambda x: _stack(1 - x[0] * x[1], -x[0] - x[1] ** 2, _bounds({}, {0: 0.5})(x)),
        (-2.0, 1.0),
        (0.5, 2.0),
        306.5,
    ),
    HSProblem(
        16,
        _rosenbrock,
        _none,
        lambda x: _stack(-x[0] - x[1] ** 2, -(x[0] ** 2) - x[1], _bounds({0: -0.5}, {0: 0.5, 1: 1.0})(x)),
        (-2.0, 1.0),
        (0.5, 0.25),
        0.25,
    ),
    HSProblem(
        17,
        _rosenbrock,
        _none,
        lambda x: _stack(x[0] - x[1] ** 2, x[1] - x[0] ** 2, _bounds({0: -0.5}, {0: 0.5, 1: 1.0})(x)),
        (-2.0, 1.0),
        (0.0, 0.0),
        1.0,
    ),
    HSProblem(
        18,
        lambda x: 0.01 * x[0] ** 2 + x[1] ** 2,
        _none,
        lambda x: _stack(
            25 - x[0] * x[1], 25 - x[0] ** 2 - x[1] ** 2, _bounds({0: 2.0, 1: 0.0}, {0: 50.0, 1: 50.0})(x)
        ),
        (2.0, 2.0),
        (math.sqrt(250), math.sqrt(2.5)),
        5.0,
    ),
    HSProblem(
        19,
        lambda x: (x[0] - 10) ** 3 + (x[1] - 20) ** 3,
        _none,
        lambda x: _stack(
            100 - (x[0] - 5) ** 2 - (x[1] - 5) ** 2,
            (x[1] - 5) ** 2 + (x[0] - 6) ** 2 - 82.81,
            _bounds({0: 13.0, 1: 0.0}, {0: 100.0, 1: 100.0})(x),
        ),
        (20.1, 5.84),
        (14.095, 0.84296079),
        -6961.81381,
    ),
    HSProblem(
        20,
        _rosenbrock,
        _none,
        lambda x: _stack(
            -x[0] - x[1] ** 2, -(x[0] ** 2) - x[1], 1 - x[0] ** 2 - x[1] ** 2, _bounds({0: -0.5}, {0: 0.5})(x)
        ),
        (-2.0, 1.0),
        (0.5, 0.5 * _SQ3),
        81.5 - 25 * _SQ3,
    ),
    HSProblem(
        21,
        lambda x: 0.01 * x[0] ** 2 + x[1] ** 2 - 100,
        _none,
        lambda x: _stack(10 - 10 * x[0] + x[1], _bounds({0: 2.0, 1: -50.0}, {0: 50.0, 1: 50.0})(x)),
        (-1.0, -1.0),
        (2.0, 0.0),
        -99.96,
    ),
    HSProblem(
        22,
        lambda x: (x[0] - 2) ** 2 + (x[1] - 1) ** 2,
        _none,
        lambda x: _stack(x[0] + x[1] - 2, x[0] ** 2 - x[1]),
        (2.0, 2.0),
        (1.0, 1.0),
        1.0,
    ),
    HSProblem(
        23,
        lambda x: x[0] ** 2 + x[1] ** 2,
        _none,
        lambda x: _stack(
            1 - x[0] - x[1],
            1 - x[0] ** 2 - x[1] ** 2,
            9 - 9 * x[0] ** 2 - x[1] ** 2,
            x[1] - x[0] ** 2,
            x[0] - x[1] ** 2,
            _bounds({0: -50.0, 1: -50.0}, {0: 50.0, 1: 50.0})(x),
        ),
        (3.0, 1.0),
        (1.0, 1.0),
        2.0,
    ),
    HSProblem(
        24,
        lambda x: ((x[0] - 3) ** 2 - 9) * x[1] ** 3 / (27 * _SQ3),
        _none,
        lambda x: _stack(
            x[1] - x[0] / _SQ3, -x[0] - _SQ3 * x[1], x[0] + _SQ3 * x[1] - 6, _bounds({0: 0.0, 1: 0.0}, {})(x)
        ),
        (1.0, 0.5),
        (3.0, _SQ3),
        -1.0,
    ),
    HSProblem(
        29,
        lambda x: -x[0] * x[1] * x[2],
        _none,
        lambda x: _stack(x[0] ** 2 + 2 * x[1] ** 2 + 4 * x[2] ** 2 - 48),
        (1.0, 1.0, 1.0),
        (4.0, 2 * math.sqrt(2), 2.0),
        -16 * math.sqrt(2),
    ),
    HSProblem(
        30,
        lambda x: (x**2).sum(),
        _none,
        lambda x: _stack(
            1 - x[0] ** 2 - x[1] ** 2, _bounds({0: 1.0, 1: -10.0, 2: -10.0}, {0: 10.0, 1: 10.0, 2: 10.0})(x)
        ),
        (1.0, 1.0, 1.0),
        (1.0, 0.0, 0.0),
        1.0,
    ),
    HSProblem(
        31,
        lambda x: 9 * x[0] ** 2 + x[1] ** 2 + 9 * x[2] ** 2,
        _none,
        lambda x: _stack(1 - x[0] * x[1], _bounds({0: -10.0, 1: 1.0, 2: -10.0}, {0: 10.0, 1: 10.0, 2: 1.0})(x)),
        (1.0, 1.0, 1.0),
        (1 / _SQ3, _SQ3, 0.0),
        6.0,
    ),
    HSProblem(
        32,
        lambda x: (x[0] + 3 * x[1] + x[2]) ** 2 + 4 * (x[0] - x[1]) ** 2,
        lambda x: _stack(1 - x[0] - x[1] - x[2]),
        lambda x: _stack(x[0] ** 3 - 6 * x[1] - 4 * x[2] + 3, _bounds({0: 0.0, 1: 0.0, 2: 0.0}, {})(x)),
        (0.1, 0.7, 0.2),
        (0.0, 0.0, 1.0),
        1.0,
    ),
    HSProblem(
        33,
        lambda x: (x[0] - 1) * (x[0] - 2) * (x[0] - 3) + x[2],
        _none,
        lambda x: _stack(
            x[0] ** 2 + x[1] ** 2 - x[2] ** 2,
            4 - x[0] ** 2 - x[1] ** 2 - x[2] ** 2,
            _bounds({0: 0.0, 1: 0.0, 2: 0.0}, {2: 5.0})(x),
        ),
        (0.0, 0.0, 3.0),
        (0.0, math.sqrt(2), math.sqrt(2)),
        math.sqrt(2) - 6,
    ),
    HSProblem(
        34,
        lambda x: -x[0],
        _none,
        lambda x: _stack(
            torch.exp(x[0]) - x[1],
            torch.exp(x[1]) - x[2],
            _bounds({0: 0.0, 1: 0.0, 2: 0.0}, {0: 100.0, 1: 100.0, 2: 10.0})(x),
        ),
        (0.0, 1.05, 2.9),
        (math.log(math.log(10)), math.log(10), 10.0),
        -math.log(math.log(10)),
    ),
    HSProblem(
        35,
        lambda x: (
            9
            - 8 * x[0]
            - 6 * x[1]
            - 4 * x[2]
            + 2 * x[0] ** 2
            + 2 * x[1] ** 2
            + x[2] ** 2
            + 2 * x[0] * x[1]
            + 2 * x[0] * x[2]
        ),
        _none,
        lambda x: _stack(x[0] + x[1] + 2 * x[2] - 3, _bounds({0: 0.0, 1: 0.0, 2: 0.0}, {})(x)),
        (0.5, 0.5, 0.5),
        (4 / 3, 7 / 9, 4 / 9),
        1 / 9,
    ),
    HSProblem(
        36,
        lambda x: -x[0] * x[1] * x[2],
        _none,
        lambda x: _stack(
            x[0] + 2 * x[1] + 2 * x[2] - 72,
            _bounds({0: 0.0, 1: 0.0, 2: 0.0}, {0: 20.0, 1: 11.0, 2: 42.0})(x),
        ),
        (10.0, 10.0, 10.0),
        (20.0, 11.0, 15.0),
        -3300.0,
    ),
    HSProblem(
        37,
        lambda x: -x[0] * x[1] * x[2],
        _none,
        lambda x: _stack(
            x[0] + 2 * x[1] + 2 * x[2] - 72,
            -x[0] - 2 * x[1] - 2 * x[2],
            _bounds({0: 0.0, 1: 0.0, 2: 0.0}, {0: 42.0, 1: 42.0, 2: 42.0})(x),
        ),
        (10.0, 10.0, 10.0),
        (24.0, 12.0, 12.0),
        -3456.0,
    ),
    HSProblem(
        38,
        lambda x: (
            100 * (x[1] - x[0] ** 2) ** 2
            + (1 - x[0]) ** 2
            + 90 * (x[3] - x[2] ** 2) ** 2
            + (1 - x[2]) ** 2
            + 10.1 * ((x[1] - 1) ** 2 + (x[3] - 1) ** 2)
            + 19.8 * (x[1] - 1) * (x[3] - 1)
        ),
        _none,
        lambda x: _stack(_bounds(dict.fromkeys(range(4), -10.0), dict.fromkeys(range(4), 10.0))(x)),
        (-3.0, -1.0, -3.0, -1.0),
        (1.0, 1.0, 1.0, 1.0),
        0.0,
    ),
    HSProblem(
        41,
        lambda x: 2 - x[0] * x[1] * x[2],
        lambda x: _stack(x[0] + 2 * x[1] + 2 * x[2] - x[3]),
        lambda x: _stack(_bounds(dict.fromkeys(range(4), 0.0), {0: 1.0, 1: 1.0, 2: 1.0, 3: 2.0})(x)),
        (2.0, 2.0, 2.0, 2.0),
        (2 / 3, 1 / 3, 1 / 3, 2.0),
        52 / 27,
    ),
    HSProblem(
        43,
        lambda x: x[0] ** 2 + x[1] ** 2 + 2 * x[2] ** 2 + x[3] ** 2 - 5 * x[0] - 5 * x[1] - 21 * x[2] + 7 * x[3],
        _none,
        lambda x: _stack(
            x[0] ** 2 + x[1] ** 2 + x[2] ** 2 + x[3] ** 2 + x[0] - x[1] + x[2] - x[3] - 8,
            x[0] ** 2 + 2 * x[1] ** 2 + x[2] ** 2 + 2 * x[3] ** 2 - x[0] - x[3] - 10,
            2 * x[0] ** 2 + x[1] ** 2 + x[2] ** 2 + 2 * x[0] - x[1] - x[3] - 5,
        ),
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 1.0, 2.0, -1.0),
        -44.0,
    ),
    HSProblem(
        44,
        lambda x: x[0] - x[1] - x[2] - x[0] * x[2] + x[0] * x[3] + x[1] * x[2] - x[1] * x[3],
        _none,
        lambda x: _stack(
            x[0] + 2 * x[1] - 8,
            4 * x[0] + x[1] - 12,
            3 * x[0] + 4 * x[1] - 12,
            2 * x[2] + x[3] - 8,
            x[2] + 2 * x[3] - 8,
            x[2] + x[3] - 5,
            _bounds(dict.fromkeys(range(4), 0.0), {})(x),
        ),
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 3.0, 0.0, 4.0),
        -15.0,
    ),
    HSProblem(
        45,
        lambda x: 2 - x[0] * x[1] * x[2] * x[3] * x[4] / 120,
        _none,
        lambda x: _stack(_bounds(dict.fromkeys(range(5), 0.0), {i: float(i + 1) for i in range(5)})(x)),
        (2.0, 2.0, 2.0, 2.0, 2.0),
        (1.0, 2.0, 3.0, 4.0, 5.0),
        1.0,
    ),
    HSProblem(
        65,
        lambda x: (x[0] - x[1]) ** 2 + (x[0] + x[1] - 10) ** 2 / 9 + (x[2] - 5) ** 2,
        _none,
        lambda x: _stack(
            x[0] ** 2 + x[1] ** 2 + x[2] ** 2 - 48,
            _bounds({0: -4.5, 1: -4.5, 2: -5.0}, {0: 4.5, 1: 4.5, 2: 5.0})(x),
        ),
        (-5.0, 5.0, 0.0),
        (3.650461821, 3.65046168, 4.6204170507),
        0.9535288567,
    ),
    HSProblem(
        66,
        lambda x: 0.2 * x[2] - 0.8 * x[0],
        _none,
        lambda x: _stack(
            torch.exp(x[0]) - x[1],
            torch.exp(x[1]) - x[2],
            _bounds({0: 0.0, 1: 0.0, 2: 0.0}, {0: 100.0, 1: 100.0, 2: 10.0})(x),
        ),
        (0.0, 1.05, 2.9),
        (0.1841264879, 1.202167873, 3.327322322),
        0.5181632741,
    ),
    HSProblem(
        71,
        lambda x: x[0] * x[3] * (x[0] + x[1] + x[2]) + x[2],
        lambda x: _stack((x**2).sum() - 40),
        lambda x: _stack(
            25 - x[0] * x[1] * x[2] * x[3],
            _bounds(dict.fromkeys(range(4), 1.0), dict.fromkeys(range(4), 5.0))(x),
        ),
        (1.0, 5.0, 5.0, 1.0),
        (1.0, 4.7429994, 3.8211503, 1.3794082),
        17.0140173,
    ),
    HSProblem(
        76,
        lambda x: (
            x[0] ** 2
            + 0.5 * x[1] ** 2
            + x[2] ** 2
            + 0.5 * x[3] ** 2
            - x[0] * x[2]
            + x[2] * x[3]
            - x[0]
            - 3 * x[1]
            + x[2]
            - x[3]
        ),
        _none,
        lambda x: _stack(
            x[0] + 2 * x[1] + x[2] + x[3] - 5,
            3 * x[0] + x[1] + 2 * x[2] - x[3] - 4,
            1.5 - x[1] - 4 * x[2],
            _bounds(dict.fromkeys(range(4), 0.0), {})(x),
        ),
        (0.5, 0.5, 0.5, 0.5),
        (0.2727273, 2.090909, 0.0, 0.5454545),
        -4.681818181,
    ),
    HSProblem(
        100,
        lambda x: (
            (x[0] - 10) ** 2
            + 5 * (x[1] - 12) ** 2
            + x[2] ** 4
            + 3 * (x[3] - 11) ** 2
            + 10 * x[4] ** 6
            + 7 * x[5] ** 2
            + x[6] ** 4
            - 4 * x[5] * x[6]
            - 10 * x[5]
            - 8 * x[6]
        ),
        _none,
        lambda x: _stack(
            2 * x[0] ** 2 + 3 * x[1] ** 4 + x[2] + 4 * x[3] ** 2 + 5 * x[4] - 127,
            7 * x[0] + 3 * x[1] + 10 * x[2] ** 2 + x[3] - x[4] - 282,
            23 * x[0] + x[1] ** 2 + 6 * x[5] ** 2 - 8 * x[6] - 196,
            4 * x[0] ** 2 + x[1] ** 2 - 3 * x[0] * x[1] + 2 * x[2] ** 2 + 5 * x[5] - 11 * x[6],
        ),
        (1.0, 2.0, 0.0, 4.0, 0.0, 1.0, 1.0),
        (2.330499, 1.951372, -0.4775414, 4.365726, -0.6244870, 1.038131, 1.594227),
        680.6300573,
    ),
    HSProblem(
        113,
        lambda x: (
            x[0] ** 2
            + x[1] ** 2
            + x[0] * x[1]
            - 14 * x[0]
            - 16 * x[1]
            + (x[2] - 10) ** 2
            + 4 * (x[3] - 5) ** 2
            + (x[4] - 3) ** 2
            + 2 * (x[5] - 1) ** 2
            + 5 * x[6] ** 2
            + 7 * (x[7] - 11) ** 2
            + 2 * (x[8] - 10) ** 2
            + (x[9] - 7) ** 2
            + 45
        ),
        _none,
        lambda x: _stack(
            4 * x[0] + 5 * x[1] - 3 * x[6] + 9 * x[7] - 105,
            10 * x[0] - 8 * x[1] - 17 * x[6] + 2 * x[7],
            -8 * x[0] + 2 * x[1] + 5 * x[8] - 2 * x[9] - 12,
            3 * (x[0] - 2) ** 2 + 4 * (x[1] - 3) ** 2 + 2 * x[2] ** 2 - 7 * x[3] - 120,
            5 * x[0] ** 2 + 8 * x[1] + (x[2] - 6) ** 2 - 2 * x[3] - 40,
            0.5 * (x[0] - 8) ** 2 + 2 * (x[1] - 4) ** 2 + 3 * x[4] ** 2 - x[5] - 30,
            x[0] ** 2 + 2 * (x[1] - 2) ** 2 - 2 * x[0] * x[1] + 14 * x[4] - 6 * x[5],
            -3 * x[0] + 6 * x[1] + 12 * (x[8] - 8) ** 2 - 7 * x[9],
        ),
        (2.0, 3.0, 5.0, 5.0, 1.0, 2.0, 7.0, 3.0, 6.0, 10.0),
        (2.171996, 2.363683, 8.773926, 5.095984, 0.9906548, 1.430574, 1.321644, 9.828726, 8.280092, 8.375927),
        24.3062091,
    ),
]
