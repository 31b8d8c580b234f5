"""EnforceProjection (AdaNP): exactness, convergence, idempotence, gradients, activation rule, bad input."""

import numpy as np
import pytest
import torch
from layer_cases import F64, affine_constraints, affine_instance, np_equality_projection, quadratic_instance

from sqpoptim.layers import EnforceProjection, OutputConstraints, ProjectionWarning, adanp, adanp_activation


def test_affine_equalities_exact_after_one_step():
    Bm, M, _, x, y_hat = affine_instance()
    res = EnforceProjection(affine_constraints(Bm, M)).eval().project(x, y_hat)
    expected = np_equality_projection(Bm.numpy(), (torch.sin(x) @ M).numpy(), y_hat.numpy())
    np.testing.assert_allclose(res.y.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert res.iterations == 1 and bool(res.converged.all())


@pytest.mark.parametrize("structured", [False, True])
def test_nonlinear_residual_below_tolerance_within_depth(structured):
    h, h_jac, x, _, y_hat = quadratic_instance(B=6, n=8, m=4)
    cons = OutputConstraints(h=h, h_jac=h_jac if structured else None)
    layer = EnforceProjection(cons).eval()
    res = layer.project(x, y_hat)
    assert res.iterations <= layer.max_depth and bool(res.converged.all())
    assert float(h(x, res.y).abs().max()) <= 1e-6  # the paper's inference criterion, checked independently
    # Gauss-Newton on a zero-residual system converges quadratically: a handful of steps.
    assert res.iterations <= 6


def test_training_tolerance_is_batch_mean_and_looser():
    h, _, x, _, y_hat = quadratic_instance(B=6, n=8, m=4, noise=0.3)
    layer = EnforceProjection(h)
    train = layer.train().project(x, y_hat)
    evaluation = layer.eval().project(x, y_hat)
    assert float(h(x, train.y).abs().mean()) <= 1e-4
    assert float(h(x, evaluation.y).abs().max()) <= 1e-6
    assert train.iterations <= evaluation.iterations


def test_idempotent_at_convergence():
    h, _, x, _, y_hat = quadratic_instance()
    layer = EnforceProjection(h, eval_tol=1e-12).eval()
    y1 = layer(x, y_hat)
    torch.testing.assert_close(layer(x, y1), y1, rtol=0, atol=0)  # converged: zero further steps
    # One more NP step from the converged point moves it by O(|c|) only.
    torch.testing.assert_close(layer.np_step(x, y1), y1, rtol=0, atol=1e-11)


def test_gradcheck_unrolled_nonlinear():
    h, _, x, _, y_hat = quadratic_instance(B=2, n=4, m=2)
    layer = EnforceProjection(h, eval_tol=1e-12, gradient="unrolled").eval()
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(), y_hat.clone().requires_grad_()))


def test_gradcheck_implicit_affine_in_y():
    # Implicit (projector) gradient is exact for constraints affine in y with x-independent Jacobian.
    Bm, M, _, x, y_hat = affine_instance(B=2, n=4, m=2)
    layer = EnforceProjection(affine_constraints(Bm, M), gradient="implicit").eval()
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(), y_hat.clone().requires_grad_()))


