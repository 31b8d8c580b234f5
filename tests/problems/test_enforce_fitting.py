"""C1 (ENFORCE function fitting): data against the defining formulas, the constraint and its parameter
Jacobian against finite differences, the metrics against independent numpy formulas, every method through the
runner, and ENFORCE's inference tolerance on the test inputs after a few training steps."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from problems import problem_names
from problems.output_tasks.enforce_fitting import EnforceFitting, fitting_constraint
from problems.runner import RunSpec, run
from sqpoptim.layers import OutputConstraints


class ExactModel(nn.Module):
    """The defining formulas plus a constant offset, with one parameter so a graph exists."""

    def __init__(self, offset=(0.0, 0.0)):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.offset = torch.tensor(offset, dtype=torch.float64)

    def forward(self, x):
        x = x.reshape(-1)
        return self.scale * torch.stack([2 * torch.sin(5 * x), -(torch.sin(5 * x) ** 2) - x**2], -1) + self.offset


def test_registered_and_data_match_the_formulas(cache):
    assert "enforce_fitting" in problem_names()
    p = EnforceFitting(dtype=torch.float64, cache_dir=cache)
    x, y = p.x_train.squeeze(-1).numpy(), p.y_train.numpy()
    assert x.shape == (100,) and p.x_test.shape == (100_000, 1)
    assert x.min() >= -2 and x.max() <= 2 and p.x_test.min() >= -2 and p.x_test.max() <= 2
    np.testing.assert_array_equal(y[:, 0], 2 * np.sin(5 * x))
    np.testing.assert_array_equal(y[:, 1], -(np.sin(5 * x) ** 2) - x**2)
    xt, yt = p.x_test.squeeze(-1).numpy(), p.y_test.numpy()
    np.testing.assert_allclose(yt, np.stack([2 * np.sin(5 * xt), -(np.sin(5 * xt) ** 2) - xt**2], -1), atol=1e-15)
    # The data lie on the constraint set (0.5 y1)^2 + x^2 + y2 = 0.
    assert np.abs((0.5 * yt[:, 0]) ** 2 + xt**2 + yt[:, 1]).max() < 1e-14
    # Uniform on [-2, 2]: mean 0, variance 4/3 (100,000 draws: 5 standard errors).
    assert abs(xt.mean()) < 5 * math.sqrt(4 / 3 / 1e5) and abs(xt.var() - 4 / 3) < 0.02
    # Smaller sizes are prefixes of the paper's test set; the training set is the paper's at every size.
    tiny = EnforceFitting("tiny", dtype=torch.float64, cache_dir=cache)
    torch.testing.assert_close(tiny.x_test, p.x_test[:1000], rtol=0, atol=0)
    torch.testing.assert_close(tiny.x_train, p.x_train, rtol=0, atol=0)
    # S of the violation percentage: max |y2| = max (sin^2 5x + x^2) on [-2, 2] (dense grid), attained near 2.
    grid = np.linspace(-2, 2, 400_001)
    assert abs(p.violation_scale - (np.sin(5 * grid) ** 2 + grid**2).max()) < 1e-3


def test_model_is_the_papers_relu_network(cache):
    p = EnforceFitting("tiny", cache_dir=cache)
    model = p.make_model(0)
    assert sum(q.numel() for q in model.parameters()) == 258
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [64, 2]
    assert sum(isinstance(m, nn.ReLU) for m in model) == 1
    for a, b, c in zip(model.parameters(), p.make_model(0).parameters(), p.make_model(1).parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_constraints_shape_values_and_parameter_jacobian(cache):
    p = EnforceFitting("tiny", dtype=torch.float64, cache_dir=cache)
    model = p.make_model(3)
    c = p.constraints(model)
    assert c.shape == (p.num_constraints,) == (25,) and c.grad_fn is not None
    xc = p.x_train[:25]
    y = model(xc)
    torch.testing.assert_close(c, ((0.5 * y[:, 0]) ** 2 + xc[:, 0] ** 2 + y[:, 1]), rtol=0, atol=1e-14)
    # Directional derivative of c in parameter space: autograd against central differences.
    params = list(model.parameters())
    torch.manual_seed(0)
    direction = [torch.randn_like(q) for q in params]
    grads = torch.autograd.grad(c.sum(), params)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    eps = 1e-6
    with torch.no_grad():
        for q, d in zip(params, direction):
            q.add_(eps * d)
        plus = p.constraints(model).sum()
        for q, d in zip(params, direction):
            q.sub_(2 * eps * d)
        minus = p.constraints(model).sum()
    assert abs(float(analytic) - float(plus - minus) / (2 * eps)) < 1e-6 * max(1.0, abs(float(analytic)))


def test_structured_jacobian_and_hessian_match_autograd(cache):
    oc = EnforceFitting("tiny", dtype=torch.float64, cache_dir=cache).output_constraints()
    generic = OutputConstraints(h=fitting_constraint)  # torch.func Jacobian and Hessian of the same h
    torch.manual_seed(0)
    x, y, w = torch.rand(7, 1, dtype=torch.float64) * 4 - 2, torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 1)
    ev, ref = oc.evaluate(x, y), generic.evaluate(x, y)
    torch.testing.assert_close(ev.h, ref.h, rtol=0, atol=0)
    torch.testing.assert_close(ev.h_jac, ref.h_jac, rtol=1e-15, atol=1e-15)
    w = w.double()
    torch.testing.assert_close(oc.lagrangian_hessian(x, y, w, None), generic.lagrangian_hessian(x, y, w, None))


def test_metrics_against_independent_formulas(cache):
    p = EnforceFitting("tiny", dtype=torch.float64, cache_dir=cache)
    exact = p.metrics(ExactModel())
    assert (
        exact["mape"] < 1e-12 and exact["wape"] < 1e-12 and abs(exact["r2"] - 1) < 1e-14 and exact["objective"] < 1e-28
    )
    assert exact["max_abs_c"] < 1e-14 and exact["test_max_violation"] < 1e-14 and exact["max_violation_pct"] < 1e-12
    shifted = ExactModel(offset=(0.1, -0.2))
    m = p.metrics(shifted)
    x = p.x_test.squeeze(-1).numpy()
    y = p.y_test.numpy()
    yp = y + np.array([0.1, -0.2])
    mape = 100 * np.mean(np.linalg.norm(yp - y, axis=1) / np.linalg.norm(y, axis=1))
    r2 = np.mean([1 - np.sum((yp[:, k] - y[:, k]) ** 2) / np.sum((y[:, k] - y[:, k].mean()) ** 2) for k in range(2)])
    viol = np.abs((0.5 * yp[:, 0]) ** 2 + x**2 + yp[:, 1])
    np.testing.assert_allclose(m["mape"], mape, rtol=1e-12)
    np.testing.assert_allclose(m["wape"], 100 * 0.3 * len(y) / np.abs(y).sum(), rtol=1e-12)
    np.testing.assert_allclose(m["r2"], r2, rtol=1e-12)
    np.testing.assert_allclose(m["test_mse"], 0.05, rtol=1e-12)  # 0.1^2 + 0.2^2 at every point
    np.testing.assert_allclose(m["max_violation_pct"], 100 * viol.max() / p.violation_scale, rtol=1e-12)
    np.testing.assert_allclose(m["mean_violation_pct"], 100 * viol.mean() / p.violation_scale, rtol=1e-12)
    assert m["time_per_batch_ms"] > 0


def test_batches_and_bad_input(cache):
    p = EnforceFitting("tiny", cache_dir=cache)
    batch = p.sample_batch(torch.Generator().manual_seed(0))
    assert batch["train"].shape == (50,) and len(set(batch["train"].tolist())) == 50
    x = p.inputs(batch)
    torch.testing.assert_close(x, p.x_train[batch["train"]])
    with pytest.raises(ValueError, match="outputs of shape"):
        p.output_loss(x, torch.zeros(50, 3), batch)
    with pytest.raises(ValueError, match="mapping with key 'train'"):
        p.inputs({"residual": batch["train"]})
    with pytest.raises(ValueError, match="Invalid size"):
        EnforceFitting("huge", cache_dir=cache)


METHODS = [
    "adam-unc",
    "soft",
    "enforce",
    "enforce:activation=true",
    "enforce:gradient=implicit",
    "hardnet-pp:max_iter=30",
    "kkt-hardnet",
    "sqp-adam",
]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_through_the_runner(method, tmp_path, cache):
    spec = RunSpec("enforce_fitting", method, lr=1e-3, batch="mini", iterations=2, size="tiny", eval_every=2)
    res = run(spec, tmp_path, cache_dir=cache, progress=False)
    assert res["status"] == "complete" and res["curves"]["iteration"] == [0, 2]
    assert all(math.isfinite(v) for v in res["curves"]["objective"])
    assert set(res["final"]) >= {"objective", "test_mse", "max_abs_c", "mape", "r2", "max_violation_pct"}
    if method.startswith(("enforce", "hardnet-pp", "kkt")):
        assert "raw_mape" in res["final"]


def test_enforce_meets_the_inference_tolerance_after_training(tmp_path, cache):
    spec = RunSpec("enforce_fitting", "enforce", lr=1e-3, iterations=20, size="tiny", dtype="float64")
    res = run(spec, tmp_path, cache_dir=cache, progress=False)
    final = res["final"]
    assert final["test_max_violation"] <= 1e-6 < final["raw_test_max_violation"]  # eval mode: max |h| ≤ ε_I
    # ... and independently, from the saved predictions of the trained model (2,000 test inputs):
    pred = np.load(tmp_path / "enforce_fitting" / f"{spec.key()}.npz")
    t, y = pred["t"], pred["u_pred"]
    assert np.abs((0.5 * y[:, 0]) ** 2 + t**2 + y[:, 1]).max() <= 1e-6
    assert float(fitting_constraint(torch.as_tensor(t)[:, None], torch.as_tensor(y)).abs().max()) <= 1e-6


def test_prediction_figure(tmp_path, cache):
    from problems.plots import plot_problem

    for method in ("adam-unc", "enforce"):
        run(
            RunSpec("enforce_fitting", method, lr=1e-3, iterations=1, size="tiny"),
            tmp_path,
            cache_dir=cache,
            progress=False,
        )
    files = plot_problem(tmp_path, "enforce_fitting", formats=("png",))
    assert len(files) == 5 and all(f.stat().st_size > 1000 for f in files)
