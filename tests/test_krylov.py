"""The constraint solvers: the dense solver against the reference functions of ``_linalg``, the matrix-free
(MINRES) solver against the dense one and the KKT oracle, the inexact-SQP termination tests, warm starts, and
the matrix-free path inside the optimizers (float64)."""

import io
import itertools
import math

import pytest
import torch
from torch import nn

import sqpoptim
from sqpoptim._dense_solver import DenseSolver
from sqpoptim._jacobian_operator import AutogradJacobian, DenseJacobian
from sqpoptim._krylov import KrylovOptions, inexact_step, minres
from sqpoptim._krylov_solver import KrylovSolver
from sqpoptim._linalg import factor_gram, gram, kkt_reference, project, scaled_normal_step
from sqpoptim._solver_choice import choose, make_solver

from .helpers import f64

GEN = torch.Generator().manual_seed(1)
EXACT = KrylovOptions(rtol=1e-13, max_iter=400)


def _problem(m=12, n=80, decay=1e-2):
    J = torch.randn(m, n, dtype=f64, generator=GEN) * torch.logspace(0, math.log10(decay), m, dtype=f64)[:, None]
    x = torch.randn(n, dtype=f64, generator=GEN)
    c = torch.randn(m, dtype=f64, generator=GEN)
    return J, x, c


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_dense_solver_on_an_operator_is_the_reference():
    J, x, c = _problem()
    S = DenseSolver(DenseJacobian(J), rank_tol=1e-7, sync_free=False)
    F = factor_gram(gram(J), 1e-7)
    torch.testing.assert_close(S.project(x), project(J, x, F), rtol=0, atol=0)
    nu = torch.tensor(0.05, dtype=f64)
    gamma = torch.where(torch.arange(J.shape[1]) < 30, 1.0, 0.3).to(f64)
    ref = scaled_normal_step(J, c, F, gamma, rank_tol=1e-7, damping=nu)
    for a, b in zip(S.scaled_normal_step(c, gamma, nu), ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    s, info = S.step(x, c, 0.7)
    s_ref, _ = kkt_reference(J, x, 0.7 * c)
    assert _rel(s, s_ref) < 1e-12 and info["rank"] == J.shape[0]


def test_minres_solves_spd_systems_and_reports_the_residual():
    J, _, _ = _problem(m=15, n=40, decay=1e-3)
    op = DenseJacobian(J)
    b = torch.randn(15, dtype=f64, generator=GEN)
    G = J @ J.T
    for inv_diag in (None, 1.0 / torch.diagonal(G)):
        res = minres(op, b, None, weight=None, inv_diag=inv_diag, stop=lambda lam, z, r: False, max_iter=200)
        torch.testing.assert_close(res.lam, torch.linalg.solve(G, b), rtol=1e-7, atol=0)
        torch.testing.assert_close(res.r, b - G @ res.lam, rtol=0, atol=1e-9 * float(b.norm()))
        torch.testing.assert_close(res.z, J.T @ res.lam, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_matrix_free_step_equals_the_dense_step_when_solved_to_tolerance(weighted):
    J, x, c = _problem(decay=1e-3)
    op = DenseJacobian(J)
    W = torch.rand(J.shape[1], dtype=f64, generator=GEN) + 0.2 if weighted else None
    dense = DenseSolver(op, rank_tol=1e-7, sync_free=False)
    krylov = KrylovSolver(op, EXACT, {})
    if weighted:
        dense, krylov = dense.weighted(W), krylov.weighted(W)
    s_dense, _ = dense.step(x, c, 0.5)
    s_krylov, _ = krylov.step(x, c, 0.5)
    assert _rel(s_krylov, s_dense) < 1e-6
    torch.testing.assert_close(J @ s_krylov, -0.5 * c, rtol=0, atol=1e-9)  # J v = -γc with J u = 0
    h = None if W is None else 1.0 / W
    s_kkt, lam = kkt_reference(J, x if h is None else h * x, 0.5 * c, h)
    assert _rel(s_krylov, s_kkt) < 1e-6
    # the multipliers of the step solve are the KKT multipliers
    assert _rel(krylov.updates["multipliers"]["step"], lam) < 1e-6
    gbar, mult = krylov.project(x, multipliers=True)
    gbar_d, mult_d = dense.project(x, multipliers=True)
    assert _rel(gbar, gbar_d) < 1e-6 and _rel(mult, mult_d) < 1e-6
    torch.testing.assert_close(J @ gbar, torch.zeros_like(c), rtol=0, atol=1e-9)


def test_matrix_free_damped_and_per_group_normal_steps_equal_the_dense_ones():
    J, x, c = _problem()
    op = DenseJacobian(J)
    nu = torch.tensor(0.1, dtype=f64)
    gamma = torch.where(torch.arange(J.shape[1]) < 40, 1.0, 0.25).to(f64)
    for g, damping in ((gamma, None), (1.0, nu), (gamma, nu)):
        s_dense, info_d = DenseSolver(op, rank_tol=1e-7, sync_free=False).step(x, c, g, damping)
        s_krylov, info_k = KrylovSolver(op, EXACT, {}).step(x, c, g, damping)
        assert _rel(s_krylov, s_dense) < 1e-6
        for key in ("v_norm", "u_norm"):
            assert abs(float(info_k[key]) - float(info_d[key])) < 1e-6 * float(info_d[key])


def test_ill_conditioned_and_rank_deficient_jacobians():
    # condition number of G about 1e10
    J, x, c = _problem(m=10, n=60, decay=1e-5)
    s_dense, _ = DenseSolver(DenseJacobian(J), rank_tol=1e-7, sync_free=False).step(x, c, 1.0)
    s_krylov, _ = KrylovSolver(DenseJacobian(J), KrylovOptions(rtol=1e-14, max_iter=2000), {}).step(x, c, 1.0)
    assert _rel(s_krylov, s_dense) < 1e-6
    # duplicate constraint points (identical rows, consistent c): the least-norm step of the independent rows
    J2 = torch.cat([J[:6], J[:3]])
    c2 = torch.cat([c[:6], c[:3]])
    s_dense, info = DenseSolver(DenseJacobian(J2), rank_tol=1e-7, sync_free=False).step(x, c2, 1.0)
    assert int(info["rank"]) == 6
    s_ref, _ = kkt_reference(J[:6], x, c[:6])
    s_krylov, _ = KrylovSolver(DenseJacobian(J2), EXACT, {}).step(x, c2, 1.0)
    assert _rel(s_dense, s_ref) < 1e-9 and _rel(s_krylov, s_ref) < 1e-6
    torch.testing.assert_close(J2 @ s_krylov, -c2, rtol=0, atol=1e-9)


def _graded_problem():
    """J = U diag(1 … 1e-4) Vᵀ (12 × 40, cond(JJᵀ) = 1e16) and a c for which MINRES on JJᵀ + μI, μ = 1e-3,
    capped at 3 iterations, leaves ‖c + Jv‖ = 1.063‖c‖ (the scaling benchmark's m = 10,000 cell did the same at
    its 5th try of a step)."""
    g = torch.Generator().manual_seed(24)
    U, _ = torch.linalg.qr(torch.randn(12, 12, dtype=f64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(40, 12, dtype=f64, generator=g))
    J = U @ torch.diag(torch.logspace(0, -4, 12, dtype=f64)) @ V.T
    return J, torch.randn(12, dtype=f64, generator=g)


def _damped_model(J, c, mu, v):
    return 0.5 * float((c + J @ v).norm()) ** 2 + 0.5 * mu * float(v @ v)


def test_a_truncated_damped_normal_step_falls_back_to_the_cauchy_point_where_it_raises_the_model():
    J, c = _graded_problem()
    op = DenseJacobian(J)
    mean = float((J**2).sum(1).mean())
    mu = 1e-3
    nu = torch.tensor(mu / mean, dtype=f64)
    raw = minres(op, -c, None, weight=None, shift=mu, inv_diag=None, stop=lambda lam, z, r: False, max_iter=3)
    assert float((c + J @ raw.z).norm()) > 1.05 * float(c.norm())  # the truncated shifted solve: growth
    solver = KrylovSolver(op, KrylovOptions(max_iter=3), {})
    v = solver.normal_step(c, nu)
    # dense oracle: the Cauchy point of q(v) = ½|c + Jv|² + ½μ|v|² along -Jᵀc
    d = -J.T @ c
    t = float(d @ d) / (float((J @ d).norm()) ** 2 + mu * float(d @ d))
    torch.testing.assert_close(v, t * d, rtol=1e-10, atol=0)
    assert solver.stats["krylov_cauchy"] and not solver.stats["krylov_converged"]
    assert float((c + J @ v).norm()) < float(c.norm())
    # an iterate that does reduce the model is kept: solved to tolerance it is the exact damped step
    exact = KrylovSolver(op, EXACT, {})
    v_exact = exact.normal_step(c, nu)
    v_ref = -J.T @ torch.linalg.solve(J @ J.T + mu * torch.eye(12, dtype=f64), c)
    assert _rel(v_exact, v_ref) < 1e-8 and not exact.stats["krylov_cauchy"]
    # every capped step reaches a tenth of the Cauchy decrease, from zero and warm-started from the truncated
    # solve's multipliers (a retaken step from the same point: the Cauchy point by one more product pair)
    assert float((-c - (J @ J.T + mu * torch.eye(12, dtype=f64)) @ raw.lam).norm()) < float(c.norm())
    for iters in (1, 2, 3, 4, 6, 10):
        for state in ({}, {"multipliers": {"normal": raw.lam}}):
            w = KrylovSolver(op, KrylovOptions(max_iter=iters), state).normal_step(c, nu)
            q0, qc = _damped_model(J, c, mu, 0 * w), _damped_model(J, c, mu, t * d)
            assert q0 - _damped_model(J, c, mu, w) >= 0.1 * (q0 - qc) * (1 - 1e-9)


def _linear_closure(x, J, c0):
    return lambda: ((x**2).sum(), J @ x + c0, J)


def test_the_matrix_free_damped_step_never_raises_a_linear_violation():
    """Linear constraints Jx = y from x = 0 with ν0 = μ/mean(diag JJᵀ) and MINRES capped at 3 iterations: the
    violation after each step is the model's, so a step whose truncated solve raised ‖c + Jv‖ would raise ‖c‖
    (before the Cauchy safeguard the first step raised ‖c‖ by 6 % and was taken unjudged). Every step must be
    accepted and lower ‖c‖."""
    J, c0 = _graded_problem()
    mean = float((J**2).sum(1).mean())
    for solver in ("krylov", "dense"):
        x = torch.zeros(40, dtype=f64, requires_grad=True)
        opt = sqpoptim.ProjectedAdamSQP(
            [x], lr=1e-9, solver=solver, normal_damping=1e-3 / mean, krylov=dict(max_iter=3)
        )
        closure = _linear_closure(x, J, c0)
        norms = []
        for _ in range(6):
            _, c = opt.step(closure)
            norms.append(float(c.norm()))
            assert not opt.diagnostics()["rejected"]
        assert all(b < a for a, b in itertools.pairwise(norms)), (solver, norms)


def test_default_rule_gives_a_descent_step_for_the_merit_function():
    J, x, c = _problem(m=20, n=100, decay=1e-3)
    op = DenseJacobian(J)
    opts = KrylovOptions(max_iter=100)  # the Byrd-Curtis-Nocedal tests, with room to meet them
    penalty = opts.penalty0
    for scale in (1.0, 1e-3, 0.0):  # far from, near and on the constraints
        cs = scale * c
        s, res, info = inexact_step(op, 0.1 * x, cs, 1.0, None, penalty, opts)
        r = cs + J @ s
        cn, rn = float(cs.norm()), float(r.norm())
        assert info["krylov_test"] in (1.0, 2.0)
        assert math.isclose(rn, float(res.r.norm()), rel_tol=1e-6, abs_tol=1e-12)
        pi = info["penalty"]
        # mred_π(s) >= ½|s|² + σπ|c| and so the merit function's directional derivative is negative
        sigma = opts.tau * (1 - opts.epsilon)
        mred = -float(torch.dot(0.1 * x, s)) + pi * (cn - rn)
        assert mred >= 0.5 * float(s @ s) + sigma * pi * max(cn, rn - cn) - 1e-12
        if info["krylov_test"] == 2.0:
            assert rn <= opts.epsilon * cn
        penalty = pi


def test_warm_start_from_the_last_multipliers():
    J, x, c = _problem()
    state = {}
    first = KrylovSolver(DenseJacobian(J), EXACT, state)
    s1, _ = first.step(x, c, 1.0)
    first.commit()
    assert set(state) == {"multipliers", "penalty"}
    again = KrylovSolver(DenseJacobian(J), EXACT, state)
    s2, _ = again.step(x, c, 1.0)
    # the stored multipliers solve the same system (to rtol): at most one polishing iteration instead of a solve
    assert again.stats["krylov_iterations"] <= 1 and first.stats["krylov_iterations"] >= 10
    assert _rel(s2, s1) < 1e-10
    # multipliers of another size are not used
    J3, x3, c3 = _problem(m=5)
    third = KrylovSolver(DenseJacobian(J3), EXACT, state)
    third.step(x3, c3, 1.0)
    assert third.stats["krylov_iterations"] > 0


def test_auto_choice_and_options_validation():
    small = DenseJacobian(torch.randn(10, 1000, dtype=f64))
    assert choose(small, "auto", KrylovOptions()) == "dense"
    assert choose(small, "krylov", KrylovOptions()) == "krylov"
    big = DenseJacobian(torch.randn(2000, 3000))  # explicit Gram 2 m² n >> capped matrix-free steps (m > 512)
    assert choose(big, "auto", KrylovOptions()) == "krylov"
    S = make_solver(small, "auto", rank_tol=1e-7, sync_free=False, options=KrylovOptions(), state={})
    assert S.kind == "dense"
    for bad in (dict(max_iter=0), dict(kappa=1.5), dict(rtol=2.0), dict(penalty0=-1.0)):
        with pytest.raises(ValueError, match="Invalid krylov"):
            KrylovOptions(**bad)
    model = nn.Linear(3, 1).to(f64)
    with pytest.raises(ValueError, match="Invalid solver"):
        sqpoptim.ProjectedAdamSQP(model.parameters(), solver="qr")
    with pytest.raises(ValueError, match="Invalid krylov options"):
        sqpoptim.ProjectedAdamSQP(model.parameters(), krylov=dict(maxiter=3))


def test_autograd_operator_products_and_row_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(f64)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    x = torch.rand(4, 2, dtype=f64, generator=GEN).requires_grad_(True)
    u = model(x)
    c = torch.autograd.grad(u.sum(), x, create_graph=True)[0][:, 0] * torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=f64)
    op = AutogradJacobian(c, params, n)
    J = op.dense()
    v = torch.randn(n, dtype=f64, generator=GEN)
    y = torch.randn(4, dtype=f64, generator=GEN)
    torch.testing.assert_close(op.mv(v), J @ v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.rmv(y), J.T @ y, rtol=1e-12, atol=1e-14)
    check = op.row_check()
    assert check[2] == 0 and (check[[0, 1, 3]] > 0).all()


# ------------------------------------------------------------------------------------------ in the optimizer

PTS = torch.rand(9, 2, dtype=f64, generator=torch.Generator().manual_seed(4))
XS = torch.rand(32, 2, dtype=f64, generator=torch.Generator().manual_seed(6))


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).to(f64)


def _closure(model):
    return lambda: (((model(XS) - XS[:, :1]) ** 2).mean(), model(PTS).squeeze(1) - 0.3 * PTS[:, 1])


@pytest.mark.parametrize("make", [sqpoptim.ProjectedAdamSQP, sqpoptim.ProjectedHeavyBallSQP, sqpoptim.StochasticSQP])
def test_optimizers_on_the_matrix_free_path_follow_the_dense_one(make):
    runs = {}
    for solver in ("dense", "krylov"):
        model = _model()
        opt = make(model.parameters(), lr=1e-2, solver=solver, krylov=dict(rtol=1e-10, max_iter=400))
        for _ in range(3):
            opt.step(_closure(model))
        runs[solver] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.diagnostics())
    assert runs["krylov"][1]["solver"] == "krylov" and runs["krylov"][1]["krylov_converged"]
    assert _rel(runs["krylov"][0], runs["dense"][0]) < 1e-6


