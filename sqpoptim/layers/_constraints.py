r"""The constraint description shared by every output layer.

A network maps an input :math:`x` to a raw output :math:`\hat y \in \mathbb{R}^n`; the layers map
:math:`\hat y` onto

.. math::

    \mathcal{C}(x) = \{\, y : h(x, y) = 0,\ b_l(x) \le g(x, y) \le b_u(x) \,\},

with :math:`h: \to \mathbb{R}^m` (equalities) and :math:`g: \to \mathbb{R}^q` (two-sided inequalities,
:math:`\pm\infty` bounds allowed). :class:`OutputConstraints` holds the callables; every layer receives the
same object.

Conventions
-----------
* ``h(x, y)`` and ``g(x, y)`` are *batched*: ``x`` is ``[B, ...]`` (or ``None`` when the constraints do not
  depend on the input), ``y`` is ``[B, n]`` and the result is ``[B, m]`` (``[B, q]``). Row ``b`` may depend
  only on ``x[b]`` and ``y[b]``.
* The layers call them with ``y`` (and a floating ``x``) in the layer's ``solve_dtype`` (float64 by default):
  constants inside ``h``/``g`` must follow the input (``A.to(y)``); a result in a lower precision than ``y``
  raises a ``TypeError`` rather than silently losing the digits the solve needs.
* Jacobians in :math:`y` are formed per sample with :mod:`torch.func`: ``vmap(jacrev(h_b))`` over the samples
  (``jac_mode="rev"``, m reverse passes) or ``vmap(jacfwd(h_b))`` (``jac_mode="fwd"``, n forward passes),
  where ``h_b`` calls ``h`` on a batch of one. So ``h`` and ``g`` must be ``torch.func``-compatible: no
  in-place writes into their inputs, no ``.item()``, no Python branching on values.
* A structure-exploiting Jacobian can be supplied instead (``h_jac``, ``g_jac``): a callable returning
  ``J [B, m, n]`` or the pair ``(h [B, m], J [B, m, n])``; the pair lets one shared product serve both (for
  quadratic constraints :math:`y^\top A_i y + c_i^\top y + d_i` the rows are :math:`2A_i y + c_i`, one
  batched product, where generic reverse mode pays m times the cost of ``h``).
* ``lagrangian_hessian(x, y, w_h, w_g) -> [B, n, n]`` optionally returns
  :math:`\sum_i w_{h,i}\nabla^2_{yy} h_i + \sum_j w_{g,j}\nabla^2_{yy} g_j` (only :class:`KKTHardNet`
  needs it); without it, ``vmap(jacfwd(grad(.)))`` of the weighted sum.
* With ``g`` but neither bound, the convention of KKT-Hardnet applies: :math:`g(x, y) \le 0`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jacfwd, jacrev, vjp, vmap

__all__ = ["ConstraintEvaluation", "OutputConstraints"]

ConstraintFn = Callable[[Tensor | None, Tensor], Tensor]
JacobianFn = Callable[[Tensor | None, Tensor], Tensor | tuple[Tensor, Tensor]]
HessianFn = Callable[[Tensor | None, Tensor, Tensor | None, Tensor | None], Tensor]
Bound = float | Tensor | Callable[[Tensor | None], Tensor] | None


@dataclass(frozen=True)
class ConstraintEvaluation:
    """Values (and optionally Jacobians in y) of both constraint blocks at one ``(x, y)``."""

    h: Tensor | None  # [B, m]
    g: Tensor | None  # [B, q]
    h_jac: Tensor | None = None  # [B, m, n]
    g_jac: Tensor | None = None  # [B, q, n]

    @property
    def c(self) -> Tensor:
        """Stacked values :math:`c = [h; g]`, ``[B, m + q]``."""
        return torch.cat([t for t in (self.h, self.g) if t is not None], dim=-1)

    @property
    def c_jac(self) -> Tensor:
        """Stacked Jacobian :math:`J_c = [J_h; J_g]`, ``[B, m + q, n]``."""
        parts = [t for t in (self.h_jac, self.g_jac) if t is not None]
        if len(parts) != (self.h is not None) + (self.g is not None):
            raise RuntimeError("Jacobians were not evaluated (call evaluate(..., jacobian=True))")
        return torch.cat(parts, dim=-2)


def _check_block(value: Tensor, name: str, batch: int, y: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}(x, y) must return a Tensor, got {type(value).__name__}")
    if value.dim() != 2 or value.shape[0] != batch:
        raise ValueError(f"{name}(x, y) must return shape [B, rows] = [{batch}, rows]; got {list(value.shape)}")
    if not value.is_floating_point() or torch.finfo(value.dtype).eps > torch.finfo(y.dtype).eps:
        raise TypeError(
            f"{name}(x, y) returned {value.dtype} for y of {y.dtype}: build the constraint from the input's "
            "dtype (e.g. A.to(y)) so the solve keeps its precision"
        )


def _check_jacobian(jac: Tensor, name: str, value: Tensor, y: Tensor) -> None:
    expected = (*value.shape, y.shape[-1])
    if not isinstance(jac, Tensor) or tuple(jac.shape) != expected:
        got = list(jac.shape) if isinstance(jac, Tensor) else type(jac).__name__
        raise ValueError(f"{name}_jac(x, y) must return shape [B, rows, n] = {list(expected)}; got {got}")


class OutputConstraints:
    r"""Equalities :math:`h(x, y) = 0` and bounds :math:`b_l \le g(x, y) \le b_u` on a network's output.

    Args:
        h: equality constraints, ``h(x, y) -> [B, m]`` (or ``None``).
        g: inequality constraint functions, ``g(x, y) -> [B, q]`` (or ``None``).
        lower, upper: bounds on ``g``: a float, a tensor broadcastable to ``[B, q]``, or a callable
            ``x -> [B, q]``; ``±inf`` entries switch a side off. Both ``None``: ``g <= 0``.
        h_jac, g_jac: optional structure-exploiting Jacobians (see the module docstring).
        lagrangian_hessian: optional ``(x, y, w_h, w_g) -> [B, n, n]``, the weighted constraint Hessians.
        jac_mode: ``"rev"`` (``vmap(jacrev)``, m reverse passes) or ``"fwd"`` (``vmap(jacfwd)``, n forward
            passes) for the generic Jacobians. Reverse is the default: the layers need
            :math:`m + q < n` or close to it, and it measured faster on the benchmark instance
            (``benchmarks/layer_projection.py``).
        jac_chunk_size: rows per reverse pass in ``jacrev`` (bounds memory; ``None``: all at once).
    """

    def __init__(
        self,
        h: ConstraintFn | None = None,
        g: ConstraintFn | None = None,
        lower: Bound = None,
        upper: Bound = None,
        *,
        h_jac: JacobianFn | None = None,
        g_jac: JacobianFn | None = None,
        lagrangian_hessian: HessianFn | None = None,
        jac_mode: str = "rev",
        jac_chunk_size: int | None = None,
    ) -> None:
        if h is None and g is None:
            raise ValueError("OutputConstraints needs at least one of h (equalities) or g (inequalities)")
        for name, fn in (("h", h), ("g", g), ("h_jac", h_jac), ("g_jac", g_jac)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if lagrangian_hessian is not None and not callable(lagrangian_hessian):
            raise TypeError("lagrangian_hessian must be callable")
        if h_jac is not None and h is None:
            raise ValueError("h_jac given without h")
        if g_jac is not None and g is None:
            raise ValueError("g_jac given without g")
        if g is None and (lower is not None or upper is not None):
            raise ValueError("bounds lower/upper given without inequality constraints g")
        if jac_mode not in ("rev", "fwd"):
            raise ValueError(f"Invalid jac_mode {jac_mode!r}: expected 'rev' or 'fwd'")
        if jac_chunk_size is not None and jac_chunk_size < 1:
            raise ValueError(f"Invalid jac_chunk_size: {jac_chunk_size}")
        if g is not None and lower is None and upper is None:
            upper = 0.0
        self.h, self.g = h, g
        self.lower, self.upper = lower, upper
        self.h_jac, self.g_jac = h_jac, g_jac
        self._lagrangian_hessian = lagrangian_hessian
        self.jac_mode = jac_mode
        self.jac_chunk_size = jac_chunk_size

    @property
    def has_equalities(self) -> bool:
        return self.h is not None

    @property
    def has_inequalities(self) -> bool:
        return self.g is not None

    # ------------------------------------------------------------------ values and Jacobians
    def evaluate(self, x: Tensor | None, y: Tensor, *, jacobian: bool = True) -> ConstraintEvaluation:
        """Values of ``h`` and ``g`` at ``(x, y)`` and, with ``jacobian=True``, their Jacobians in ``y``."""
        h = hj = g = gj = None
        if self.h is not None:
            h, hj = self._block(self.h, self.h_jac, "h", x, y, jacobian)
        if self.g is not None:
            g, gj = self._block(self.g, self.g_jac, "g", x, y, jacobian)
        return ConstraintEvaluation(h=h, g=g, h_jac=hj, g_jac=gj)

    def _block(
        self,
        fn: ConstraintFn,
        jac_fn: JacobianFn | None,
        name: str,
        x: Tensor | None,
        y: Tensor,
        jacobian: bool,
    ) -> tuple[Tensor, Tensor | None]:
        batch = y.shape[0]
        if not jacobian:
            value = fn(x, y)
            _check_block(value, name, batch, y)
            return value, None
        if jac_fn is not None:
            out = jac_fn(x, y)
            if isinstance(out, tuple):
                value, jac = out
            else:
                value, jac = fn(x, y), out
            _check_block(value, name, batch, y)
            _check_jacobian(jac, name, value, y)
            return value, jac
        return self._func_jacobian(fn, name, x, y)

    def _func_jacobian(self, fn: ConstraintFn, name: str, x: Tensor | None, y: Tensor) -> tuple[Tensor, Tensor]:
        # Check the shape inside too: under vmap a wrong shape would otherwise fail with a cryptic error.
        def single(xi: Tensor | None, yi: Tensor) -> tuple[Tensor, Tensor]:
            out = fn(None if xi is None else xi.unsqueeze(0), yi.unsqueeze(0))
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
                shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"{name}(x, y) on a batch of one must return shape [1, rows]; got {shape}")
            out = out.squeeze(0)
            return out, out

        if self.jac_mode == "rev":
            transform = jacrev(single, argnums=1, has_aux=True, chunk_size=self.jac_chunk_size)
        else:
            transform = jacfwd(single, argnums=1, has_aux=True)
        jac, value = vmap(transform, in_dims=(None if x is None else 0, 0))(x, y)  # [B, m, n], [B, m]
        _check_block(value, name, y.shape[0], y)
        return value, jac

    def vjp(
        self, x: Tensor | None, y: Tensor, w_h: Tensor | None, w_g: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        r"""Values and :math:`J_h^\top w_h + J_g^\top w_g` (``[B, n]``) with one reverse pass.

        Rows are independent, so one vector-Jacobian product of the batched function with per-sample
        cotangents gives every sample's product at once. With user Jacobians, their batched product.
        """
        if (self.h is None or self.h_jac is not None) and (self.g is None or self.g_jac is not None):
            ev = self.evaluate(x, y, jacobian=True)
            jty = torch.zeros_like(y)
            if ev.h_jac is not None:
                jty = jty + torch.einsum("bmn,bm->bn", ev.h_jac, w_h)
            if ev.g_jac is not None:
                jty = jty + torch.einsum("bqn,bq->bn", ev.g_jac, w_g)
            return ev.h, ev.g, jty
        fns = [(fn, name) for fn, name in ((self.h, "h"), (self.g, "g")) if fn is not None]

        def stacked(yy: Tensor) -> tuple[Tensor, ...]:
            return tuple(fn(x, yy) for fn, _ in fns)

        values, pullback = vjp(stacked, y)
        for value, (_, name) in zip(values, fns):
            _check_block(value, name, y.shape[0], y)
        weights = tuple(w for fn, w in ((self.h, w_h), (self.g, w_g)) if fn is not None)
        (jty,) = pullback(weights)
        h = values[0] if self.h is not None else None
        g = values[-1] if self.g is not None else None
        return h, g, jty

    def lagrangian_hessian(self, x: Tensor | None, y: Tensor, w_h: Tensor | None, w_g: Tensor | None) -> Tensor:
        r""":math:`\sum_i w_{h,i} \nabla^2_{yy} h_i + \sum_j w_{g,j} \nabla^2_{yy} g_j`, ``[B, n, n]``."""
        n = y.shape[-1]
        if self._lagrangian_hessian is not None:
            hess = self._lagrangian_hessian(x, y, w_h, w_g)
            if not isinstance(hess, Tensor) or tuple(hess.shape) != (y.shape[0], n, n):
                got = list(hess.shape) if isinstance(hess, Tensor) else type(hess).__name__
                raise ValueError(f"lagrangian_hessian must return [B, n, n] = {[y.shape[0], n, n]}; got {got}")
            return hess

        def weighted(xi: Tensor | None, yi: Tensor, whi: Tensor | None, wgi: Tensor | None) -> Tensor:
            xb = None if xi is None else xi.unsqueeze(0)
            total = yi.new_zeros(())
            if self.h is not None:
                total = total + (self.h(xb, yi.unsqueeze(0)).squeeze(0) * whi).sum()
            if self.g is not None:
                total = total + (self.g(xb, yi.unsqueeze(0)).squeeze(0) * wgi).sum()
            return total

        dims = (None if x is None else 0, 0, None if w_h is None else 0, None if w_g is None else 0)
        return vmap(jacfwd(grad(weighted, argnums=1), argnums=1), in_dims=dims)(x, y, w_h, w_g)

    # ------------------------------------------------------------------ bounds and residuals
    def bounds(self, x: Tensor | None, g: Tensor) -> tuple[Tensor, Tensor]:
        """Lower and upper bounds as ``[B, q]`` tensors in ``g``'s dtype and device."""
        return self._bound(self.lower, x, g, -torch.inf, "lower"), self._bound(self.upper, x, g, torch.inf, "upper")

    @staticmethod
    def _bound(spec: Bound, x: Tensor | None, g: Tensor, default: float, name: str) -> Tensor:
        if spec is None:
            return torch.full_like(g, default)
        value = spec(x) if callable(spec) else spec
        value = torch.as_tensor(value, dtype=g.dtype, device=g.device)
        try:
            return torch.broadcast_to(value, g.shape)
        except RuntimeError:
            raise ValueError(
                f"{name} bound of shape {list(value.shape)} does not broadcast to g's shape {list(g.shape)}"
            ) from None

    def residual(self, ev: ConstraintEvaluation, lower: Tensor | None, upper: Tensor | None) -> Tensor:
        r"""The residual :math:`[h;\ \mathrm{ReLU}(g - b_u) - \mathrm{ReLU}(b_l - g)]`, ``[B, m + q]``.

        ``lower``/``upper`` are ``None`` when there is no ``g``.
        """
        parts = []
        if ev.h is not None:
            parts.append(ev.h)
        if ev.g is not None:
            # ±inf bounds give ReLU(-inf) = 0: that side is switched off.
            parts.append(torch.relu(ev.g - upper) - torch.relu(lower - ev.g))
        return torch.cat(parts, dim=-1)

    def violation(self, x: Tensor | None, y: Tensor) -> Tensor:
        """Largest violation per sample, ``[B]`` (``|h|`` and the distance of ``g`` to its bounds)."""
        ev = self.evaluate(x, y, jacobian=False)
        lower, upper = self.bounds(x, ev.g) if ev.g is not None else (None, None)
        return self.residual(ev, lower, upper).abs().amax(dim=-1)
