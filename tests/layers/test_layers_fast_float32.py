"""The mixed-precision layers on sqpoptim.fast_float32_products: the Gram factor and the output, against IEEE."""

import pytest
import torch
from layer_cases import quadratic_instance

from sqpoptim import _fast_float32 as ff
from sqpoptim.layers import EnforceProjection, OutputConstraints
from sqpoptim.layers._linalg import gram_cholesky_

EPS32 = torch.finfo(torch.float32).eps
pytestmark = pytest.mark.skipif(
    not ff.float32_products_verified(), reason="oneDNN's bfloat16 products are absent or not float32-accurate here"
)


@pytest.fixture
def default_setting():
    old = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "none"
    yield
    torch.backends.mkldnn.matmul.fp32_precision = old


@pytest.mark.usefixtures("default_setting")
def test_gram_factor_on_fast_products_matches_the_ieee_factor():
    J = torch.randn(20, 150, 200, generator=torch.Generator().manual_seed(2))
    L_ieee, flagged, rows = gram_cholesky_(J, torch.empty(20, 150, 150))
    with ff.fast_float32_products(torch.device("cpu")):
        L_fast, flagged_fast, rows_fast = gram_cholesky_(J, torch.empty(20, 150, 150))
    # Both factor J J^T to float32 accuracy: their difference is bounded by the conditioning of the factorisation.
    G = J.double() @ J.double().mT
    kappa = torch.linalg.cond(G).max()
    tol = float(kappa.sqrt()) * 150 * EPS32
    L64 = torch.linalg.cholesky(G)
    for L in (L_ieee, L_fast):
        assert float(((L.tril().double() - L64).abs().amax((-2, -1)) / L64.abs().amax((-2, -1))).max()) <= tol
    assert torch.equal(flagged, flagged_fast)
    torch.testing.assert_close(rows_fast, rows, rtol=16 * EPS32, atol=0)


@pytest.mark.usefixtures("default_setting")
def test_mixed_precision_layer_on_fast_products_matches_ieee_products():
    h, h_jac, x, _, y_hat = quadratic_instance(B=8, n=60, m=40, noise=0.5, seed=4)
    cons = OutputConstraints(h=h, h_jac=h_jac)
    fast = EnforceProjection(cons, eval_tol=1e-10, mixed_precision=True).eval().project(x, y_hat)
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    ieee = EnforceProjection(cons, eval_tol=1e-10, mixed_precision=True).eval().project(x, y_hat)
    for res in (fast, ieee):
        assert bool(res.converged.all()) and float(h(x, res.y).abs().max()) <= 1e-10
    # the float32 steps' rounding differs, nothing else (the bound of the float32-vs-float64 test)
    assert float((fast.y - ieee.y).abs().max()) <= 1e3 * EPS32 * float(y_hat.abs().max())
