"""Darcy (spec A4): the random-field generator against its covariance, the finite-volume solver against
manufactured solutions (second order), the residual operator against the solver, and the problem's mechanics
(constraints through the FFT with complex parameters, batches, cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import problems.pinn.darcy as darcy_module
from problems import get_problem, problem_class
from problems.core.fno import FNO
from problems.pinn.darcy import Darcy
from problems.reference.darcy_solver import (
    _operator,
    darcy_residual,
    face_coefficients,
    gaussian_random_field,
    solve_darcy,
    threshold_field,
)


class Oracle(nn.Module):
    """Reads ν from the FNO input channel and returns the finite-volume solution (the exact discrete u)."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, inputs):
        nu = (inputs[:, 0] * 4.5 + 7.5).detach().cpu().double().numpy()
        return self.scale * torch.as_tensor(solve_darcy(nu), dtype=inputs.dtype)[:, None]


@pytest.fixture(scope="module")
def problem64(cache):
    return Darcy("tiny", dtype=torch.float64, cache_dir=cache)


# --- random fields -------------------------------------------------------------------------------------
def test_random_field_matches_its_covariance():
    n, samples, tau, alpha, modes = 9, 4000, 3.0, 2.0, 64
    a = gaussian_random_field(samples, n, np.random.default_rng(1), alpha=alpha, tau=tau, n_modes=modes)
    k = np.arange(modes)
    coef = tau ** (alpha - 1) * (np.pi**2 * (k[:, None] ** 2 + k[None, :] ** 2) + tau**2) ** (-alpha / 2)
    coef[0, 0] = 0.0
    cos = np.cos(np.pi * np.outer(k, np.linspace(0, 1, n)))  # [modes, n]
    variance = np.einsum("kl,ki,lj->ij", coef**2, cos**2, cos**2)  # Karhunen–Loève: Σ λ_k φ_k(x)²
    assert np.abs(a.mean(0)).max() < 5 * np.sqrt(variance.max() / samples)
    np.testing.assert_allclose(a.var(0), variance, rtol=0.1)  # sampling error ≈ √(2/4000) ≈ 2 %
    nu = threshold_field(a)
    assert set(np.unique(nu)) == {3.0, 12.0}
    assert abs((nu == 12.0).mean() - 0.5) < 0.02  # symmetric field: half the nodes are high


# --- finite volumes ------------------------------------------------------------------------------------
def _manufactured(n, variable):
    x = np.linspace(0.0, 1.0, n)
    X, Y = np.meshgrid(x, x, indexing="ij")
    u = np.sin(np.pi * X) * np.sin(2 * np.pi * Y)
    u_x, u_y = (
        np.pi * np.cos(np.pi * X) * np.sin(2 * np.pi * Y),
        2 * np.pi * np.sin(np.pi * X) * np.cos(2 * np.pi * Y),
    )
    if variable:
        nu = 1 + 0.5 * np.sin(2 * np.pi * X) * np.cos(np.pi * Y)
        nu_x, nu_y = (
            np.pi * np.cos(2 * np.pi * X) * np.cos(np.pi * Y),
            -0.5 * np.pi * np.sin(2 * np.pi * X) * np.sin(np.pi * Y),
        )
    else:
        nu, nu_x, nu_y = np.full_like(X, 2.0), 0.0, 0.0
    f = -(nu_x * u_x + nu_y * u_y) + nu * 5 * np.pi**2 * u  # −∇·(ν∇u) with Δu = −5π² u
    return nu, f, u


@pytest.mark.parametrize("variable", [False, True])
def test_solver_is_second_order_on_manufactured_solutions(variable):
    sizes = np.array([17, 33, 65])
    errors = []
    for n in sizes:
        nu, f, u = _manufactured(n, variable)
        errors.append(np.abs(solve_darcy(nu[None], f[None])[0] - u).max())
    slopes = -np.diff(np.log(errors)) / np.diff(np.log(sizes - 1))
    np.testing.assert_allclose(slopes, 2.0, atol=0.05)