def test_state_dict_round_trip_keeps_the_warm_starts():
    opts = dict(solver="krylov", krylov=dict(max_iter=20), normal_damping=None)  # the fused (one-solve) step
    model = _model()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, **opts)
    for _ in range(2):
        opt.step(_closure(model))
    sd = opt.state_dict()
    assert set(sd["state"]["global"]["krylov"]["multipliers"]) == {"gradient", "step"}
    twin = _model()
    twin.load_state_dict(model.state_dict())
    opt2 = sqpoptim.ProjectedAdamSQP(twin.parameters(), lr=1e-2, **opts)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(2):
        opt.step(_closure(model))
        opt2.step(_closure(twin))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert opt.diagnostics()["krylov_iterations"] == opt2.diagnostics()["krylov_iterations"]


def test_bad_input_on_the_matrix_free_path_leaves_everything_unchanged():
    model = _model()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, solver="krylov")
    opt.step(_closure(model))
    before = [p.detach().clone() for p in model.parameters()]
    sd = opt.state_dict()
    state_before = [t.clone() for t in sd["state"]["global"]["krylov"]["multipliers"].values()]

    def poisoned():
        loss, c = _closure(model)()
        return loss, c * torch.tensor([1.0] * 8 + [float("nan")], dtype=f64)

    with pytest.raises(FloatingPointError, match="constraint values c"):
        opt.step(poisoned)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = opt.state_dict()["state"]["global"]["krylov"]["multipliers"].values()
    assert all(torch.equal(a, b) for a, b in zip(state_before, after))


