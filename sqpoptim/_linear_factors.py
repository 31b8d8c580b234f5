r"""The Jacobian of pointwise constraints from per-sample factors of ``nn.Linear`` layers: one backward pass.

Setting. The closure evaluates the model on the m constraint points as one batch, and :math:`c_i` depends on
the model's computation at point i alone (output constraints :math:`c_i = \varphi_i(f(x_i))`). A linear layer
:math:`z = A W^\top + b` on the way, with inputs :math:`A \in \mathbb{R}^{m\times d_{in}}` (row :math:`a_i` at
point i), then contributes to row i of J the blocks :math:`\partial c_i/\partial W = \delta_i a_i^\top` and
:math:`\partial c_i/\partial b = \delta_i`, where :math:`\delta_i = \partial c_i/\partial z_i`. One backward pass
of :math:`w^\top c` gives :math:`\Delta = \partial (w^\top c)/\partial z`, whose row i is :math:`w_i\delta_i`;
with the inputs :math:`A_l` recorded by a forward hook, every product the solvers need follows without J:

.. math::

    (Jx)_i = \sum_l \delta_{l,i}^\top X_l\, a_{l,i} + \delta_{l,i}^\top x_{b_l}, \qquad
    J^\top y = \big((\Delta_l \circ y)^\top A_l,\ \Delta_l^\top y\big)_l, \qquad
    JJ^\top = \sum_l (\Delta_l\Delta_l^\top) \circ (A_lA_l^\top + \mathbf{1}\mathbf{1}^\top),

the last being the per-example gradient inner products of Goodfellow ("Efficient per-example gradient
computations", arXiv:1510.01799) that "ghost clipping" uses for differentially private training (Li, Tramèr,
Liang, Hashimoto, "Large language models can be strong differentially private learners", arXiv:2110.05679).
Cost: one backward over the m points (not the m backwards of the batched Jacobian, each through all m points),
:math:`m^2\sum_l(d_{in}+d_{out})` for the Gram matrix instead of :math:`m^2 n`, :math:`2mn` per product pair, and
no ``[m, n]`` matrix in memory. A layer called several times on the way to ``c`` contributes the sum of its
calls' blocks (and the cross terms of its calls to the Gram matrix).

Detection (no help from the user). While the closure runs, a global forward hook records every call of an
``nn.Linear`` (exactly that class's ``forward``). The factors are used only if, on a random probe:

(a) for every trainable parameter, the vector-Jacobian product :math:`J^\top w` that autograd computes equals
    the sum of :math:`\Delta^\top A` (weights) and :math:`\Delta^\top\mathbf 1` (biases) over the recorded calls —
    which fails when a parameter reaches ``c`` other than through a recorded call (another layer type, a
    functional ``F.linear``, derivatives with respect to the input built with ``create_graph``);
(b) the probe gives the same per-point signals as the all-ones pass, :math:`\Delta^w_i/w_i = \Delta^1_i` — which
    fails when points are coupled (batch normalisation in training mode, a residual mixing several points, a
    permuted ``c``) — and every recorded input has a leading dimension m and was not modified in place.

Every step runs one backward pass with :math:`w = \mathbf 1` for the signals (so the factors, hence the steps,
do not depend on when a verification ran); the checks add one probe pass with weights drawn from [1, 2], at the
first step, whenever the set of recorded calls changes and every ``VERIFY_EVERY`` steps. When they fail the
optimizer falls back to the batched Jacobian (and stops recording).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook

from ._jacobian_operator import JacobianOperator
from ._layout import FlatLayout
from ._workspace import Workspace

__all__ = ["VERIFY_EVERY", "LayerFactors", "LinearCallRecorder", "layer_factors"]

VERIFY_EVERY = 50  # steps between two full verifications of the per-point structure
_GRAM_CHUNK_BYTES = 1 << 27  # float64 temporaries of the Gram matrix, per row block
_BLOCK_CHUNK_BYTES = 1 << 27  # explicit Jacobian blocks, per chunk of output units
_GRAM_ROW_BLOCKS = 8  # row blocks of the unweighted Gram matrix (only the upper triangle is formed)
_MV_BLOCK_ELEMENTS = 1 << 17  # entries of the [rows, d_in] temporary of J x, per block of rows


@dataclass
class _Call:
    module: nn.Linear
    input: Tensor
    output: Tensor
    versions: tuple[int, int]


class LinearCallRecorder:
    """Context manager recording every ``nn.Linear`` call with a graph (module, input, output)."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self._handle = None

    def __enter__(self) -> LinearCallRecorder:
        self.calls = []
        self._handle = register_module_forward_hook(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, module: nn.Module, args: tuple, output: object) -> None:
        if (
            type(module).forward is nn.Linear.forward
            and args
            and isinstance(args[0], Tensor)
            and isinstance(output, Tensor)
            and output.requires_grad
        ):
            self.calls.append(_Call(module, args[0], output, (args[0]._version, output._version)))  # type: ignore[arg-type]


