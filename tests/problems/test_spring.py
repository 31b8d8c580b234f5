"""A1 spring: the data against the exact solution and scipy, the residual code against the exact solution, and
the constraint Jacobian paths the optimizers use."""

import numpy as np
import pytest
import scipy.integrate
import torch
from torch import nn

from problems.pinn.spring import CONSTRAINT_INDICES, Spring, spring_exact


class ExactSpring(nn.Module):
    """The closed-form solution as a model, with one parameter (a scale fixed at 1) so a graph exists."""

    def __init__(self, dtype):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=dtype))

    def forward(self, t):
        return self.scale * spring_exact(t)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_exact_solution_solves_the_ivp():
    t = np.linspace(0.0, 1.0, 201)
    sol = scipy.integrate.solve_ivp(
        lambda _, y: [y[1], -4.0 * y[1] - 400.0 * y[0]],
        (0.0, 1.0),
        [1.0, 0.0],
        t_eval=t,
        rtol=1e-12,
        atol=1e-12,
    )
    np.testing.assert_allclose(spring_exact(t), sol.y[0], atol=1e-9)


def test_data_points_and_values(cache):
    p = Spring(dtype=torch.float64, cache_dir=cache)
    t_fit = p.t_fit.squeeze(-1).numpy()
    np.testing.assert_array_equal(t_fit, np.arange(0, 181, 20) / 499.0)
    assert len(t_fit) == 10 and t_fit.max() <= 0.361
    np.testing.assert_allclose(p.u_fit.squeeze(-1).numpy(), spring_exact(t_fit), rtol=0, atol=1e-15)
    np.testing.assert_allclose(p.t_residual.squeeze(-1).numpy(), np.linspace(0, 1, 30), atol=1e-15)
    np.testing.assert_allclose(p.t_constraint.squeeze(-1).numpy(), [4 / 29, 12 / 29, 21 / 29], atol=1e-15)
    assert p.t_test.shape == (1000, 1)
    np.testing.assert_allclose(p.u_test.squeeze(-1).numpy(), spring_exact(p.t_test.squeeze(-1).numpy()))


def test_residual_vanishes_on_exact_solution(cache):
    p = Spring(dtype=torch.float64, cache_dir=cache)
    exact = ExactSpring(torch.float64)
    # |u''| reaches ~400 on [0, 1]: a residual of 1e-10 is ~12 orders below its terms.
    assert p.residual(exact, p.t_residual).abs().max() < 1e-10
    assert p.constraints(exact).abs().max() < 1e-10
    assert p.objective(exact) < 1e-24
    m = p.metrics(exact)
    assert m["test_mse"] < 1e-28 and m["max_abs_c"] < 1e-10 and m["objective"] < 1e-24
    # ... and equals the closed form on a non-solution: u = cos(ωt) gives r = (400 − ω²) cos ωt − 4ω sin ωt.
    w, t = 396**0.5, p.t_residual
    wrong = p.residual(lambda t: torch.cos(w * t), t)
    torch.testing.assert_close(wrong, (4 * torch.cos(w * t) - 4 * w * torch.sin(w * t)).squeeze(-1))


def test_model_architecture_and_seeding(cache):
    p = Spring(cache_dir=cache)
    model = p.make_model(0)
    assert sum(q.numel() for q in model.parameters()) == 2209
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [32, 32, 32, 1]
    assert sum(isinstance(m, nn.Tanh) for m in model) == 3
    same, other = p.make_model(0), p.make_model(1)
    for a, b, c in zip(model.parameters(), same.parameters(), other.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c)
        bound = a.shape[-1] ** -0.5 if a.dim() == 2 else None
        if bound is not None:  # PyTorch's nn.Linear distribution U[-1/sqrt(fan_in), 1/sqrt(fan_in)]
            assert a.abs().max() <= bound
    # float32 is the rounded float64 draw: the same network up to rounding.
    m64 = Spring(dtype=torch.float64, cache_dir=cache).make_model(0)
    for a, b in zip(model.parameters(), m64.parameters()):
        assert a.dtype == torch.float32 and b.dtype == torch.float64
        torch.testing.assert_close(a, b.float(), rtol=0, atol=0)


