"""Jacobian paths: batched == per-row loop == torch.func == finite differences (float64)."""

import pytest
import torch

import sqpoptim
from sqpoptim import _jacobian
from sqpoptim._jacobian import batched_jacobian, flat_size, jacobian, loop_jacobian

from .helpers import TinyPINN, burgers_residual, burgers_residual_pointwise, f64, finite_difference_jacobian
from .optimizers import PROJECTED_SQP, factories

POINTS = torch.tensor([[0.1, 0.2], [0.5, 0.5], [0.9, 0.3], [0.3, 0.8], [0.7, 0.1]], dtype=f64)


def _setup(complex_layer=False):
    model = TinyPINN(complex_layer=complex_layer)
    params = list(model.parameters())
    n = sum(flat_size(p) for p in params)
    return model, params, n


@pytest.mark.parametrize("complex_layer", [False, True])
def test_batched_loop_and_finite_differences_agree_through_input_derivatives(complex_layer):
    model, params, n = _setup(complex_layer)
    c = burgers_residual(model, POINTS)
    J_batched = batched_jacobian(c, params, n)
    J_loop = loop_jacobian(c, params, n)
    J_fd = finite_difference_jacobian(lambda: burgers_residual(model, POINTS), params)
    torch.testing.assert_close(J_batched, J_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J_batched, J_fd, rtol=1e-6, atol=1e-7)
    assert J_batched.shape == (5, n)


def test_chunked_batched_pass_matches_single_pass():
    model, params, n = _setup()
    c = burgers_residual(model, POINTS)
    full = batched_jacobian(c, params, n)
    for chunk in (1, 2, 4):
        torch.testing.assert_close(batched_jacobian(c, params, n, chunk_size=chunk), full, rtol=1e-13, atol=1e-15)


def test_pointwise_torch_func_path_matches_autograd():
    model, params, n = _setup(complex_layer=True)
    c_ref = burgers_residual(model, POINTS)
    J_ref = batched_jacobian(c_ref, params, n)
    spec = sqpoptim.PointwiseConstraints(model, burgers_residual_pointwise, POINTS)
    c, J = spec.evaluate(params, n)
    torch.testing.assert_close(c, c_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J, J_ref, rtol=1e-10, atol=1e-12)
    _, J2 = sqpoptim.PointwiseConstraints(model, burgers_residual_pointwise, POINTS, chunk_size=2).evaluate(params, n)
    torch.testing.assert_close(J2, J, rtol=0, atol=1e-14)


def test_pointwise_path_gives_zero_columns_for_parameters_outside_the_model():
    model, params, n = _setup()
    extra = torch.nn.Parameter(torch.randn(3, dtype=f64))
    spec = sqpoptim.PointwiseConstraints(model, burgers_residual_pointwise, POINTS)
    _, J = spec.evaluate([*params, extra], n + 3)
    assert torch.equal(J[:, -3:], torch.zeros(5, 3, dtype=f64))


def test_unused_parameter_gets_zero_columns():
    model, params, n = _setup()
    unused = torch.nn.Parameter(torch.ones(4, dtype=f64))
    c = burgers_residual(model, POINTS)
    J = batched_jacobian(c, [*params, unused], n + 4)
    assert torch.equal(J[:, -4:], torch.zeros(5, 4, dtype=f64))


def test_batched_failure_falls_back_to_loop_with_one_warning(monkeypatch):
    model, params, n = _setup()

    def broken(*args, **kwargs):
        raise RuntimeError("vmap: no batching rule for this operator")

    monkeypatch.setattr(_jacobian, "batched_jacobian", broken)
    warned = [False]
    c = burgers_residual(model, POINTS)
    with pytest.warns(sqpoptim.JacobianFallbackWarning, match="no batching rule"):
        J = jacobian(c, params, n, mode="batched", chunk_size=None, warned=warned)
    torch.testing.assert_close(J, loop_jacobian(c, params, n), rtol=0, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jacobian(c, params, n, mode="batched", chunk_size=None, warned=warned)  # no second warning


def test_constraints_without_graph_are_rejected():
    _, params, n = _setup()
    with pytest.raises(ValueError, match="do not depend on any parameter"):
        batched_jacobian(torch.ones(3, dtype=f64), params, n)


ALL_POINTS = torch.tensor([[0.1, 0.2], [0.5, 0.5], [0.9, 0.3], [0.3, 0.8], [0.7, 0.1], [0.2, 0.9]], dtype=f64)
FIT_POINTS = torch.tensor([[0.0, 0.0], [1.0, 0.5], [0.4, 0.6]], dtype=f64)


def _shared_closure(model):
    """A PINN closure whose constraints are read off the objective's residual pass (rows 1 and 4)."""
    r = burgers_residual(model, ALL_POINTS)
    fit = ((model(FIT_POINTS).squeeze(-1) - 0.3) ** 2).mean()
    return fit + 0.1 * (r**2).mean(), r[[1, 4]]


@pytest.mark.parametrize("complex_layer", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_joint_gradient_and_jacobian_are_the_separate_ones(complex_layer, chunk):
    from sqpoptim._gradient import flat_gradient
    from sqpoptim._layout import build_layout

    model, params, n = _setup(complex_layer)
    layout = build_layout([{"params": params}])
    loss, c = _shared_closure(model)
    g, J = _jacobian.joint_gradient_and_jacobian(loss, c, params, n, chunk_size=chunk)
    J_ref = loop_jacobian(c, params, n)
    g_ref = flat_gradient(loss, layout, retain_graph=True)
    torch.testing.assert_close(J, J_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-13)
    constant = torch.zeros((), dtype=f64)  # an objective without a graph: a zero gradient, J as before
    g0, J0 = _jacobian.joint_gradient_and_jacobian(constant, c, params, n, chunk_size=chunk)
    assert torch.equal(g0, torch.zeros(n, dtype=f64))
    torch.testing.assert_close(J0, J_ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", PROJECTED_SQP)
def test_joint_mode_steps_as_the_batched_mode(name):
    runs = {}
    for mode in ("batched", "joint"):
        model = TinyPINN()
        opt = factories(name, lr=1e-2)[name](model.parameters(), jacobian=mode)
        for _ in range(4):
            opt.step(lambda model=model: _shared_closure(model))
        runs[mode] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.diagnostics()["jacobian"])
    assert runs["joint"][1] == "joint" and runs["batched"][1] == "batched"
    torch.testing.assert_close(runs["joint"][0], runs["batched"][0], rtol=1e-11, atol=1e-12)


def test_joint_mode_falls_back_to_the_separate_passes(monkeypatch):
    from sqpoptim import _jacobian_path

    def broken(*args, **kwargs):
        raise RuntimeError("vmap: no batching rule for this operator")

    monkeypatch.setattr(_jacobian_path, "joint_gradient_and_jacobian", broken)
    model, ref = TinyPINN(), TinyPINN()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, jacobian="joint")
    opt_ref = sqpoptim.ProjectedAdamSQP(ref.parameters(), lr=1e-2, jacobian="batched")
    for _ in range(2):
        opt.step(lambda: _shared_closure(model))
        opt_ref.step(lambda: _shared_closure(ref))
    assert opt.diagnostics()["jacobian"] == "batched"
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
