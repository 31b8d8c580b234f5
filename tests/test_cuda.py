"""CUDA behaviour (skipped without a GPU): CPU/CUDA parity, no host synchronisation inside step(), deferred
non-finite reporting, and state moved to the parameters' device on load."""

import math

import pytest
import torch

import sqpoptim

from .helpers import TinyPINN, burgers_residual
from .optimizers import factories

pytestmark = pytest.mark.cuda

X = torch.rand(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
Y = torch.sin(2 * X[:, :1])
PTS = torch.tensor([[0.2, 0.3], [0.6, 0.4], [0.8, 0.9]], dtype=torch.float64)

FACTORIES = factories(
    "sqp-adam", "sqp-adam-scaled", "sqp-hb", "sqp", "adam-con", "adam-unc", "sqp-adam-damped-0.1", lr=1e-2
)


def _closure(model, device):
    x, y, pts = X.to(device), Y.to(device), PTS.to(device)
    return lambda: (((model(x) - y) ** 2).mean(), burgers_residual(model, pts))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_cuda_matches_cpu_in_float64(name):
    out = {}
    for device in ("cpu", "cuda"):
        model = TinyPINN(seed=1).to(device)
        opt = FACTORIES[name](model.parameters())
        for _ in range(5):
            opt.step(_closure(model, device))
        out[device] = torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_step_never_synchronises_with_the_host(name):
    model = TinyPINN(seed=2).to("cuda")
    opt = FACTORIES[name](model.parameters())
    closure = _closure(model, "cuda")
    opt.step(closure)  # first step: lazy initialisation, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_non_finite_step_is_skipped_on_the_device_and_reported_later():
    model = TinyPINN(seed=3).to("cuda")
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    assert opt.sync_free is None  # auto: sync-free on CUDA
    closure = _closure(model, "cuda")
    opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: (closure()[0] * math.nan, closure()[1]))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    with pytest.raises(FloatingPointError, match="loss"):
        opt.check_finite()


def test_global_state_moves_to_the_parameters_device_on_load():
    model = TinyPINN(seed=4)
    opt = sqpoptim.StochasticSQP(model.parameters(), lr=1.0, step_rule="adaptive")
    opt.step(_closure(model, "cpu"))
    sd = opt.state_dict()
    model_cuda = TinyPINN(seed=4).to("cuda")
    opt_cuda = sqpoptim.StochasticSQP(model_cuda.parameters(), lr=1.0, step_rule="adaptive")
    opt_cuda.load_state_dict(sd)
    for key in ("step", "tau", "xi"):
        assert getattr(opt_cuda.global_state, key).device.type == "cuda"
    opt_cuda.step(_closure(model_cuda, "cuda"))
