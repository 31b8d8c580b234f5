"""With no constraints every method reduces to its unconstrained counterpart (float64)."""

import pytest
import torch

import sqpoptim
from sqpoptim import adam_sqp_direction

from .helpers import TinyPINN, burgers_residual, f64

X = torch.rand(64, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
Y = torch.sin(3 * X[:, :1]) * torch.cos(2 * X[:, 1:])


def objective(model):
    return ((model(X) - Y) ** 2).mean()


def run(opt_factory, steps=25, constraints=None):
    model = TinyPINN(seed=3)
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        opt.step(lambda: (objective(model), None if constraints is None else constraints(model)))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_torch(opt_factory, steps=25):
    model = TinyPINN(seed=3)
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        objective(model).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_adam_sqp_standard_without_constraints_is_adam():
    """eps=1e-30 makes torch's eps-outside and our eps-inside Adam coincide to rounding."""
    ours = run(lambda p: sqpoptim.ProjectedAdamSQP(p, lr=1e-2, eps=1e-30, bias_correction="standard"))
    ref = run_torch(lambda p: torch.optim.Adam(p, lr=1e-2, eps=1e-30))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_adam_unc_is_adam_with_eps_inside_the_square_root():
    ours = run(lambda p: sqpoptim.AdamUnc(p, lr=1e-2, eps=1e-3))
    model = TinyPINN(seed=3)
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for k in range(1, 26):  # textbook Adam, eps inside the square root
        grads = torch.autograd.grad(objective(model), params)
        with torch.no_grad():
            for p, g, mi, vi in zip(params, grads, m, v):
                mi.mul_(0.9).add_(0.1 * g)
                vi.mul_(0.999).add_(0.001 * g * g)
                p -= 1e-2 * (mi / (1 - 0.9**k)) / torch.sqrt(vi / (1 - 0.999**k) + 1e-3)
    torch.testing.assert_close(ours, torch.cat([p.detach().reshape(-1) for p in params]), rtol=1e-12, atol=1e-12)
    # and AdamUnc ignores constraints: same iterates as ProjectedAdamSQP with none
    same = run(lambda p: sqpoptim.AdamUnc(p, lr=1e-2, eps=1e-3), constraints=lambda mdl: burgers_residual(mdl, X[:3]))
    torch.testing.assert_close(same, ours, rtol=0, atol=0)


def test_heavy_ball_sqp_without_constraints_is_ema_heavy_ball():
    ours = run(lambda p: sqpoptim.ProjectedHeavyBallSQP(p, lr=5e-2, momentum=0.8))
    model = TinyPINN(seed=3)
    params = list(model.parameters())
    buf = [torch.zeros_like(p) for p in params]
    for _ in range(25):
        grads = torch.autograd.grad(objective(model), params)
        with torch.no_grad():
            for p, g, b in zip(params, grads, buf):
                b.mul_(0.8).add_(0.2 * g)
                p -= 5e-2 * b
    torch.testing.assert_close(ours, torch.cat([p.detach().reshape(-1) for p in params]), rtol=1e-12, atol=1e-12)


def test_heavy_ball_matches_torch_sgd_with_dampening_after_its_undamped_first_step():
    """torch.optim.SGD seeds its buffer with the first gradient undamped; starting ours from that buffer, the
    two coincide."""
    model_a, model_b = TinyPINN(seed=3), TinyPINN(seed=3)
    sgd = torch.optim.SGD(model_b.parameters(), lr=5e-2, momentum=0.8, dampening=0.8)
    ours = sqpoptim.ProjectedHeavyBallSQP(model_a.parameters(), lr=5e-2, momentum=0.8)
    sgd.zero_grad()
    objective(model_b).backward()
    sgd.step()
    with torch.no_grad():  # replay SGD's first step into ours: buffer = g_1 and x_1 = x_0 - lr g_1
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            ours.state[pa]["momentum_buffer"] = sgd.state[pb]["momentum_buffer"].clone()
            pa.copy_(pb)
    for _ in range(20):
        sgd.zero_grad()
        objective(model_b).backward()
        sgd.step()
        ours.step(lambda: (objective(model_a), None))
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def test_stochastic_sqp_without_constraints_is_sgd():
    ours = run(lambda p: sqpoptim.StochasticSQP(p, lr=5e-2))
    ref = run_torch(lambda p: torch.optim.SGD(p, lr=5e-2))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("projection", ["euclidean", "scaled"])
def test_adam_defossez_without_constraints(projection):
    """Défossez et al.'s Adam: m = β1 m + g, w = β2 w + g², x -= α(1-β1)sqrt((1-β2^k)/(1-β2)) m / sqrt(w + ε)."""
    ours = run(lambda p: sqpoptim.ProjectedAdamSQP(p, lr=1e-2, projection=projection))
    model = TinyPINN(seed=3)
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    w = [torch.zeros_like(p) for p in params]
    for k in range(1, 26):
        grads = torch.autograd.grad(objective(model), params)
        alpha_k = 1e-2 * 0.1 * ((1 - 0.999**k) / 0.001) ** 0.5
        with torch.no_grad():
            for p, g, mi, wi in zip(params, grads, m, w):
                mi.mul_(0.9).add_(g)
                wi.mul_(0.999).add_(g * g)
                p -= alpha_k * mi / torch.sqrt(wi + 1e-7)
    torch.testing.assert_close(ours, torch.cat([p.detach().reshape(-1) for p in params]), rtol=1e-12, atol=1e-12)


def test_primal_dual_without_constraints_is_its_inner_optimizer():
    ours = run(lambda p: sqpoptim.PrimalDual(p, lr=1e-2))
    ref = run_torch(lambda p: torch.optim.Adam(p, lr=1e-2))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_adam_con_and_sqp_adam_differ_only_in_the_vector_fed_to_the_moments():
    """The functional form with project_gradients=False accumulates raw g; with True, Pg; nothing else."""
    gen = torch.Generator().manual_seed(0)
    n, m = 30, 4
    J = torch.randn(m, n, generator=gen, dtype=f64)
    c = torch.randn(m, generator=gen, dtype=f64)
    g = torch.randn(n, generator=gen, dtype=f64)
    P = torch.eye(n, dtype=f64) - J.T @ torch.linalg.solve(J @ J.T, J)
    kw = dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-7,
        normal_lr=1e-2,
        projection="scaled",
        bias_correction="standard",
        rank_tol=1e-7,
    )
    outs = {}
    for proj, fed in ((True, P @ g), (False, g)):
        ma, wa = torch.zeros(n, dtype=f64), torch.zeros(n, dtype=f64)
        delta, _ = adam_sqp_direction(g, c, J, ma, wa, 1, project_gradients=proj, **kw)
        torch.testing.assert_close(ma, 0.1 * fed, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(wa, 0.001 * fed * fed, rtol=1e-12, atol=1e-16)
        mb, wb = torch.zeros(n, dtype=f64), torch.zeros(n, dtype=f64)  # feeding the vector in by hand
        delta_b, _ = adam_sqp_direction(fed, c, J, mb, wb, 1, project_gradients=False, **kw)
        torch.testing.assert_close(delta, delta_b, rtol=1e-12, atol=1e-14)
        outs[proj] = delta
    assert (outs[True] - outs[False]).norm() > 1e-4
    model = TinyPINN(seed=1)  # and the classes agree with that reading
    a = sqpoptim.ConstrainedAdam(model.parameters(), lr=1e-2)
    assert (a.project_gradients, a.projection, a.bias_correction) == (False, "scaled", "standard")