def _one_step(m, width, solver, **kw):
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.rand(128, 8, generator=gen, dtype=f64), torch.rand(128, 1, generator=gen, dtype=f64)
    Xc, Yc = torch.rand(m, 8, generator=gen, dtype=f64), torch.rand(m, generator=gen, dtype=f64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
    model = model.to(f64)
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-3, solver=solver, **kw)
    opt.step(lambda: (((model(X) - Y) ** 2).mean(), model(Xc).squeeze(1) - Yc))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - x0, opt.diagnostics()


@pytest.mark.parametrize("m, width, rtol", [(30, 24, 1e-10), pytest.param(100, 64, 1e-8, marks=pytest.mark.slow)])
def test_matrix_free_step_of_a_network_equals_the_dense_step(m, width, rtol):
    # pointwise output constraints of a tanh MLP through the layer factors; cond(JJᵀ) about 8e4 (m = 30) and 4e6
    # (m = 100), where MINRES's float64 recurrences stall near 1e-9 relative
    s_dense, d = _one_step(m, width, "dense")
    s_krylov, k = _one_step(m, width, "krylov", krylov=dict(rtol=rtol, max_iter=5000))
    assert d["jacobian"] == k["jacobian"] == "layers" and k["solver"] == "krylov" and k["krylov_converged"]
    assert _rel(s_krylov, s_dense) < 1e-6


