"""The trust region of the damped normal step: the secular equation against a dense eigendecomposition and
scipy's root finder, the radius rule, exact against sync-free mode, checkpoints, and reaching feasibility from a
random tanh network (float64)."""

import math

import pytest
import torch
from scipy.optimize import brentq
from torch import nn

import sqpoptim
from sqpoptim import _damping, _trust_region
from sqpoptim._dense_solver import as_solver

from .helpers import f64
from .test_linalg import random_problem


def _length_oracle(J, c):
    """‖v(μ)‖ = ‖Jᵀ(JJᵀ + μI)⁻¹c‖ from the eigendecomposition of JJᵀ: √Σ λ_i ĉ_i² / (λ_i + μ)²."""
    lam, Q = torch.linalg.eigh(J @ J.T)
    ch = Q.T @ c
    return lambda mu: math.sqrt(float((lam.clamp_min(0) * ch**2 / (lam + mu) ** 2).sum()))


def _root(length, target):
    """μ with ‖v(μ)‖ = target, by scipy's Brent method on log μ."""
    return math.exp(brentq(lambda t: length(math.exp(t)) - target, -80.0, 80.0, xtol=1e-14, rtol=1e-14))


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_the_damping_solves_the_secular_equation(seed, sync_free, monkeypatch):
    J, _, c, _ = random_problem(6, 20, seed=seed, cond=1e6)
    S = as_solver(J, rank_tol=1e-7, sync_free=sync_free)
    length = _length_oracle(J, c)
    scale = float(torch.diagonal(J @ J.T).mean())
    nu = torch.tensor(1e-6, dtype=f64)
    gauss_newton = length(1e-6 * scale)
    for fraction in (0.5, 0.1, 1e-3):
        target = fraction * gauss_newton
        mu_star = _root(length, target)
        # with the default budget: a step within the tolerance of the radius
        nu_eff, binds = _trust_region.damping_within(
            S, c, nu, torch.tensor(target, dtype=f64), 1.0, sync_free=sync_free
        )
        assert bool(binds)
        assert abs(length(float(nu_eff) * scale) / target - 1) <= _trust_region.TOLERANCE
        # to convergence: the root itself
        monkeypatch.setattr(_trust_region, "ITERATIONS", 60)
        monkeypatch.setattr(_trust_region, "TOLERANCE", 1e-12)
        nu_eff, _ = _trust_region.damping_within(S, c, nu, torch.tensor(target, dtype=f64), 1.0, sync_free=sync_free)
        assert float(nu_eff) * scale == pytest.approx(mu_star, rel=1e-8)
        monkeypatch.undo()
    # a radius the ν-damped step fits in, or none: ν itself (the same tensor in exact mode)
    for radius in (2.0 * gauss_newton, math.inf):
        nu_eff, binds = _trust_region.damping_within(
            S, c, nu, torch.tensor(radius, dtype=f64), 1.0, sync_free=sync_free
        )
        assert not bool(binds) and torch.equal(nu_eff, nu)
        assert sync_free or nu_eff is nu
    # the radius bounds the displacement γv: ‖v‖ ≤ Δ/γ
    target = 0.1 * gauss_newton
    nu_eff, _ = _trust_region.damping_within(S, c, nu, torch.tensor(target, dtype=f64), 0.25, sync_free=sync_free)
    assert abs(length(float(nu_eff) * scale) / (4 * target) - 1) <= _trust_region.TOLERANCE


def test_the_matrix_free_bound_keeps_the_step_inside_the_radius():
    J, _, c, _ = random_problem(6, 20, seed=7, cond=1e6)
    S = sqpoptim._solver_choice.make_solver(
        sqpoptim._jacobian_operator.DenseJacobian(J),
        "krylov",
        rank_tol=1e-7,
        sync_free=False,
        options=sqpoptim._krylov.KrylovOptions(),
        state={},
    )
    length = _length_oracle(J, c)
    scale = float(torch.diagonal(J @ J.T).mean())
    for target in (1e-3, 1e-1, 10.0):
        nu_eff, binds = _trust_region.damping_within(
            S, c, torch.tensor(1e-6, dtype=f64), torch.tensor(target, dtype=f64), 1.0, sync_free=False
        )
        assert length(float(nu_eff) * scale) <= target * (1 + 1e-12)
        assert bool(binds) == (length(1e-6 * scale) > length(float(nu_eff) * scale))


def test_the_radius_rule():
    state = _damping.initial_state(1e-6, torch.device("cpu"))
    assert float(state.radius) == _damping.NO_RADIUS  # none (a finite sentinel: no inf in the state)

    def verdict(before, predicted, after, length, bound, radius=1.0):
        model = torch.tensor([before, predicted, 1.0, length, float(bound)], dtype=f64)
        s = _damping.DampingState(
            nu=state.nu, escalation=state.escalation, model=model, radius=torch.tensor(radius, dtype=f64)
        )
        return _damping.judge(s, torch.zeros((), dtype=f64), torch.tensor([after], dtype=f64), 1)

    # a failure (ρ = -3): rejected, Δ = ‖γv‖/(4(1 - ρ)) whether or not the radius set the step
    for bound in (False, True):
        v = verdict(2.0, 1.0, 5.0, 0.8, bound, radius=math.inf)
        assert bool(v.reject) and float(v.rho) == pytest.approx(-3.0)
        assert float(v.radius) == pytest.approx(0.8 / 16.0)
    # a poor step the radius made (ρ = 0.1): Δ = ‖γv‖/(4 · 0.9); a poor step inside it: Δ unchanged
    assert float(verdict(2.0, 1.0, 1.9, 0.5, True).radius) == pytest.approx(0.5 / 3.6)
    assert float(verdict(2.0, 1.0, 1.9, 0.5, False).radius) == 1.0
    # a good step at the radius doubles it; inside it, nothing changes
    assert float(verdict(2.0, 1.0, 1.0, 1.0, True).radius) == 2.0
    assert float(verdict(2.0, 1.0, 1.0, 0.5, False).radius) == 1.0
    # a checkpoint's three-entry model (no length): a failure leaves Δ
    s = _damping.DampingState(nu=state.nu, escalation=state.escalation, model=torch.tensor([2.0, 1.0, 1.0], dtype=f64))
    v = _damping.judge(s, torch.zeros((), dtype=f64), torch.tensor([5.0], dtype=f64), 1)
    assert bool(v.reject) and float(v.radius) == _damping.NO_RADIUS


