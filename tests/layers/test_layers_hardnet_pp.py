"""HardNetPP: ε → 0 agreement with ENFORCE, convergence with two-sided bounds, gradients, options."""

import pytest
import torch
from layer_cases import F64, quadratic_instance

from sqpoptim.layers import EnforceProjection, HardNetPP, OutputConstraints, adanp, hardnet_pp


def test_vanishing_damping_reproduces_enforce_steps():
    h, _, x, _, y_hat = quadratic_instance(B=5, n=7, m=3, noise=0.2)
    cons = OutputConstraints(h=h)
    enforce_2 = adanp(cons, x, y_hat, tol=1e-300, max_depth=2).y  # exactly two NP steps
    gaps = [float((hardnet_pp(cons, x, y_hat, eps=eps, max_iter=2).y - enforce_2).abs().max()) for eps in (1e-5, 1e-6)]
    assert gaps[1] < 1e-6 and gaps[1] < gaps[0] / 5  # O(ε)
    converged = HardNetPP(cons, eps=1e-9, max_iter=30).eval()(x, y_hat)
    torch.testing.assert_close(converged, EnforceProjection(cons, eval_tol=1e-12).eval()(x, y_hat), rtol=0, atol=1e-8)


def _bounded_instance(structured=False, **kw):
    h, h_jac, x, y_star, y_hat = quadratic_instance(**kw)
    # Bounds that y* satisfies with margin and ŷ violates on some samples.
    lower, upper = y_star[:, :3] - 0.05, y_star[:, :3] + 0.02
    g = lambda x, y: y[:, :3]  # noqa: E731
    jacs = {}
    if structured:
        E = torch.eye(y_hat.shape[1], dtype=F64)[:3]
        jacs = {"h_jac": h_jac, "g_jac": lambda x, y: E.expand(y.shape[0], 3, -1)}
    cons = OutputConstraints(h=h, g=g, lower=lambda x: lower, upper=lambda x: upper, **jacs)
    return cons, h, x, y_hat, lower, upper


def test_equalities_and_two_sided_bounds_converge_with_paper_settings():
    # The structured Jacobian keeps 500 iterations fast; the generic path is exercised in the other tests.
    cons, h, x, y_hat, lower, upper = _bounded_instance(structured=True, B=6, n=8, m=3)
    assert bool(((y_hat[:, :3] < lower) | (y_hat[:, :3] > upper)).any())  # the bounds are active
    res = HardNetPP(cons).eval().project(x, y_hat)  # ε = 0.3, 500 iterations
    assert res.iterations == 500 and bool(res.converged.all())
    assert float(h(x, res.y).abs().max()) <= 1e-6
    assert bool((res.y[:, :3] >= lower - 1e-6).all() & (res.y[:, :3] <= upper + 1e-6).all())


def test_more_constraints_than_outputs_uses_the_n_by_n_form():
    # n = 3 outputs; one equality and a box on every coordinate: m + q = 4 > n.
    cons = OutputConstraints(h=lambda x, y: (y**2).sum(-1, keepdim=True) - 1.0, g=lambda x, y: y, lower=-0.9, upper=0.9)
    y_hat = torch.tensor([[2.0, 0.1, 0.1], [0.3, -1.5, 0.4]], dtype=F64)
    res = HardNetPP(cons, early_stop=True, tol=1e-9).eval().project(None, y_hat)
    assert bool(res.converged.all()) and res.iterations < 500
    assert float(cons.violation(None, res.y).max()) <= 1e-9


def test_early_stop_checks_every_k_iterations():
    h, _, x, _, y_hat = quadratic_instance()
    res = HardNetPP(h, early_stop=True, check_every=4, tol=1e-8).eval().project(x, y_hat)
    assert res.iterations % 4 == 0 and res.iterations < 500 and float(res.residual.max()) <= 1e-8


def test_gradcheck_unrolled_equalities():
    h, _, x, _, y_hat = quadratic_instance(B=2, n=4, m=2)
    layer = HardNetPP(h, max_iter=6, nonconvergence="ignore").eval()
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(), y_hat.clone().requires_grad_()))


def test_gradcheck_unrolled_with_active_bounds():
    cons, _, x, y_hat, lower, upper = _bounded_instance(B=2, n=4, m=1, noise=0.3)
    layer = HardNetPP(cons, max_iter=3, nonconvergence="ignore").eval()
    # Few iterations keep violated rows strictly violated, away from the ReLU kink (finite differences
    # across it would not match any derivative).
    g_final = layer(x, y_hat)[:, :3]
    margin = torch.minimum((g_final - upper).abs(), (g_final - lower).abs()).min()
    assert float(margin) > 1e-4
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(), y_hat.clone().requires_grad_()))


def test_bad_arguments():
    h = lambda x, y: y[:, :1]  # noqa: E731
    with pytest.raises(ValueError, match="unrolled' only"):
        HardNetPP(h, gradient="implicit")
    with pytest.raises(ValueError, match="eps"):
        HardNetPP(h, eps=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        HardNetPP(h, max_iter=0)
    with pytest.raises(ValueError, match="check_every"):
        HardNetPP(h, check_every=0)
