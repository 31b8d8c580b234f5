"""E4 pooling: every generated point against the balances and specifications, the split interval against a
linear program, the midpoint rule, the closed-form derivatives against torch.func, the metrics of an exact model
and the runner's methods."""

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

from problems import get_problem
from problems.output_tasks.pooling import INPUT_BOX, MIN_SPLIT_WIDTH, pooling_data, split_interval
from problems.runner import RunSpec, run
from sqpoptim.layers import KKTHardNet, OutputConstraints


@pytest.fixture(scope="module")
def data():
    return pooling_data(2000)


def test_every_point_satisfies_the_balances_and_both_specifications(data):
    x, y = data
    a, b, xx, yy = x.T
    m, px, py, cx, cy = y.T
    scale = np.abs(x).max()
    np.testing.assert_allclose(px + py, a + b, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(px + cx, xx, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(py + cy, yy, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(m * (px + py), 3 * a + b, rtol=1e-14, atol=0)
    assert (m * px + 2 * cx - 2.5 * xx < 0).all() and (m * py + 2 * cy - 1.5 * yy < 0).all()  # strictly
    assert (y[:, 1:] >= 0).all() and (m >= 1).all() and (m < 2).all()  # physical flows and sulfur content
    lo, hi = np.array(INPUT_BOX).T
    assert (x >= lo).all() and (x <= hi).all()


def test_split_interval_is_the_feasible_range_of_a_linear_program(data):
    """min and max of P_x over {flows >= 0, balances, specifications} (m fixed by the balances) by linprog."""
    x, _ = data
    for a, b, xx, yy in x[:25]:
        m = (3 * a + b) / (a + b)
        # variables (Px, Py, Cx, Cy) >= 0
        A_eq = [[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]]
        b_eq = [a + b, xx, yy]
        A_ub = [[m, 0, 2, 0], [0, m, 0, 2]]
        b_ub = [2.5 * xx, 1.5 * yy]
        bounds = (
            scipy.optimize.linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, method="highs").x[0]
            for c in ([1, 0, 0, 0], [-1, 0, 0, 0])
        )
        lp_lo, lp_hi = bounds
        _, lo, hi = split_interval(np.array([[a, b, xx, yy]]))
        assert lo[0] == pytest.approx(lp_lo, abs=1e-9) and hi[0] == pytest.approx(lp_hi, abs=1e-9)


def test_the_split_is_the_midpoint_and_the_kept_draws_are_exactly_the_feasible_ones(data):
    x, y = data
    _, lo, hi = split_interval(x)
    np.testing.assert_allclose(y[:, 1], 0.5 * (lo + hi), rtol=1e-15, atol=1e-12)
    assert (hi - lo >= MIN_SPLIT_WIDTH).all()
    # The first block of draws of the documented generator: kept in order, by the documented rule only.
    rng = np.random.default_rng(4)
    lo_box, hi_box = np.array(INPUT_BOX).T
    draws = lo_box + (hi_box - lo_box) * rng.random((100_000, 4))
    m, lo, hi = split_interval(draws)
    kept = draws[(m < 2) & (hi - lo >= MIN_SPLIT_WIDTH)]
    np.testing.assert_array_equal(x[: min(len(kept), len(x))], kept[: len(x)])
    small, _ = pooling_data(50)
    np.testing.assert_array_equal(small, x[:50])  # sizes are prefixes


def test_problem_splits_and_closed_form_derivatives(cache, data):
    p = get_problem("pooling", size="tiny", dtype=torch.float64, cache_dir=cache)
    assert p.x_train.shape == (40, 4) and p.x_val.shape == (10, 4) and p.y_train.shape == (40, 5)
    np.testing.assert_array_equal(p.x_train.numpy(), data[0][:40])
    oc = p.output_constraints()
    generic = OutputConstraints(h=oc.h, g=oc.g)
    gen = torch.Generator().manual_seed(0)
    y = p.y_train + 10 * torch.randn(p.y_train.shape, dtype=torch.float64, generator=gen)
    a, b = oc.evaluate(p.x_train, y), generic.evaluate(p.x_train, y)
    torch.testing.assert_close(a.c_jac, b.c_jac, rtol=1e-14, atol=1e-12)
    w_h, w_g = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64)
    torch.testing.assert_close(
        oc.lagrangian_hessian(p.x_train, y, w_h, w_g), generic.lagrangian_hessian(p.x_train, y, w_h, w_g)
    )
    model = p.make_model(0)
    c = p.constraints(model)
    assert c.shape == (p.num_constraints,) == (16,)  # 4 balances at the first 4 training inputs
    (grad,) = torch.autograd.grad(c.square().sum(), model[0].weight)
    assert grad.abs().sum() > 0


class Exact(nn.Module):
    """The data's own outputs for the data's inputs (a lookup by row), with one parameter."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.dummy = x, y, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        idx = torch.cdist(x, self.x).argmin(dim=1)
        return self.y[idx] + 0 * self.dummy


def test_metrics_of_the_exact_model(cache):
    p = get_problem("pooling", size="tiny", dtype=torch.float64, cache_dir=cache)
    exact = Exact(torch.cat([p.x_train, p.x_val]), torch.cat([p.y_train, p.y_val]))
    m = p.metrics(exact)
    assert m["train_mse"] == 0 and m["val_mse"] == 0
    assert m["val_violation"] < 1e-13 and m["max_abs_c"] < 1e-12 and m["test_max_violation"] < 1e-12


@pytest.mark.parametrize(
    "method",
    ["adam-unc", "soft", "sqp-adam", "hardnet-pp:early_stop=true:max_iter=50", "kkt-hardnet:max_iter=5:eta=75"],
)
def test_methods_run_through_the_runner(method, cache, tmp_path):
    spec = RunSpec("pooling", method, lr=1e-3, batch="mini", iterations=2, size="tiny", dtype="float64", eval_every=1)
    res = run(spec, tmp_path, cache_dir=cache, progress=False)
    assert res["status"] == "complete" and res["curves"]["iteration"] == [0, 1, 2]
    assert np.isfinite(res["final"]["objective"]) and np.isfinite(res["final"]["val_violation"])


def test_kkt_hardnet_projects_near_the_data_like_scipy_but_not_from_zero(cache):
    """Near the data the layer converges to scipy's Euclidean projection; from y = 0 (an untrained network's
    output) the balance h4 = m(Px + Py) - 3A - B has a zero gradient, the degenerate start that the paper's warm
    start (eta) avoids."""
    p = get_problem("pooling", size="tiny", dtype=torch.float64, cache_dir=cache)
    oc = p.output_constraints()
    x = p.x_train[:6]
    y_hat = p.y_train[:6] + torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = KKTHardNet(oc).eval().project(x, y_hat)
    assert bool(res.converged.all()) and res.residual.max() < 1e-9
    for i in range(6):
        a, b, xx, yy = x[i].numpy()
        yi = y_hat[i].numpy()

        # the paper's six constraints written out in numpy: an oracle independent of the module's torch code
        def balances(v, a=a, b=b, xx=xx, yy=yy):
            return np.array([v[1] + v[2] - a - b, xx - v[1] - v[3], yy - v[2] - v[4], v[0] * (v[1] + v[2]) - 3 * a - b])

        def specifications(v, xx=xx, yy=yy):  # >= 0 for SLSQP
            return -np.array([v[0] * v[1] + 2 * v[3] - 2.5 * xx, v[0] * v[2] + 2 * v[4] - 1.5 * yy])

        sol = scipy.optimize.minimize(
            lambda v, yi=yi: 0.5 * np.sum((v - yi) ** 2),
            p.y_train[i].numpy(),
            jac=lambda v, yi=yi: v - yi,
            method="SLSQP",
            constraints=[{"type": "eq", "fun": balances}, {"type": "ineq", "fun": specifications}],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        np.testing.assert_allclose(res.y[i].numpy(), sol.x, rtol=0, atol=1e-6)
    J = oc.evaluate(x, torch.zeros(6, 5, dtype=torch.float64)).h_jac  # [6, 4, 5]
    assert J[:, 3].abs().max() == 0


def test_enforce_is_not_applicable(cache, tmp_path):
    with pytest.raises(ValueError, match="equalities only"):
        run(RunSpec("pooling", "enforce", lr=1e-3, iterations=1, size="tiny"), tmp_path, cache_dir=cache)
