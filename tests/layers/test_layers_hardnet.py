"""HardNetAffine: closed-form projections against numpy oracles; gradients; rank deficiency; bad input."""

import numpy as np
import pytest
import torch
from layer_cases import F64, affine_constraints, affine_instance, np_equality_projection, quadratic_instance

from sqpoptim.layers import HardNetAffine, OutputConstraints, ProjectionWarning, parallel_step


def test_equalities_exact_in_one_step():
    Bm, M, _, x, y_hat = affine_instance()
    res = HardNetAffine(affine_constraints(Bm, M)).eval().project(x, y_hat)
    b = (torch.sin(x) @ M).numpy()
    expected = np_equality_projection(Bm.numpy(), b, y_hat.numpy())
    np.testing.assert_allclose(res.y.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert res.iterations == 1 and bool(res.converged.all()) and float(res.residual.max()) < 1e-12
    assert not bool(res.regularized.any())


def test_inequalities_parallel_projection_matches_pseudoinverse():
    _, _, Am, x, y_hat = affine_instance(q=3)
    lo, hi = -np.ones(3), np.array([1.0, np.inf, 0.5])
    cons = OutputConstraints(g=lambda x, y: y @ Am.T, lower=torch.tensor(lo), upper=torch.tensor(hi))
    res = HardNetAffine(cons).eval().project(x, y_hat)
    A, Y = Am.numpy(), y_hat.numpy()
    AY = Y @ A.T
    expected = Y - (np.maximum(AY - hi, 0) - np.maximum(lo - AY, 0)) @ np.linalg.pinv(A).T
    np.testing.assert_allclose(res.y.numpy(), expected, rtol=1e-12, atol=1e-12)
    # Parallel projection: A y⁺ = clip(A y, lo, hi), so satisfied rows do not move.
    np.testing.assert_allclose(res.y.numpy() @ A.T, np.clip(AY, lo, hi), rtol=1e-12, atol=1e-12)


def test_equalities_and_inequalities_together():
    Bm, M, Am, x, y_hat = affine_instance(m=2, q=2)
    cons = affine_constraints(Bm, M, Am, lower=-0.3, upper=0.3)
    res = HardNetAffine(cons).eval().project(x, y_hat)
    C = np.vstack([Bm.numpy(), Am.numpy()])
    Y = y_hat.numpy()
    AY = Y @ Am.numpy().T
    r = np.hstack([Y @ Bm.numpy().T - (torch.sin(x) @ M).numpy(), np.maximum(AY - 0.3, 0) - np.maximum(-0.3 - AY, 0)])
    np.testing.assert_allclose(res.y.numpy(), Y - r @ np.linalg.pinv(C).T, rtol=1e-11, atol=1e-11)
    assert float(res.residual.max()) < 1e-12


def test_gradcheck_through_closed_form():
    Bm, M, Am, x, y_hat = affine_instance(B=3, n=5, m=2, q=2)
    layer = HardNetAffine(affine_constraints(Bm, M, Am, lower=-0.3, upper=0.3)).eval()
    xr, yr = x.clone().requires_grad_(), y_hat.clone().requires_grad_()
    assert torch.autograd.gradcheck(layer, (xr, yr))


def test_damped_step_push_through_identity():
    gen = torch.Generator().manual_seed(3)
    J, r, y = (torch.randn(*s, dtype=F64, generator=gen) for s in ((4, 7, 5), (4, 7), (4, 5)))
    wide = parallel_step(y, r, J, 0.3)[0]  # k = 7 > n = 5: the n x n form
    JJ = J @ J.mT + 0.3 * torch.eye(7, dtype=F64)
    expected = y - torch.einsum("bkn,bk->bn", J, torch.linalg.solve(JJ, r))
    torch.testing.assert_close(wide, expected, rtol=1e-12, atol=1e-12)


def test_rank_deficient_rows_are_regularised_and_flagged():
    Bm, M, _, x, y_hat = affine_instance(m=2)
    B3 = torch.cat([Bm, Bm[:1]])  # a duplicated (consistent) constraint
    M3 = torch.cat([M, M[:, :1]], dim=1)
    res = HardNetAffine(affine_constraints(B3, M3)).eval().project(x, y_hat)
    expected = np_equality_projection(Bm.numpy(), (torch.sin(x) @ M).numpy(), y_hat.numpy())
    np.testing.assert_allclose(res.y.numpy(), expected, rtol=1e-8, atol=1e-8)
    assert bool(res.regularized.all()) and bool(res.converged.all())


def test_nonaffine_constraints_are_reported():
    h, _, x, _, y_hat = quadratic_instance()
    with pytest.warns(ProjectionWarning, match="missed the tolerance"):
        HardNetAffine(h).eval()(x, y_hat)
    with pytest.raises(RuntimeError, match="missed the tolerance"):
        HardNetAffine(h, nonconvergence="raise").eval()(x, y_hat)
    HardNetAffine(h).train()(x, y_hat)  # training mode: diagnostics only, no warning


def test_float32_outputs_with_float64_solve():
    Bm, M, _, x, y_hat = affine_instance()
    y32 = y_hat.float().requires_grad_()
    y = HardNetAffine(affine_constraints(Bm, M)).eval()(x.float(), y32)
    assert y.dtype == torch.float32
    b = (torch.sin(x.float().double()) @ M).numpy()
    expected = np_equality_projection(Bm.numpy(), b, y32.detach().double().numpy())
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=0, atol=1e-5)
    y.sum().backward()
    assert y32.grad.dtype == torch.float32


def test_bad_input():
    Bm, M, _, x, y_hat = affine_instance()
    layer = HardNetAffine(affine_constraints(Bm, M))
    with pytest.raises(ValueError, match="batch mismatch"):
        layer(x[:2], y_hat)
    with pytest.raises(ValueError, match=r"\[B, n\]"):
        layer(x, y_hat[0])
    bad = y_hat.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="y_hat contains NaN"):
        layer(x, bad)
    badx = x.clone()
    badx[0, 0] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN"):
        layer(badx, y_hat)
    with pytest.raises(ValueError, match="lower > upper"):
        HardNetAffine(OutputConstraints(g=lambda x, y: y, lower=1.0, upper=0.0))(x, y_hat)
    with pytest.raises(ValueError, match="not finite"):
        HardNetAffine(lambda x, y: torch.log(y[:, :1] - 100))(x, y_hat)
    with pytest.raises(TypeError, match="constraints"):
        HardNetAffine(3)
