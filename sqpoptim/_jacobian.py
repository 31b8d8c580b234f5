r"""Constraint Jacobians over the flattened parameters.

Parameters are flattened in a fixed order (param group by param group); a complex parameter contributes its
real view (``torch.view_as_real``: real and imaginary parts interleaved), so every Jacobian here is a real
``[m, n]`` matrix. For a real-valued constraint of a complex weight :math:`z = a + ib`, PyTorch's gradient is
:math:`\partial c/\partial a + i\,\partial c/\partial b`, whose real view is exactly the gradient with respect
to :math:`(a, b)`.

Three ways to form :math:`J = \partial c/\partial x`:

* :func:`batched_jacobian` (the default): one vectorised backward over all rows,
  ``torch.autograd.grad(c, params, grad_outputs=I, is_grads_batched=True)``, optionally ``chunk_size`` rows at
  a time to bound memory when m is large. It works through residuals that contain input derivatives built with
  ``autograd.grad(create_graph=True)`` (u_t, u_xx, ...).
* :func:`joint_gradient_and_jacobian` (``jacobian="joint"``): the objective's gradient and J from one
  vectorised backward over the m + 1 rows of :math:`(f, c)`. When c is read off the objective's own pass (PINN
  residuals at collocation points the objective also uses) the shared graph is traversed once instead of twice;
  the rows of the objective cost m + 1 times its part of the graph, so it does not pay when the objective has a
  large part of its own.
* :func:`loop_jacobian`: one backward per row. The slow reference, the test oracle, and the fallback when the
  batched pass raises (some operators have no batching rule).
* :class:`PointwiseConstraints`: opt-in ``torch.func`` path for residuals written functionally, one point at
  a time: ``vmap`` of per-point ``grad_and_value`` over the constraint points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ._warnings import warn_user

__all__ = [
    "JacobianFallbackWarning",
    "PointwiseConstraints",
    "batched_jacobian",
    "flat_size",
    "joint_gradient_and_jacobian",
    "loop_jacobian",
]


class JacobianFallbackWarning(UserWarning):
    """The batched Jacobian pass raised and the per-row loop was used instead."""


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def flat_size(p: Tensor) -> int:
    """Number of real entries ``p`` contributes to the flat parameter vector."""
    return p.numel() * (2 if p.is_complex() else 1)


def _fill_rows(J: Tensor, rows: slice, grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
    k = J[rows].shape[0]
    off = 0
    for p, gp in zip(params, grads):
        size = flat_size(p)
        block = J[rows, off : off + size]
        if gp is None:
            block.zero_()
        elif gp.is_sparse:
            raise ValueError("sparse gradients are not supported (use a dense embedding, sparse=False)")
        else:
            block.copy_(_real(gp).reshape(k, size))
        off += size


def _check_graph(c: Tensor) -> None:
    if not c.requires_grad:
        raise ValueError(
            "the constraints c do not depend on any parameter (c has no autograd graph); "
            "compute c from the model inside the closure, or return (loss, c, J) with J given"
        )


def batched_jacobian(c: Tensor, params: Sequence[Tensor], n: int, *, chunk_size: int | None = None) -> Tensor:
    """``[m, n]`` Jacobian of ``c`` (1-D, length m) with respect to the flattened ``params``, by batched
    backward passes of ``chunk_size`` rows (all rows at once when ``None``). The graph of ``c`` is retained."""
    m = c.shape[0]
    real_dtype = _real(params[0]).dtype
    if m == 0:
        return torch.empty((m, n), dtype=real_dtype, device=c.device)
    _check_graph(c)
    step = m if chunk_size is None else max(1, int(chunk_size))
    eye = torch.eye(m, dtype=c.dtype, device=c.device)
    J = None
    for start in range(0, m, step):
        rows = slice(start, min(start + step, m))
        grads = torch.autograd.grad(
            c, params, grad_outputs=eye[rows], is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        if step >= m and all(gp is not None and not gp.is_sparse for gp in grads):
            # one pass: J is the blocks side by side, one concatenation instead of a copy per block
            return torch.cat([_real(gp).reshape(m, -1) for gp in grads], dim=1)
        if J is None:
            J = torch.empty((m, n), dtype=real_dtype, device=c.device)
        _fill_rows(J, rows, grads, params)
    assert J is not None
    return J


def joint_gradient_and_jacobian(
    loss: Tensor, c: Tensor, params: Sequence[Tensor], n: int, *, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(g, J)``: the ``[n]`` gradient of the scalar ``loss`` and the ``[m, n]`` Jacobian of ``c``, as the rows of
    the Jacobian of ``(loss, c)`` by :func:`batched_jacobian` (one vectorised backward when ``chunk_size`` is
    ``None``). The graphs are retained (so that a pass that raises leaves them whole for the separate passes)."""
    _check_graph(c)  # (a constant objective's row comes out zero)
    K = batched_jacobian(torch.cat([loss.reshape(1).to(c.dtype), c]), params, n, chunk_size=chunk_size)
    return K[0], K[1:]


