r"""The constraint Jacobian as an operator: :math:`J \in \mathbb{R}^{m\times n}` through its products.

Every solve of a step needs only :math:`Jx`, :math:`J^\top y`, the diagonal of :math:`JWJ^\top` (validation and
the Jacobi preconditioner) and, for the dense solver, the Gram matrix :math:`JWJ^\top` itself. Three forms
provide them:

* :class:`DenseJacobian` — an explicit ``[m, n]`` matrix (from the batched or per-row backward, from
  :class:`~sqpoptim.PointwiseConstraints`, or given by the closure). The Gram matrix costs :math:`m^2 n`.
* :class:`~sqpoptim._linear_factors.LayerFactors` — per-sample factors of ``nn.Linear`` layers from one
  backward pass; :math:`J` is never formed and its Gram matrix costs :math:`m^2\sum_l(d_{in} + d_{out})`.
* :class:`AutogradJacobian` — nothing but the autograd graph of ``c``: :math:`J^\top y` is a vector-Jacobian
  product and :math:`Jx` a double backward (the derivative of :math:`y \mapsto J^\top y` along ``x``), each
  one backward pass over the constraint graph. The matrix-free solver's fallback for closures nothing else
  applies to (input derivatives built with ``create_graph``, models without linear layers).

Products take and return vectors in the parameters' dtype; Gram matrices and row norms are float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._layout import as_real, flat_size
from ._linalg import gram as dense_gram
from ._workspace import Workspace

__all__ = ["AutogradJacobian", "DenseJacobian", "JacobianOperator"]

# Columns of J turned into float64 at once when summing squares of its rows (bounds the temporary).
_ROW_CHUNK_BYTES = 1 << 27


class JacobianOperator:
    """:math:`J` (``[m, n]``) seen through products. Subclasses implement :meth:`mv`, :meth:`rmv` and
    :meth:`dense`; the Gram matrix and the row norms default to the dense matrix."""

    m: int
    n: int
    dtype: torch.dtype
    device: torch.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.m, self.n)

    def mv(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """:math:`Jx`, ``[n] -> [m]``."""
        raise NotImplementedError

    def rmv(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        """:math:`J^\\top y`, ``[m] -> [n]``."""
        raise NotImplementedError

    def dense(self) -> Tensor:  # pragma: no cover - abstract
        """The explicit ``[m, n]`` matrix (forms it if needed)."""
        raise NotImplementedError

    def gram(
        self, weight: Tensor | None = None, *, out: Tensor | None = None, workspace: Workspace | None = None
    ) -> Tensor:
        r""":math:`JWJ^\top` in float64, ``[m, m]`` (``weight`` the diagonal of W, ``[n]``, or ``None``), written
        into ``out`` when given; ``workspace`` may hold the float64 temporaries between steps."""
        return dense_gram(self.dense(), weight, out=out)

    def row_sq_norms(self, weight: Tensor | None = None) -> Tensor:
        r"""The diagonal of :math:`JWJ^\top`, float64 ``[m]``: zero exactly for an all-zero row, non-finite
        exactly when the row holds a non-finite entry (squares summed in float64 never cancel)."""
        return _row_sq_norms(self.dense(), weight)

    def row_check(self) -> Tensor:
        """Float64 ``[m]``: zero exactly at all-zero rows, non-finite exactly at rows with a non-finite entry (the
        step's validation). The squared row norms unless a subclass has a cheaper witness."""
        return self.row_sq_norms()

    def mean_row_sq_norm(self, weight: Tensor | None = None) -> Tensor:
        r""":math:`\operatorname{mean}_i (JWJ^\top)_{ii}` (0-d float64): the scale of the damping shift μ."""
        return self.row_sq_norms(weight).mean()

    # cost model (floating-point operations), for the automatic choice of solver
    def product_flops(self) -> float:
        """One :math:`Jx` and one :math:`J^\\top y`."""
        return 4.0 * self.m * self.n

    def gram_flops(self) -> float:
        """The unweighted Gram matrix."""
        return 2.0 * self.m * self.m * self.n

    @property
    def materialised(self) -> bool:
        """Whether the explicit matrix is held (or as cheap to form as to use)."""
        return False


def _row_sq_norms(J: Tensor, weight: Tensor | None) -> Tensor:
    m, n = J.shape
    out = torch.zeros(m, dtype=torch.float64, device=J.device)
    chunk = max(1, _ROW_CHUNK_BYTES // (8 * max(m, 1)))
    for start in range(0, n, chunk):
        Jc = J[:, start : start + chunk].to(torch.float64)
        sq = Jc * Jc
        if weight is not None:
            sq = sq * weight[start : start + chunk].to(torch.float64)
        out += sq.sum(1)
    return out


class DenseJacobian(JacobianOperator):
    """An explicit Jacobian ``[m, n]``."""

    def __init__(self, J: Tensor) -> None:
        self.J = J
        self.m, self.n = J.shape
        self.dtype, self.device = J.dtype, J.device

    def mv(self, x: Tensor) -> Tensor:
        return self.J @ x

    def rmv(self, y: Tensor) -> Tensor:
        return self.J.T @ y

    def dense(self) -> Tensor:
        return self.J

    @property
    def materialised(self) -> bool:
        return True


class AutogradJacobian(JacobianOperator):
    r""":math:`J` of ``c`` with respect to ``params`` through autograd alone; ``c``'s graph is retained.

    :math:`J^\top y` = ``autograd.grad(c, params, y)``. :math:`Jx` by the double-backward identity: with a
    dummy :math:`w` (zeros, requiring grad), :math:`h(w) = J^\top w` is built once with ``create_graph=True``;
    it is linear in :math:`w`, and :math:`Jx = \partial (x^\top h(w))/\partial w`, one backward pass through
    that graph per product. The graph of ``c`` must be twice differentiable (any graph built from
    differentiable torch operations is). Complex parameters are not supported on this path.
    """

    def __init__(self, c: Tensor, params: Sequence[Tensor], n: int) -> None:
        if any(p.is_complex() for p in params):
            raise ValueError("the autograd Jacobian operator does not support complex parameters")
        if not c.requires_grad:
            raise ValueError(
                "the constraints c do not depend on any parameter (c has no autograd graph); "
                "compute c from the model inside the closure"
            )
        self.c, self.params = c, list(params)
        self.m, self.n = c.shape[0], n
        self.dtype, self.device = as_real(self.params[0]).dtype, c.device
        self._sizes = [flat_size(p) for p in self.params]
        self._w: Tensor | None = None
        self._h: list[Tensor] | None = None
        self._h_params: list[int] = []

    def _flat(self, grads: Sequence[Tensor | None]) -> Tensor:
        parts = [
            torch.zeros(s, dtype=self.dtype, device=self.device) if gp is None else gp.reshape(-1)
            for gp, s in zip(grads, self._sizes)
        ]
        return torch.cat(parts)

    def rmv(self, y: Tensor) -> Tensor:
        grads = torch.autograd.grad(
            self.c, self.params, grad_outputs=y.to(self.c.dtype), retain_graph=True, allow_unused=True
        )
        return self._flat(grads)

    def mv(self, x: Tensor) -> Tensor:
        if self._w is None:
            with torch.enable_grad():
                self._w = torch.zeros(self.m, dtype=self.c.dtype, device=self.device, requires_grad=True)
                h = torch.autograd.grad(
                    self.c, self.params, grad_outputs=self._w, create_graph=True, retain_graph=True, allow_unused=True
                )
            self._h_params = [i for i, hp in enumerate(h) if hp is not None and hp.requires_grad]
            self._h = [h[i] for i in self._h_params]
        assert self._h is not None
        if not self._h:  # J^T w does not depend on w: J = 0
            return torch.zeros(self.m, dtype=self.dtype, device=self.device)
        xs = x.split(self._sizes)
        (jx,) = torch.autograd.grad(
            self._h,
            self._w,
            grad_outputs=[xs[i].view_as(self._h[k]) for k, i in enumerate(self._h_params)],
            retain_graph=True,
            allow_unused=True,
        )
        return torch.zeros(self.m, dtype=self.dtype, device=self.device) if jx is None else jx.to(self.dtype)

    def dense(self) -> Tensor:
        from ._jacobian import batched_jacobian

        return batched_jacobian(self.c, self.params, self.n)

    def row_sq_norms(self, weight: Tensor | None = None) -> Tensor:
        raise NotImplementedError(
            "the autograd operator has no cheap row norms: the Jacobi preconditioner (krylov=dict(jacobi=True)) "
            "needs a Jacobian from layer factors, an explicit J or PointwiseConstraints"
        )

    def mean_row_sq_norm(self, weight: Tensor | None = None, probes: int = 4) -> Tensor:
        r"""Hutchinson's estimate of :math:`\operatorname{tr}(JWJ^\top)/m`: the mean of
        :math:`\|JW^{1/2}\xi\|^2/m` over ``probes`` Rademacher vectors ξ (``probes`` products, a fixed seed, so
        the same J gives the same value). Unbiased, with a relative spread of about
        :math:`\sqrt{2/\text{probes}}` at worst (a rank-one J) and far less when the rows are many and of
        similar size; it only scales the damping shift, whose ν adapts anyway."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        root = None if weight is None else weight.to(self.dtype).clamp_min(0).sqrt()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(probes):
            xi = torch.randint(0, 2, (self.n,), generator=gen, device=self.device).to(self.dtype) * 2 - 1
            total = total + self.mv(xi if root is None else xi * root).double().square().sum()
        return total / (probes * max(self.m, 1))

    def row_check(self) -> Tensor:
        r""":math:`(J\xi)^2` for a Gaussian :math:`\xi` (one product): zero at an all-zero row and, for any other
        row, with probability one nonzero; non-finite at a row with a non-finite entry (inf or NaN in J reach
        :math:`J\xi` whatever ξ is)."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        xi = torch.randn(self.n, generator=gen, dtype=self.dtype, device=self.device)
        return self.mv(xi).double().square()

    def product_flops(self) -> float:
        # a backward pass over the constraint graph per product; its size is unknown here, so count it like
        # an explicit product (the graph of m points costs at least a multiple of m n)
        return 8.0 * self.m * self.n
