r"""The value a closure returns for equality *and* inequality constraints: :class:`Constraints`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._jacobian import PointwiseConstraints

__all__ = ["Constraints"]


@dataclass(frozen=True)
class Constraints:
    r"""Equality and inequality constraints of one closure call: ``return loss, Constraints(eq=c_e, ineq=c_i)``.

    The convention is

    .. math::

        c_E(\theta) = 0 \quad(\texttt{eq},\ m_E \text{ rows}), \qquad
        c_I(\theta) \le 0 \quad(\texttt{ineq},\ m_I \text{ rows}),

    so a bound :math:`u(x_j) \ge 0` is ``ineq=-u(x)``, a limit :math:`T \le T_{max}` is ``ineq=T - T_max`` and a
    fairness gap :math:`|r_a - r_b| \le \epsilon` is ``ineq=torch.stack([r_a - r_b - eps, r_b - r_a - eps])``.

    Args:
        eq: the equality residuals, a 1-D floating tensor, a :class:`~sqpoptim.PointwiseConstraints`, or
            ``None`` (none; an empty tensor means the same).
        ineq: the inequality residuals, same types.
        eq_jac: optional Jacobian of ``eq`` over the flattened parameters, dense ``[m_E, n]`` or one tensor
            ``[m_E, *p.shape]`` per trainable parameter (as the third value of ``(loss, c, J)``); not with a
            :class:`~sqpoptim.PointwiseConstraints`.
        ineq_jac: the same for ``ineq``.

    What can be checked without the parameters is checked here (1-D, floating point, one dtype and one device
    for both parts, a Jacobian only with its residuals and with as many rows); the optimizer checks the rest
    (the parameters' device and dtype, ``n``) when it reads the closure. ``(loss, c)`` and ``(loss, c, J)`` keep
    meaning equalities only.
    """

    eq: Tensor | PointwiseConstraints | None = None
    ineq: Tensor | PointwiseConstraints | None = None
    eq_jac: Tensor | Sequence[Tensor] | None = None
    ineq_jac: Tensor | Sequence[Tensor] | None = None

    def __post_init__(self) -> None:
        tensors = []
        for name in ("eq", "ineq"):
            c = getattr(self, name)
            jac = getattr(self, f"{name}_jac")
            if c is None or isinstance(c, PointwiseConstraints):
                if jac is not None:
                    why = "no residuals" if c is None else "a PointwiseConstraints (it forms its own Jacobian)"
                    raise ValueError(f"{name}_jac was given but {name} is {why}")
                continue
            if not isinstance(c, Tensor):
                raise TypeError(
                    f"Constraints.{name} must be a 1-D tensor, PointwiseConstraints or None; got {type(c).__name__}"
                )
            if c.dim() != 1:
                raise ValueError(
                    f"Constraints.{name} must be a 1-D tensor of residuals; got shape {tuple(c.shape)}"
                    + (" (use .reshape(1) for a single constraint)" if c.dim() == 0 else "")
                )
            if not c.is_floating_point():
                raise ValueError(f"Constraints.{name} must be a real floating-point tensor; got {c.dtype}")
            if jac is not None:
                _check_jacobian(f"{name}_jac", jac, c)
            if c.numel():
                tensors.append((name, c))
        if len(tensors) == 2:
            (_, a), (_, b) = tensors
            if a.device != b.device:
                raise ValueError(f"Constraints.eq is on {a.device} but Constraints.ineq is on {b.device}")
            if a.dtype != b.dtype:
                raise ValueError(f"Constraints.eq has dtype {a.dtype} but Constraints.ineq has {b.dtype}")

    @property
    def num_eq(self) -> int:
        """:math:`m_E`."""
        return _count(self.eq)

    @property
    def num_ineq(self) -> int:
        """:math:`m_I`."""
        return _count(self.ineq)


def _count(c: Any) -> int:
    if c is None:
        return 0
    return len(c) if isinstance(c, PointwiseConstraints) else c.shape[0]


def _check_jacobian(name: str, jac: Any, c: Tensor) -> None:
    m = c.shape[0]
    blocks = [jac] if isinstance(jac, Tensor) else list(jac) if isinstance(jac, (list, tuple)) else None
    if blocks is None or not all(isinstance(b, Tensor) for b in blocks):
        raise TypeError(f"Constraints.{name} must be a tensor or a sequence of tensors; got {type(jac).__name__}")
    if isinstance(jac, Tensor) and jac.dim() != 2:
        raise ValueError(f"Constraints.{name} must be [m, n] = [{m}, n]; got shape {tuple(jac.shape)}")
    for i, b in enumerate(blocks):
        where = "" if isinstance(jac, Tensor) else f" block {i}"
        if b.dim() == 0 or b.shape[0] != m:
            raise ValueError(
                f"Constraints.{name}{where} must have {m} rows (one per residual); got shape {tuple(b.shape)}"
            )
        if b.device != c.device:
            raise ValueError(f"Constraints.{name}{where} is on {b.device} but its residuals are on {c.device}")
        if b.is_sparse:
            raise ValueError(f"Constraints.{name}{where} is sparse; pass a dense tensor")
        if b.dtype != c.dtype and not (torch.is_complex(b) and b.real.dtype == c.dtype):
            raise ValueError(f"Constraints.{name}{where} has dtype {b.dtype} but its residuals have {c.dtype}")
