"""A2 chemistry: the generator against scipy's ODE solver and the mass balance, the residual code against the
exact solution, the input-derivative trick against finite differences, and the optimizer's Jacobian path."""

import numpy as np
import pytest
import scipy.integrate
import torch
from torch import nn

from problems.core.autodiff import input_derivative, input_jvp
from problems.pinn.chemistry import (
    MASS_BALANCE,
    NOMINAL_U0,
    Chemistry,
    chemistry_solution,
    initial_conditions,
    rate_matrix,
)

W = np.asarray(MASS_BALANCE)


class ExactChemistry(nn.Module):
    """u(t) = V diag(e^{λt}) V⁻¹ u0 (A is diagonalisable with real eigenvalues) in torch, differentiable in t
    to any order; one parameter (a scale fixed at 1) so that a graph exists."""

    def __init__(self, dtype):
        super().__init__()
        lam, V = np.linalg.eig(rate_matrix())
        assert np.all(np.isreal(lam))
        self.register_buffer("lam", torch.as_tensor(lam.real, dtype=dtype))
        self.register_buffer("V", torch.as_tensor(V.real, dtype=dtype))
        self.register_buffer("Vinv", torch.as_tensor(np.linalg.inv(V.real), dtype=dtype))
        self.scale = nn.Parameter(torch.ones((), dtype=dtype))

    def forward(self, x):  # x: [N, 5] = [u0, t]
        modes = x[:, :4] @ self.Vinv.T  # [N, 4] coordinates of u0 in the eigenbasis
        return self.scale * (modes * torch.exp(self.lam * x[:, 4:])) @ self.V.T  # [N, 4]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_rate_matrix_and_mass_balance():
    A = rate_matrix()
    k1, k2, k3, k4, k5 = 4.283, 1.191, 5.743, 10.219, 1.535
    u = np.array([1.0, 2.0, 3.0, 4.0])
    du = A @ u
    expected = [-(k1 + k2 + k4) * 1 + k3 * 3 + k5 * 4, 2 * k1 * 1, k2 * 1 - k3 * 3, k4 * 1 - k5 * 4]
    np.testing.assert_allclose(du, expected, rtol=1e-15)
    np.testing.assert_allclose(W @ A, 0.0, atol=1e-14)


def test_matrix_exponential_matches_solve_ivp():
    u0 = initial_conditions(3, 1000)
    t = np.arange(64) * 10 / 64
    exact = chemistry_solution(u0, t)  # [3, 64, 4]
    A = rate_matrix()
    for i in range(3):
        sol = scipy.integrate.solve_ivp(
            lambda _, u: A @ u, (0, t[-1]), u0[i], t_eval=t, method="DOP853", rtol=1e-13, atol=1e-14
        )
        np.testing.assert_allclose(exact[i], sol.y.T, rtol=1e-10, atol=1e-10)


def test_generated_data_satisfy_ode_and_mass_balance(cache):
    p = Chemistry("tiny", dtype=torch.float64, cache_dir=cache)
    x, u = p.x_train.numpy(), p.u_train.numpy()
    u0, t = x[:, :4], x[:, 4]
    # Mass balance: w·u(t) is conserved, so it equals w·u0 at every point.
    np.testing.assert_allclose(u @ W, u0 @ W, rtol=1e-13)
    # u(0) = u0, and the ODE by central differences of the solution operator (error O(h²) ~ 1e-8 here).
    np.testing.assert_allclose(u[t == 0], u0[t == 0], rtol=1e-14)
    h = 1e-4
    du = (chemistry_solution(u0[:64], t[:64] + h) - chemistry_solution(u0[:64], t[:64] - h)) / (2 * h)
    du = du[np.arange(64), np.arange(64)]  # [64, 4] the diagonal: point j at its own time
    np.testing.assert_allclose(du, u[:64] @ rate_matrix().T, rtol=1e-6, atol=1e-6)


