"""KKTHardNet: KKT conditions, scipy projections, both gradient modes, rank deficiency, bad input."""

import numpy as np
import pytest
import torch
from layer_cases import F64, affine_constraints, affine_instance, loop_jacobian, quadratic_instance
from scipy.optimize import minimize

from sqpoptim.layers import HardNetAffine, KKTHardNet, OutputConstraints, ProjectionWarning
from sqpoptim.layers._kkt_system import KKTBlocks, ReducedKKT


def _g(x, y):
    return torch.stack([y[:, 0] + y[:, 1], y[:, 2] ** 2 + 0.5 * y[:, 3]], -1)


def _instance(B=5, n=5, m=2, seed=0, noise=0.15):
    """Quadratic equalities and nonlinear inequalities g(y) <= u, active for some samples at ŷ."""
    h, _, x, y_star, y_hat = quadratic_instance(B=B, n=n, m=m, seed=seed, noise=noise)
    upper = _g(x, y_star) + 0.02  # y* is feasible with a small margin, so ŷ's noise activates bounds
    return h, _g, x, y_hat, upper


def _structured(B=2, n=4, m=1, noise=0.3):
    """The same instance with analytic Jacobians and Lagrangian Hessian (fast enough for gradcheck)."""
    h, h_jac, x, y_star, y_hat = quadratic_instance(B=B, n=n, m=m, noise=noise)

    def g_jac(x, y):
        J = torch.zeros(y.shape[0], 2, y.shape[1], dtype=y.dtype)
        J[:, 0, :2] = 1.0
        J[:, 1, 2], J[:, 1, 3] = 2 * y[:, 2], 0.5
        return _g(x, y), J

    def hessian(x, y, w_h, w_g):
        H = h_jac.lagrangian_hessian(x, y, w_h, None).clone()
        H[:, 2, 2] += 2 * w_g[:, 1]  # ∇²(y₂²)
        return H

    cons = OutputConstraints(
        h=h, g=_g, upper=_g(x, y_star) + 0.02, h_jac=h_jac, g_jac=g_jac, lagrangian_hessian=hessian
    )
    return cons, x, y_hat


def test_solution_satisfies_kkt_conditions():
    h, g, x, y_hat, upper = _instance(B=8)
    res = KKTHardNet(OutputConstraints(h=h, g=g, upper=upper)).eval().project(x, y_hat)
    assert bool(res.converged.all()) and float(res.extras["kkt_residual"].max()) <= 1e-10
    y, mu_e, mu_i = res.y, res.extras["multipliers_eq"], res.extras["multipliers_ineq"]
    gap = upper - g(x, y)  # only upper bounds: the inequality rows are g - u in g's order
    stationarity = y - y_hat + torch.einsum("bmn,bm->bn", loop_jacobian(h, x, y), mu_e)
    stationarity = stationarity + torch.einsum("bqn,bq->bn", loop_jacobian(g, x, y), mu_i)
    assert float(stationarity.abs().max()) <= 1e-10
    assert float(h(x, y).abs().max()) <= 1e-10
    assert float(gap.min()) >= -1e-10 and float(mu_i.min()) >= -1e-10
    assert float((mu_i * gap).abs().max()) <= 1e-9
    assert bool((mu_i > 1e-6).any())  # some bound is active, so the test is not vacuous


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_projection(seed):
    h, g, x, y_hat, upper = _instance(B=4, seed=seed)
    res = KKTHardNet(OutputConstraints(h=h, g=g, upper=upper)).eval().project(x, y_hat)
    assert bool(res.converged.all())
    for b in range(4):
        yb = y_hat[b].numpy()

        def eq(y, b=b):
            return h(x[b : b + 1], torch.tensor(y)[None])[0].numpy()

        def ineq(y, b=b):
            return (upper[b] - g(x[b : b + 1], torch.tensor(y)[None])[0]).numpy()

        sol = minimize(
            lambda y, yb=yb: 0.5 * np.sum((y - yb) ** 2),
            yb,
            jac=lambda y, yb=yb: y - yb,
            method="SLSQP",
            constraints=[{"type": "eq", "fun": eq}, {"type": "ineq", "fun": ineq}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        assert sol.success
        np.testing.assert_allclose(res.y[b].numpy(), sol.x, rtol=0, atol=1e-6)


def test_two_sided_bounds_with_infinite_sides():
    h, g, x, y_hat, upper = _instance(B=6)
    lower = torch.full_like(upper, -torch.inf)
    lower[:, 1] = -0.2  # one row two-sided, for every sample
    upper = upper.clone()
    upper[::2, 0] = torch.inf  # a side switched off for some samples only
    cons = OutputConstraints(h=h, g=g, lower=lower, upper=upper)
    res = KKTHardNet(cons).eval().project(x, y_hat)
    assert bool(res.converged.all()) and float(cons.violation(x, res.y).max()) <= 1e-10


def test_affine_equalities_match_closed_form():
    # The paper's affine closed form has a sign error; the correct one is HardNet's projection.
    Bm, M, _, x, y_hat = affine_instance()
    cons = affine_constraints(Bm, M)
    res = KKTHardNet(cons).eval().project(x, y_hat)
    torch.testing.assert_close(res.y, HardNetAffine(cons).eval()(x, y_hat), rtol=0, atol=1e-10)
    assert res.iterations <= 2  # Newton is exact for a linear KKT system


@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_gradcheck_with_active_inequalities(gradient):
    cons, x, y_hat = _structured()
    generic = OutputConstraints(h=cons.h, g=cons.g, upper=cons.upper)
    torch.testing.assert_close(  # the structured callbacks are the generic path's, faster
        KKTHardNet(cons).eval()(x, y_hat), KKTHardNet(generic).eval()(x, y_hat), rtol=0, atol=1e-12
    )
    layer = KKTHardNet(cons, gradient=gradient).eval()
    assert bool((layer.project(x, y_hat).extras["multipliers_ineq"] > 1e-3).any())
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(), y_hat.clone().requires_grad_()))