def test_torch_operator_is_the_solver_matrix():
    rng = np.random.default_rng(2)
    nu = threshold_field(gaussian_random_field(3, 8, rng))
    u = np.zeros((3, 8, 8))
    u[:, 1:-1, 1:-1] = rng.standard_normal((3, 6, 6))
    matrix_times_u = (_operator(nu) @ u[:, 1:-1, 1:-1].reshape(-1)).reshape(3, 6, 6)
    nu_x, nu_y = face_coefficients(torch.as_tensor(nu))
    residual = darcy_residual(torch.as_tensor(u), nu_x, nu_y, 0.0)
    np.testing.assert_allclose(residual.numpy(), matrix_times_u, rtol=1e-12, atol=1e-10)


def test_residual_vanishes_on_the_solver_solution(problem64):
    nu = torch.as_tensor(problem64.data["nu_train"])
    r = darcy_residual(torch.as_tensor(problem64.data["u_train"]), *face_coefficients(nu))
    assert r.abs().max() < 1e-11


def test_solver_rejects_bad_input():
    with pytest.raises(ValueError, match="solve_darcy"):
        solve_darcy(np.ones((4, 4)))
    with pytest.raises(ValueError, match="solve_darcy"):
        solve_darcy(-np.ones((1, 4, 4)))


# --- data ----------------------------------------------------------------------------------------------
def test_data_selection_and_physics(problem64):
    d = problem64.data
    high = d["high_fraction"]
    chosen = np.concatenate([d["train_index"], d["test_index"]])
    assert len(np.unique(chosen)) == len(chosen) == problem64.n_train + problem64.n_test  # disjoint
    distance = np.abs(high - np.median(high))
    assert distance[chosen].max() <= np.sort(distance)[len(chosen) - 1]  # the fields closest to the median
    assert set(np.unique(d["nu_train"])) <= {3.0, 12.0}
    u = d["u_train"]
    assert np.all(u[:, 0] == 0) and np.all(u[:, -1] == 0) and np.all(u[:, :, 0] == 0) and np.all(u[:, :, -1] == 0)
    assert np.all(u[:, 1:-1, 1:-1] > 0)  # positive forcing, zero boundary: positive inside
    assert problem_class("darcy") is Darcy and get_problem("darcy", size="tiny", cache_dir=problem64.cache_dir)


# --- terms and constraints against the exact discrete solution -----------------------------------------
def test_terms_and_constraints_vanish_on_the_reference_solution(problem64):
    terms = problem64.terms(Oracle())
    assert terms["pde"] < 1e-22 and terms["boundary"] == 0 and terms["fit"] < 1e-30
    assert problem64.constraints(Oracle()).abs().max() < 1e-11
    # Teeth: a 1 % error in u leaves a residual of 1 % of the forcing.
    assert problem64.terms(Oracle(1.01))["pde"] == pytest.approx(1e-4, rel=1e-6)