def test_initial_conditions_and_points(cache):
    # The paper's draw: np.random.seed(1000), then U[-1, 1]^4 per initial condition (RandomState is the legacy
    # global generator's algorithm and seeding).
    legacy = np.random.RandomState(1000)
    loop = np.stack([np.asarray(NOMINAL_U0) + legacy.uniform(-1, 1, 4) for _ in range(5)])
    np.testing.assert_array_equal(initial_conditions(5, 1000), loop)
    tiny = Chemistry("tiny", dtype=torch.float64, cache_dir=cache)
    small = Chemistry("small", dtype=torch.float64, cache_dir=cache)
    assert tiny.num_points == 20 * 64 and small.num_points == 32 * 64
    torch.testing.assert_close(small.x_train[: 20 * 64], tiny.x_train, rtol=0, atol=0)  # a prefix
    t = tiny.x_train[:64, 4].numpy()
    np.testing.assert_allclose(t, np.arange(64) * 10 / 64, rtol=0, atol=0)
    assert abs(t[-1] - 630 / 64) < 1e-15
    assert torch.all((tiny.x_train[:, :4] - torch.tensor(NOMINAL_U0, dtype=torch.float64)).abs() <= 1)
    # Held-out test initial conditions; fixed 20% fit subset; 10 distinct constraint points.
    assert not set(map(tuple, tiny.u0_test.tolist())) & set(map(tuple, tiny.x_train[:, :4].tolist()))
    assert len(tiny.fit_idx) == 256 and len(set(tiny.fit_idx.tolist())) == 256
    assert len(set(tiny.constraint_idx.tolist())) == 10 and tiny.constraint_idx.max() < tiny.num_points


def test_paper_size(cache):
    p = Chemistry("paper", cache_dir=cache)
    assert p.x_train.shape == (64_000, 5) and p.u_train.shape == (64_000, 4)
    assert len(p.fit_idx) == 12_800 and p.x_test.shape == (200 * 64, 5)
    batch = p.sample_batch(torch.Generator().manual_seed(0))
    assert batch["residual"].shape == (12_800,) and batch["fit"].shape == (2_560,)


def test_input_jvp_matches_finite_differences_and_per_output_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    t = x[:, 4:].clone().requires_grad_(True)
    u = model(torch.cat([x[:, :4], t], 1))
    jvp = input_jvp(u, t)  # [7, 4]
    rows = torch.cat([input_derivative(u, t, torch.eye(4, dtype=torch.float64)[i]) for i in range(4)], 1)
    torch.testing.assert_close(jvp, rows, rtol=1e-12, atol=1e-14)
    h = 1e-6
    up, down = x.clone(), x.clone()
    up[:, 4] += h
    down[:, 4] -= h
    torch.testing.assert_close(jvp, (model(up) - model(down)).detach() / (2 * h), rtol=1e-7, atol=1e-8)


def test_residuals_vanish_on_exact_solution(cache):
    p = Chemistry("tiny", dtype=torch.float64, cache_dir=cache)
    exact = ExactChemistry(torch.float64)
    torch.testing.assert_close(exact(p.x_train), p.u_train, rtol=1e-12, atol=1e-12)  # eig form = expm data
    ode, mass = p.residuals(exact, p.x_train)
    # |A u| ~ 1e2 on these data: residuals at 1e-10 are rounding.
    assert ode.abs().max() < 1e-10 and mass.abs().max() < 1e-10
    assert p.constraints(exact).abs().max() < 1e-10
    assert p.objective(exact) < 1e-20
    metrics = p.metrics(exact)
    assert metrics["test_mse"] < 1e-20 and metrics["max_abs_c"] < 1e-10
    # A wrong model u(x) = u0 (constant in t): u' = 0, so the ODE residual is −A u0 and the mass balance 0.
    ode, mass = p.residuals(lambda x: x[:, :4] * 1.0, p.x_train)
    torch.testing.assert_close(ode, -p.x_train[:, :4] @ p.A.T)
    assert mass.abs().max() == 0