def test_implicit_matches_unrolled_for_affine_constraints():
    Bm, M, _, x, y_hat = affine_instance()
    grads = {}
    for mode in ("unrolled", "implicit"):
        xr, yr = x.clone().requires_grad_(), y_hat.clone().requires_grad_()
        y = EnforceProjection(affine_constraints(Bm, M), gradient=mode).eval()(xr, yr)
        (y * torch.arange(7.0, dtype=F64)).sum().backward()
        grads[mode] = (xr.grad, yr.grad)
    for a, b in zip(grads["unrolled"], grads["implicit"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_implicit_error_vanishes_linearly_near_the_manifold():
    """Nonlinear h: the projector omits curvature, an error O(|ŷ - ỹ|) (documented deviation)."""
    h, _, x, y_star, _ = quadratic_instance(B=4, n=6, m=3)
    direction = torch.randn(y_star.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    weights = torch.randn(y_star.shape, dtype=F64, generator=torch.Generator().manual_seed(8))
    errors = []
    for sigma in (1e-2, 1e-3):
        grads = []
        for mode in ("unrolled", "implicit"):
            yr = (y_star + sigma * direction).requires_grad_()
            (EnforceProjection(h, eval_tol=1e-13, gradient=mode).eval()(x, yr) * weights).sum().backward()
            grads.append(yr.grad)
        errors.append(float((grads[0] - grads[1]).abs().max()))
    assert errors[1] < errors[0] / 5  # first order in the distance to the manifold


def _count_jacobians(run):
    calls = {"n": 0}
    jacobian = OutputConstraints._func_jacobian

    def counting(self, *args):
        calls["n"] += 1
        return jacobian(self, *args)

    OutputConstraints._func_jacobian = counting
    try:
        return run(), calls["n"]
    finally:
        OutputConstraints._func_jacobian = jacobian


def test_broyden_reaches_the_tolerance_with_one_jacobian():
    h, _, x, _, y_hat = quadratic_instance(B=6, n=10, m=4, noise=0.1)
    layer = EnforceProjection(h, eval_tol=1e-11).eval()
    assert layer._jacobian_mode() == "broyden"  # auto, with torch.func Jacobians and the implicit gradient
    res, jacobians = _count_jacobians(lambda: layer.project(x, y_hat))
    assert bool(res.converged.all()) and float(h(x, res.y).abs().max()) <= 1e-11
    assert jacobians == 1  # formed once at ŷ, then secant updates only
    exact, exact_jacobians = _count_jacobians(
        lambda: EnforceProjection(h, eval_tol=1e-11, jacobian="exact").eval().project(x, y_hat)
    )
    assert exact_jacobians == exact.iterations > jacobians  # one per step, none after the last
    # Both end on the constraint set near ŷ, at slightly different points (quasi-Newton vs Newton path).
    torch.testing.assert_close(res.y, exact.y, rtol=0, atol=5e-3)
    # The chord iteration (the first Jacobian throughout, refreshed only where a step fails) gets there too.
    chord, chord_jacobians = _count_jacobians(
        lambda: EnforceProjection(h, eval_tol=1e-11, jacobian="chord").eval().project(x, y_hat)
    )
    assert bool(chord.converged.all()) and chord_jacobians < exact_jacobians


def test_broyden_falls_back_to_the_exact_step_far_from_the_set():
    h, _, x, _, y_hat = quadratic_instance(B=6, n=8, m=4, noise=1.5)
    res, jacobians = _count_jacobians(lambda: EnforceProjection(h, eval_tol=1e-10).eval().project(x, y_hat))
    assert bool(res.converged.all()) and jacobians > 1  # some samples needed a fresh Jacobian


@pytest.mark.parametrize("method", ["paper", "line_search"])
def test_gradcheck_implicit_at_a_feasible_input(method):
    # On the constraint set the projector is the exact derivative of AdaNP's limit (also with Broyden steps).
    h, _, x, y_star, _ = quadratic_instance(B=2, n=4, m=2)
    layer = EnforceProjection(h, eval_tol=1e-13, method=method).eval()
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(), y_star.clone().requires_grad_()), atol=1e-6)


def test_rank_deficient_jacobian_is_regularised_and_converges():
    h, _, x, _, y_hat = quadratic_instance()
    dup = lambda x, y: torch.cat([h(x, y), h(x, y)[:, :1]], dim=-1)  # noqa: E731
    res = EnforceProjection(dup).eval().project(x, y_hat)
    assert bool(res.regularized.all()) and bool(res.converged.all())
    reference = EnforceProjection(h, eval_tol=1e-10, jacobian="exact").eval()(x, y_hat)
    torch.testing.assert_close(EnforceProjection(dup, jacobian="exact").eval()(x, y_hat), reference, rtol=0, atol=1e-6)


def test_activation_rule():
    h, _, x, y_star, y_hat = quadratic_instance()
    layer = EnforceProjection(h).eval()
    mse_to = lambda target: lambda y: ((y - target) ** 2).mean()  # noqa: E731
    # The targets are feasible: projecting the noisy output helps, AdaNP is activated.
    y, active = adanp_activation(layer, x, y_hat, mse_to(y_star))
    assert active
    torch.testing.assert_close(y, layer(x, layer.np_step(x, y_hat)))
    # A target equal to the raw output: any projection makes it worse, so ŷ is returned.
    y, active = adanp_activation(layer, x, y_hat, mse_to(y_hat))
    assert not active and y is y_hat


def _dense_limit_vjp(h, x, y, w):
    """Oracle: the implicit gradient at a feasible y from explicit per-sample Jacobians, P = I - Bᵀ(BBᵀ)⁻¹B."""
    gy, gx = [], []
    for xb, yb, wb in zip(x, y, w, strict=True):
        B = torch.autograd.functional.jacobian(lambda yy, xb=xb: h(xb[None], yy[None])[0], yb)  # [m, n]
        Bx = torch.autograd.functional.jacobian(lambda xx, yb=yb: h(xx[None], yb[None])[0], xb)  # [m, m]
        v = torch.linalg.solve(B @ B.T, B @ wb)
        gy.append(wb - B.T @ v)
        gx.append(-Bx.T @ v)
    return torch.stack(gy), torch.stack(gx)


@pytest.mark.parametrize("mixed", [False, True, "bfloat16"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_activation_rule_implicit_gradient_is_the_layers_at_the_limit(mixed, mode):
    # Implicit mode: the check step is the layer's own first step, AdaNP continues from it, and the result is
    # differentiated at its limit (the first step is not differentiated on its own): the projector there.
    h, _, x, y_star, y_hat = quadratic_instance(B=3, n=6, m=3, noise=0.2)
    layer = EnforceProjection(h, eval_tol=1e-12, train_tol=1e-8, mixed_precision=mixed, jacobian="exact")
    layer.train(mode == "train")
    xs, ys = x.clone().requires_grad_(), y_hat.clone().requires_grad_()
    y, active = adanp_activation(layer, xs, ys, lambda y: ((y - y_star) ** 2).mean())
    assert active
    with torch.no_grad():  # exact Jacobians: the layer's own iteration, interrupted after its first step
        torch.testing.assert_close(y, layer(x, y_hat), rtol=0, atol=1e-12)
    w = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    y.backward(w)
    grad_y, grad_x = _dense_limit_vjp(h, x, y.detach(), w)
    torch.testing.assert_close(ys.grad, grad_y, rtol=1e-6 if mixed else 1e-9, atol=1e-8 if mixed else 1e-11)
    torch.testing.assert_close(xs.grad, grad_x, rtol=1e-6 if mixed else 1e-9, atol=1e-8 if mixed else 1e-11)


def test_activation_rule_unrolled_differentiates_every_step():
    # gradient="unrolled": the paper's graph, through the first step and the AdaNP steps after it.
    h, _, x, y_star, y_hat = quadratic_instance()
    layer = EnforceProjection(h, eval_tol=1e-13, gradient="unrolled").eval()
    measure = lambda y: ((y - y_star) ** 2).mean()  # noqa: E731
    assert adanp_activation(layer, x, y_hat, measure)[1]
    f = lambda yh: adanp_activation(layer, x, yh, measure)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (y_hat.clone().requires_grad_(),), atol=1e-6)


def test_infeasible_constraints_are_reported():
    h = lambda x, y: y[:, :1] ** 2 + 1.0  # noqa: E731  (no real solution)
    y_hat = torch.randn(3, 2, dtype=F64)
    with pytest.warns(ProjectionWarning, match="missed the tolerance"):
        res = EnforceProjection(h, max_depth=20).eval().project(None, y_hat)  # the paper's steps: the default
    assert not bool(res.converged.any()) and res.iterations == 20
    # The line search descends to the minimum of |h| (1, at y_1 = 0) and stops there, flagged unconverged.
    with pytest.warns(ProjectionWarning, match="missed the tolerance"):
        res = EnforceProjection(h, max_depth=20, method="line_search").eval().project(None, y_hat)
    assert not bool(res.converged.any()) and res.iterations < 20
    torch.testing.assert_close(res.residual, torch.ones(3, dtype=F64), rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="infeasible"):
        EnforceProjection(h, max_depth=5, nonconvergence="raise").eval()(None, y_hat)


def test_float32_network_with_float64_solve():
    h, _, x, _, y_hat = quadratic_instance()
    y32 = y_hat.float().requires_grad_()
    y = EnforceProjection(h).eval()(x.float(), y32)
    assert y.dtype == torch.float32
    # The float64 solve met 1e-6; the float32 cast adds only rounding of y.
    assert float(h(x.float().double(), y.detach().double()).abs().max()) < 1e-4
    y.sum().backward()
    assert y32.grad.dtype == torch.float32 and bool(torch.isfinite(y32.grad).all())


def test_forward_does_not_mutate_the_layer():
    h, _, x, _, y_hat = quadratic_instance()
    layer = EnforceProjection(h).eval()
    before = dict(vars(layer))
    layer(x, y_hat)
    assert dict(vars(layer)) == before and len(layer.state_dict()) == 0


def test_functional_form_and_bad_arguments():
    h, _, x, _, y_hat = quadratic_instance()
    res = adanp(OutputConstraints(h=h), x, y_hat, tol=1e-8)
    assert float(res.residual.max()) <= 1e-8
    with pytest.raises(ValueError, match="equalities only"):
        EnforceProjection(OutputConstraints(h=h, g=lambda x, y: y))
    with pytest.raises(ValueError, match="gradient"):
        EnforceProjection(h, gradient="adjoint")
    with pytest.raises(ValueError, match="jacobian"):
        EnforceProjection(h, jacobian="secant")
    with pytest.raises(ValueError, match="unrolled"):
        EnforceProjection(h, gradient="unrolled", jacobian="broyden")
    with pytest.raises(ValueError, match="method"):
        EnforceProjection(h, method="armijo")
    with pytest.raises(ValueError, match="unrolled"):
        EnforceProjection(h, gradient="unrolled", method="line_search")
    with pytest.raises(ValueError, match="max_depth"):
        EnforceProjection(h, max_depth=0)
    with pytest.raises(ValueError, match="tolerances"):
        EnforceProjection(h, eval_tol=0.0)
    with pytest.raises(ValueError, match="solve_dtype"):
        EnforceProjection(h, solve_dtype=torch.float16)
    with pytest.raises(ValueError, match="nonconvergence"):
        EnforceProjection(h, nonconvergence="loud")
