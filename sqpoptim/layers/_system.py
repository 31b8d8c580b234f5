r"""The stacked constraints :math:`c = [h;\ g]` of one layer call, evaluated on any subset of the batch.

The iterative layers freeze samples that have converged and keep stepping the rest, so every evaluation takes
an index tensor ``idx`` (``None``: the whole batch) and evaluates the user's callables on ``x[idx]``,
``y[idx]`` only; rows are independent (``OutputConstraints`` convention), so a sub-batch costs in proportion
to its size. The bounds are computed once per call.

HardNet++'s residual and its active rows:

.. math::

    r = \begin{bmatrix} h \\ \mathrm{ReLU}(g - b_u) - \mathrm{ReLU}(b_l - g) \end{bmatrix}, \qquad
    \frac{\partial r}{\partial y} = A J_c, \quad A = \mathrm{diag}(a), \quad
    a_i = \begin{cases} 1 & \text{equality row} \\ [g_i > b_{u,i} \text{ or } g_i < b_{l,i}] & \text{inequality row}
    \end{cases}

(at :math:`g_i` exactly on a bound the one-sided derivative from the feasible side, 0, is taken).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import check_bounds, finite_or_raise
from ._constraints import ConstraintEvaluation, OutputConstraints

__all__ = ["StackedSystem", "broyden_update", "put"]


def put(full: Tensor, idx: Tensor | None, part: Tensor) -> Tensor:
    """``full`` with rows ``idx`` replaced by ``part`` (out of place, so autograd sees it); ``idx=None``: ``part``."""
    return part if idx is None else full.index_copy(0, idx, part)


def take(full: Tensor | None, idx: Tensor | None) -> Tensor | None:
    return full if idx is None or full is None else full[idx]


def broyden_update(J: Tensor, s: Tensor, dc: Tensor) -> Tensor:
    r"""Broyden's ("good") secant update per sample: :math:`J + (\Delta c - J s)\, s^\top / (s^\top s)`.

    The smallest change of :math:`J` in the Frobenius norm with :math:`J_+ s = \Delta c`. ``J`` ``[B, k, n]``,
    ``s`` ``[B, n]``, ``dc`` ``[B, k]``; samples with :math:`s = 0` keep ``J``.
    """
    ss = (s * s).sum(-1)  # [B]
    u = dc - torch.einsum("bkn,bn->bk", J, s)  # [B, k]
    step = u[:, :, None] * (s / ss.clamp_min(torch.finfo(s.dtype).tiny)[:, None])[:, None, :]
    return torch.where((ss > 0)[:, None, None], J + step, J)


class StackedSystem:
    """:math:`c = [h; g]` at fixed inputs ``x``, with the bounds and HardNet++'s residual (module docstring)."""

    def __init__(
        self, constraints: OutputConstraints, x: Tensor | None, y0: Tensor, *, jacobian: bool, c0: Tensor | None = None
    ) -> None:
        """``c0``: the values at ``y0`` when the caller has them (equalities only; nothing is evaluated then)."""
        self.cons, self.x = constraints, x
        if c0 is not None:
            if constraints.has_inequalities or jacobian:
                raise ValueError("StackedSystem(c0=...) takes equality constraints and jacobian=False")
            ev = ConstraintEvaluation(h=c0, g=None)
        else:
            ev = constraints.evaluate(x, y0, jacobian=jacobian)
        finite_or_raise(ev.c, "the constraint function")
        self.m = ev.h.shape[-1] if ev.h is not None else 0
        self.k = ev.c.shape[-1]
        self.lower = self.upper = None
        if ev.g is not None:
            self.lower, self.upper = constraints.bounds(x, ev.g)  # [B, q]
            check_bounds(self.lower, self.upper)
        self.c0 = ev.c  # [B, k] at y0
        self.J0 = ev.c_jac if jacobian else None  # [B, k, n] at y0
        self.cheap_jacobian = constraints.has_user_jacobians

    def values(self, y: Tensor, idx: Tensor | None = None) -> Tensor:
        """:math:`c` ``[b, k]`` at ``y`` (the rows ``idx`` of the batch)."""
        return self.cons.evaluate(take(self.x, idx), y, jacobian=False).c

    def jacobian(self, y: Tensor, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(c [b, k], J_c [b, k, n])`` at ``y``."""
        ev = self.cons.evaluate(take(self.x, idx), y, jacobian=True)
        return ev.c, ev.c_jac

    def residual(self, c: Tensor, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """HardNet++'s residual ``r [b, k]`` and the active rows ``a [b, k]`` (bool) at values ``c``."""
        if self.lower is None:
            return c, torch.ones_like(c, dtype=torch.bool)
        g = c[:, self.m :]
        lower, upper = take(self.lower, idx), take(self.upper, idx)
        r = torch.cat([c[:, : self.m], torch.relu(g - upper) - torch.relu(lower - g)], dim=-1)
        active = torch.cat([torch.ones_like(c[:, : self.m], dtype=torch.bool), (g > upper) | (g < lower)], dim=-1)
        return r, active

    def near_active(self, c: Tensor, tol: float | Tensor, idx: Tensor | None = None) -> Tensor:
        """Rows violated or within ``tol`` (a float or ``[b]``) of a bound, ``[b, k]``."""
        if self.lower is None:
            return torch.ones_like(c, dtype=torch.bool)
        g = c[:, self.m :]
        lower, upper = take(self.lower, idx), take(self.upper, idx)
        if isinstance(tol, Tensor):
            tol = tol[:, None]
        return torch.cat(
            [torch.ones_like(c[:, : self.m], dtype=torch.bool), (g >= upper - tol) | (g <= lower + tol)], dim=-1
        )
