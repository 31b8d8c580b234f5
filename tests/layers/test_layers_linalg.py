"""The in-place Gram factor of the layers' NP steps against the factor of the explicit Gram matrix."""

import pytest
import torch
from layer_cases import F64

from sqpoptim.layers._linalg import cholesky_apply, gram_cholesky_, gram_factor


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("m", "n"), [(3, 10), (49, 60), (150, 200)])  # one row block; three row blocks
def test_in_place_gram_factor_matches_the_explicit_factor(dtype, m, n):
    gen = torch.Generator().manual_seed(m)
    J = torch.randn(5, m, n, dtype=F64, generator=gen).to(dtype)
    work = torch.full((5, m, m), float("nan"), dtype=dtype)  # what the buffer held before must not matter
    L, flagged, rows = gram_cholesky_(J, work)
    assert L.data_ptr() == work.data_ptr()  # in place
    L_ref, flagged_ref = gram_factor(J @ J.mT)
    eps = torch.finfo(dtype).eps
    scale = float(L_ref.abs().max())
    torch.testing.assert_close(L, L_ref, rtol=0, atol=64 * m * eps * scale)
    assert torch.equal(L.triu(1), torch.zeros_like(L))
    assert torch.equal(flagged, flagged_ref) and not bool(flagged.any())
    torch.testing.assert_close(rows, J.square().sum(-1), rtol=8 * n * eps, atol=0)
    # The oracle: L L^T is J J^T (plus the regularising shift) to the factorisation's rounding, in float64.
    G = J.double() @ J.double().mT
    resid = (L.double() @ L.double().mT - G).abs().max() / G.abs().max()
    assert float(resid) <= 64 * m * eps
    rhs = torch.randn(5, m, dtype=F64, generator=gen)
    w = cholesky_apply(L.double(), rhs)
    kappa = torch.linalg.cond(G)
    err = ((G @ w[..., None]).squeeze(-1) - rhs).norm(dim=-1) / rhs.norm(dim=-1)
    assert bool((err <= 64 * m * eps * kappa.sqrt()).all()), err


def test_in_place_gram_factor_flags_a_rank_deficient_jacobian():
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(3, 60, 80, dtype=F64, generator=gen)
    J[1, 7] = J[1, 3]  # a duplicated row: J J^T singular in sample 1
    L, flagged, _ = gram_cholesky_(J, torch.empty(3, 60, 60, dtype=F64))
    assert flagged.tolist() == [False, True, False]
    assert torch.equal(flagged, gram_factor(J @ J.mT)[1])
    assert bool(torch.isfinite(L).all())


def test_least_norm_step_in_a_work_buffer_is_the_least_norm_solution():
    from sqpoptim.layers._gauss_newton import least_norm_step

    gen = torch.Generator().manual_seed(1)
    J = torch.randn(6, 50, 70, dtype=F64, generator=gen)
    r = torch.randn(6, 50, dtype=F64, generator=gen)
    work = torch.full((8, 50, 50), float("nan"), dtype=F64)  # larger than the batch: its leading rows are used
    d, flagged = least_norm_step(J, r, None, 0.0, work)
    d_ref = -(torch.linalg.pinv(J) @ r[..., None]).squeeze(-1)  # the least-norm solution of J d = -r
    torch.testing.assert_close(d, d_ref, rtol=0, atol=1e-10)
    assert not bool(flagged.any())
    torch.testing.assert_close(d, least_norm_step(J, r, None, 0.0)[0], rtol=0, atol=1e-12)
    # Under autograd the buffer is not used (in-place factorisations have no derivative): gradients still flow.
    Jg = J.clone().requires_grad_()
    d_g, _ = least_norm_step(Jg, r, None, 0.0, work)
    (g,) = torch.autograd.grad(d_g.sum(), Jg)
    assert bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0
    torch.testing.assert_close(d_g.detach(), d_ref, rtol=0, atol=1e-10)
