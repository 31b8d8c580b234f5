"""HardNetPP: the paper's iteration (ε → 0 agreement with ENFORCE, bounds), the Levenberg–Marquardt iteration,
both gradients, options."""

import itertools

import pytest
import torch
from layer_cases import F64, quadratic_instance

from sqpoptim.layers import EnforceProjection, HardNetPP, OutputConstraints, adanp, hardnet_pp
from sqpoptim.layers._hardnet_pp import FREE_STEPS


def test_vanishing_damping_reproduces_enforce_steps():
    h, _, x, _, y_hat = quadratic_instance(B=5, n=7, m=3, noise=0.2)
    cons = OutputConstraints(h=h)
    enforce_2 = adanp(cons, x, y_hat, tol=1e-300, max_depth=2).y  # exactly two NP steps
    gaps = [float((hardnet_pp(cons, x, y_hat, eps=eps, max_iter=2).y - enforce_2).abs().max()) for eps in (1e-5, 1e-6)]
    assert gaps[1] < 1e-6 and gaps[1] < gaps[0] / 5  # O(ε)
    converged = HardNetPP(cons, method="paper", eps=1e-9, max_iter=12).eval()(x, y_hat)
    enforce = EnforceProjection(cons, eval_tol=1e-12, jacobian="exact").eval()(x, y_hat)
    torch.testing.assert_close(converged, enforce, rtol=0, atol=1e-8)


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


def _feasible(y, h, x, lower, upper, tol):
    return float(h(x, y).abs().max()) <= tol and bool(((y[:, :3] >= lower - tol) & (y[:, :3] <= upper + tol)).all())


def test_paper_iteration_with_equalities_and_two_sided_bounds():
    # The structured Jacobian keeps 500 iterations fast; the generic path is exercised in the other tests.
    cons, h, x, y_hat, lower, upper = _bounded_instance(structured=True, B=6, n=8, m=3)
    assert bool(((y_hat[:, :3] < lower) | (y_hat[:, :3] > upper)).any())  # the bounds are active
    res = HardNetPP(cons, method="paper").eval().project(x, y_hat)  # ε = 0.3, 500 iterations
    assert res.iterations == 500 and bool(res.converged.all())
    assert _feasible(res.y, h, x, lower, upper, 1e-6)


@pytest.mark.parametrize("structured", [True, False])
def test_levenberg_marquardt_converges_quadratically_with_bounds(structured):
    cons, h, x, y_hat, lower, upper = _bounded_instance(structured=structured, B=6, n=8, m=3)
    res = HardNetPP(cons, tol=1e-12).eval().project(x, y_hat)
    assert bool(res.converged.all()) and res.iterations <= 12
    assert _feasible(res.y, h, x, lower, upper, 1e-12)
    # A feasible input is a fixed point: no step is taken.
    again = HardNetPP(cons, tol=1e-12).eval().project(x, res.y)
    assert again.iterations == 0 and torch.equal(again.y, res.y)


def test_levenberg_marquardt_where_the_paper_step_is_overdetermined():
    # n = 3 outputs; one equality and a box on every coordinate: m + q = 4 > n. The paper's step solves the
    # four linearised rows in the least-squares sense; dropping the satisfied rows makes them consistent.
    cons = OutputConstraints(h=lambda x, y: (y**2).sum(-1, keepdim=True) - 1.0, g=lambda x, y: y, lower=-0.9, upper=0.9)
    y_hat = torch.tensor([[2.0, 0.1, 0.1], [0.3, -1.5, 0.4]], dtype=F64)
    paper = HardNetPP(cons, method="paper", early_stop=True, tol=1e-9).eval().project(None, y_hat)
    lm = HardNetPP(cons, tol=1e-9).eval().project(None, y_hat)
    for res in (paper, lm):
        assert bool(res.converged.all()) and float(cons.violation(None, res.y).max()) <= 1e-9
    assert lm.iterations < 20 < paper.iterations


def test_levenberg_marquardt_is_monotone_after_the_free_gauss_newton_steps():
    # A far-away start on a strongly curved equality. The first FREE_STEPS steps are plain Gauss–Newton and may
    # increase the violation (it can have to cross a region of larger residual); then the iteration goes on
    # from the best point so far and accepted steps never increase the violation energy.
    cons = OutputConstraints(h=lambda x, y: torch.exp(y[:, :1]) + y[:, 1:2] ** 3 - 2.0)
    y_hat = torch.tensor([[-6.0, -3.0], [4.0, 2.0], [-1.0, 0.5]], dtype=F64)

    def energy(it):
        y = HardNetPP(cons, max_iter=it, tol=1e-13, nonconvergence="ignore").eval()(None, y_hat)
        return float(cons.violation(None, y).square().sum())

    free = [float(cons.violation(None, y_hat).square().sum())] + [energy(it) for it in range(1, FREE_STEPS)]
    later = [energy(it) for it in range(FREE_STEPS, FREE_STEPS + 25, 3)]
    assert later[0] <= min(free)
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(later))
    assert later[-1] <= 1e-24