def loop_jacobian(c: Tensor, params: Sequence[Tensor], n: int) -> Tensor:
    """``[m, n]`` Jacobian by one backward pass per row (reference implementation)."""
    m = c.shape[0]
    J = torch.empty((m, n), dtype=_real(params[0]).dtype, device=c.device)
    if m == 0:
        return J
    _check_graph(c)
    for i in range(m):
        grads = torch.autograd.grad(c[i], params, retain_graph=True, allow_unused=True)
        _fill_rows(J, slice(i, i + 1), grads, params)
    return J


def jacobian(
    c: Tensor, params: Sequence[Tensor], n: int, *, mode: str, chunk_size: int | None, warned: list[bool]
) -> Tensor:
    """Dispatch on ``mode`` ("batched" or "loop"); a batched pass that raises falls back to the loop with a
    one-time warning (``warned`` is the caller's one-element flag)."""
    if mode == "loop":
        return loop_jacobian(c, params, n)
    try:
        return batched_jacobian(c, params, n, chunk_size=chunk_size)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        if "Sparse" in str(err):  # a sparse gradient (nn.Embedding(sparse=True)): the loop would refuse it too
            raise ValueError("sparse gradients are not supported (use a dense embedding, sparse=False)") from None
        if not warned[0]:
            warned[0] = True
            warn_user(
                f"batched Jacobian pass failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "using one backward pass per constraint from now on (pass jacobian='loop' to silence this)",
                JacobianFallbackWarning,
            )
        return loop_jacobian(c, params, n)


class PointwiseConstraints:
    r"""Constraints written one point at a time, for the opt-in ``torch.func`` Jacobian path.

    ``residual(f, x)`` returns the scalar residual at one point ``x`` (a row of ``points``; when ``points`` is
    a tuple or dict of tensors sharing the leading dimension m, ``x`` is the matching tuple or dict of rows),
    where ``f(z) = model(z[None])[0]`` evaluates the model functionally on a single input; derivatives with
    respect to the input are taken with ``torch.func`` (``jacfwd``, ``grad``, ``hessian``) on ``f``. Each
    constraint's gradient sees only its own input: for models that process many inputs in one batched graph
    (an operator network over fields) this avoids back-propagating every row through every other row's input,
    which the batched backward over ``c`` cannot avoid (Darcy, paper size: 0.3 s instead of 18 s per J). The optimizer
    evaluates ``c`` and the per-point parameter gradients (the rows of ``J``) with one
    ``vmap(grad_and_value(...))`` over the points, ``chunk_size`` points at a time if given.

    Return it from the closure in place of ``c``: ``return loss, PointwiseConstraints(model, residual, pts)``.
    Parameters of the optimizer that are not parameters of ``model`` get zero Jacobian columns.

    Example (the spring ODE residual u'' + 4u' + 400u at points t)::

        def residual(f, t):
            u = lambda s: f(s).squeeze()
            du = torch.func.grad(lambda s: u(s).sum())
            d2u = torch.func.grad(lambda s: du(s).sum())
            return (d2u(t) + 4 * du(t) + 400 * u(t)).squeeze()
    """

    def __init__(
        self,
        model: nn.Module,
        residual: Callable[[Callable[[Tensor], Tensor], Any], Tensor],
        points: Any,
        *,
        chunk_size: int | None = None,
    ) -> None:
        leaves = tree_leaves(points)
        if not leaves or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in leaves):
            raise ValueError("points must be a tensor, or a tuple/dict of tensors, with a leading point dimension")
        if len({t.shape[0] for t in leaves}) != 1:
            raise ValueError(f"all point tensors must share the leading dimension; got {[t.shape[0] for t in leaves]}")
        self.model, self.residual, self.points, self.chunk_size = model, residual, points, chunk_size
        self._m = leaves[0].shape[0]

    def __len__(self) -> int:
        return self._m

    def evaluate(self, params: Sequence[Tensor], n: int) -> tuple[Tensor, Tensor]:
        """``(c [m], J [m, n])`` at the current parameters (both detached)."""
        from torch.func import functional_call, grad_and_value, vmap

        named = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        index = {id(p): name for name, p in named.items()}
        pdict = {name: p.detach() for name, p in named.items()}

        def point_residual(pd: dict[str, Tensor], x: Any) -> Tensor:
            def f(z: Tensor) -> Tensor:
                return functional_call(self.model, (pd, buffers), (z.unsqueeze(0),)).squeeze(0)

            r = self.residual(f, x)
            if r.numel() != 1:
                raise ValueError(f"residual(f, x) must return a scalar; got shape {tuple(r.shape)}")
            return r.reshape(())

        grads, values = vmap(grad_and_value(point_residual), in_dims=(None, 0), chunk_size=self.chunk_size)(
            pdict, self.points
        )
        grads_in_order = [grads[index[id(p)]] if id(p) in index else None for p in params]
        m = values.shape[0]
        J = torch.empty((m, n), dtype=_real(params[0]).dtype, device=values.device)
        _fill_rows(J, slice(0, m), grads_in_order, params)
        return values.detach(), J
