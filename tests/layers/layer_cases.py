"""Shared test instances and oracles for the output-layer tests (float64, small sizes)."""

from __future__ import annotations

import numpy as np
import torch

from sqpoptim.layers import OutputConstraints

F64 = torch.float64


def quadratic_instance(B: int = 4, n: int = 6, m: int = 3, noise: float = 0.1, seed: int = 0):
    """The benchmarks' quadratic constraint family at small size: h_i = yᵀA_i y + c_iᵀy + d_i - x_i³ with a feasible y*.

    Returns ``(h, h_jac, x, y_star, y_hat)``; ``h_jac`` is the structure-exploiting pair (h, J), and
    ``h_jac.lagrangian_hessian(x, y, w_h, w_g)`` is Σ w_h,k 2A_k (for constraints with h only).
    """
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, n, n, dtype=F64, generator=gen)
    A = 0.5 * (G + G.mT) / n**0.5
    c = torch.randn(m, n, dtype=F64, generator=gen) / n**0.5
    d = torch.randn(m, dtype=F64, generator=gen)

    def h(x, y):
        return torch.einsum("bi,kij,bj->bk", y, A.to(y), y) + y @ c.to(y).T + d.to(y) - x**3

    def h_jac(x, y):
        Ay = torch.einsum("kij,bj->bki", A.to(y), y)  # [B, m, n]
        J = 2 * Ay + c.to(y)
        return (Ay * y[:, None, :]).sum(-1) + y @ c.to(y).T + d.to(y) - x**3, J

    def lagrangian_hessian(x, y, w_h, w_g):
        return 2 * torch.einsum("bk,kij->bij", w_h, A.to(y))

    h_jac.lagrangian_hessian = lagrangian_hessian  # the structured second derivatives travel with h_jac
    y_star = torch.randn(B, n, dtype=F64, generator=gen)
    x = torch.sign(h(torch.zeros(B, m, dtype=F64), y_star)) * h(torch.zeros(B, m, dtype=F64), y_star).abs() ** (1 / 3)
    y_hat = y_star + noise * torch.randn(B, n, dtype=F64, generator=gen)
    return h, h_jac, x, y_star, y_hat


def affine_instance(B: int = 5, n: int = 7, m: int = 3, q: int = 2, seed: int = 0):
    """Affine constraints B y = sin(x) M and bounds on A y: returns (Bmat, M, Amat, x, y_hat) as float64."""
    gen = torch.Generator().manual_seed(seed)
    Bm = torch.randn(m, n, dtype=F64, generator=gen)
    M = torch.randn(2, m, dtype=F64, generator=gen)
    Am = torch.randn(q, n, dtype=F64, generator=gen)
    x = torch.randn(B, 2, dtype=F64, generator=gen)
    y_hat = 2 * torch.randn(B, n, dtype=F64, generator=gen)
    return Bm, M, Am, x, y_hat


def affine_constraints(Bm, M, Am=None, lower=None, upper=None) -> OutputConstraints:
    h = lambda x, y: y @ Bm.to(y).T - torch.sin(x) @ M.to(x)  # noqa: E731
    if Am is None:
        return OutputConstraints(h=h)
    return OutputConstraints(h=h, g=lambda x, y: y @ Am.to(y).T, lower=lower, upper=upper)


def loop_jacobian(fn, x, y) -> torch.Tensor:
    """Oracle: one backward per constraint row over the batched function (rows are per-sample)."""
    y = y.detach().requires_grad_()
    out = fn(x, y)
    rows = [torch.autograd.grad(out[:, i].sum(), y, retain_graph=True)[0] for i in range(out.shape[1])]
    return torch.stack(rows, dim=1)  # [B, m, n]


def np_equality_projection(Bm: np.ndarray, b: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Closed-form Euclidean projection of each row of y onto {B y = b_row} with numpy."""
    out = np.empty_like(y)
    for i in range(y.shape[0]):
        r = Bm @ y[i] - b[i]
        out[i] = y[i] - Bm.T @ np.linalg.solve(Bm @ Bm.T, r)
    return out
