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
* Jacobians in :math:`y` are formed with :mod:`torch.func` on the *batched* function, using that rows are
  independent (row ``b`` of ``h(x, y)`` depends on ``x[b]``, ``y[b]`` only): a vector-Jacobian product with the
  cotangent :math:`e_i` in every sample gives row i of every sample's Jacobian at once, so ``vmap`` over the
  ``rows`` unit cotangents forms ``J [B, rows, n]`` in ``rows`` reverse passes of the whole batch
  (``jac_mode="rev"``); ``vmap`` over the ``n`` unit tangents of ``jvp`` forms it in ``n`` forward passes
  (``"fwd"``). ``"auto"`` (the default) takes the fewer passes: forward when :math:`n <` rows. Each pass keeps
  the user's batch dimension, so the batched matrix products inside ``h`` stay large (vectorising over samples
  instead, ``vmap(jacrev(h_b))`` with ``h`` on batches of one, measured 3-4x slower on the 200-variable,
  150-quadratic-row benchmark of ``benchmarks/layer_projection.py``). ``jac_chunk_size`` passes are vectorised
  together (``"auto"``: as many as keep ``chunk * B * (n + rows)`` below :math:`2^{23}` elements, which bounds
  the stacked tangents and, for functions whose intermediates scale with their inputs, the memory of the
  pass). So ``h`` and ``g`` must be ``torch.func``-compatible: no in-place writes into their inputs, no
  ``.item()``, no Python branching on values; ``"fwd"`` also needs forward-mode formulas for their operators.
* A structure-exploiting Jacobian can be supplied instead (``h_jac``, ``g_jac``): a callable returning
  ``J [B, m, n]`` or the pair ``(h [B, m], J [B, m, n])``; the pair lets one shared product serve both (for
  quadratic constraints :math:`y^\top A_i y + c_i^\top y + d_i` the rows are :math:`2A_i y + c_i`, one
  batched product, where generic reverse mode pays m times the cost of ``h``).
* ``lagrangian_hessian(x, y, w_h, w_g) -> [B, n, n]`` optionally returns
  :math:`\sum_i w_{h,i}\nabla^2_{yy} h_i + \sum_j w_{g,j}\nabla^2_{yy} g_j` (only :class:`KKTHardNet`
  needs it); without it, the forward-mode Jacobian (as above) of the batched gradient of the weighted sum.
* With ``g`` but neither bound, the convention of KKT-Hardnet applies: :math:`g(x, y) \le 0`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

__all__ = ["ConstraintEvaluation", "OutputConstraints", "batched_jacobian"]

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
        if self.g is None or self.h is None:
            return self.h if self.g is None else self.g
        return torch.cat([self.h, self.g], dim=-1)

    @property
    def c_jac(self) -> Tensor:
        """Stacked Jacobian :math:`J_c = [J_h; J_g]`, ``[B, m + q, n]``."""
        parts = [t for t in (self.h_jac, self.g_jac) if t is not None]
        if len(parts) != (self.h is not None) + (self.g is not None):
            raise RuntimeError("Jacobians were not evaluated (call evaluate(..., jacobian=True))")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)  # one block: no copy


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


CHUNK_ELEMENTS = 2**23