def test_the_autograd_operators_damping_scale_is_hutchinsons_estimate_of_the_mean_row_norm():
    """The matrix-free damped normal step needs mean_i (JWJᵀ)_ii; through autograd alone it is estimated from
    four Rademacher products: deterministic, and close to the exact value on many rows of different sizes."""
    from sqpoptim._jacobian_operator import AutogradJacobian

    torch.manual_seed(1)
    W = torch.randn(50, 300, dtype=torch.float64, requires_grad=True)
    c = (W**2).sum(1) * torch.linspace(0.1, 3.0, 50, dtype=torch.float64)
    op = AutogradJacobian(c, [W], W.numel())
    J = op.dense()
    w = torch.rand(W.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for weight in (None, w):
        exact = ((J**2) * (1.0 if weight is None else weight)).sum(1).mean()
        estimate = op.mean_row_sq_norm(weight)
        assert torch.equal(estimate, op.mean_row_sq_norm(weight))
        assert abs(estimate / exact - 1) < 0.15


@pytest.mark.parametrize("name", ["sqp", "sqp-hb", "sqp-adam"])
def test_the_default_damped_step_runs_matrix_free_through_autograd(name):
    """A plain parameter vector gets the autograd operator (no layers to factor); with the default damping the
    matrix-free normal step uses the estimated scale and drives linear constraints down."""
    make = {
        "sqp": sqpoptim.StochasticSQP,
        "sqp-hb": sqpoptim.ProjectedHeavyBallSQP,
        "sqp-adam": sqpoptim.ProjectedAdamSQP,
    }
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    opt = make[name]([x], lr=0.05, solver="krylov")
    for _ in range(30):
        opt.step(lambda: (((x - 1) ** 2).sum(), A @ x - 1))
    diag = opt.diagnostics()
    assert diag["jacobian"] == "autograd" and diag["solver"] == "krylov"
    # from max|c| = 1: the inexact solves (termination tests, not rtol) leave 1e-6 to 1e-3 along the way
    assert (A @ x.detach() - 1).abs().max().item() < 1e-2
