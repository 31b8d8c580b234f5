"""Jacobian paths: batched == per-row loop == torch.func == finite differences (float64)."""

import pytest
import torch

import sqpoptim
from sqpoptim import _jacobian
from sqpoptim._jacobian import batched_jacobian, flat_size, jacobian, loop_jacobian

from .helpers import TinyPINN, burgers_residual, burgers_residual_pointwise, f64, finite_difference_jacobian

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
