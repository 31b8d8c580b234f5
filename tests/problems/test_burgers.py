"""Burgers (spec A3): the spectral reference solver against the Cole–Hopf exact solution, the residual
code against the same exact solution wrapped as a model, and the problem's mechanics (constraints, batches,
cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import problems.pinn.burgers as burgers_module
from problems import get_problem, problem_class
from problems.pinn.burgers import Burgers
from problems.reference.burgers_solver import fourier_interpolate, solve_burgers

NU = 0.01
# Cole–Hopf: u = −2ν φ_x / φ with φ = 2 + Σ a_k exp(−ν (2πk)² t) cos(2πk x + θ_k) solving φ_t = ν φ_xx.
CH_A, CH_K, CH_THETA = (1.2, 0.5), (1, 2), (0.3, 1.1)


def cole_hopf(x, t, nu=NU, lib=np):
    """Exact periodic Burgers solution at broadcast ``x``, ``t`` (numpy or torch, differentiable)."""
    phi, phi_x = 2.0, 0.0
    for a, k, theta in zip(CH_A, CH_K, CH_THETA):
        decay = lib.exp(-nu * (2 * np.pi * k) ** 2 * t)
        arg = 2 * np.pi * k * x + theta
        phi = phi + a * decay * lib.cos(arg)
        phi_x = phi_x - a * decay * 2 * np.pi * k * lib.sin(arg)
    return -2 * nu * phi_x / phi


class ColeHopfModel(nn.Module):
    """The exact solution as a model on the problem's inputs ``[x, t, u0 (32)]`` (u0 is ignored)."""

    def __init__(self, nu=NU):
        super().__init__()
        self.nu = nu
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))  # so that a graph to parameters exists

    def forward(self, inputs):
        return self.scale * cole_hopf(inputs[:, :1], inputs[:, 1:2], self.nu, lib=torch)


@pytest.fixture(scope="module")
def problem64(cache):
    return Burgers("tiny", dtype=torch.float64, cache_dir=cache)


# --- the reference solver ---------------------------------------------------------------------------------
def test_solver_spectral_convergence_against_cole_hopf():
    t = np.linspace(0.0, 1.0, 11)
    errors = []
    for n in (16, 32, 64):
        x = np.arange(n) / n
        u = solve_burgers(cole_hopf(x, 0.0), t, NU, rtol=1e-10, atol=1e-12)  # [T, n]
        errors.append(np.abs(u - cole_hopf(x[None, :], t[:, None])).max())
    ratio_coarse, ratio_fine = errors[1] / errors[0], errors[2] / errors[1]
    # Spectral: each doubling gains more than the last (an algebraic order p would give equal ratios 2^-p).
    assert ratio_coarse < 0.05
    assert ratio_fine < ratio_coarse / 10
    assert errors[-1] < 1e-8


def test_solver_temporal_convergence_against_cole_hopf():
    n, t = 96, np.linspace(0.0, 1.0, 11)
    x = np.arange(n) / n
    exact = cole_hopf(x[None, :], t[:, None])
    rtols = np.array([1e-3, 1e-4, 1e-5, 1e-6])
    errors = [np.abs(solve_burgers(cole_hopf(x, 0.0), t, NU, rtol=r, atol=r * 1e-2) - exact).max() for r in rtols]
    slope = np.polyfit(np.log10(rtols), np.log10(errors), 1)[0]
    assert 0.7 < slope < 1.3, (errors, slope)  # global error proportional to the tolerance
    assert errors[-1] < 1e-7


