"""Inequality constraints in the three SQP optimizers: the closure contract, the reduction to the equality path,
convergence to certified QP solutions, state_dict round trips, float32, sync-free mode, refusals and the
elastic step (float64 unless stated)."""

import copy
import io

import numpy as np
import pytest
import torch

import sqpoptim

from .helpers import TinyPINN, burgers_residual, burgers_residual_pointwise, f64
from .optimizers import factories
from .qp_oracles import qp_reference

FACTORIES = {
    "sqp": lambda p, **kw: sqpoptim.StochasticSQP(p, lr=0.5, **kw),
    "sqp-adaptive": lambda p, **kw: sqpoptim.StochasticSQP(p, lr=1.0, step_rule="adaptive", lipschitz=(2.0, 1.0), **kw),
    "sqp-hb": lambda p, **kw: sqpoptim.ProjectedHeavyBallSQP(p, lr=0.3, momentum=0.5, **kw),
    "sqp-adam": lambda p, **kw: sqpoptim.ProjectedAdamSQP(p, lr=0.1, **kw),
    "sqp-adam-scaled": lambda p, **kw: sqpoptim.ProjectedAdamSQP(p, lr=0.1, projection="scaled", **kw),
}
SMALL_LR = factories("sqp", "sqp-hb", "sqp-adam", "sqp-adam-scaled", lr=1e-2)  # for the network: steps that keep
# the inequalities below far from their bound
FIXED = ["sqp", "sqp-hb", "sqp-adam", "sqp-adam-scaled"]


def projection_problem(seed, n=12, m_eq=2, m_in=8):
    """min ½‖x − a‖²_D s.t. C_E x = d_E, C_I x <= d_I, with a known feasible point and several active bounds;
    the solution, certified, from the scipy/dense-KKT oracle."""
    gen = torch.Generator().manual_seed(seed)
    C = torch.randn(m_eq + m_in, n, generator=gen, dtype=f64)
    x_feas = torch.randn(n, generator=gen, dtype=f64)
    slack = torch.rand(m_eq + m_in, generator=gen, dtype=f64) * (torch.rand(m_eq + m_in, generator=gen) > 0.5)
    slack[:m_eq] = 0
    d = C @ x_feas + slack
    a = 3 * torch.randn(n, generator=gen, dtype=f64)
    D = torch.rand(n, generator=gen, dtype=f64) + 0.5
    x_star, _ = qp_reference(C.numpy(), -d.numpy(), a.numpy(), m_eq, h=D.numpy(), start=x_feas.numpy())
    return C, d, a, D, torch.tensor(x_star), m_eq


def closure_of(x, C, d, a, D, m_eq):
    def closure():
        r = C @ x - d
        return 0.5 * (D * (x - a) ** 2).sum(), sqpoptim.Constraints(eq=r[:m_eq], ineq=r[m_eq:])

    return closure


@pytest.mark.parametrize("name", list(FACTORIES))
def test_converges_to_the_certified_solution_of_a_linearly_constrained_qp(name):
    C, d, a, D, x_star, m_eq = projection_problem(seed=list(FACTORIES).index(name))
    x = torch.zeros(12, dtype=f64, requires_grad=True)
    opt = FACTORIES[name]([x])
    closure = closure_of(x, C, d, a, D, m_eq)
    worst = []
    for k in range(1000):  # measured: 20 (SQP) to 410 (Adam) steps to 1e-9
        opt.step(closure)
        if k >= 1:  # after the first step every iterate satisfies the (linear) constraints
            r = (C @ x.detach() - d).numpy()
            worst.append(max(np.abs(r[:m_eq]).max(), r[m_eq:].max()))
        if (x.detach() - x_star).abs().max() < 1e-9:
            break
    assert (x.detach() - x_star).abs().max() < 1e-9
    if name != "sqp-adaptive":  # the adaptive rule's α_k < 1 scales the normal step too: violation ~ Π(1 - α_j)
        assert max(worst) < 1e-10
    assert worst[-1] < 1e-9
    diag = opt.diagnostics()
    assert diag["qp_converged"] and not diag["elastic"]
    assert diag["ineq_violation"] < 1e-12 and diag["active_inequalities"] >= 1