def test_constraints_have_a_graph_to_every_parameter(cache):
    p = Spring(dtype=torch.float64, cache_dir=cache)
    model = p.make_model(0)
    c = p.constraints(model)
    assert c.shape == (3,) and p.num_constraints == 3
    params = list(model.parameters())
    for i in range(3):
        grads = torch.autograd.grad(c[i], params, retain_graph=True)
        assert all(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_constraint_jacobian_matches_row_loop(cache, dtype):
    p = Spring(dtype=dtype, cache_dir=cache)
    model = p.make_model(3)
    params = list(model.parameters())
    c = p.constraints(model)
    eye = torch.eye(3, dtype=dtype)
    batched = torch.autograd.grad(c, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
    rows = [torch.autograd.grad(c[i], params, retain_graph=True) for i in range(3)]
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    for j, b in enumerate(batched):
        torch.testing.assert_close(b, torch.stack([r[j] for r in rows]), **tol)


def test_constraint_gradient_matches_finite_differences(cache):
    """The parameter gradient through the create_graph input derivatives, against central differences."""
    p = Spring(dtype=torch.float64, cache_dir=cache)
    model = p.make_model(0)
    first = next(model.parameters())
    (g,) = torch.autograd.grad(p.constraints(model)[1], first)
    h = 1e-6
    for idx in [(0, 0), (5, 0), (17, 0)]:
        with torch.no_grad():
            first[idx] += h
            up = p.constraints(model)[1].item()
            first[idx] -= 2 * h
            down = p.constraints(model)[1].item()
            first[idx] += h
        assert abs((up - down) / (2 * h) - g[idx].item()) < 1e-6 * max(1.0, abs(g[idx].item()))


def test_mini_batches(cache):
    p = Spring(dtype=torch.float64, cache_dir=cache)
    draw = lambda seed: p.sample_batch(torch.Generator().manual_seed(seed))["residual"]  # noqa: E731
    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (15,) and len(set(a.tolist())) == 15 and 0 <= a.min() and a.max() < 30
    model = p.make_model(0)
    # The objective on a batch holding every residual point is the full objective.
    full = {"residual": torch.randperm(30, generator=torch.Generator().manual_seed(2))}
    torch.testing.assert_close(p.objective(model, full), p.objective(model), rtol=1e-13, atol=0)
    # A batch subsamples the residual term only: recompute it by hand.
    t_b = p.t_residual[a]
    fit = torch.mean((model(p.t_fit) - p.u_fit) ** 2)
    torch.testing.assert_close(p.objective(model, {"residual": a}), fit + 1e-4 * p.residual(model, t_b).pow(2).mean())
    assert set(CONSTRAINT_INDICES) <= set(range(30))


def test_bad_batches_raise(cache):
    p = Spring(cache_dir=cache)
    model = p.make_model(0)
    with pytest.raises(ValueError, match="spring"):
        p.objective(model, {"data": torch.arange(3)})
    with pytest.raises(ValueError, match="spring"):
        p.objective(model, {"residual": torch.tensor([0, 30])})
    with pytest.raises(TypeError, match="spring"):
        p.objective(model, {"residual": torch.tensor([0.0, 1.0])})
    with pytest.raises(ValueError, match="size"):
        Spring("huge", cache_dir=cache)


def test_cache_roundtrip_and_corruption(cache):
    first = Spring(dtype=torch.float64, cache_dir=cache)
    files = sorted(cache.glob("spring-*.npz"))
    assert len(files) == 1
    again = Spring(dtype=torch.float64, cache_dir=cache)
    assert torch.equal(first.u_test, again.u_test) and torch.equal(first.t_fit, again.t_fit)
    # An edited entry (valid file, wrong values): the checksum no longer matches, so it is regenerated.
    with np.load(files[0]) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["u_fit"] = arrays["u_fit"] + 1.0
    np.savez(files[0], **arrays)
    repaired = Spring(dtype=torch.float64, cache_dir=cache)
    assert torch.equal(first.u_fit, repaired.u_fit) and torch.equal(first.u_test, repaired.u_test)
    with np.load(files[0]) as f:  # rewritten with the right values
        np.testing.assert_array_equal(f["u_fit"], first.u_fit.squeeze(-1).numpy())


def test_cache_regenerates_a_truncated_file(cache):
    first = Spring(dtype=torch.float64, cache_dir=cache)
    (npz,) = cache.glob("spring-*.npz")
    npz.write_bytes(npz.read_bytes()[:100])
    repaired = Spring(dtype=torch.float64, cache_dir=cache)
    assert torch.equal(first.u_test, repaired.u_test)
