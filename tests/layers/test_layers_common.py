"""Behaviour every layer shares: dtypes, diagnostics as values, no state mutation, the public API."""

import pytest
import torch
from layer_cases import quadratic_instance

import sqpoptim.layers as layers
from sqpoptim.layers import EnforceProjection, HardNetPP, KKTHardNet, OutputConstraints, ProjectionResult

ITERATIVE = [
    lambda c: EnforceProjection(c),
    lambda c: HardNetPP(c, early_stop=True, tol=1e-7),
    lambda c: KKTHardNet(c),
]


@pytest.mark.parametrize("make", ITERATIVE, ids=["enforce", "hardnet_pp", "kkt"])
def test_float32_network_outputs_with_float64_solves(make):
    h, h_jac, x, _, y_hat = quadratic_instance()
    layer = make(OutputConstraints(h=h, h_jac=h_jac)).eval()
    y32 = y_hat.float().requires_grad_()
    res = layer.project(x.float(), y32)
    assert isinstance(res, ProjectionResult) and res.y.dtype == torch.float32
    assert res.residual.dtype == torch.float64 and bool(res.converged.all())
    # The float64 solution met the tolerance; only the final cast to float32 perturbs it.
    y64 = make(OutputConstraints(h=h, h_jac=h_jac)).eval()(x.float().double(), y_hat.float().double())
    torch.testing.assert_close(res.y.double(), y64, rtol=0, atol=1e-6)
    res.y.square().sum().backward()
    assert y32.grad.dtype == torch.float32 and bool(torch.isfinite(y32.grad).all())


@pytest.mark.parametrize("make", ITERATIVE, ids=["enforce", "hardnet_pp", "kkt"])
def test_project_returns_values_and_forward_leaves_module_untouched(make):
    h, _, x, _, y_hat = quadratic_instance()
    layer = make(OutputConstraints(h=h)).eval()
    before = {k: v for k, v in vars(layer).items() if k != "_modules"}
    res = layer.project(x, y_hat)
    torch.testing.assert_close(layer(x, y_hat), res.y)
    assert {k: v for k, v in vars(layer).items() if k != "_modules"} == before
    assert isinstance(res.iterations, int) and res.residual.shape == res.converged.shape == (y_hat.shape[0],)
    assert res.regularized.dtype == torch.bool


def test_public_api():
    assert set(layers.__all__) >= {
        "OutputConstraints",
        "HardNetAffine",
        "EnforceProjection",
        "HardNetPP",
        "KKTHardNet",
        "ProjectionResult",
        "adanp_activation",
    }
    for name in layers.__all__:
        assert getattr(layers, name).__doc__


@pytest.mark.cuda
@pytest.mark.parametrize("make", ITERATIVE, ids=["enforce", "hardnet_pp", "kkt"])
def test_cuda_matches_cpu(make):
    h, h_jac, x, _, y_hat = quadratic_instance()
    cons = OutputConstraints(h=h, h_jac=h_jac)
    on_cpu = make(cons).eval()(x, y_hat)
    on_gpu = make(cons).eval()(x.cuda(), y_hat.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-9)