def test_mass_balance_equals_w_dot_ode_derivative(cache):
    p = Chemistry("tiny", dtype=torch.float64, cache_dir=cache)
    model = p.make_model(0)
    x = p.x_train[p.constraint_idx]
    _, mass = p.residuals(model, x)
    torch.testing.assert_close(p.mass_balance(model, x), mass, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.constraints(model), mass)


def test_constraints_graph_and_batched_jacobian(cache):
    p = Chemistry("tiny", dtype=torch.float64, cache_dir=cache)
    model = p.make_model(1)
    named = list(model.named_parameters())
    params = [q for _, q in named]
    c = p.constraints(model)
    assert c.shape == (10,) and p.num_constraints == 10
    eye = torch.eye(10, dtype=torch.float64)
    batched = torch.autograd.grad(
        c, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
    )
    rows = [torch.autograd.grad(c[i], params, retain_graph=True, allow_unused=True) for i in range(10)]
    for j, (name, _) in enumerate(named):
        if name == "6.bias":
            # w·∂u/∂t does not depend on the output bias: structurally absent from the graph.
            assert batched[j] is None and all(r[j] is None for r in rows)
            continue
        torch.testing.assert_close(batched[j], torch.stack([r[j] for r in rows]), rtol=1e-12, atol=1e-12)
        assert all(batched[j][i].abs().max() > 0 for i in range(10)), name


def test_mini_batches(cache):
    p = Chemistry("tiny", dtype=torch.float64, cache_dir=cache)
    draw = lambda seed: p.sample_batch(torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k]) for k in ("residual", "fit"))
    assert a["residual"].shape == (256,) and len(set(a["residual"].tolist())) == 256
    assert a["fit"].shape == (51,) and len(set(a["fit"].tolist())) == 51
    model = p.make_model(0)
    everything = {"residual": torch.randperm(p.num_points), "fit": torch.randperm(len(p.fit_idx))}
    torch.testing.assert_close(p.objective(model, everything), p.objective(model), rtol=1e-12, atol=0)
    # By hand: the residual terms on the residual batch, the fit term on its own batch of fit points.
    ode, mass = p.residuals(model, p.x_train[a["residual"]])
    idx = p.fit_idx[a["fit"]]
    fit = (model(p.x_train[idx]) - p.u_train[idx]).pow(2).mean()
    expected = 1e-2 * ode.pow(2).mean() + 1e-2 * mass.pow(2).mean() + fit
    torch.testing.assert_close(p.objective(model, a), expected, rtol=1e-12, atol=0)


def test_bad_input_raises(cache):
    p = Chemistry("tiny", cache_dir=cache)
    model = p.make_model(0)
    with pytest.raises(ValueError, match="chemistry"):
        p.objective(model, {"residual": torch.arange(3)})
    with pytest.raises(ValueError, match="chemistry"):
        p.objective(model, {"residual": torch.arange(3), "fit": torch.tensor([10**6])})


def test_cache_roundtrip_and_edit(cache):
    first = Chemistry("tiny", dtype=torch.float64, cache_dir=cache)
    (npz,) = cache.glob("chemistry-*.npz")
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["u_train"] = arrays["u_train"] * 2
    np.savez(npz, **arrays)
    repaired = Chemistry("tiny", dtype=torch.float64, cache_dir=cache)
    for name in ("x_train", "u_train", "x_test", "u_test", "fit_idx", "constraint_idx"):
        assert torch.equal(getattr(first, name), getattr(repaired, name)), name
    # Different sizes are different entries.
    Chemistry("small", cache_dir=cache)
    assert len(list(cache.glob("chemistry-*.npz"))) == 2


def test_prediction_starts_at_the_initial_condition(cache):
    p = Chemistry("tiny", cache_dir=cache)
    pred = p.prediction(p.make_model(0))
    assert pred["u_pred"].shape == pred["u_true"].shape == (len(pred["t"]), 4) and pred["t_data"].shape == (64,)
    np.testing.assert_allclose(pred["u_true"][0], pred["u0"], rtol=1e-14)
