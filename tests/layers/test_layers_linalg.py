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