def batched_jacobian(
    fn: Callable[[Tensor], Tensor], y: Tensor, rows: int, mode: str = "auto", chunk_size: int | str | None = "auto"
) -> Tensor:
    r"""Per-sample Jacobians ``[B, rows, n]`` of a batched, row-independent ``fn: [B, n] -> [B, rows]``.

    Reverse mode: ``vmap`` over the ``rows`` cotangents :math:`e_i` (the same in every sample) of one
    vector-Jacobian product of the whole batch; forward mode: ``vmap`` over the ``n`` tangents :math:`e_j` of
    ``jvp``. ``mode="auto"`` picks the fewer passes (forward when ``n < rows``). Differentiable: under an outer
    autograd graph the result carries second derivatives (``torch.func`` transforms compose with autograd).
    """
    batch, n = y.shape
    if mode == "auto":
        mode = "fwd" if n < rows else "rev"
    passes = rows if mode == "rev" else n
    if chunk_size == "auto":
        chunk_size = max(1, min(passes, CHUNK_ELEMENTS // max(1, batch * (n + rows))))
    if mode == "rev":
        _, pullback = vjp(fn, y)
        basis = torch.eye(rows, dtype=y.dtype, device=y.device).unsqueeze(1).expand(rows, batch, rows)
        (jac,) = vmap(pullback, chunk_size=chunk_size)(basis)  # [rows, B, n]
        return jac.movedim(0, 1)
    basis = torch.eye(n, dtype=y.dtype, device=y.device).unsqueeze(1).expand(n, batch, n)
    jac = vmap(lambda t: jvp(fn, (y,), (t,))[1], chunk_size=chunk_size)(basis)  # [n, B, rows]
    return jac.permute(1, 2, 0)


class OutputConstraints:
    r"""Equalities :math:`h(x, y) = 0` and bounds :math:`b_l \le g(x, y) \le b_u` on a network's output.

    Args:
        h: equality constraints, ``h(x, y) -> [B, m]`` (or ``None``).
        g: inequality constraint functions, ``g(x, y) -> [B, q]`` (or ``None``).
        lower, upper: bounds on ``g``: a float, a tensor broadcastable to ``[B, q]``, or a callable
            ``x -> [B, q]``; ``±inf`` entries switch a side off. Both ``None``: ``g <= 0``.
        h_jac, g_jac: optional structure-exploiting Jacobians (see the module docstring).
        lagrangian_hessian: optional ``(x, y, w_h, w_g) -> [B, n, n]``, the weighted constraint Hessians.
        jac_mode: ``"auto"`` (forward mode when ``n`` < rows, else reverse), ``"rev"`` (one reverse pass per
            row) or ``"fwd"`` (one forward pass per output) for the generic Jacobians (module docstring).
        jac_chunk_size: passes vectorised together: ``"auto"`` (bounded memory, module docstring), an
            int, or ``None`` (all at once).
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
        jac_mode: str = "auto",
        jac_chunk_size: int | str | None = "auto",
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
        if jac_mode not in ("auto", "rev", "fwd"):
            raise ValueError(f"Invalid jac_mode {jac_mode!r}: expected 'auto', 'rev' or 'fwd'")
        if (
            jac_chunk_size != "auto"
            and jac_chunk_size is not None
            and (not isinstance(jac_chunk_size, int) or jac_chunk_size < 1)
        ):
            raise ValueError(f"Invalid jac_chunk_size: {jac_chunk_size!r} (a positive int, 'auto' or None)")
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

    @property
    def has_user_jacobians(self) -> bool:
        """Every block has a structure-exploiting Jacobian (so Jacobians cost about as much as values)."""
        return (self.h is None or self.h_jac is not None) and (self.g is None or self.g_jac is not None)

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
        value = fn(x, y)
        _check_block(value, name, y.shape[0], y)
        return value, batched_jacobian(lambda yy: fn(x, yy), y, value.shape[-1], self.jac_mode, self.jac_chunk_size)

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

        def lagrangian_gradient(yy: Tensor) -> Tensor:  # [B, n]: row b is ∇_y of sample b's weighted sum
            def total(yv: Tensor) -> Tensor:
                value = yv.new_zeros(())
                if self.h is not None and w_h is not None:
                    value = value + (self.h(x, yv) * w_h).sum()
                if self.g is not None and w_g is not None:
                    value = value + (self.g(x, yv) * w_g).sum()
                return value

            return grad(total)(yy)

        # Rows are independent, so the gradient's Jacobian is block diagonal: n forward passes give every block.
        return batched_jacobian(lagrangian_gradient, y, n, "fwd", self.jac_chunk_size)

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