@pytest.mark.parametrize("name", FIXED)
def test_inactive_inequalities_reproduce_the_equality_path(name):
    """Inequalities far from their bounds change nothing: the same iterates as the closure (loss, c), to 1e-12,
    with the paper's undamped normal step (the step with inequalities is undamped under the default, the
    equality path damped: see test_default_damping_leaves_the_inequality_step_undamped)."""
    model_a, model_b = TinyPINN(seed=1), TinyPINN(seed=1)
    X = torch.rand(32, 2, dtype=f64, generator=torch.Generator().manual_seed(3))
    Y = torch.sin(2 * X[:, :1])
    pts = torch.tensor([[0.2, 0.3], [0.6, 0.4], [0.8, 0.9]], dtype=f64)
    grid = torch.rand(20, 2, dtype=f64, generator=torch.Generator().manual_seed(4))
    opt_a = SMALL_LR[name](model_a.parameters(), normal_damping=None)
    opt_b = SMALL_LR[name](model_b.parameters())
    for _ in range(6):
        opt_a.step(lambda: (((model_a(X) - Y) ** 2).mean(), burgers_residual(model_a, pts)))
        _loss, cons = opt_b.step(
            lambda: (
                ((model_b(X) - Y) ** 2).mean(),
                sqpoptim.Constraints(eq=burgers_residual(model_b, pts), ineq=model_b(grid).squeeze(-1) - 100.0),
            )
        )
        assert isinstance(cons, sqpoptim.Constraints) and cons.ineq.shape == (20,) and not cons.eq.requires_grad
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    assert opt_b.diagnostics()["active_inequalities"] == 0