def _tanh_problem(seed=0, width=32, m=10):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    ).to(f64)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    X, Y = torch.rand(64, 8, generator=gen, dtype=f64), torch.rand(64, 1, generator=gen, dtype=f64)
    Xc, Yc = torch.rand(m, 8, generator=gen, dtype=f64), torch.rand(m, generator=gen, dtype=f64)
    return model, lambda: (((model(X) - Y) ** 2).mean(), model(Xc).squeeze(1) - Yc)


def _run(steps=11, **kw):
    model, closure = _tanh_problem()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-4, **kw)
    out = []
    for _ in range(steps):
        _, c = opt.step(closure)
        out.append(float(c.abs().max()))
    return out, opt, model


def test_a_random_tanh_network_meets_its_output_constraints_within_ten_steps(monkeypatch):
    # 8 -> 32 -> 32 -> 32 -> 1 tanh MLP, ten output constraints at random points (c starts at 0.81): the
    # Gauss-Newton step overshoots ~100-fold, is rejected, and the radius the failure sets lets the next steps
    # converge; without the radius the doubling of ν spends all ten steps escalating
    c_max, opt, _ = _run()
    assert c_max[0] > 0.5
    assert c_max[10] <= 1e-2  # max|c| after ten steps
    rejected = int(opt.global_state.damping.rejected_steps)
    monkeypatch.setattr(
        sqpoptim._optimizer, "damping_within", lambda S, c, nu, radius, gamma, sync_free, warm: (nu, nu < 0)
    )
    c_max, opt, _ = _run()
    assert c_max[10] > 0.5
    assert rejected <= 2 < int(opt.global_state.damping.rejected_steps)


def test_sync_free_trust_region_steps_match_exact_mode():
    runs = []
    for sync_free in (False, True):
        c_max, opt, model = _run(sync_free=sync_free)
        runs.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), c_max, opt.global_state.damping))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-9, atol=1e-11)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-8, abs=1e-12)
    assert float(runs[0][2].radius) == pytest.approx(float(runs[1][2].radius), rel=1e-9)
    assert int(runs[0][2].rejected_steps) == int(runs[1][2].rejected_steps) >= 1


def test_the_radius_survives_a_state_dict_round_trip_and_old_checkpoints_load():
    _, opt, model = _run(steps=4)
    radius = opt.global_state.damping.radius
    assert float(radius) < _damping.NO_RADIUS
    sd = opt.state_dict()
    model2, closure2 = _tanh_problem()
    model2.load_state_dict(model.state_dict())
    opt2 = sqpoptim.ProjectedAdamSQP(model2.parameters(), lr=1e-4)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.global_state.damping.radius, radius)
    # a checkpoint from before the radius: no radius, a three-entry model; it loads and steps (Δ = ∞)
    old = opt.state_dict()
    old["state"]["global"]["damping"] = {
        k: v for k, v in old["state"]["global"]["damping"].items() if k != "radius"
    } | {"model": old["state"]["global"]["damping"]["model"][:3]}
    opt3 = sqpoptim.ProjectedAdamSQP(model2.parameters(), lr=1e-4)
    opt3.load_state_dict(old)
    assert opt3.global_state.damping.radius is None
    opt3.step(closure2)
    assert opt3.global_state.damping.model.numel() == 5


@pytest.mark.cuda
def test_sync_free_trust_region_steps_never_synchronise_with_the_host():
    # on CUDA (sync-free by default) the rejection and the secular equation are device computations: the steps
    # around the first rejection, where the radius binds, run under the sync debug mode "error"
    model, _ = _tanh_problem()
    model.to("cuda")
    gen = torch.Generator().manual_seed(1)  # the data of _tanh_problem(seed=0), on the device
    X, Y = torch.rand(64, 8, generator=gen, dtype=f64).cuda(), torch.rand(64, 1, generator=gen, dtype=f64).cuda()
    Xc, Yc = torch.rand(10, 8, generator=gen, dtype=f64).cuda(), torch.rand(10, generator=gen, dtype=f64).cuda()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-4)

    def cuda_closure():
        return ((model(X) - Y) ** 2).mean(), model(Xc).squeeze(1) - Yc

    opt.step(cuda_closure)  # first step: lazy initialisation, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            opt.step(cuda_closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(opt.global_state.damping.rejected_steps) >= 1
    assert float(opt.global_state.damping.radius) < _damping.NO_RADIUS