def test_early_stop_checks_every_k_iterations():
    h, _, x, _, y_hat = quadratic_instance()
    res = HardNetPP(h, method="paper", early_stop=True, check_every=4, tol=1e-8).eval().project(x, y_hat)
    assert res.iterations % 4 == 0 and res.iterations < 500 and float(res.residual.max()) <= 1e-8


@pytest.mark.parametrize("method", ["paper", "lm"])
def test_gradcheck_unrolled_equalities(method):
    h, _, x, _, y_hat = quadratic_instance(B=2, n=4, m=2)
    layer = HardNetPP(h, method=method, max_iter=4, tol=1e-300, gradient="unrolled", nonconvergence="ignore")
    assert torch.autograd.gradcheck(layer.eval(), (x.clone().requires_grad_(), y_hat.clone().requires_grad_()))


def test_gradcheck_unrolled_with_active_bounds():
    cons, _, x, y_hat, lower, upper = _bounded_instance(B=2, n=4, m=1, noise=0.3)
    layer = HardNetPP(cons, method="paper", max_iter=3, gradient="unrolled", nonconvergence="ignore").eval()
    # Few iterations keep violated rows strictly violated, away from the ReLU kink (finite differences
    # across it would not match any derivative).
    g_final = layer(x, y_hat)[:, :3]
    margin = torch.minimum((g_final - upper).abs(), (g_final - lower).abs()).min()
    assert float(margin) > 1e-4
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(), y_hat.clone().requires_grad_()))


@pytest.mark.parametrize("method", ["paper", "lm"])
def test_gradcheck_implicit_at_a_feasible_input(method):
    # On the constraint set the implicit gradient is the exact derivative of the limit map: finite differences
    # move ŷ off the set by 1e-6 and the layer (tolerance 1e-13) projects back.
    h, h_jac, x, y_star, _ = quadratic_instance(B=2, n=4, m=2)
    cons = OutputConstraints(h=h, h_jac=h_jac)
    kw = {"max_iter": 3000, "early_stop": True, "check_every": 1} if method == "paper" else {}
    layer = HardNetPP(cons, method=method, tol=1e-13, **kw).eval()
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(), y_star.clone().requires_grad_()), atol=1e-6)


@pytest.mark.parametrize("method", ["paper", "lm"])
def test_implicit_approaches_unrolled_linearly_near_the_constraint_set(method):
    h, h_jac, x, y_star, _ = quadratic_instance(B=3, n=6, m=3)
    cons = OutputConstraints(h=h, h_jac=h_jac)
    direction = torch.randn(y_star.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    weights = torch.randn(y_star.shape, dtype=F64, generator=torch.Generator().manual_seed(8))
    kw = {"max_iter": 120} if method == "paper" else {"tol": 1e-13}
    errors = []
    for sigma in (1e-2, 1e-3):
        grads = []
        for gradient in ("unrolled", "implicit"):
            yr = (y_star + sigma * direction).requires_grad_()
            layer = HardNetPP(cons, method=method, gradient=gradient, nonconvergence="ignore", **kw).eval()
            (layer(x, yr) * weights).sum().backward()
            grads.append(yr.grad)
        errors.append(float((grads[0] - grads[1]).abs().max()))
    assert errors[1] < errors[0] / 5 and errors[1] < 1e-2


def test_broyden_jacobians_converge_with_fewer_jacobians():
    cons, h, x, y_hat, lower, upper = _bounded_instance(B=6, n=8, m=3, noise=0.2)
    calls = {"n": 0}
    jacobian = OutputConstraints._func_jacobian

    def counting(self, *args):
        calls["n"] += 1
        return jacobian(self, *args)

    results = {}
    for mode in ("exact", "broyden"):
        calls["n"] = 0
        OutputConstraints._func_jacobian = counting
        try:
            results[mode] = (HardNetPP(cons, tol=1e-11, jacobian=mode).eval().project(x, y_hat), calls["n"])
        finally:
            OutputConstraints._func_jacobian = jacobian
    for res, _ in results.values():
        assert bool(res.converged.all()) and _feasible(res.y, h, x, lower, upper, 1e-11)
    assert results["broyden"][1] < results["exact"][1]
    assert HardNetPP(cons)._jacobian_mode() == "broyden"  # auto: generic Jacobians are updated


def test_bad_arguments():
    h = lambda x, y: y[:, :1]  # noqa: E731
    with pytest.raises(ValueError, match="method"):
        HardNetPP(h, method="newton")
    with pytest.raises(ValueError, match="broyden"):
        HardNetPP(h, method="paper", jacobian="broyden")
    with pytest.raises(ValueError, match="broyden"):
        HardNetPP(h, gradient="unrolled", jacobian="broyden")
    with pytest.raises(ValueError, match="eps"):
        HardNetPP(h, eps=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        HardNetPP(h, max_iter=0)
    with pytest.raises(ValueError, match="check_every"):
        HardNetPP(h, check_every=0)
    with pytest.raises(ValueError, match="gradient"):
        HardNetPP(h, gradient="adjoint")