@pytest.mark.parametrize("name", FIXED)
def test_constraints_with_equalities_only_is_the_equality_path_bit_for_bit(name):
    model_a, model_b = TinyPINN(seed=2), TinyPINN(seed=2)
    pts = torch.tensor([[0.1, 0.5], [0.7, 0.2]], dtype=f64)
    X = torch.rand(16, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    opt_a, opt_b = SMALL_LR[name](model_a.parameters()), SMALL_LR[name](model_b.parameters())
    for _ in range(4):
        opt_a.step(lambda: ((model_a(X) ** 2).mean(), burgers_residual(model_a, pts)))
        opt_b.step(lambda: ((model_b(X) ** 2).mean(), sqpoptim.Constraints(eq=burgers_residual(model_b, pts))))
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_jacobians_given_formed_or_mixed_agree():
    """eq_jac / ineq_jac given, formed by autograd, or one of each: the same step (PointwiseConstraints too)."""
    pts = torch.tensor([[0.2, 0.3], [0.6, 0.4]], dtype=f64)
    grid = torch.rand(6, 2, dtype=f64, generator=torch.Generator().manual_seed(7))
    X = torch.rand(16, 2, dtype=f64, generator=torch.Generator().manual_seed(8))
    results = []
    for mode in ("autograd", "given", "mixed", "pointwise"):
        model = TinyPINN(seed=3)
        params = list(model.parameters())
        opt = sqpoptim.ProjectedHeavyBallSQP(params, lr=0.05)

        def closure(model=model, params=params, mode=mode):
            loss = (model(X) ** 2).mean()
            ce, ci = burgers_residual(model, pts), -model(grid).squeeze(-1) - 0.1  # u >= -0.1 at the grid
            if mode == "autograd":
                return loss, sqpoptim.Constraints(eq=ce, ineq=ci)
            Je = torch.stack(
                [torch.cat([g.reshape(-1) for g in torch.autograd.grad(r, params, retain_graph=True)]) for r in ce]
            )
            if mode == "mixed":
                return loss, sqpoptim.Constraints(eq=ce.detach(), eq_jac=Je, ineq=ci)
            if mode == "pointwise":
                pc = sqpoptim.PointwiseConstraints(model, burgers_residual_pointwise, pts)
                return loss, sqpoptim.Constraints(eq=pc, ineq=ci)
            Ji = torch.stack(
                [torch.cat([g.reshape(-1) for g in torch.autograd.grad(r, params, retain_graph=True)]) for r in ci]
            )
            return loss, sqpoptim.Constraints(eq=ce.detach(), eq_jac=Je, ineq=ci.detach(), ineq_jac=Ji)

        for _ in range(3):
            opt.step(closure)
        results.append(torch.cat([p.detach().reshape(-1) for p in params]))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name", [*FIXED, "sqp-adaptive"])
def test_interrupted_and_resumed_run_gives_the_same_iterates(name):
    """The warm-start working sets are optimizer state: a run resumed from a (weights_only) checkpoint repeats
    the uninterrupted one bit for bit."""
    C, d, a, D, _, m_eq = projection_problem(seed=5)

    def run(steps, x, opt):
        for _ in range(steps):
            opt.step(closure_of(x, C, d, a, D, m_eq))

    x = torch.zeros(12, dtype=f64, requires_grad=True)
    opt = FACTORIES[name]([x])
    run(10, x, opt)
    reference = x.detach().clone()

    x2 = torch.zeros(12, dtype=f64, requires_grad=True)
    opt2 = FACTORIES[name]([x2])
    run(5, x2, opt2)
    assert opt2.state_dict()["state"]["global"]["inequality_active"].dtype == torch.bool
    buf = io.BytesIO()
    torch.save({"x": x2.detach(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    x3 = saved["x"].clone().requires_grad_(True)
    opt3 = FACTORIES[name]([x3])
    opt3.load_state_dict(saved["opt"])
    torch.testing.assert_close(opt3.global_state.inequality_active, opt2.global_state.inequality_active)
    run(5, x3, opt3)
    assert torch.equal(x3.detach(), reference)


@pytest.mark.parametrize("name", FIXED)
def test_float32(name):
    C, d, a, D, x_star, m_eq = projection_problem(seed=9)
    x = torch.zeros(12, dtype=torch.float32, requires_grad=True)
    opt = FACTORIES[name]([x])
    C32, d32, a32, D32 = (t.float() for t in (C, d, a, D))
    for _ in range(300):  # measured: 1e-3 after 30 (SQP) to 230 (Adam) steps
        opt.step(closure_of(x, C32, d32, a32, D32, m_eq))
    assert x.dtype == torch.float32
    assert (x.detach().double() - x_star).abs().max() < 1e-3
    r = C32 @ x.detach() - d32
    assert r[:m_eq].abs().max() < 1e-5 and r[m_eq:].max() < 1e-5


@pytest.mark.parametrize("name", FIXED)
def test_sync_free_mode_matches_exact_mode(name):
    """The fixed dual budget without host reads gives the exact mode's iterates where it converges (warm starts
    keep it converged after the first steps)."""
    C, d, a, D, _x_star, m_eq = projection_problem(seed=11)
    out = []
    for sync_free in (False, True):
        x = torch.zeros(12, dtype=f64, requires_grad=True)
        opt = FACTORIES[name]([x], sync_free=sync_free)
        for _ in range(40):
            opt.step(closure_of(x, C, d, a, D, m_eq))
        out.append(x.detach().clone())
        assert opt.diagnostics()["qp_converged"]
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("name", FIXED)
def test_non_finite_step_leaves_parameters_and_state_bit_identical(name, sync_free):
    C, d, a, D, _, m_eq = projection_problem(seed=12)
    x = torch.zeros(12, dtype=f64, requires_grad=True)
    opt = FACTORIES[name]([x], sync_free=sync_free)
    for _ in range(3):
        opt.step(closure_of(x, C, d, a, D, m_eq))
    x_before = x.detach().clone()
    state_before = copy.deepcopy(opt.state_dict())

    def bad():
        loss, cons = closure_of(x, C, d, a, D, m_eq)()
        return loss, sqpoptim.Constraints(eq=cons.eq, ineq=cons.ineq * float("nan"))

    if sync_free:
        opt.step(bad)
        with pytest.raises(FloatingPointError, match="constraint values"):
            opt.check_finite()
    else:
        with pytest.raises(FloatingPointError, match="constraint values"):
            opt.step(bad)
    assert torch.equal(x.detach(), x_before)
    after = opt.state_dict()
    for key in ("inequality_active", "step"):
        assert torch.equal(after["state"]["global"][key], state_before["state"]["global"][key])
    for k, v in state_before["state"].items():
        if k != "global":
            for name_, t in v.items():
                assert torch.equal(after["state"][k][name_], t)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_default_damping_leaves_the_inequality_step_undamped(name):
    """The default normal_damping damps the steps without inequalities only: with inequalities the iterates are
    those of normal_damping=None, bit for bit, and no damping state is kept."""
    C, d, a, D, _, m_eq = projection_problem(seed=15)
    xs = [torch.zeros(12, dtype=f64, requires_grad=True) for _ in range(2)]
    default = FACTORIES[name]([xs[0]])
    undamped = FACTORIES[name]([xs[1]], normal_damping=None)
    assert default.normal_damping == sqpoptim._damping.DEFAULT_NU0 or name == "sqp-adaptive"
    for _ in range(15):
        default.step(closure_of(xs[0], C, d, a, D, m_eq))
        undamped.step(closure_of(xs[1], C, d, a, D, m_eq))
    assert torch.equal(xs[0], xs[1]) and default.diagnostics()["active_inequalities"] >= 1
    assert default.global_state.damping is None and "damping" not in default.diagnostics()


def test_equality_steps_after_an_inequality_step_are_judged_afresh():
    """A closure that gives inequalities at some steps only: the damped equality steps around them keep ν, but
    the step after an inequality step is not judged against the model of the last damped step (which predicted
    a point the inequality step has moved away from); the one after it is judged again."""
    x = torch.ones(12, dtype=f64, requires_grad=True)
    a = torch.linspace(-1, 1, 12, dtype=f64)
    opt = sqpoptim.ProjectedHeavyBallSQP([x], lr=0.1)

    def sphere():
        return 0.5 * ((x - a) ** 2).sum(), (x @ x - 4.0).reshape(1)

    def with_bounds():
        return sphere()[0], sqpoptim.Constraints(eq=sphere()[1], ineq=x[:3] - 0.2)

    for _ in range(2):
        opt.step(sphere)
    assert 0.5 < opt.diagnostics()["damping_ratio"] < 1.0  # judged: the normal part dominates, ‖c‖ = 8 -> 1.3
    nu = opt.global_state.damping.nu.clone()
    opt.step(with_bounds)
    assert opt.global_state.damping.model is None and torch.equal(opt.global_state.damping.nu, nu)
    assert "damping" not in opt.diagnostics()
    opt.step(sphere)
    diag = opt.diagnostics()
    assert not diag["rejected"] and np.isnan(diag["damping_ratio"])  # not judged: no stale verdict
    opt.step(sphere)
    assert 0.5 < opt.diagnostics()["damping_ratio"] <= 1.0  # judged again from here


def test_refusals_leave_everything_unchanged():
    C, d, a, D, _, m_eq = projection_problem(seed=13)
    x = torch.zeros(12, dtype=f64, requires_grad=True)
    closure = closure_of(x, C, d, a, D, m_eq)
    for damped in (
        sqpoptim.ProjectedAdamSQP([x], lr=0.05, normal_damping=0.1),
        sqpoptim.ProjectedHeavyBallSQP([x], lr=0.05, normal_damping=1.0),
        sqpoptim.StochasticSQP([x], lr=0.05, normal_damping=1e-3),
    ):
        nu = damped.normal_damping
        with pytest.raises(ValueError, match=f"normal_damping={nu:g} is not available with inequality constraints"):
            damped.step(closure)
        assert (x == 0).all() and "global" not in damped.state_dict()["state"]
        assert all(not st for st in damped.state_dict()["state"].values())
    y = torch.zeros(6, dtype=f64, requires_grad=True)
    z = torch.zeros(6, dtype=f64, requires_grad=True)
    groups = sqpoptim.ProjectedHeavyBallSQP([{"params": [y], "normal_lr": 1.0}, {"params": [z], "normal_lr": 0.5}])

    def two():
        xx = torch.cat([y, z])
        r = C @ xx - d
        return 0.5 * (D * (xx - a) ** 2).sum(), sqpoptim.Constraints(eq=r[:m_eq], ineq=r[m_eq:])

    with pytest.raises(ValueError, match="one normal step size"):
        groups.step(two)
    assert (y == 0).all() and (z == 0).all() and "global" not in groups.state_dict()["state"]
    assert all((st["momentum_buffer"] == 0).all() for st in groups.state_dict()["state"].values())
    opt = sqpoptim.StochasticSQP([x], lr=0.1)
    with pytest.raises(ValueError, match="with Constraints, give the Jacobians"):
        opt.step(lambda: (x.sum(), sqpoptim.Constraints(ineq=x[:2]), torch.eye(2, 12, dtype=f64)))
    with pytest.raises(ValueError, match=r"Constraints.ineq_jac must be \[m, n\]"):
        opt.step(lambda: (x.sum(), sqpoptim.Constraints(ineq=x[:2], ineq_jac=torch.ones(2, dtype=f64))))
    with pytest.raises(ValueError, match=r"J must have shape \[m, n\] = \[2, 12\]"):
        opt.step(lambda: (x.sum(), sqpoptim.Constraints(ineq=x[:2], ineq_jac=torch.ones(2, 5, dtype=f64))))
    assert (x == 0).all()


@pytest.mark.parametrize("name", FIXED)
def test_inequality_steps_take_the_dense_solver_and_the_layer_factors(name):
    """solver="auto" takes the dense solver with inequalities; the Jacobian of pointwise bounds on a network's
    outputs comes from the per-sample layer factors, and the iterates are those of the explicit batched J."""
    X = torch.rand(24, 2, dtype=f64, generator=torch.Generator().manual_seed(5))
    Y = torch.sin(3 * X[:, :1])
    grid = torch.rand(40, 2, dtype=f64, generator=torch.Generator().manual_seed(6))
    runs = {}
    for jac in ("auto", "batched"):
        model = TinyPINN(seed=3)
        opt = FACTORIES[name](model.parameters(), jacobian=jac)

        def closure(model=model):  # an upper bound at 0.3 that the fit to sin(3x) must respect
            return ((model(X) - Y) ** 2).mean(), sqpoptim.Constraints(ineq=model(grid).squeeze(-1) - 0.3)

        active = 0
        for _ in range(5):
            opt.step(closure)
            active = max(active, opt.diagnostics()["active_inequalities"])
        runs[jac] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.diagnostics(), active)
    (x_auto, d_auto, active), (x_batched, d_batched, _) = runs["auto"], runs["batched"]
    assert d_auto["solver"] == d_batched["solver"] == "dense"
    assert d_auto["jacobian"] == "layers" and d_batched["jacobian"] == "batched"
    assert active >= 1  # the bound binds at some step: the QP, not the equality step, was taken
    torch.testing.assert_close(x_auto, x_batched, rtol=1e-10, atol=1e-10)


def test_matrix_free_solver_with_inequalities_is_refused_before_anything_changes():
    C, d, a, D, _, m_eq = projection_problem(seed=14)
    x = torch.zeros(12, dtype=f64, requires_grad=True)
    for opt in (  # (undamped: the damped matrix-free normal step needs row norms the autograd operator lacks)
        sqpoptim.StochasticSQP([x], lr=0.1, solver="krylov", normal_damping=None),
        sqpoptim.ProjectedHeavyBallSQP([x], lr=0.1, solver="krylov", normal_damping=None),
        sqpoptim.ProjectedAdamSQP([x], lr=0.1, solver="krylov", normal_damping=None),
    ):
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(ValueError, match=r"solver='krylov' \(matrix-free\) is not available with inequality"):
            opt.step(closure_of(x, C, d, a, D, m_eq))
        assert (x == 0).all() and opt.state_dict() == before
        opt.step(lambda: (0.5 * ((x - a) ** 2).sum(), C[:m_eq] @ x - d[:m_eq]))  # equalities: matrix-free as asked
        assert opt.diagnostics()["solver"] == "krylov"
        with torch.no_grad():
            x.zero_()
    with pytest.raises(ValueError, match="inequality constraints need the dense constraint solver"):
        from sqpoptim._jacobian_operator import DenseJacobian
        from sqpoptim._krylov import KrylovOptions
        from sqpoptim._krylov_solver import KrylovSolver

        sqpoptim.heavy_ball.heavy_ball_sqp_direction(
            a,
            C @ a - d,
            KrylovSolver(DenseJacobian(C), KrylovOptions(), {}),
            torch.zeros(12, dtype=f64),
            lr=0.1,
            momentum=0.0,
            normal_lr=1.0,
            rank_tol=1e-7,
            num_ineq=C.shape[0] - m_eq,
        )


def test_more_inequalities_than_parameters_and_zero_gradient_rows():
    """Box constraints on 3 parameters plus 10 extra half-spaces (m > n is fine for inequalities); a satisfied
    inequality with a zero gradient is harmless, a violated one is refused with the usual message."""
    x = torch.zeros(3, dtype=f64, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(10, 3, generator=gen, dtype=f64)
    opt = sqpoptim.StochasticSQP([x], lr=0.5)

    def closure(shift=-1.0):
        ineq = torch.cat([x - 1, -1 - x, A @ x - 2, (0 * x.sum() + shift).reshape(1)])
        return ((x - torch.tensor([3.0, -3.0, 0.5], dtype=f64)) ** 2).sum(), sqpoptim.Constraints(ineq=ineq)

    for _ in range(60):
        opt.step(closure)
    d, _ = qp_reference(
        np.vstack([np.eye(3), -np.eye(3), A.numpy()]),
        np.r_[-np.ones(6), -2 * np.ones(10)],
        np.array([3.0, -3.0, 0.5]),
        0,
    )
    np.testing.assert_allclose(x.detach().numpy(), d, atol=1e-9)
    with pytest.raises(ValueError, match=r"constraint\(s\) \[16\] cannot be reduced"):
        opt.step(lambda: closure(shift=1.0))


def test_infeasible_constraints_take_elastic_steps():
    """x <= -1 and x >= 1: no exception; the iterate settles at the least-squares compromise x = 0 and the
    diagnostics say the steps were elastic."""
    x = torch.tensor([0.7, 0.2], dtype=f64, requires_grad=True)
    for opt in (sqpoptim.StochasticSQP([x], lr=0.3), sqpoptim.ProjectedAdamSQP([x], lr=0.05)):
        with pytest.warns(sqpoptim.InfeasibilityWarning, match="may be infeasible"):
            for _ in range(100):
                opt.step(lambda: (((x - 3) ** 2).sum(), sqpoptim.Constraints(ineq=torch.stack([x[0] + 1, 1 - x[0]]))))
        diag = opt.diagnostics()
        assert diag["elastic"] and diag["ineq_violation"] == pytest.approx(1.0, abs=1e-5)
        assert abs(x[0].item()) < 1e-4  # ... while the free coordinate follows the objective
        assert x[1].item() == pytest.approx(3.0, abs=1e-3)


def test_multipliers_of_an_active_bound():
    """min (x-2)² s.t. x <= 1: the multiplier of the bound is 2 (∇f + λ∇c = 0 at x = 1)."""
    x = torch.zeros(1, dtype=f64, requires_grad=True)
    for opt in (sqpoptim.StochasticSQP([x], lr=0.25), sqpoptim.ProjectedHeavyBallSQP([x], lr=0.25)):
        with torch.no_grad():
            x.zero_()
        for _ in range(80):
            opt.step(lambda: (((x - 2) ** 2).sum(), sqpoptim.Constraints(ineq=x - 1)))
        assert x.item() == pytest.approx(1.0, abs=1e-12)
        assert opt.multipliers.item() == pytest.approx(2.0, rel=1e-6)


# ---------------------------------------------------------------- baselines


def test_penalty_with_inequalities_matches_its_closed_form():
    """f = (x-2)² with x <= 1 and 0.5 x = 0: Adam on (x-2)² + ρ/2 (max(0, x-1)² + 0) settles at x = (4+ρ)/(2+ρ);
    a satisfied inequality (y <= 1 at y = 0.5) adds nothing."""
    rho = 10.0
    x = torch.zeros(2, dtype=f64, requires_grad=True)
    opt = sqpoptim.PenaltyAdam([x], lr=0.05, rho=rho)
    for _ in range(1000):
        loss, cons = opt.step(
            lambda: ((x[0] - 2) ** 2 + (x[1] - 0.5) ** 2, sqpoptim.Constraints(ineq=torch.stack([x[0] - 1, x[1] - 1])))
        )
    assert isinstance(cons, sqpoptim.Constraints) and cons.ineq.shape == (2,)
    torch.testing.assert_close(x.detach(), torch.tensor([(4 + rho) / (2 + rho), 0.5], dtype=f64), atol=1e-4, rtol=0)
    penalized = opt.diagnostics()["penalized_loss"]
    assert penalized == pytest.approx(loss.item() + 0.5 * rho * max(0.0, x[0].item() - 1) ** 2, rel=1e-3)


def test_primal_dual_keeps_inequality_multipliers_nonnegative():
    """min (x-2)² + (y-0.5)² s.t. x <= 1 (active, λ = 2) and y <= 1 (inactive, λ = 0)."""
    x = torch.zeros(2, dtype=f64, requires_grad=True)
    opt = sqpoptim.PrimalDual([x], lr=0.1, dual_lr=0.5, inner=torch.optim.SGD)
    lams = []
    for _ in range(600):
        opt.step(
            lambda: ((x[0] - 2) ** 2 + (x[1] - 0.5) ** 2, sqpoptim.Constraints(ineq=torch.stack([x[0] - 1, x[1] - 1])))
        )
        lams.append(opt.multipliers.clone())
    assert min(lam.min().item() for lam in lams) >= 0.0
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, 0.5], dtype=f64), atol=1e-8, rtol=0)
    torch.testing.assert_close(opt.multipliers, torch.tensor([2.0, 0.0], dtype=f64), atol=1e-7, rtol=0)


# ---------------------------------------------------------------- CUDA (run only where a GPU is present)


def _network_closure(model, device):
    X = torch.rand(32, 2, dtype=f64, generator=torch.Generator().manual_seed(3)).to(device)
    Y = torch.sin(2 * X[:, :1])
    pts = torch.tensor([[0.2, 0.3], [0.6, 0.4]], dtype=f64, device=device)
    grid = torch.rand(12, 2, dtype=f64, generator=torch.Generator().manual_seed(4)).to(device)

    def closure():  # u >= 0.2 on a grid: active from the start for this initialisation
        ineq = 0.2 - model(grid).squeeze(-1)
        return ((model(X) - Y) ** 2).mean(), sqpoptim.Constraints(eq=burgers_residual(model, pts), ineq=ineq)

    return closure


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SMALL_LR))
def test_cuda_matches_cpu_with_inequalities(name):
    out = {}
    for device in ("cpu", "cuda"):
        model = TinyPINN(seed=5).to(device)
        opt = SMALL_LR[name](model.parameters())
        for _ in range(5):
            opt.step(_network_closure(model, device))
        assert opt.diagnostics()["active_inequalities"] > 0
        out[device] = torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-9, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SMALL_LR))
def test_cuda_step_with_inequalities_never_synchronises(name):
    model = TinyPINN(seed=6).to("cuda")
    opt = SMALL_LR[name](model.parameters())
    closure = _network_closure(model, "cuda")
    opt.step(closure)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.global_state.inequality_active.device.type == "cuda"