@pytest.mark.slow
def test_solver_resolution_of_the_data_setting():
    """The data setting (sin IC, ν = 0.01, 256 points) against 512 points: spectral convergence."""
    t = np.linspace(0.0, 1.0, 32)
    sols = {}
    for n in (64, 128, 256, 512):
        sols[n] = solve_burgers(np.sin(2 * np.pi * np.arange(n) / n + 0.1 * np.pi), t, NU)[:, :: n // 32]
    errors = [np.abs(sols[n] - sols[512]).max() for n in (64, 128, 256)]
    assert errors[1] / errors[0] < 0.05 and errors[2] / errors[1] < errors[1] / errors[0] / 10
    assert errors[2] < 1e-7


def test_solver_conserves_the_mean():
    x = np.arange(64) / 64
    u0 = 0.5 + np.sin(2 * np.pi * x + 1.0) + 0.3 * np.cos(6 * np.pi * x)
    u = solve_burgers(u0, np.linspace(0.0, 1.0, 9), 0.05, rtol=1e-8, atol=1e-10)
    assert np.abs(u.mean(axis=-1) - u0.mean()).max() < 1e-13
    assert np.abs(u[-1] - u0).max() > 0.1  # the solution did move


def test_translation_shortcut_matches_a_direct_solve():
    """The data use one solve from sin(2πx) evaluated at x + ξ/2. For a band-limited initial condition and a
    shift that is not a grid shift, the dealiased scheme is exactly translation-equivariant; without the 2/3
    rule, aliasing breaks this (the check has teeth)."""
    n, nu, shift, t = 16, 0.03, 0.137, np.linspace(0.0, 0.5, 4)
    x = np.arange(n) / n

    def u0(x):
        return 0.6 * np.sin(2 * np.pi * x) + 0.3 * np.cos(4 * np.pi * x + 1.0)

    def mismatch(dealias):
        direct = solve_burgers(u0(x + shift), t, nu, dealias=dealias)  # [T, n]
        shifted = fourier_interpolate(solve_burgers(u0(x), t, nu, dealias=dealias), x[None, :] + shift)
        return np.abs(shifted - direct).max()

    assert mismatch(True) < 1e-9
    assert mismatch(False) > 1e-5


def test_fourier_interpolation_is_exact_for_trigonometric_polynomials():
    rng = np.random.default_rng(0)
    x_grid, x_any = np.arange(16) / 16, rng.random(50)

    def f(x):
        return 0.3 + np.sin(2 * np.pi * x) - 0.7 * np.cos(6 * np.pi * x + 0.4) + 0.2 * np.sin(14 * np.pi * x)

    np.testing.assert_allclose(fourier_interpolate(f(x_grid), x_any), f(x_any), atol=1e-13)
    np.testing.assert_allclose(fourier_interpolate(f(x_grid), x_grid), f(x_grid), atol=1e-13)


def test_solver_rejects_bad_input():
    with pytest.raises(ValueError, match="solve_burgers"):
        solve_burgers(np.zeros((2, 2, 8)), np.linspace(0, 1, 3), NU)
    with pytest.raises(ValueError, match="solve_burgers"):
        solve_burgers(np.zeros(8), np.array([0.5, 1.0]), NU)


# --- data -------------------------------------------------------------------------------------------------
def test_data_layout_and_physics(problem64):
    d = problem64.data
    np.testing.assert_array_equal(d["x"], np.arange(32) / 32)  # truly periodic, not linspace(0, 1, 32)
    np.testing.assert_allclose(d["u_train"][:, 0, :], d["u0_train"], atol=1e-12)  # the IC at t = 0
    np.testing.assert_allclose(d["u0_train"], np.sin(2 * np.pi * d["x"] + np.pi * d["xi_train"][:, None]))
    assert np.all((d["xi_train"] >= 0) & (d["xi_train"] < 0.2))
    assert np.abs(d["u_train"]).max() <= 1.0 + 1e-12  # maximum principle
    assert problem_class("burgers") is Burgers and get_problem("burgers", size="tiny", cache_dir=problem64.cache_dir)


# --- residual and constraints against the exact solution --------------------------------------------------
def test_residual_vanishes_on_the_exact_solution(problem64):
    model = ColeHopfModel()
    points = torch.arange(problem64.n_train * 32 * 32)
    assert problem64.residual(model, points).abs().max() < 1e-13
    terms = problem64.terms(model)
    assert terms["pde"] < 1e-26 and terms["periodic"] < 1e-28
    assert problem64.constraints(model).abs().max() < 1e-13
    # The check has teeth: a wrong viscosity leaves a visible residual.
    assert problem64.residual(ColeHopfModel(nu=2 * NU), points).abs().max() > 1e-3


def test_boundary_and_fit_terms_vanish_on_the_data(problem64):
    """A model that reproduces the reference data (trigonometric interpolation in x of the stored grid values)
    has zero fit, initial-condition and periodicity terms: the terms index the data consistently."""
    u0_table = torch.as_tensor(problem64.data["u0_train"])  # [I, 32]
    coef = torch.fft.rfft(torch.as_tensor(problem64.data["u_train"]), dim=-1) / 32  # [I, T, 17]
    weight = torch.tensor([1.0] + [2.0] * 15 + [1.0], dtype=torch.float64)

    class Lookup(nn.Module):
        def forward(self, inputs):
            ic = (inputs[:, None, 2:] - u0_table).abs().sum(-1).argmin(1)  # which initial condition
            a = torch.round(inputs[:, 1].detach() * 31).long()  # which grid time
            phase = torch.exp(2j * torch.pi * inputs[:, :1] * torch.arange(17))  # [P, 17]
            u = (phase * weight * coef[ic, a]).sum(-1).real
            return (u + 0 * inputs[:, 1])[:, None]  # t enters the graph (its derivative is unused)

    terms = problem64.terms(Lookup())
    assert terms["fit"] < 1e-28 and terms["initial"] < 1e-28 and terms["periodic"] < 1e-28
    assert terms["pde"] > 0


def test_constraints_shape_and_graph(problem64):
    model = problem64.make_model(0)
    c = problem64.constraints(model)
    assert c.shape == (problem64.num_constraints,) == (10,)
    grads = torch.autograd.grad(c.sum(), list(model.parameters()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_batched_constraint_jacobian_matches_row_loop(problem64):
    model = problem64.make_model(1)
    params = list(model.parameters())
    c = problem64.constraints(model)
    eye = torch.eye(len(c), dtype=c.dtype)
    batched = torch.autograd.grad(c, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
    rows = [torch.autograd.grad(c[k], params, retain_graph=True) for k in range(len(c))]
    for i, j in enumerate(batched):
        torch.testing.assert_close(j, torch.stack([r[i] for r in rows]), rtol=1e-10, atol=1e-12)


def test_objective_gradient_matches_finite_differences(problem64):
    model = problem64.make_model(2)
    params = list(model.parameters())
    batch = problem64.sample_batch(torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(problem64.objective(model, batch), params)
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, p in
                 enumerate(params)]  # fmt: skip
    eps = 1e-6

    def shifted(sign):
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(sign * eps * v)
        value = problem64.objective(model, batch).item()
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.sub_(sign * eps * v)
        return value

    fd = (shifted(1) - shifted(-1)) / (2 * eps)
    exact = sum((g * v).sum() for g, v in zip(grads, direction)).item()
    assert abs(fd - exact) < 1e-6 * max(1.0, abs(exact))


# --- batches, metrics, dtypes, cache ----------------------------------------------------------------------
def test_mini_batches_are_deterministic_and_a_full_cover_equals_the_full_objective(problem64):
    b1 = problem64.sample_batch(torch.Generator().manual_seed(3))
    b2 = problem64.sample_batch(torch.Generator().manual_seed(3))
    b3 = problem64.sample_batch(torch.Generator().manual_seed(4))
    assert all(torch.equal(b1[k], b2[k]) for k in b1) and not torch.equal(b1["pde"], b3["pde"])
    n_points = problem64.n_train * 32 * 32
    assert len(b1["pde"]) == round(0.2 * n_points) and len(b1["fit"]) == round(0.2 * problem64.n_train * 200)
    full = {
        "pde": torch.arange(n_points), "periodic": torch.arange(problem64.n_train * 32),
        "initial": torch.arange(problem64.n_train * 32), "fit": torch.arange(problem64.n_train * 200),
    }  # fmt: skip
    model = problem64.make_model(0)
    torch.testing.assert_close(problem64.objective(model, full), problem64.objective(model), rtol=1e-12, atol=0)


def test_metrics_and_prediction(problem64):
    model = problem64.make_model(0)
    m = problem64.metrics(model)
    assert {"objective", "test_mse", "max_abs_c"} <= m.keys() and all(isinstance(v, float) for v in m.values())
    assert m["objective"] == pytest.approx(problem64.objective(model).item(), rel=1e-12)
    assert m["max_abs_c"] == pytest.approx(problem64.constraints(model).abs().max().item(), rel=1e-12)
    pred = problem64.prediction(model)
    assert pred["u_true"].shape == pred["u_pred"].shape == (32, 32) and pred["x"].shape == pred["t"].shape == (32,)
    np.testing.assert_array_equal(pred["u_true"], problem64.data["u_test"][0])


def test_cache_hit_and_regeneration(tmp_path, monkeypatch):
    calls = []
    real = burgers_module._generate
    # The cache mechanics do not depend on the solver: a stand-in (u frozen at u0) keeps this test fast.
    monkeypatch.setattr(burgers_module, "solve_burgers", lambda u0, t, nu, **kw: np.repeat(u0[None], len(t), 0))
    monkeypatch.setattr(burgers_module, "_generate", lambda *a: calls.append(a) or real(*a))
    first = Burgers("tiny", cache_dir=tmp_path).data
    second = Burgers("tiny", cache_dir=tmp_path).data
    assert len(calls) == 1 and all(np.array_equal(first[k], second[k]) for k in first)
    npz = next(tmp_path.glob("burgers-*.npz"))
    np.savez(npz, **{**first, "u_train": first["u_train"] + 1e-3})  # an edited entry: must not be trusted
    third = Burgers("tiny", cache_dir=tmp_path).data
    assert len(calls) == 2 and all(np.array_equal(first[k], third[k]) for k in first)
