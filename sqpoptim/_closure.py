"""The closure contract of the constrained optimizers: what ``closure()`` returns, checked.

``step(closure)`` calls ``closure()`` with gradients enabled. The closure returns ``(loss, c)``,
``(loss, c, J)`` or ``(loss, Constraints(eq=..., ineq=...))``:

* ``loss``: a scalar tensor with a graph to the parameters;
* ``c``: a 1-D tensor of equality-constraint residuals (``None`` or an empty tensor when there are none), or a
  :class:`~sqpoptim.PointwiseConstraints` for the ``torch.func`` per-point path;
* ``J`` (optional): the Jacobian of ``c``, dense ``[m, n]`` over the flattened parameters or a sequence of
  per-parameter tensors ``[m, *p.shape]``;
* a :class:`~sqpoptim.Constraints` in place of ``c`` gives equalities ``c_E = 0`` and inequalities
  ``c_I <= 0`` (each part as ``c`` above, their Jacobians as ``eq_jac``/``ineq_jac``). The two parts are stacked,
  equalities first, into one ``c`` whose last ``num_ineq`` rows are the inequalities.

The closure must *not* call ``backward()``: the optimizer forms the gradient of ``loss`` and the Jacobian of
``c`` itself, and ``p.grad`` is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._constraints import Constraints
from ._jacobian import PointwiseConstraints
from ._layout import FlatLayout, as_real

__all__ = ["CONTRACT_HINT", "StepInputs", "parse_closure_output"]

CONTRACT_HINT = (
    "the closure must return (loss, c), (loss, c, J) or (loss, Constraints(eq=..., ineq=...)) and must not call "
    "backward(); for example\n"
    "    def closure():\n"
    "        loss = criterion(model(x), y)\n"
    "        c = residuals(model)        # 1-D tensor, driven to c = 0\n"
    "        return loss, c"
)


@dataclass
class StepInputs:
    """What one closure call gave: ``loss`` (0-d), ``c`` ``[m]`` (with its graph unless ``J`` is given) and
    ``J`` ``[m, n]`` when the closure or a :class:`~sqpoptim.PointwiseConstraints` supplied it. The last
    ``num_ineq`` rows of ``c`` are inequalities :math:`c_i \\le 0`. ``J_parts`` = (J of the equalities, J of the
    inequalities) when only one of the two was supplied (the other is ``None``, to be formed from ``c``)."""

    loss: Tensor
    c: Tensor
    J: Tensor | None
    num_ineq: int = 0
    J_parts: tuple[Tensor | None, Tensor | None] | None = None


def parse_closure_output(out: Any, layout: FlatLayout, *, max_constraints: int | None = None) -> StepInputs:
    """Check ``closure()``'s value against the contract and bring it to :class:`StepInputs`.

    ``max_constraints`` (n for the SQP methods, whose linearised constraints must have full row rank) bounds m.
    A :class:`~sqpoptim.PointwiseConstraints` is evaluated here (values and Jacobian in one pass)."""
    if isinstance(out, Tensor):
        raise TypeError(f"the closure returned a single tensor; {CONTRACT_HINT}")
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise TypeError(
            f"the closure returned {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            + f"; {CONTRACT_HINT}"
        )
    loss, c = out[0], out[1]
    J_given = out[2] if len(out) == 3 else None
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a scalar tensor; got {shape}")
    loss = loss.reshape(())
    J = None
    if isinstance(c, Constraints):
        if J_given is not None:
            raise ValueError(
                "with Constraints, give the Jacobians as Constraints(eq_jac=..., ineq_jac=...), not as a third value"
            )
        return _stacked(loss, c, layout, max_constraints)
    if isinstance(c, PointwiseConstraints):
        if J_given is not None:
            raise ValueError("give J either through PointwiseConstraints or as the third value, not both")
        c, J = c.evaluate(layout.params, layout.n)
    elif c is None:
        c = loss.new_zeros(0).detach()
    elif not isinstance(c, Tensor):
        raise TypeError(f"c must be a 1-D tensor, None or PointwiseConstraints; got {type(c).__name__}")
    if c.dim() != 1:
        raise ValueError(f"c must be a 1-D tensor of constraint residuals; got shape {tuple(c.shape)}")
    if c.device != layout.device:
        raise ValueError(f"c is on {c.device} but the parameters are on {layout.device}")
    if not c.is_floating_point():
        raise ValueError(f"c must be a floating-point tensor; got {c.dtype}")
    m = c.shape[0]
    if max_constraints is not None and m > max_constraints:
        raise ValueError(
            f"more constraints than parameters: m = {m} > n = {layout.n}; the linearised constraints "
            "J d = -c cannot have full row rank"
        )
    if J_given is not None:
        J = dense_jacobian(J_given, m, layout)
    return StepInputs(loss, c, J)


def dense_jacobian(J: Any, m: int, layout: FlatLayout) -> Tensor:
    """A given Jacobian as a detached ``[m, n]`` tensor over the flat parameters (checked)."""
    if isinstance(J, Tensor):
        if J.shape != (m, layout.n):
            raise ValueError(f"J must have shape [m, n] = [{m}, {layout.n}]; got {tuple(J.shape)}")
        blocks = [J]
    elif isinstance(J, (list, tuple)):
        if len(J) != len(layout.params):
            raise ValueError(f"J has {len(J)} blocks but there are {len(layout.params)} trainable parameters")
        blocks = []
        for i, (Jp, p) in enumerate(zip(J, layout.params)):
            if not isinstance(Jp, Tensor) or Jp.shape != (m, *p.shape):
                shape = tuple(Jp.shape) if isinstance(Jp, Tensor) else type(Jp).__name__
                raise ValueError(f"J block {i} must have shape {(m, *p.shape)}; got {shape}")
            blocks.append(as_real(Jp).reshape(m, -1))
    else:
        raise TypeError(f"J must be a tensor or a sequence of tensors; got {type(J).__name__}")
    for Jp in blocks:
        if Jp.dtype != layout.dtype:
            raise ValueError(f"J has dtype {Jp.dtype} but the parameters have {layout.dtype}")
        if Jp.device != layout.device:
            raise ValueError(f"J is on {Jp.device} but the parameters are on {layout.device}")
        if Jp.is_sparse:
            raise ValueError("sparse Jacobians are not supported; pass a dense tensor")
    return blocks[0].detach() if len(blocks) == 1 else torch.cat([b.detach() for b in blocks], dim=1)


def _part(values: Any, jac: Any, loss: Tensor, layout: FlatLayout, name: str) -> tuple[Tensor, Tensor | None]:
    """One part of a :class:`Constraints`: its values and, when supplied or formed per point, its Jacobian (an
    absent or empty part has the empty Jacobian)."""
    if values is None:
        return loss.new_zeros(0).detach(), None
    if isinstance(values, PointwiseConstraints):
        return values.evaluate(layout.params, layout.n)
    if values.device != layout.device:
        raise ValueError(f"Constraints.{name} is on {values.device} but the parameters are on {layout.device}")
    if jac is None:
        return values, None
    return values, dense_jacobian(jac, values.shape[0], layout)


def _stacked(loss: Tensor, cons: Constraints, layout: FlatLayout, max_constraints: int | None) -> StepInputs:
    """``c = [c_E; c_I]`` and its Jacobian (or what is known of it) from a :class:`Constraints`."""
    c_eq, J_eq = _part(cons.eq, cons.eq_jac, loss, layout, "eq")
    c_in, J_in = _part(cons.ineq, cons.ineq_jac, loss, layout, "ineq")
    m_eq, m_in = c_eq.shape[0], c_in.shape[0]
    if max_constraints is not None and m_eq > max_constraints:
        raise ValueError(
            f"more equality constraints than parameters: m_E = {m_eq} > n = {layout.n}; the linearised "
            "equalities cannot have full row rank (inequalities may outnumber the parameters)"
        )
    dtype = c_in.dtype if m_in else c_eq.dtype
    c = torch.cat([c_eq.to(dtype), c_in.to(dtype)])
    missing_eq, missing_in = m_eq > 0 and J_eq is None, m_in > 0 and J_in is None
    if missing_eq == bool(m_eq) and missing_in == bool(m_in) and (m_eq or m_in):
        return StepInputs(loss, c, None, num_ineq=m_in)  # no Jacobian given: the step forms all of it
    no_rows = c.new_zeros((0, layout.n), dtype=layout.dtype)  # an absent part's Jacobian is known: empty
    J_eq = J_eq if m_eq else no_rows
    J_in = J_in if m_in else no_rows
    if J_eq is not None and J_in is not None:
        return StepInputs(loss, c, torch.cat([J_eq, J_in]), num_ineq=m_in)
    return StepInputs(loss, c, None, num_ineq=m_in, J_parts=(J_eq, J_in))