def test_implicit_matches_unrolled_at_convergence():
    h, g, x, y_hat, upper = _instance(B=6)
    grads = []
    for gradient in ("unrolled", "implicit"):
        xr, yr = x.clone().requires_grad_(), y_hat.clone().requires_grad_()
        layer = KKTHardNet(OutputConstraints(h=h, g=g, upper=upper), gradient=gradient).eval()
        (layer(xr, yr) * torch.linspace(-1, 2, 5, dtype=F64)).sum().backward()
        grads.append((xr.grad, yr.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_rank_deficient_equalities_fall_back_to_gauss_newton():
    h, _, x, _, y_hat = quadratic_instance(B=4, m=2)
    dup = lambda x, y: torch.cat([h(x, y), h(x, y)[:, :1]], dim=-1)  # noqa: E731
    res = KKTHardNet(dup).eval().project(x, y_hat)
    assert bool(res.regularized.all()) and bool(res.converged.all())
    torch.testing.assert_close(res.y, KKTHardNet(h).eval()(x, y_hat), rtol=0, atol=1e-10)


def test_float32_solve_dtype():
    h, _, x, _, y_hat = quadratic_instance()
    layer = KKTHardNet(h, solve_dtype=None).eval()
    res = layer.project(x.float(), y_hat.float())
    assert res.y.dtype == torch.float32 and bool(res.converged.all())  # tol defaults to 1e-5 in float32


@pytest.mark.parametrize("hessian", ["positive definite", "negative on the constraints' normals"])
def test_reduced_solves_match_the_dense_kkt_matrix(hessian):
    gen = torch.Generator().manual_seed(3)
    B, n, m, p = 6, 7, 2, 3
    Jh, Jg = torch.randn(B, m, n, dtype=F64, generator=gen), torch.randn(B, p, n, dtype=F64, generator=gen)
    # Rows with D_s >= D_mu and with D_mu > D_s, including the extremes 0 and 2 - sqrt(2).
    d_mu, d_s = 2 * torch.rand(B, p, dtype=F64, generator=gen), 2 * torch.rand(B, p, dtype=F64, generator=gen)
    d_mu[0, 0], d_s[0, 0], d_mu[1, 1], d_s[1, 1] = 0.0, 2 - 2**0.5, 2 - 2**0.5, 0.0
    if hessian == "positive definite":
        A = torch.randn(B, n, n, dtype=F64, generator=gen)
        H, gamma = A @ A.mT + 0.1 * torch.eye(n, dtype=F64), None
    else:  # indefinite, but positive on the null space of J_h: the augmented solve handles it
        H, gamma = torch.eye(n, dtype=F64) - 3 * Jh.mT @ Jh, torch.full((B,), 10.0, dtype=F64)
    blocks = KKTBlocks(H, Jh, Jg, d_mu, d_s)
    K = blocks.dense()
    b = torch.randn(B, n + m + 2 * p, dtype=F64, generator=gen)
    reduced = ReducedKKT(blocks, gamma=gamma)
    assert not bool(reduced.not_pd.any())
    torch.testing.assert_close(reduced.solve(b)[0], torch.linalg.solve(K, b), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reduced.solve_transpose(b)[0], torch.linalg.solve(K.mT, b), rtol=1e-10, atol=1e-10)
    if gamma is not None:
        assert bool(ReducedKKT(blocks).not_pd.all())  # the plain reduction needs H̃ positive definite


def _cubic(B=64, seed=0):
    """KKT-Hardnet's E1 constraint y1 = y2^3 + a far from an untrained network's output (ŷ ≈ (0, -0.2)):
    the nearest point of the curve has y2 ≈ -a^(1/3); a nearby point with y2 ≈ 0 is no KKT point."""
    gen = torch.Generator().manual_seed(seed)
    a = 12 + 30 * torch.rand(B, 1, dtype=F64, generator=gen)
    y_hat = torch.cat(
        [0.05 * torch.randn(B, 1, dtype=F64, generator=gen), -0.2 + 0.02 * torch.randn(B, 1, dtype=F64, generator=gen)],
        -1,
    )
    h = lambda x, y: y[:, :1] - y[:, 1:] ** 3 - x  # noqa: E731
    hess = lambda x, y, w_h, w_g: torch.diag_embed(torch.cat([torch.zeros_like(y[:, :1]), -6 * y[:, 1:] * w_h], -1))  # noqa: E731
    jac = lambda x, y: torch.stack([torch.ones_like(y[:, 0]), -3 * y[:, 1] ** 2], -1)[:, None]  # noqa: E731
    return OutputConstraints(h=h, h_jac=jac, lagrangian_hessian=hess), a, y_hat


def test_globalised_newton_reaches_local_projections_where_the_paper_iteration_stalls():
    cons, a, y_hat = _cubic()
    res = KKTHardNet(cons, nonconvergence="ignore").eval().project(a, y_hat)
    assert bool(res.converged.all())
    y, mu = res.y, res.extras["multipliers_eq"][:, 0]
    assert float(cons.h(a, y).abs().max()) <= 1e-10
    # A local minimum of the distance on the curve: positive curvature along the tangent (1, 3 y2²)/‖·‖.
    t = torch.stack([3 * y[:, 1] ** 2, torch.ones_like(mu)], -1)
    curvature = t[:, 0] ** 2 + t[:, 1] ** 2 * (1 - 6 * mu * y[:, 1])
    assert bool((curvature > 0).all())
    assert float((y - y_hat).norm(dim=-1).max()) < 4.0  # the near branch (the far one is at distance >= 12)
    # The paper's iteration (Newton, Armijo on ½‖F‖², Gauss–Newton fallback) stalls at a stationary point of
    # ½‖F‖² that is no KKT point, for every sample.
    paper = KKTHardNet(cons, method="paper", max_iter=30, nonconvergence="ignore").eval().project(a, y_hat)
    assert not bool(paper.converged.any())


def _pooling():
    """KKT-Hardnet's pooling constraints (four balances, bilinear in the pool quality m; two specifications) at
    four inputs (A, B, X, Y), and an untrained network's outputs (m, Px, Py, Cx, Cy) there."""

    def h(x, y):
        a, b, xx, yy = x.unbind(-1)
        m, px, py, cx, cy = y.unbind(-1)
        return torch.stack([px + py - a - b, xx - px - cx, yy - py - cy, m * (px + py) - 3 * a - b], -1)

    def g(x, y):
        _, _, xx, yy = x.unbind(-1)
        m, px, py, cx, cy = y.unbind(-1)
        return torch.stack([m * px + 2 * cx - 2.5 * xx, m * py + 2 * cy - 1.5 * yy], -1)

    x = torch.tensor(
        [
            [4.11, 143.07, 50.18, 179.69],
            [7.61, 47.82, 82.71, 7.41],
            [30.62, 124.03, 68.31, 115.7],
            [14.05, 210.0, 92.2, 164.34],
        ],
        dtype=F64,
    )
    y_hat = torch.tensor(
        [
            [-12.31, 1.84, -27.77, 11.1, 12.62],
            [-8.81, 3.73, -4.46, 9.22, 2.09],
            [-7.31, 2.6, -19.77, 5.63, 4.33],
            [-12.68, 4.17, -31.96, 10.71, 7.65],
        ],
        dtype=F64,
    )
    return OutputConstraints(h=h, g=g), x, y_hat


def test_restart_from_a_feasible_point_where_newton_from_the_raw_output_fails():
    cons, x, y_hat = _pooling()
    stuck = KKTHardNet(cons, restart=None, max_iter=25, nonconvergence="ignore").eval().project(x, y_hat)
    assert not bool(stuck.converged.any())
    res = KKTHardNet(cons).eval().project(x, y_hat)  # restart after 10 iterations
    assert bool(res.converged.all()) and float(cons.violation(x, res.y).max()) <= 1e-9
    # The restarted samples end at KKT points of the projection (checked with autograd Jacobians).
    y, mu_e, mu_i = res.y, res.extras["multipliers_eq"], res.extras["multipliers_ineq"]
    stationarity = y - y_hat + torch.einsum("bmn,bm->bn", loop_jacobian(cons.h, x, y), mu_e)
    stationarity = stationarity + torch.einsum("bqn,bq->bn", loop_jacobian(cons.g, x, y), mu_i)
    assert float(stationarity.abs().max()) <= 1e-8 * float(y_hat.abs().max())
    assert float(mu_i.min()) >= -1e-10 and float((mu_i * cons.g(x, y)).abs().max()) <= 1e-6


def test_unrolled_gradient_stays_finite_through_rejected_and_fallback_steps():
    cons, a, y_hat = _cubic(B=8)
    yr = y_hat.clone().requires_grad_()
    y = KKTHardNet(cons, gradient="unrolled", max_iter=40, nonconvergence="ignore").eval()(a, yr)
    y.square().sum().backward()
    assert bool(torch.isfinite(yr.grad).all())


def test_paper_fixed_step_contracts_geometrically_on_a_linear_system():
    # Affine constraints: F(z + α d) = (1 - α) F(z) for the Newton step d, so ‖F‖ halves exactly per step.
    Bm, M, _, x, y_hat = affine_instance()
    cons = affine_constraints(Bm, M)
    norms = []
    for k in (2, 3):
        res = (
            KKTHardNet(cons, method="paper", step_size=0.5, max_iter=k, nonconvergence="ignore")
            .eval()
            .project(x, y_hat)
        )
        norms.append(res.extras["kkt_residual"])
    torch.testing.assert_close(norms[1], 0.5 * norms[0], rtol=1e-9, atol=0)


def test_infeasible_and_bad_arguments():
    h = lambda x, y: y[:, :1] ** 2 + 1.0  # noqa: E731
    y_hat = torch.randn(3, 2, dtype=F64)
    with pytest.warns(ProjectionWarning):
        res = KKTHardNet(h, max_iter=10).eval().project(None, y_hat)
    assert not bool(res.converged.any())
    with pytest.raises(ValueError, match="lower > upper"):
        KKTHardNet(OutputConstraints(g=lambda x, y: y, lower=1.0, upper=-1.0))(None, y_hat)
    with pytest.raises(ValueError, match="gradient"):
        KKTHardNet(h, gradient="adjoint")
    with pytest.raises(ValueError, match="line search"):
        KKTHardNet(h, backtrack=1.0)
    with pytest.raises(ValueError, match="max_iter"):
        KKTHardNet(h, max_iter=0)
    with pytest.raises(ValueError, match="method"):
        KKTHardNet(h, method="lm")
    with pytest.raises(ValueError, match="restart"):
        KKTHardNet(h, restart=0)
    with pytest.raises(ValueError, match="step_size"):
        KKTHardNet(h, step_size=0.5)  # the fixed step is the paper iteration's