@dataclass
class _Term:
    """One recorded call: inputs A ``[m, d_in]``, per-point signals D ``[m, d_out]`` (row i = δ_i) and where
    its weight and bias sit in the flat vector (``None``: not trainable)."""

    A: Tensor
    D: Tensor
    weight: slice | None
    bias: slice | None


class LayerFactors(JacobianOperator):
    """J of pointwise constraints as per-sample factors of linear layers (see the module docstring)."""

    def __init__(self, groups: list[list[_Term]], m: int, n: int, dtype: torch.dtype, device: torch.device):
        self.groups = groups  # terms grouped by module (a module's calls share its parameters)
        self.m, self.n, self.dtype, self.device = m, n, dtype, device

    @property
    def terms(self) -> Iterator[_Term]:
        for group in self.groups:
            yield from group

    def mv(self, x: Tensor) -> Tensor:
        y = torch.zeros(self.m, dtype=self.dtype, device=self.device)
        for t in self.terms:
            if t.weight is not None:
                X = x[t.weight].view(t.D.shape[1], t.A.shape[1])
                # rows in blocks whose [rows, d_in] product stays in cache: half the time of one [m, d_in] product
                # followed by the row sums (measured at m = 10,000, d = 224)
                rows = max(64, _MV_BLOCK_ELEMENTS // t.A.shape[1])
                for start in range(0, self.m, rows):
                    block = slice(start, start + rows)
                    y[block] += ((t.D[block] @ X) * t.A[block]).sum(1)
            if t.bias is not None:
                y += t.D @ x[t.bias]
        return y

    def rmv(self, y: Tensor) -> Tensor:
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for t in self.terms:
            Dy = t.D * y.to(self.dtype).unsqueeze(1)
            if t.weight is not None:
                out[t.weight] += (Dy.T @ t.A).reshape(-1)
            if t.bias is not None:
                out[t.bias] += Dy.sum(0)
        return out

    def gram(
        self, weight: Tensor | None = None, *, out: Tensor | None = None, workspace: Workspace | None = None
    ) -> Tensor:
        r""":math:`JWJ^\top` (float64; into ``out`` when given). Unweighted: the Hadamard form, by row blocks and
        over the upper triangle only; the factors are cast to float64 first, so this is the exact Gram matrix of
        the J that the products use (PSD, consistent with :meth:`mv` and :meth:`rmv`) up to float64 rounding.
        A module with one output unit (the last layer of a scalar network) contributes :math:`EE^\top` of its
        explicit block :math:`E = \sum_t \delta_t \circ [A_t, \mathbf 1]` instead (one product, no Hadamard
        factor). Each row block of G is written in place: the first term's product goes straight into G, the
        others are added to it (``addmm_``, ``addcmul_``). The float64 copies of the factors and the two
        Hadamard factors of a row block go into ``workspace`` when given (:mod:`sqpoptim._workspace`).
        Weighted (the scaled projection): :math:`m^2 n`, from explicit column blocks."""
        m = self.m
        G = torch.empty((m, m), dtype=torch.float64, device=self.device) if out is None else out
        if m == 0:
            return G
        if weight is not None or not self.groups:
            G.zero_()
        if weight is not None:
            for cols, block in self._blocks():
                G.addmm_(block * weight[cols].to(torch.float64), block.T)
            return G
        explicit, hadamard = self._gram_operands(workspace)
        # row blocks over the upper triangle: about half the products of the full matrix for 8+ blocks
        rows = max(128, -(-m // _GRAM_ROW_BLOCKS), 1)
        rows = max(1, min(rows, _GRAM_CHUNK_BYTES // (16 * m)))
        # the Hadamard factors of a row block, [rows, m - start] views of two [rows, m] buffers
        bufs = [None if workspace is None else workspace.buffer(f"gram.{k}", (rows, m), self.device) for k in "PQ"]

        def product(X: Tensor, Y: Tensor, buf: Tensor | None) -> Tensor:
            return torch.mm(X, Y.T) if buf is None else torch.mm(X, Y.T, out=buf[: X.shape[0], : Y.shape[0]])

        for start in range(0, m, rows):
            I = slice(start, min(start + rows, m))
            cols = slice(start, m)
            K = G[I, cols]  # (no zero fill: the first term writes it)
            first = True
            for E in explicit:
                if first:
                    torch.mm(E[I], E[cols].T, out=K)
                else:
                    K.addmm_(E[I], E[cols].T)
                first = False
            for group in hadamard:
                for Aa, Da in group:
                    for Ab, Db in group:
                        P = product(Da[I], Db[cols], bufs[0])
                        if Aa is None and first:
                            K.copy_(P)
                        elif Aa is None:
                            K.add_(P)
                        elif first:
                            torch.mul(P, product(Aa[I], Ab[cols], bufs[1]), out=K)
                        else:
                            K.addcmul_(P, product(Aa[I], Ab[cols], bufs[1]))
                        first = False
            G[I.stop :, I] = G[I, I.stop :].T
        return G

    def _gram_operands(
        self, workspace: Workspace | None
    ) -> tuple[list[Tensor], list[list[tuple[Tensor | None, Tensor]]]]:
        """The float64 operands of the unweighted Gram matrix: explicit blocks ``[m, d_in + 1]`` of the modules
        with one output unit, and ``([A, 1], D)`` per call of the others (``[A, 1]`` is ``A`` without a trained
        bias, ``None`` without a trained weight); in the workspace's buffers when there is one."""
        m = self.m
        explicit: list[Tensor] = []
        hadamard: list[list[tuple[Tensor | None, Tensor]]] = []

        def f64(name: str, shape: tuple[int, int]) -> Tensor:
            buf = None if workspace is None else workspace.buffer("gram." + name, shape, self.device)
            return torch.empty(shape, dtype=torch.float64, device=self.device) if buf is None else buf

        def inputs(t: _Term, name: str) -> Tensor:  # [A, 1] when the bias is trained: A Aᵀ + 1 in the same product
            d_in = t.A.shape[1]
            A = f64(name, (m, d_in + (t.bias is not None)))
            A[:, :d_in] = t.A
            if t.bias is not None:
                A[:, d_in] = 1.0
            return A

        def signals(t: _Term, name: str) -> Tensor:
            return f64(name, (m, t.D.shape[1])).copy_(t.D)

        for i, group in enumerate(self.groups):
            if group[0].weight is not None and group[0].D.shape[1] == 1:
                E = inputs(group[0], f"E{i}").mul_(group[0].D)  # (d a in float64: exact)
                for j, t in enumerate(group[1:], 1):
                    E.addcmul_(inputs(t, f"A{i}.{j}"), t.D.to(torch.float64))
                explicit.append(E)
            else:
                hadamard.append(
                    [
                        (inputs(t, f"A{i}.{j}") if t.weight is not None else None, signals(t, f"D{i}.{j}"))
                        for j, t in enumerate(group)
                    ]
                )
        return explicit, hadamard

    def row_sq_norms(self, weight: Tensor | None = None) -> Tensor:
        """diag(JWJᵀ) as float64 (the Jacobi preconditioner, the damping's scale), with the factors' dtype's
        accuracy; validation uses :meth:`row_check`."""
        if weight is not None:
            out = torch.zeros(self.m, dtype=torch.float64, device=self.device)
            for cols, block in self._blocks():
                out += (block * block * weight[cols].to(torch.float64)).sum(1)
            return out
        out = torch.zeros(self.m, dtype=self.dtype, device=self.device)
        for group in self.groups:
            for ta in group:
                for tb in group:
                    inner = torch.linalg.vecdot(ta.A, tb.A) if ta.weight is not None else torch.zeros_like(out)
                    if ta.bias is not None:
                        inner += 1.0
                    out += torch.linalg.vecdot(ta.D, tb.D) * inner
        return out.double()

    def row_check(self) -> Tensor:
        r""":math:`\sum_l \max_j|\delta_{l,ij}|\,(\max_k|a_{l,ik}| + 1_{\text{bias}})` in float64: zero exactly when
        row i of J is zero (a product of float32 numbers in float64 never underflows), non-finite exactly when it
        holds a non-finite entry — one pass over the factors, not over J."""
        out = torch.zeros(self.m, dtype=torch.float64, device=self.device)
        for t in self.terms:
            a = t.A.abs().amax(1).double() if t.weight is not None else torch.zeros_like(out)
            out += t.D.abs().amax(1).double() * (a + (1.0 if t.bias is not None else 0.0))
        return out

    def dense(self) -> Tensor:
        J = torch.zeros((self.m, self.n), dtype=self.dtype, device=self.device)
        for cols, block in self._blocks(dtype=self.dtype):
            J[:, cols] = block
        return J

    def _blocks(self, dtype: torch.dtype = torch.float64) -> Iterator[tuple[slice, Tensor]]:
        """Explicit column blocks of J (a module's calls summed), a bounded number of output units at a time."""
        m = self.m
        for group in self.groups:
            head = group[0]
            d_out, d_in = head.D.shape[1], head.A.shape[1]
            if head.weight is not None:
                units = max(1, _BLOCK_CHUNK_BYTES // (8 * max(m, 1) * d_in))
                for j in range(0, d_out, units):
                    k = min(units, d_out - j)
                    block = sum(
                        (t.D[:, j : j + k, None].to(dtype) * t.A[:, None, :].to(dtype)).reshape(m, k * d_in)
                        for t in group
                    )
                    start = head.weight.start + j * d_in
                    yield slice(start, start + k * d_in), block
            if head.bias is not None:
                yield head.bias, sum(t.D.to(dtype) for t in group)

    def gram_flops(self) -> float:
        flops = 0.0
        for group in self.groups:
            d = group[0].A.shape[1] + group[0].D.shape[1]
            pairs = 1 if group[0].weight is not None and group[0].D.shape[1] == 1 else len(group) ** 2
            flops += pairs * self.m * self.m * d  # products of m x m x d, upper triangle only (one: E Eᵀ)
        return flops

    def product_flops(self) -> float:
        return 4.0 * self.m * sum(t.A.shape[1] * t.D.shape[1] for t in self.terms)


def layer_factors(
    c: Tensor, calls: list[_Call], layout: FlatLayout, *, verify: bool, seed: int = 0
) -> LayerFactors | str:
    """The factors of ``c``'s Jacobian from the recorded ``calls``, or a sentence saying why they do not apply.

    ``verify`` runs checks (a) and (b) of the module docstring (two probe backward passes, one of them also
    returning the parameters' vector-Jacobian products); otherwise one backward pass gives the signals. The
    graph of ``c`` is retained (the objective may share it)."""
    m = c.shape[0]
    if m == 0:
        return "no constraints"
    if any(p.is_complex() for p in layout.params):
        return "complex parameters"
    candidates = [
        call
        for call in calls
        if call.input.dim() == 2 and call.output.dim() == 2 and call.input.shape[0] == m and call.output.shape[0] == m
    ]
    if not candidates:
        return "no nn.Linear call on a batch of the m constraint points"
    for call in candidates:
        if (call.input._version, call.output._version) != call.versions:
            return "a linear layer's input or output was modified in place"
    dtype = layout.dtype
    outputs = [call.output for call in candidates]
    signals = torch.autograd.grad(c, outputs, grad_outputs=torch.ones_like(c), retain_graph=True, allow_unused=True)
    used = [(call, d) for call, d in zip(candidates, signals) if d is not None]
    if not used:
        return "c does not depend on any recorded nn.Linear call"
    offsets = {}
    off = 0
    for p, size in zip(layout.params, layout.sizes):
        offsets[id(p)] = slice(off, off + size)
        off += size
    by_module: dict[int, list[_Term]] = {}
    for call, d in used:
        mod = call.module
        weight = offsets.get(id(mod.weight)) if mod.weight.requires_grad else None
        bias = offsets.get(id(mod.bias)) if mod.bias is not None and mod.bias.requires_grad else None
        if weight is None and bias is None:
            continue  # a frozen layer on the way: it passes the signal on and contributes no columns
        D = d.detach().to(dtype)
        by_module.setdefault(id(mod), []).append(_Term(call.input.detach().to(dtype), D, weight, bias))
    factors = LayerFactors(list(by_module.values()), m, layout.n, dtype, c.device)
    if verify:
        reason = _check(c, factors, used, layout, seed)
        if reason is not None:
            return reason
    return factors


def _check(
    c: Tensor, factors: LayerFactors, used: list[tuple[_Call, Tensor]], layout: FlatLayout, seed: int
) -> str | None:
    """Checks (a) and (b) of the module docstring with one probe backward pass (weights w from [1, 2]) against
    the signals of the all-ones pass that every step makes; ``None`` when both hold."""
    tol = torch.finfo(layout.dtype).eps ** 0.5
    gen = torch.Generator(device=c.device).manual_seed(seed)
    w = 1.0 + torch.rand(c.shape[0], generator=gen, dtype=c.dtype, device=c.device)
    outputs = [call.output for call, _ in used]
    grads = torch.autograd.grad(c, outputs + list(layout.params), grad_outputs=w, retain_graph=True, allow_unused=True)
    for (_, d1), d2 in zip(used, grads[: len(outputs)]):
        s2 = d2 / w.unsqueeze(1)
        if float((d1 - s2).abs().max()) > tol * float(d1.abs().max()):
            return "the constraints couple the points (c_i depends on the model at other points than i)"
    ours = factors.rmv(w.to(layout.dtype))
    start = 0
    for p, size, ref in zip(layout.params, layout.sizes, grads[len(outputs) :]):
        mine = ours[start : start + size]
        start += size
        if ref is not None and ref.is_sparse:
            return "a parameter has a sparse gradient"
        ref_flat = torch.zeros_like(mine) if ref is None else ref.reshape(-1).to(mine.dtype)
        scale = torch.linalg.vector_norm(ref_flat) + torch.linalg.vector_norm(mine)
        if float(torch.linalg.vector_norm(mine - ref_flat)) > tol * float(scale):
            shape = tuple(p.shape)
            return f"a parameter of shape {shape} reaches c other than through the recorded nn.Linear calls"
    return None