def test_constraints_shape_and_graph(problem64):
    model = problem64.make_model(0)
    c = problem64.constraints(model)
    assert c.shape == (problem64.num_constraints,) == (50,)
    named = dict(model.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(c.sum(), list(named.values()))))  # raises if one is unused
    assert any(p.is_complex() for p in named.values())
    assert all(torch.isfinite(torch.view_as_real(g) if g.is_complex() else g).all() for g in grads.values())
    # The operator annihilates constants, so the output bias (a constant shift of u) cannot change c.
    output_bias = "projection.2.bias"
    assert grads.pop(output_bias).abs().max() < 1e-10
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_batched_constraint_jacobian_matches_row_loop(problem64):
    # The paper's FNO layout with narrow lifting/projection: the same FFT and complex-parameter path, and a
    # fraction of the cost (exact GELU in float64 is slow on CPU).
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = FNO(3, 1, width=4, modes=(16, 16), n_layers=4, lifting_channels=8, projection_channels=8,
                    dtype=torch.float64)  # fmt: skip
    params = list(model.parameters())
    c = problem64.constraints(model)
    eye = torch.eye(len(c), dtype=c.dtype)
    batched = torch.autograd.grad(c, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
    checked = range(0, len(c), 5)  # every fifth row keeps the reference loop cheap; all rows are batched
    rows = [torch.autograd.grad(c[k], params, retain_graph=True) for k in checked]
    for i, j in enumerate(batched):
        assert j.shape == (len(c), *params[i].shape) and j.dtype == params[i].dtype
        torch.testing.assert_close(j[checked], torch.stack([r[i] for r in rows]), rtol=1e-10, atol=1e-12)


def test_objective_gradient_matches_finite_differences_through_real_views(problem64):
    """For a complex parameter, PyTorch's gradient read as a real pair (``view_as_real``) is the gradient
    with respect to the real pair (Re, Im): the convention an optimizer working on real views relies on."""
    model = problem64.make_model(2)
    params = list(model.parameters())
    batch = problem64.sample_batch(torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(problem64.objective(model, batch), params)
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
    eps = 1e-6

    def value_at(sign):
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(sign * eps * v)
        value = problem64.objective(model, batch).item()
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.sub_(sign * eps * v)
        return value

    def real(t):
        return torch.view_as_real(t) if t.is_complex() else t

    fd = (value_at(1) - value_at(-1)) / (2 * eps)
    exact = sum((real(g) * real(v)).sum() for g, v in zip(grads, direction)).item()
    assert abs(fd - exact) < 1e-6 * max(1.0, abs(exact))


# --- batches, metrics, dtypes, cache -------------------------------------------------------------------
def test_mini_batches_are_deterministic_and_a_full_cover_equals_the_full_objective(problem64):
    b1 = problem64.sample_batch(torch.Generator().manual_seed(3))
    b2 = problem64.sample_batch(torch.Generator().manual_seed(3))
    assert torch.equal(b1["fields"], b2["fields"]) and len(b1["fields"]) == max(1, round(0.2 * problem64.n_train))
    draws = {tuple(problem64.sample_batch(torch.Generator().manual_seed(s))["fields"].tolist()) for s in range(20)}
    assert len(draws) > 1
    model = problem64.make_model(0)
    full = {"fields": torch.arange(problem64.n_train)}
    torch.testing.assert_close(problem64.objective(model, full), problem64.objective(model), rtol=1e-12, atol=0)


def test_metrics_and_prediction(problem64):
    model = problem64.make_model(0)
    m = problem64.metrics(model)
    assert {"objective", "test_mse", "max_abs_c"} <= m.keys() and all(isinstance(v, float) for v in m.values())
    assert m["objective"] == pytest.approx(problem64.objective(model).item(), rel=1e-12)
    assert m["max_abs_c"] == pytest.approx(problem64.constraints(model).abs().max().item(), rel=1e-12)
    assert problem64.metrics(Oracle())["test_mse"] < 1e-30
    pred = problem64.prediction(model)
    assert pred["nu"].shape == pred["u_true"].shape == pred["u_pred"].shape == (16, 16)
    np.testing.assert_array_equal(pred["u_true"], problem64.data["u_test"][0])


def test_cache_hit_and_regeneration(tmp_path, monkeypatch):
    calls = []
    real = darcy_module._generate
    monkeypatch.setattr(darcy_module, "_generate", lambda *a: calls.append(a) or real(*a))
    first = Darcy("tiny", cache_dir=tmp_path).data
    second = Darcy("tiny", cache_dir=tmp_path).data
    assert len(calls) == 1 and all(np.array_equal(first[k], second[k]) for k in first)
    npz = next(tmp_path.glob("darcy-*.npz"))
    np.savez(npz, **{**first, "u_train": first["u_train"] * 1.001})  # an edited entry: must not be trusted
    third = Darcy("tiny", cache_dir=tmp_path).data
    assert len(calls) == 2 and all(np.array_equal(first[k], third[k]) for k in first)


def test_pointwise_constraints_match_the_batched_ones(cache):
    """The per-(field, pixel) residual used for torch.func Jacobians gives the same c and J (float64)."""
    import sqpoptim
    from sqpoptim._jacobian import batched_jacobian, flat_size

    p = Darcy("tiny", dtype=torch.float64, cache_dir=cache)
    model = p.make_model(0)
    params = list(model.parameters())
    n = sum(flat_size(q) for q in params)
    c = p.constraints(model)
    J_ref = batched_jacobian(c, params, n)
    residual, points = p.pointwise_constraints()
    c_pw, J_pw = sqpoptim.PointwiseConstraints(model, residual, points).evaluate(params, n)
    torch.testing.assert_close(c_pw, c.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(J_pw, J_ref, rtol=1e-9, atol=1e-9)
