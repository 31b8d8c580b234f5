"""D learned MPC: feasible initial states, the cached reference against the KKT conditions, trust-constr on an
independent (x, u) formulation and random feasible trajectories, the closed-form constraint derivatives against
torch.func, Table I's metrics on exact and on known suboptimal outputs, and the runner's methods."""

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch
from torch import nn

from problems import get_problem
from problems.output_tasks.mpc import HORIZON, X_TARGET, Q, mpc_cost, mpc_data, sample_initial_states
from problems.reference.mpc_solver import kkt_residual
from problems.runner import RunSpec, run
from sqpoptim.layers import OutputConstraints


@pytest.fixture(scope="module")
def mpc(cache):
    return get_problem("mpc", size="tiny", dtype=torch.float64, cache_dir=cache)


def test_initial_states_fill_the_ellipsoid_uniformly():
    x0 = sample_initial_states(2000, 123)
    q = np.einsum("ni,ij,nj->n", x0, Q, x0)
    assert q.max() <= 10.0
    # uniform in a 5-dimensional ellipsoid: the normalised radius r = sqrt(q/10) has CDF r^5
    assert scipy.stats.kstest(np.sqrt(q / 10), lambda r: r**5).pvalue > 1e-3
    np.testing.assert_array_equal(sample_initial_states(50, 123), x0[:50])  # prefixes, deterministic


def test_splits_and_feasibility(mpc):
    assert mpc.x0_train.shape == (8, 5) and mpc.x0_val.shape == (4, 5) and mpc.x0_test.shape == (4, 5)
    for x0 in (mpc.x0_train, mpc.x0_val, mpc.x0_test):
        assert (torch.einsum("ni,ij,nj->n", x0, torch.as_tensor(Q), x0) <= 10).all()
    torch.testing.assert_close(mpc.x0_test, torch.as_tensor(sample_initial_states(4, 52)), rtol=0, atol=0)


def test_reference_is_feasible_and_satisfies_the_kkt_conditions(mpc):
    data, oc = mpc_data(), mpc.output_constraints()
    for split in ("val", "test"):
        assert mpc.reference_kkt[split].max() < 1e-10  # stationarity, primal, complementarity as solved
        x0, y = getattr(mpc, f"x0_{split}"), getattr(mpc, f"y_{split}")
        assert oc.h(x0, y).abs().max() < 1e-12  # the trajectory obeys the dynamics
        assert oc.violation(x0, y).max() < 1e-12  # and the bounds
        torch.testing.assert_close(mpc_cost(y), getattr(mpc, f"z_{split}"), rtol=1e-14, atol=0)
        u = y.reshape(-1, HORIZON, 9)[..., :4].reshape(y.shape[0], -1).numpy()
        for xi, ui in zip(x0.numpy(), u):  # recomputed from the stored trajectory
            r = kkt_residual(data, xi, ui)
            assert max(r["stationarity"], r["primal"], r["complementarity"]) < 1e-10
            assert r["active_quadratic"] > 0  # the target is outside the ellipsoid: the state constraint binds


def _full_space(mpc, i):
    """The QCQP in all 90 variables (u, x) built from the problem's own torch constraints (no prediction
    matrices): ``(cost, jac, bounds, D, h0, quad, quad_jac, start)``."""
    oc, x0 = mpc.output_constraints(), mpc.x0_test[i : i + 1]
    jacobian = torch.autograd.functional.jacobian
    y0 = torch.zeros(90, dtype=torch.float64)
    D = jacobian(lambda y: oc.h(x0, y[None])[0], y0).numpy()  # the dynamics are affine: h(y) = D y + h(0)
    h0 = oc.h(x0, y0[None])[0].numpy()
    quad = lambda v: oc.g(x0, torch.from_numpy(v)[None])[0, 40:].numpy()  # noqa: E731
    quad_jac = lambda v: jacobian(lambda y: oc.g(x0, y[None])[0, 40:], torch.from_numpy(v)).numpy()  # noqa: E731
    target = np.tile(np.r_[np.zeros(4), X_TARGET], HORIZON)  # Z = ||y - target||^2 in the (u, x) layout
    assert float(mpc_cost(torch.from_numpy(target)[None])) == 0
    lb = np.tile(np.r_[-np.ones(4), -np.inf * np.ones(5)], HORIZON)
    start = np.tile(np.r_[np.zeros(4), x0[0].numpy()], HORIZON)  # u = 0: feasible
    cost = lambda v: np.sum((v - target) ** 2)  # noqa: E731
    return cost, lambda v: 2 * (v - target), (lb, -lb), D, h0, quad, quad_jac, start


