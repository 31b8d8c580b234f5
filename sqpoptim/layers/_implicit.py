r"""Implicit gradients of ENFORCE's and HardNet++'s projections: the derivative of the iteration's limit.

Both layers iterate :math:`y_{k+1} = T(y_k) = y_k - J_c^\top (J_c J_c^\top + \varepsilon I)^{-1} r(y_k)` (or
its Levenberg–Marquardt / NP variants, :mod:`._gauss_newton`) until :math:`r(y^\star) = 0`. Every feasible
point is a fixed point, so :math:`y^\star = T(y^\star)` does not pin :math:`y^\star` to :math:`\hat y` and the
implicit function theorem does not apply to it directly; what the iteration defines is the limit map
:math:`\Phi(\hat y) = \lim_k T^k(\hat y)`. Its derivative at a point of the constraint set is the limit of the
powers of the step Jacobian there. With :math:`J_a = A J_c` the active rows (equalities, and inequalities
violated or within ``tol`` of a bound) and the derivative of :math:`J_c(y)` multiplying :math:`r(y^\star)=0`,

.. math::

    DT(y^\star) = I - H^{-1} J_a^\top J_a, \qquad H = J_c^\top J_c + \varepsilon I,

whose eigenvalues lie in :math:`(0, 1]` (:math:`H \succeq J_a^\top J_a + \varepsilon I`), so its powers tend
to the :math:`H`-orthogonal projector onto :math:`\ker J_a`; summing the series for the input derivative the
same way,

.. math::

    \boxed{\; \frac{\partial \Phi}{\partial \hat y} = I - H^{-1} J_a^\top S^{-1} J_a, \quad
    \frac{\partial \Phi}{\partial x} = -H^{-1} J_a^\top S^{-1} \frac{\partial r_a}{\partial x}, \quad
    S = J_a H^{-1} J_a^\top \;}

so a backward pass solves one :math:`k \times k` system: :math:`v = S^{-1} J_a H^{-1} \bar y`,
:math:`\bar{\hat y} = \bar y - J_a^\top v`, :math:`\bar x = -(\partial r_a/\partial x)^\top v`.

* ENFORCE's NP steps and HardNet++'s Levenberg–Marquardt steps (:math:`\nu_k \to 0`, and inactive rows
  dropped from the step): :math:`H = I`, the orthogonal projector
  :math:`I - J_a^\top (J_a J_a^\top)^{-1} J_a` of the ENFORCE paper (App. B) for ``eps=0``.
* HardNet++'s paper iteration (fixed :math:`\varepsilon`, all rows of :math:`J_c`): with
  :math:`G_\varepsilon = J_c J_c^\top + \varepsilon I` the push-through identities give
  :math:`S = (I - \varepsilon G_\varepsilon^{-1})_{aa}` and :math:`J_a H^{-1} \bar y = (G_\varepsilon^{-1}
  J_c \bar y)_a`, a :math:`k \times k` computation whether or not :math:`k > n`.

This is the exact derivative of the layer's output when :math:`\hat y` is on the constraint set (and the
active set is locally constant) and for affine constraints whose Jacobian does not depend on :math:`x`;
elsewhere the limit map depends on the path, and the formula differs from it by
:math:`O(\|\hat y - y^\star\|)` (tested against the unrolled derivative of converged iterations). The
Jacobian is exact at :math:`y^\star` whatever Jacobians the forward used (Broyden's included), i.e. it is the
derivative of the exact-Jacobian iteration. Parameters captured inside ``h``/``g`` receive no gradient.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import vjp

from .._fast_float32 import fast_float32_products
from ._linalg import cholesky_apply, gram_cholesky_, gram_solve, transpose_apply
from ._system import StackedSystem

__all__ = ["LimitBackward", "limit_vjp"]


def limit_vjp(J: Tensor, active: Tensor | None, grad_y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r"""``(v, ŷ̄)`` of the module docstring: ``J`` ``[B, k, n]``, ``active`` ``[B, k]`` (``None``: every row, as for
    equality constraints), ``grad_y`` ``[B, n]``."""
    Jg = (grad_y[:, None, :] @ J.mT).squeeze(1)  # [B, k]: dot products along J's contiguous rows
    if eps == 0 and active is None:  # S = J J^T, factored in place (a third less arithmetic than J @ J.mT)
        L, _, _ = gram_cholesky_(J, J.new_empty(J.shape[0], J.shape[-2], J.shape[-2]))
        v = cholesky_apply(L, Jg)
        return v, grad_y - transpose_apply(J, v)
    a = torch.ones_like(Jg) if active is None else active.to(J.dtype)
    eye = torch.eye(J.shape[-2], dtype=J.dtype, device=J.device)
    if eps == 0:
        S, rhs = J @ J.mT, Jg
    else:
        G_eps = J @ J.mT + eps * eye  # positive definite
        L = torch.linalg.cholesky(G_eps)
        inv = torch.cholesky_solve(eye.expand_as(G_eps), L)  # [B, k, k]
        S, rhs = eye - eps * inv, (inv @ Jg[..., None]).squeeze(-1)
    # Restrict to the active rows: zero the others and put an identity there, so their v is 0.
    S = S * a[:, :, None] * a[:, None, :] + torch.diag_embed(1 - a)
    v, _ = gram_solve(S, rhs * a)  # [B, k]
    return v, grad_y - transpose_apply(J, v)


class LimitBackward(torch.autograd.Function):
    """Identity on the converged output; backward: :func:`limit_vjp` at it (module docstring)."""

    @staticmethod
    def forward(ctx, system: StackedSystem, eps: float, tol: float, x, y_hat, y_star, c_star, J_star):
        ctx.system, ctx.eps, ctx.tol = system, eps, tol
        ctx.save_for_backward(x, y_star, c_star, J_star)
        return y_star.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        system: StackedSystem = ctx.system
        x, y_star, c_star, J_star = ctx.saved_tensors
        if J_star is None:
            c_star, J_star = system.jacobian(y_star)
        # [B, k]; None: equalities only, every row active
        active = None if system.lower is None else system.near_active(c_star, ctx.tol)
        # A float32 J (mixed-precision forward): the solve in float32, relative error ~ kappa(J J^T) eps_32, with
        # the forward's float32-accurate fast products where they were verified (sqpoptim.fast_float32_products).
        fast = fast_float32_products(J_star.device) if J_star.dtype == torch.float32 else contextlib.nullcontext()
        with fast:
            v, grad_y_hat = limit_vjp(J_star, active, grad_y.to(J_star.dtype), ctx.eps)
        v, grad_y_hat = v.to(grad_y.dtype), grad_y_hat.to(grad_y.dtype)
        grad_x = None
        if x is not None and ctx.needs_input_grad[3]:
            _, pull = vjp(lambda xx: pinned_rows(system, xx, y_star, c_star, ctx.tol), x)
            (grad_x,) = pull(-v)
        return None, None, None, grad_x, grad_y_hat, None, None, None


def pinned_rows(system: StackedSystem, x: Tensor, y: Tensor, c_ref: Tensor, tol: float) -> Tensor:
    r"""The active rows as functions of ``x`` at fixed ``y``: :math:`h`, and :math:`g - b` for the bound :math:`b`
    each active inequality sits on (bounds may depend on ``x``); inactive rows are returned as they are (their
    cotangent is zero)."""
    cons = system.cons
    ev = cons.evaluate(x, y, jacobian=False)
    if ev.g is None:
        return ev.c
    lower, upper = cons.bounds(x, ev.g)
    g_ref = c_ref[:, system.m :]
    on_upper = g_ref >= system.upper - tol
    bound = torch.where(on_upper, upper, torch.where(torch.isfinite(lower), lower, 0.0))
    bound = torch.where(torch.isfinite(bound), bound, 0.0)
    return torch.cat([ev.c[:, : system.m], ev.g - bound], dim=-1)
