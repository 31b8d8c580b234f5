"""B manifold toy: the truth and the noise model against their closed forms, the constraints and metrics on
exact and scaled solutions, and the optimizer's Jacobian path."""

import numpy as np
import pytest
import torch
from torch import nn

from problems.pinn.manifold_toy import ANGLE_NOISE, ManifoldToy, _generate, manifold_truth


class Scaled(nn.Module):
    """x ↦ r·y*(x): the truth for r = 1; r is a parameter so that a graph exists."""

    def __init__(self, r, dtype):
        super().__init__()
        self.r = nn.Parameter(torch.tensor(float(r), dtype=dtype))

    def forward(self, x):
        return self.r * manifold_truth(x.squeeze(-1))


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_truth_is_on_the_circle_and_monotone():
    x = np.linspace(-1, 1, 2001)
    y = manifold_truth(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-15)
    theta = np.unwrap(np.arctan2(y[:, 1], y[:, 0]))
    assert np.all(np.diff(theta) >= 0)
    np.testing.assert_allclose(theta[-1] - theta[0], 2 * np.pi, atol=1e-12)
    torch.testing.assert_close(manifold_truth(torch.as_tensor(x)), torch.as_tensor(y))


def test_noise_model_shrinks_the_conditional_mean():
    """The docstring's claim: E[y | x] = e^{-s²/2} y*(x), so its normalisation is the truth. Monte Carlo with
    200,000 samples: the standard error of each mean is below 0.002; we allow 5 of them."""
    data = _generate(200_000)
    y_star = manifold_truth(data["x"])
    along = np.sum(data["y"] * y_star, axis=1)  # component along y*
    across = data["y"][:, 0] * -y_star[:, 1] + data["y"][:, 1] * y_star[:, 0]  # component along y*⊥
    assert abs(along.mean() - np.exp(-(ANGLE_NOISE**2) / 2)) < 5 * along.std() / np.sqrt(len(along))
    assert abs(across.mean()) < 5 * across.std() / np.sqrt(len(across))
    assert data["x"].min() >= -1 and data["x"].max() <= 1


def test_data_and_points(cache):
    p = ManifoldToy(dtype=torch.float64, cache_dir=cache)
    assert p.x.shape == (256, 1) and p.y.shape == (256, 2)
    np.testing.assert_allclose(p.x_constraint.squeeze(-1).numpy(), -1 + (2 * np.arange(16) + 1) / 16)
    assert ManifoldToy("tiny", cache_dir=cache).x.shape == (64, 1)
    # The data are noisy: not on the circle, but near it.
    radius = p.y.norm(dim=1)
    assert (radius - 1).abs().max() > 1e-2 and (radius - 1).abs().mean() < 0.2


def test_constraints_and_metrics_on_exact_and_scaled_solutions(cache):
    p = ManifoldToy(dtype=torch.float64, cache_dir=cache)
    exact = Scaled(1.0, torch.float64)
    assert p.constraints(exact).abs().max() < 1e-15
    m = p.metrics(exact)
    assert m["test_mse"] < 1e-30 and m["max_abs_c"] < 1e-15 and m["max_manifold_violation"] < 1e-15
    torch.testing.assert_close(p.objective(exact), torch.mean((manifold_truth(p.x.squeeze(-1)) - p.y) ** 2))
    # r·y*: c = r² − 1, ‖y‖ − 1 = r − 1, test MSE = (r − 1)²/2 per component on average over the unit circle.
    scaled = Scaled(0.5, torch.float64)
    torch.testing.assert_close(p.constraints(scaled), torch.full((16,), -0.75, dtype=torch.float64))
    m = p.metrics(scaled)
    assert abs(m["max_manifold_violation"] - 0.5) < 1e-15 and abs(m["max_abs_c"] - 0.75) < 1e-15
    assert abs(m["test_mse"] - 0.125) < 1e-15


def test_constraints_graph_and_batched_jacobian(cache):
    p = ManifoldToy(dtype=torch.float64, cache_dir=cache)
    model = p.make_model(0)
    assert [layer.out_features for layer in model if isinstance(layer, nn.Linear)] == [32, 32, 2]
    params = list(model.parameters())
    c = p.constraints(model)
    assert c.shape == (16,) and p.num_constraints == 16
    batched = torch.autograd.grad(
        c, params, grad_outputs=torch.eye(16, dtype=torch.float64), is_grads_batched=True, retain_graph=True
    )
    rows = [torch.autograd.grad(c[i], params, retain_graph=True) for i in range(16)]
    for j, b in enumerate(batched):
        torch.testing.assert_close(b, torch.stack([r[j] for r in rows]), rtol=1e-12, atol=1e-14)
        assert all(b[i].abs().max() > 0 for i in range(16))
    # ∂c/∂b_out = 2y at the constraint points (the output bias moves y directly).
    with torch.no_grad():
        y = model(p.x_constraint)
    torch.testing.assert_close(batched[-1], 2 * y)


def test_mini_batches(cache):
    p = ManifoldToy(dtype=torch.float64, cache_dir=cache)
    draw = lambda seed: p.sample_batch(torch.Generator().manual_seed(seed))["data"]  # noqa: E731
    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (64,) and len(set(a.tolist())) == 64
    model = p.make_model(0)
    torch.testing.assert_close(
        p.objective(model, {"data": a}), torch.mean((model(p.x[a]) - p.y[a]) ** 2), rtol=1e-14, atol=0
    )
    torch.testing.assert_close(p.objective(model, {"data": torch.randperm(256)}), p.objective(model))
    with pytest.raises(ValueError, match="manifold_toy"):
        p.objective(model, {"residual": a})


def test_cache_roundtrip_and_edit(cache):
    first = ManifoldToy(dtype=torch.float64, cache_dir=cache)
    (npz,) = cache.glob("manifold_toy-*.npz")
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y"] = arrays["y"][::-1].copy()
    np.savez(npz, **arrays)
    again = ManifoldToy(dtype=torch.float64, cache_dir=cache)
    assert torch.equal(first.y, again.y) and torch.equal(first.x, again.x)


def test_description_lists_the_penalty_weights(cache):
    assert ManifoldToy("tiny", cache_dir=cache).describe()["penalty_weights"] == (1.0, 1e2, 1e4, 1e6)