def _check_full_space(mpc, i, x, feasibility_tol):
    _, _, _, D, h0, quad, _, _ = _full_space(mpc, i)
    assert np.abs(D @ x + h0).max() < feasibility_tol and quad(x).max() < 10 + feasibility_tol
    assert float(mpc_cost(torch.from_numpy(x)[None])) == pytest.approx(float(mpc.z_test[i]), rel=1e-7)
    np.testing.assert_allclose(x, mpc.y_test[i].numpy(), atol=1e-4)


def test_reference_agrees_with_slsqp_in_the_full_space(mpc):
    for i in range(2):
        cost, jac, (lb, ub), D, h0, quad, quad_jac, start = _full_space(mpc, i)
        res = scipy.optimize.minimize(
            cost,
            start,
            jac=jac,
            method="SLSQP",
            bounds=list(zip(lb, ub)),
            constraints=[
                {"type": "eq", "fun": lambda v, D=D, h0=h0: D @ v + h0, "jac": lambda v, D=D: D},
                {"type": "ineq", "fun": lambda v, q=quad: 10 - q(v), "jac": lambda v, qj=quad_jac: -qj(v)},
            ],
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        # SLSQP stops with constraint residuals of ~1e-7 (its own accuracy, not the reference's)
        _check_full_space(mpc, i, res.x, feasibility_tol=1e-6)


@pytest.mark.slow
def test_reference_agrees_with_trust_constr_in_the_full_space(mpc):
    cost, jac, (lb, ub), D, h0, quad, quad_jac, start = _full_space(mpc, 0)
    res = scipy.optimize.minimize(
        cost,
        start,
        jac=jac,
        hess=lambda v: 2 * np.eye(v.size),
        method="trust-constr",
        bounds=scipy.optimize.Bounds(lb, ub),
        constraints=[
            scipy.optimize.LinearConstraint(D, -h0, -h0),
            scipy.optimize.NonlinearConstraint(quad, -np.inf, 10.0, jac=quad_jac),
        ],
        options={"gtol": 1e-10, "xtol": 1e-12, "maxiter": 3000},
    )
    _check_full_space(mpc, 0, res.x, feasibility_tol=1e-8)


def test_reference_beats_random_feasible_trajectories(mpc):
    data = mpc_data()
    rng = np.random.default_rng(0)
    for x0, z_star in zip(mpc.x0_test.numpy(), mpc.z_test.numpy()):
        for _ in range(100):
            u = rng.uniform(-1, 1, size=40)
            lo, hi = 0.0, 1.0  # the feasible set is convex and contains u = 0: bisect the scale
            if data.quad(x0, u).max() > 10:
                for _ in range(50):
                    mid = 0.5 * (lo + hi)
                    lo, hi = (mid, hi) if data.quad(x0, mid * u).max() <= 10 else (lo, mid)
                u = lo * u
            assert data.quad(x0, u).max() <= 10 and np.abs(u).max() <= 1
            assert data.cost(x0, u) >= z_star


def test_closed_form_constraint_derivatives_match_torch_func(mpc):
    oc = mpc.output_constraints()
    generic = OutputConstraints(h=oc.h, g=oc.g, lower=oc.lower, upper=oc.upper)
    gen = torch.Generator().manual_seed(0)
    y = mpc.y_val + torch.randn(mpc.y_val.shape, dtype=torch.float64, generator=gen)
    a, b = oc.evaluate(mpc.x0_val, y), generic.evaluate(mpc.x0_val, y)
    torch.testing.assert_close(a.c_jac, b.c_jac, rtol=1e-14, atol=1e-14)
    w_h, w_g = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    torch.testing.assert_close(
        oc.lagrangian_hessian(mpc.x0_val, y, w_h, w_g), generic.lagrangian_hessian(mpc.x0_val, y, w_h, w_g)
    )


class Lookup(nn.Module):
    """Returns ``table[row of x0]`` for the known states (exact match), with one parameter."""

    def __init__(self, x0, y):
        super().__init__()
        self.x0, self.y, self.dummy = x0, y, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.y[torch.cdist(x, self.x0).argmin(dim=1)] + 0 * self.dummy


def test_table_metrics_of_exact_and_of_idle_trajectories(mpc):
    x0 = torch.cat([mpc.x0_train, mpc.x0_val, mpc.x0_test])
    exact = torch.cat([torch.zeros(8, 90, dtype=torch.float64), mpc.y_val, mpc.y_test])
    m = mpc.metrics(Lookup(x0, exact))
    assert m["test_subopt_max"] < 1e-14 and m["test_mse"] == 0 and m["test_max_violation"] < 1e-12
    # u = 0, x_k = x_0: feasible, cost sum_k ||x_0 - target||^2, so S = (N ||x_0 - target||^2 - Z*)/Z*
    idle = torch.cat(
        [torch.zeros(x0.shape[0], HORIZON, 4, dtype=torch.float64), x0[:, None].expand(-1, HORIZON, 5)], -1
    )
    m = mpc.metrics(Lookup(x0, idle.reshape(-1, 90)))
    z_idle = HORIZON * (mpc.x0_test - torch.as_tensor(X_TARGET)).square().sum(-1)
    s = (z_idle - mpc.z_test) / mpc.z_test
    assert m["test_subopt_mean"] == pytest.approx(float(s.mean()), rel=1e-12)
    assert m["test_subopt_max"] == pytest.approx(float(s.max()), rel=1e-12)
    assert m["test_dyn_viol_max"] == 0 and m["test_box_viol_max"] == 0 and m["test_quad_viol_max"] == 0
    # and a box violation of 0.5 on one control of every test output, measured as ReLU(|u| - 1)
    bad = idle.clone()
    bad[:, 3, 2] = -1.5
    m = mpc.metrics(Lookup(x0, bad.reshape(-1, 90)))
    assert m["test_box_viol_max"] == 0.5 and m["test_box_viol_mean"] == pytest.approx(0.5 / 40)


def test_constraints_shape_and_graph(mpc):
    model = mpc.make_model(0)
    c = mpc.constraints(model)
    assert c.shape == (mpc.num_constraints,) == (100,)
    torch.testing.assert_close(c, mpc.output_constraints().h(mpc.x0_train[:2], model(mpc.x0_train[:2])).reshape(-1))
    (g,) = torch.autograd.grad(c.square().sum(), model[0].weight)
    assert g.abs().sum() > 0


@pytest.mark.parametrize(
    "method",
    ["adam-unc", "soft", "sqp-adam", "hardnet-pp:max_iter=20", "kkt-hardnet:max_iter=3:gradient=implicit"],
)
def test_methods_run_through_the_runner(method, mpc, tmp_path):
    spec = RunSpec("mpc", method, lr=1e-3, batch="mini", iterations=2, size="tiny", dtype="float64", eval_every=1)
    res = run(spec, tmp_path, cache_dir=mpc.cache_dir, progress=False)
    assert res["status"] == "complete" and res["curves"]["iteration"] == [0, 1, 2]
    f = res["final"]
    keys = {f"test_{k}_{s}" for k in ("subopt", "dyn_viol", "box_viol", "quad_viol") for s in ("mean", "max")}
    assert keys <= set(f) and all(np.isfinite(f[k]) for k in keys)


def _far_raw_output(mpc):
    """An untrained backbone's raw output: every state near 0, i.e. ~10 from the dynamics through x₀."""
    x = mpc.x0_train
    return x, 0.3 * torch.randn(x.shape[0], HORIZON * 9, generator=torch.Generator().manual_seed(0), dtype=x.dtype)


def test_hardnet_pp_without_free_steps_is_continuous_and_its_unrolled_gradient_is_exact(mpc):
    # The layer as the MPC table trains it. Oracles: the output moves by O(|dŷ|) under a perturbation of ŷ
    # (the free steps' best-point pick lets it jump by O(1)), and central differences of Σ Z(layer(ŷ)).
    from sqpoptim.layers import HardNetPP

    layer = HardNetPP(mpc.output_constraints(), free_steps=0, tol=1e-11, gradient="unrolled")
    x, y_hat = _far_raw_output(mpc)
    gen = torch.Generator().manual_seed(1)
    dirs = [(d := torch.randn(y_hat.shape, generator=gen, dtype=y_hat.dtype)) / d.norm() for _ in range(3)]
    h = 1e-6
    with torch.no_grad():
        for d in dirs:
            moved = (layer(x, y_hat + h * d) - layer(x, y_hat - h * d)).norm(dim=-1)
            assert moved.max() <= 10 * 2 * h
    v = y_hat.clone().requires_grad_(True)
    mpc_cost(layer(x, v)).sum().backward()
    f = lambda y: float(mpc_cost(layer(x, y)).sum())  # noqa: E731
    h = 1e-4
    for d in [*dirs, v.grad / v.grad.norm()]:
        fd = (f(y_hat + h * d) - f(y_hat - h * d)) / (2 * h)
        assert abs(float((v.grad * d).sum()) - fd) <= 1e-4 * (1 + abs(fd))


def test_hardnet_pp_free_steps_is_validated(mpc):
    from sqpoptim.layers import HardNetPP

    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="free_steps"):
            HardNetPP(mpc.output_constraints(), free_steps=bad)
